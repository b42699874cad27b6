"""Packed (THD) rows through every parallel layout reproduce an unsharded, unpacked reference.

Each layout loads the same full weights and runs the trainer's own path (``training.step.run_schedule``:
device placement, ``models.inputs`` THD params, ``THDCoreAttention``, ``parallel.loss_scaling``) through
Megatron's schedules, DDP and ``finalize_model_grads`` on packed rows of several sequences. The
reference runs every sequence *alone* through a plain single-process model and writes the losses from
their formulas with one global denominator, so a wrong CP partition, a sequence leaking into its
neighbour, a wrong per-sequence reduction or a wrong normaliser (sums instead of means) all show up
in the loss or in the gradients. Pair losses: every sequence is split over the CP ranks (2*CP chunks
each), so each pair's log-probs are assembled from all CP ranks. SFT goes through Megatron's output
layer and logits, REDI through the fused output head (``parallel.fused_logprobs``, tied embeddings), so
both heads are checked in every layout.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from redi_megatron.data.batch import ROLE_CHOSEN, ROLE_REJECTED, ROLE_SFT, SequenceSpec, build_microbatch
from redi_megatron.models.config import ModelConfig, ParallelConfig
from redi_megatron.testing.distributed import run_distributed

MODEL = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, vocab_size=256)
# Qwen3: per-head q/k RMSNorm (its weight grads are partial per TP rank), head_dim 32 != 64/4, no qkv bias.
# Llama 3.2: llama3 RoPE scaling with 3.2's values, tied embeddings, no bias.
MODELS = {
    "qwen2": MODEL,
    "qwen3": ModelConfig(family="qwen3", num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                         num_query_groups=2, kv_channels=32, vocab_size=256, add_qkv_bias=False, qk_layernorm=True,
                         rope_theta=1e6),
    "llama3": ModelConfig(family="llama", num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                          num_query_groups=2, vocab_size=256, add_qkv_bias=False, rope_theta=500000.0,
                          rope_type="llama3", rope_scaling_factor=32.0, norm_eps=1e-5),
}
ROW, MULTIPLE = 128, 16          # 16 = 2*CP*TP for the largest layout (TP2 + SP, CP4)
MB_PER_DP = 2                    # a multiple of PP, as the interleaved schedule needs
ALPHA = 0.8


def _sequences(seed: int, loss: str) -> list[SequenceSpec]:
    """Four sequences of uneven lengths (5..28 tokens, so padded to 16 or 32) for one packed row."""
    rng = np.random.default_rng(seed)
    roles = [ROLE_SFT] * 4 if loss == "sft" else [ROLE_CHOSEN, ROLE_REJECTED] * 2
    out = []
    for i, role in enumerate(roles):
        length = int(rng.integers(5, 29))
        sample = seed * 10 + (i if loss == "sft" else i // 2)
        out.append(SequenceSpec(rng.integers(0, MODEL.vocab_size, length), int(rng.integers(1, 4)), role, sample))
    return out


def _global_batch(loss: str, dp: int) -> list[list[SequenceSpec]]:
    return [_sequences(100 * (loss == "redi") + i, loss) for i in range(MB_PER_DP * dp)]


def _schedule_rank(parallel: ParallelConfig, full_sd: dict, model: ModelConfig = MODEL) -> dict:
    """Every rank: one forward/backward per loss through the trainer's schedule; loss and full grads."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from redi_megatron.losses import get_loss
    from redi_megatron.models.builder import build_model_chunks
    from redi_megatron.models.output_head import return_hidden_states
    from redi_megatron.models.sharding import load_full_state_dict
    from redi_megatron.parallel.loss_scaling import make_loss_func, reduce_step_metrics
    from redi_megatron.parallel.state import groups
    from redi_megatron.testing.params import gather_stage_tensors
    from redi_megatron.training.step import run_schedule

    g = groups()
    dp_rank, dp_size = g.rank(g.dp), g.size(g.dp)
    chunks = build_model_chunks(model, parallel)
    wrapped = []
    for chunk in chunks:
        load_full_state_dict(chunk, full_sd, g.rank(g.tp), g.size(g.tp))
        wrapped.append(DistributedDataParallel(config=chunk.config, module=chunk,
                                               ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True)))
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    out = {}
    for loss in ("sft", "redi"):
        spec = get_loss(loss)
        hp = spec.make_hparams({"alpha": ALPHA} if loss == "redi" else {})
        mine = _global_batch(loss, dp_size)[dp_rank * MB_PER_DP:(dp_rank + 1) * MB_PER_DP]
        mbs = [build_microbatch(seqs, ROW, pad_id=0, pad_to_multiple_of=MULTIPLE) for seqs in mine]
        for m in wrapped:
            m.zero_grad_buffer()
        if loss == "redi":  # SFT runs Megatron's output layer on logits, REDI the fused head on hidden states
            for chunk in chunks:
                return_hidden_states(chunk)
        metrics = run_schedule(wrapped, mbs, g, lambda mb, head: make_loss_func(spec, hp, mb, g, chunk_size=7,
                                                                                head=head), forward_only=False)
        out[loss] = {"loss": reduce_step_metrics(metrics, g)["loss"],
                     "grads": gather_stage_tensors(wrapped, g.tp, select=lambda p: p.main_grad)}
    return out


