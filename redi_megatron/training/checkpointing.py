"""Training checkpoints: model + optimizer (dist_checkpointing) + scheduler, sampler, config, RNG.

``<save_dir>/checkpoints/step_0000100/`` is a model checkpoint directory (``redi_megatron.models.
checkpoint``: loadable by ``redi-megatron-to-hf`` and as ``checkpoint.init_from`` of the next stage)
with an ``optimizer/`` tree and the trainer state in ``redi_meta.json``. Writes are atomic (a partial
directory renamed into place), so a run killed mid-save resumes from the previous checkpoint.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from redi_megatron.errors import SharedError, UserError
from redi_megatron.parallel.collectives import barrier, broadcast_object, count_over_world, is_global_rank_zero

_STEP_DIR = re.compile(r"^step_(\d{7})$")


def checkpoints_dir(save_dir: str) -> Path:
    return Path(save_dir) / "checkpoints"


def step_dir(save_dir: str, step: int) -> Path:
    return checkpoints_dir(save_dir) / f"step_{step:07d}"


def list_checkpoints(save_dir: str) -> list[tuple[int, Path]]:
    """Complete checkpoints (their meta file exists) in step order."""
    root = checkpoints_dir(save_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and (entry / "redi_meta.json").is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(save_dir: str) -> Optional[Path]:
    found = list_checkpoints(save_dir)
    return found[-1][1] if found else None


def _optimizer_sharded(c, model_sd: dict, is_loading: bool) -> dict:
    # "fully_reshardable": the default "fully_sharded_model_space" builds flattened-range tensors that
    # megatron-core 0.16's own dist_checkpointing refuses; this format also reshards across layouts.
    return c.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                          metadata={"distrib_optim_sharding_type": "fully_reshardable"})


def save_training_checkpoint(c, step: int, sampler_state: dict, resolved_cfg: dict,
                             monitor_state: Optional[dict] = None) -> Path:
    """Save everything needed to continue exactly after ``step`` optimizer steps. Collective."""
    from redi_megatron.models.checkpoint import model_sharded_state_dict, save_model_checkpoint

    out = step_dir(c.cfg.checkpoint.save_dir, step)
    _check_finite(c, step)
    model_sd = model_sharded_state_dict(c.chunks)
    meta = {"trainer": {"step": step, "sampler": sampler_state, "scheduler": c.scheduler.state_dict(),
                        "cpu_rng_state": torch.get_rng_state().tolist(),
                        "collapse_monitor": monitor_state},
            "run_config": resolved_cfg, "source": "redi-train"}
    save_model_checkpoint(c.chunks, c.model_cfg, out, tokenizer_dir=c.tokenizer_dir, extra_meta=meta,
                          extra_sharded={"optimizer": _optimizer_sharded(c, model_sd, False)})
    if is_global_rank_zero():
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(resolved_cfg, sort_keys=False))
        _prune(c.cfg.checkpoint.save_dir, c.cfg.checkpoint.keep_last)
    barrier()
    return out


def _check_finite(c, step: int) -> None:
    """RuntimeError, on every rank, if any rank's weights hold NaN/inf: such a checkpoint is never written
    (it would become the newest, the one a rerun resumes from, and pruning would drop the good ones)."""
    bad = any(not bool(torch.isfinite(p).all()) for chunk in c.chunks for p in chunk.parameters())
    ranks = count_over_world(bad)
    if ranks:
        raise RuntimeError(f"step {step}: weights hold NaN/inf on {ranks} rank(s); no checkpoint written")


def _prune(save_dir: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(save_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def load_training_checkpoint(c, path: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from ``path``; returns the trainer state dict."""
    from redi_megatron.models.checkpoint import load_extra_sharded, load_model_checkpoint, model_sharded_state_dict

    meta = load_model_checkpoint(c.chunks, path, trust_unverified=c.cfg.checkpoint.trust_unverified)
    if "trainer" not in meta:
        raise UserError(f"{path} is a model checkpoint without trainer state; use it as "
                         f"checkpoint.init_from instead of resuming from it")
    # Without apex/TE the optimizer can only describe its state once it has some: give it placeholder
    # state (megatron's own helper: one step on zero gradients), which the load then overwrites.
    for opt in getattr(c.optimizer, "chained_optimizers", [c.optimizer]):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is not None:
            init()
    state = load_extra_sharded(path, "optimizer", _optimizer_sharded(c, model_sharded_state_dict(c.chunks), True),
                               trust_unverified=c.cfg.checkpoint.trust_unverified)
    c.optimizer.load_state_dict(state)
    trainer = meta["trainer"]
    c.scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(torch.tensor(trainer["cpu_rng_state"], dtype=torch.uint8))
    return trainer


def find_resume_point(save_dir: str, resume: bool, on_corrupt: str = "fallback",
                      trust_unverified: bool = False) -> Optional[Path]:
    """The checkpoint to resume from (same answer on every rank), or None to start fresh.

    The newest checkpoint is verified against its manifest first. A damaged one is reported by file;
    with ``on_corrupt="fallback"`` it is renamed ``<name>.damaged`` (kept, never deleted: its step can
    then be written again) and the previous one is tried; ``"refuse"`` raises instead.
    """
    if not resume:
        return None
    message = None
    if is_global_rank_zero():
        try:
            path = _newest_intact(save_dir, on_corrupt, trust_unverified)
        except UserError as e:
            path, message = None, str(e)
    else:
        path = None
    path, message = broadcast_object((None if path is None else str(path), message))
    if message is not None:
        raise SharedError(message)
    return None if path is None else Path(path)


def _newest_intact(save_dir: str, on_corrupt: str, trust_unverified: bool) -> Optional[Path]:
    from redi_megatron.models.manifest import verify_manifest

    for _, path in reversed(list_checkpoints(save_dir)):
        try:
            verify_manifest(path, trust_unverified)
            return path
        except UserError as err:
            if on_corrupt != "fallback":
                raise UserError(f"cannot resume: {err} (checkpoint.on_corrupt=refuse)") from None
            aside = path.with_name(path.name + ".damaged")
            n = 1
            while aside.exists():
                aside, n = path.with_name(f"{path.name}.damaged{n}"), n + 1
            path.rename(aside)
            print(f"redi-train: {err}; set it aside as {aside.name} and trying the previous checkpoint",
                  flush=True)
    return None


def ensure_run_dir(save_dir: str) -> None:
    if is_global_rank_zero():
        os.makedirs(save_dir, exist_ok=True)
    barrier()
