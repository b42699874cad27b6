"""Megatron-Core parallel layouts on CPU/gloo reproduce the single-rank loss and gradients.

Every layout loads the same full (TP1/PP1) weights, runs the same microbatches through Megatron's own
pipeline schedule, DDP and ``finalize_model_grads`` (per-token loss normalisation), and the gathered
gradients are compared with a single-rank reference.
"""
from __future__ import annotations

import pytest
import torch

from redi_megatron.models.config import ModelConfig, ParallelConfig
from redi_megatron.testing.distributed import run_distributed

MODEL = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, vocab_size=256)
SEQ, BATCH, MICROBATCHES = 16, 2, 2


def _microbatches(n: int, packed: bool) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ), generator=g)
        if packed:  # two sequences per row with uneven lengths, then padding
            seq_ids = torch.tensor([[0] * 5 + [1] * 9 + [-1] * 2, [2] * 11 + [3] * 3 + [-1] * 2])
        else:
            seq_ids = torch.arange(BATCH)[:, None].expand(BATCH, SEQ).clone()
        labels = torch.roll(tokens, -1, dims=1)
        mask = ((seq_ids >= 0) & (seq_ids == torch.roll(seq_ids, -1, dims=1))).float()
        mask[:, -1] = 0
        mask[:, :2] = 0  # a "prompt" that is not trained on
        out.append(dict(tokens=tokens, labels=labels, loss_mask=mask, seq_ids=seq_ids,
                        position_ids=torch.arange(SEQ).expand(BATCH, SEQ).clone()))
    return out


def _step(parallel: ParallelConfig, full_sd: dict, microbatches: list[dict], packed: bool):
    """Runs on every rank: one forward/backward through Megatron's schedule; returns loss and grads."""
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from redi_megatron.models.builder import build_model_chunks
    from redi_megatron.models.cpu_attention import packed_attention_mask
    from redi_megatron.models.sharding import load_full_state_dict
    from redi_megatron.parallel.context import split_for_cp
    from redi_megatron.parallel.params import gather_stage_tensors
    from redi_megatron.parallel.state import groups

    g = groups()
    dp_rank, dp_size = g.rank(g.dp), g.size(g.dp)
    per_rank = len(microbatches) // dp_size
    mine = microbatches[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    chunks = build_model_chunks(MODEL, parallel)
    wrapped = []
    for chunk in chunks:
        load_full_state_dict(chunk, full_sd, g.rank(g.tp), g.size(g.tp))
        ddp = DistributedDataParallel(config=chunk.config, module=chunk,
                                      ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
        wrapped.append(ddp)
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        tokens, labels, mask, pos = (split_for_cp(mb[k], g.cp) for k in
                                     ("tokens", "labels", "loss_mask", "position_ids"))
        attn = packed_attention_mask(mb["seq_ids"]) if packed else None
        logits = model(tokens, pos, attn)

        def loss_func(output):
            ce = tensor_parallel.vocab_parallel_cross_entropy(output.float().transpose(0, 1).contiguous(),
                                                              labels.t().contiguous()).t()
            loss = (ce * mask).sum()
            return loss, mask.sum().to(torch.int), {"loss_sum": loss.detach().clone()}

        return logits, loss_func

    iters = [iter(mine) for _ in wrapped]
    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters if len(iters) > 1 else iters[0],
        model=wrapped if len(wrapped) > 1 else wrapped[0], num_microbatches=len(mine),
        seq_length=SEQ // parallel.cp, micro_batch_size=BATCH, forward_only=False)
    loss = sum(d["loss_sum"] for d in out) if out else None
    grads = gather_stage_tensors(wrapped, g.tp, select=lambda p: p.main_grad)
    return {"loss": loss, "grads": grads, "tp_rank": g.rank(g.tp)}


def _init_full_state_dict():
    from redi_megatron.models.builder import build_gpt_model
    from redi_megatron.parallel.params import gather_stage_tensors

    torch.manual_seed(0)
    model = build_gpt_model(MODEL, ParallelConfig())
    return gather_stage_tensors([model], None)


@pytest.fixture(scope="module")
def reference():
    full_sd = run_distributed(_init_full_state_dict, 1)[0]
    results = {}
    for packed in (False, True):
        mbs = _microbatches(2 * MICROBATCHES, packed)
        results[packed] = (mbs, run_distributed(_step, 1, args=(ParallelConfig(), full_sd, mbs, packed))[0])
    return full_sd, results


def _merge(results: list[dict]) -> tuple[torch.Tensor, dict]:
    """Token-loss sum over DP and CP ranks (TP ranks repeat it), union of gathered grads over stages."""
    losses = [r["loss"] for r in results if r["loss"] is not None and r["tp_rank"] == 0]
    assert losses, "no rank reported a loss"
    total = sum(losses)  # DP ranks hold their own microbatches, CP ranks their own tokens
    grads: dict = {}
    for r in results:
        grads.update(r["grads"])
    return total, grads


@pytest.mark.parametrize("name,world,parallel,packed", [
    ("tp2", 2, ParallelConfig(tp=2), False),
    ("pp2", 2, ParallelConfig(pp=2), False),
    ("cp2", 2, ParallelConfig(cp=2), False),
    ("cp2_packed", 2, ParallelConfig(cp=2), True),
    ("dp2", 2, ParallelConfig(), False),
    ("tp2_sp", 2, ParallelConfig(tp=2, sequence_parallel=True), True),
    ("pp2_vpp2", 2, ParallelConfig(pp=2, vpp=2), False),
    ("tp2_pp2_cp2_sp", 8, ParallelConfig(tp=2, pp=2, cp=2, sequence_parallel=True), True),
])
def test_layout_matches_single_rank(reference, name, world, parallel, packed):
    full_sd, ref = reference
    mbs, ref_out = ref[packed]
    dp = world // (parallel.tp * parallel.pp * parallel.cp)
    if dp == 1:
        # Without DP the reference ran 2x the microbatches; compare against a matching single-rank run.
        mbs = mbs[:MICROBATCHES]
        ref_out = run_distributed(_step, 1, args=(ParallelConfig(), full_sd, mbs, packed))[0]
    results = run_distributed(_step, world, tp=parallel.tp, pp=parallel.pp, cp=parallel.cp,
                              vpp=parallel.vpp, args=(parallel, full_sd, mbs, packed), timeout=240)
    total, grads = _merge(results)
    torch.testing.assert_close(total, ref_out["loss"], rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_out["grads"].keys()
    for key, ref_grad in ref_out["grads"].items():
        assert ref_grad.abs().max() > 0, key
        torch.testing.assert_close(grads[key], ref_grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_packed_rows_equal_separate_sequences():
    """Block-diagonal masking makes a packed row compute exactly what separate rows compute."""
    def run():
        from redi_megatron.models.builder import build_gpt_model
        from redi_megatron.models.cpu_attention import packed_attention_mask

        torch.manual_seed(0)
        model = build_gpt_model(MODEL, ParallelConfig()).eval()
        a, b = torch.randint(0, 256, (1, 6)), torch.randint(0, 256, (1, 10))
        row = torch.cat([a, b], dim=1)
        seq_ids = torch.tensor([[0] * 6 + [1] * 10])
        with torch.no_grad():
            packed = model(row, torch.arange(16)[None], packed_attention_mask(seq_ids))
            sep_a = model(a, torch.arange(6)[None], None)
            sep_b = model(b, torch.arange(10)[None], None)
        return packed, torch.cat([sep_a, sep_b], dim=1)

    packed, separate = run_distributed(run, 1)[0]
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)