def _reference_rank(full_sd: dict, dp: int, cfg: ModelConfig = MODEL) -> dict:
    """One process, no packing: every sequence alone through the model; losses from their formulas."""
    from redi_megatron.models.builder import build_gpt_model
    from redi_megatron.models.inputs import model_inputs
    from redi_megatron.models.sharding import load_full_state_dict
    from redi_megatron.parallel.state import groups

    model = build_gpt_model(cfg, ParallelConfig())
    load_full_state_dict(model, full_sd, 0, 1)
    out = {}
    for loss in ("sft", "redi"):
        model.zero_grad()
        seq_logps, lengths, roles = [], [], []
        for seqs in _global_batch(loss, dp):
            for s in seqs:
                alone = build_microbatch([s], s.length, pad_id=0)
                logits = model(**model_inputs(alone, groups()))[0].float()
                tok = torch.log_softmax(logits, -1).gather(-1, alone.labels[0, :, None])[:, 0]
                seq_logps.append((tok * alone.loss_mask[0]).sum())
                lengths.append(s.num_loss_tokens)
                roles.append(s.role)
        if loss == "sft":
            value = -torch.stack(seq_logps).sum() / sum(lengths)
        else:  # sequences come as chosen, rejected, chosen, rejected, ...
            terms = [-seq_logps[i] / lengths[i] + ALPHA * seq_logps[i + 1] / lengths[i + 1]
                     for i in range(0, len(roles), 2)]
            value = torch.stack(terms).sum() / len(terms)
        value.backward()
        out[loss] = {"loss": float(value.detach()),
                     "grads": {k: p.grad.clone() for k, p in _named(model).items()}}
    return out


def _named(model) -> dict:
    from redi_megatron.models.sharding import global_names

    names = global_names(model)
    return {names[n]: p for n, p in model.named_parameters()}


def _init_full_state_dict(cfg: ModelConfig = MODEL):
    from redi_megatron.models.builder import build_gpt_model
    from redi_megatron.testing.params import gather_stage_tensors

    torch.manual_seed(0)
    full = gather_stage_tensors([build_gpt_model(cfg, ParallelConfig())], None)
    g = torch.Generator().manual_seed(1)
    for name, t in full.items():  # norms start at 1: perturb them so a q/k norm mix-up shows
        if "layernorm" in name or "norm" in name.rsplit(".", 2)[0]:
            t.add_(0.1 * torch.randn(t.shape, generator=g))
    return full


_references: dict = {}


@pytest.fixture(scope="module")
def reference():
    def get(family: str):
        if family not in _references:
            cfg = MODELS[family]
            full_sd = run_distributed(_init_full_state_dict, 1, args=(cfg,))[0]
            _references[family] = full_sd, {dp: run_distributed(_reference_rank, 1, args=(full_sd, dp, cfg))[0]
                                            for dp in (1, 2)}
        return _references[family]
    return get


LAYOUTS = [
    ("tp2", 2, ParallelConfig(tp=2)),
    ("pp2", 2, ParallelConfig(pp=2)),
    ("dp2", 2, ParallelConfig()),
    ("cp2", 2, ParallelConfig(cp=2)),
    ("tp2_sp", 2, ParallelConfig(tp=2, sequence_parallel=True)),
    ("pp2_vpp2", 2, ParallelConfig(pp=2, vpp=2)),
    ("cp4", 4, ParallelConfig(cp=4)),
    ("tp2_cp2_sp", 4, ParallelConfig(tp=2, cp=2, sequence_parallel=True)),
    ("pp2_vpp2_cp2", 4, ParallelConfig(pp=2, vpp=2, cp=2)),
    ("tp2_cp4_sp", 8, ParallelConfig(tp=2, cp=4, sequence_parallel=True)),
    ("tp2_pp2_cp2_sp", 8, ParallelConfig(tp=2, pp=2, cp=2, sequence_parallel=True)),
]


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("name,world,parallel", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_packed_layout_matches_unpacked_single_rank(reference, name, world, parallel, family):
    full_sd, refs = reference(family)
    dp = world // (parallel.tp * parallel.pp * parallel.cp)
    results = run_distributed(_schedule_rank, world, tp=parallel.tp, pp=parallel.pp, cp=parallel.cp,
                              vpp=parallel.vpp, args=(parallel, full_sd, MODELS[family]), timeout=240)
    for loss in ("sft", "redi"):
        ref = refs[dp][loss]
        grads: dict = {}
        for r in results:
            assert abs(r[loss]["loss"] - ref["loss"]) < 1e-5, (loss, r[loss]["loss"], ref["loss"])
            grads.update(r[loss]["grads"])
        assert grads.keys() == ref["grads"].keys()
        for key, ref_grad in ref["grads"].items():
            assert ref_grad.abs().max() > 0, key
            torch.testing.assert_close(grads[key], ref_grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{loss} {key}: {m}")
