"""DPO's offline reference: one forward-only pass of the frozen starting model over the pair data.

The result (``[num_pairs, 2]`` summed completion log-probs, chosen then rejected) is stored in the run
directory and attached to the dataset, so training never holds a second model in memory. A resumed run
reads the stored file instead of recomputing it (the model has moved on by then).
"""
from __future__ import annotations

import os

import numpy as np

from redi_megatron.data.batch import ROLE_CHOSEN, ROLE_REJECTED
from redi_megatron.data.tokenized import load_npy
from redi_megatron.errors import UserError
from redi_megatron.parallel.collectives import barrier, gather_objects_world, is_global_rank_zero
from redi_megatron.parallel.loss_scaling import make_sequence_logps_func
from redi_megatron.parallel.state import ParallelGroups
from redi_megatron.training.step import forward_only

REFERENCE_FILE = "reference_logps.npy"


def reference_logps(c, sampler) -> np.ndarray:
    """Reference log-probs for every pair of ``c.dataset``: loaded from the run dir or computed."""
    path = os.path.join(c.cfg.checkpoint.save_dir, REFERENCE_FILE)
    if os.path.isfile(path):
        values = load_npy(path, "delete it and rerun to recompute the reference log-probs")
        if values.shape != (len(c.dataset), 2):
            raise UserError(f"{path} has shape {values.shape}, the dataset has {len(c.dataset)} pairs")
        return values
    values = _compute(c, sampler)
    if is_global_rank_zero():
        np.save(path + ".partial.npy", values)
        os.replace(path + ".partial.npy", path)
    barrier()
    return values


def _compute(c, sampler) -> np.ndarray:
    from tqdm import tqdm

    g = c.groups
    records: list[tuple[int, int, float]] = []
    for step in tqdm(range(sampler.steps_per_epoch), desc="DPO reference log-probs",
                     disable=not is_global_rank_zero()):
        batch = sampler.build(sampler.plan(0, step))
        mbs = batch.microbatches
        outputs = forward_only(c, mbs, lambda mb, head: make_sequence_logps_func(
            mb, g, vocab_size=c.model_cfg.vocab_size, head=head))
        for mb, out in zip(mbs, outputs):
            for sid, role, logp in zip(mb.sample_ids.tolist(), mb.roles.tolist(), out["seq_logps"].tolist()):
                records.append((sid, role, logp))
    # Only one rank per DP replica reports: last pipeline stage, first TP and CP rank.
    last_stage = ParallelGroups.rank(g.pp) == ParallelGroups.size(g.pp) - 1
    reporter = last_stage and ParallelGroups.rank(g.tp) == 0 and ParallelGroups.rank(g.cp) == 0
    everything = gather_objects_world(records if reporter else [])
    values = np.full((len(c.dataset), 2), np.nan)
    for part in everything:
        for sid, role, logp in part:
            values[sid, 0 if role == ROLE_CHOSEN else 1] = logp
            assert role in (ROLE_CHOSEN, ROLE_REJECTED)
    missing = np.argwhere(np.isnan(values))
    if missing.size:
        raise RuntimeError(f"reference pass left {len(missing)} log-probs unset, e.g. sample {missing[0][0]}")
    return values

