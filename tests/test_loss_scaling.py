"""Pin Megatron-Core's loss-scaling contract (redi_megatron/parallel/loss_scaling.py) with Megatron's own code.

1. ``forward_step_calc_loss`` with our 3-tuple: unscaled with ``calculate_per_token_loss``, divided by the
   normaliser and the microbatch count without it; nothing on a non-last stage.
2. The whole 1F1B pipeline schedule + Megatron DDP + ``finalize_model_grads`` on a trivial 2-stage torch
   model (PP2 x CP2 x DP2, 8 ranks), for a "tokens" loss (SFT) and a "pairs" loss (REDI): the gradients
   equal those of the global-batch mean computed on one process, the normaliser reaches the first stage,
   and ``reduce_step_metrics`` gives every pipeline rank the reference loss.
A Megatron upgrade that changes any of this fails here.
"""
from __future__ import annotations

import pytest
import torch

from redi_megatron.losses import get_loss
from redi_megatron.parallel.loss_scaling import MEGATRON_CONFIG_OVERRIDES, make_loss_func, validate_megatron_config
from redi_megatron.parallel.state import ParallelGroups
from redi_megatron.testing.distributed import run_distributed

from loss_references import VOCAB, isclose, make_microbatch, ref_loss

HIDDEN, MICROBATCHES, DP = 8, 2, 2
CASES = [("sft", {}, "packed"), ("redi", {"alpha": 0.8, "neg_weighting_gamma": 0.3}, "packed")]


def _config(**kw):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=1,
                             use_cpu_initialization=True, pipeline_dtype=torch.float32, **kw)


def _one_loss_func():
    spec = get_loss("redi")
    mb = make_microbatch(5, "pairs", "packed")
    logits = torch.randn(*mb.labels.shape, VOCAB)
    return make_loss_func(spec, spec.make_hparams({}), mb, ParallelGroups(None, None, None, None, None)), logits


@pytest.mark.parametrize("per_token", [True, False])
def test_forward_step_calc_loss_contract(per_token):
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss

    loss_func, logits = _one_loss_func()
    expect_sum, expect_norm, _ = loss_func(logits.clone())
    store: list = []
    out, num_tokens = forward_step_calc_loss(
        torch.nn.Identity(), logits.clone(), loss_func, _config(calculate_per_token_loss=per_token),
        vp_stage=None, collect_non_loss_data=False, num_microbatches=4, forward_data_store=store,
        cp_group_size=2, is_last_stage=True)
    assert int(num_tokens) == int(expect_norm) == 2 and num_tokens.dtype == torch.int32
    scale = 1.0 if per_token else 1.0 / (int(expect_norm) * 4)
    assert torch.allclose(out, expect_sum * scale)
    assert set(store[0]) >= {"loss", "accuracy", "margin", "num_pairs"}
    # The schedules accumulate normalisers into an int32 scalar in place: ours must be an integer.
    total = torch.zeros([], dtype=torch.int)
    total += num_tokens
    assert int(total) == 2


def test_forward_step_calc_loss_skips_non_last_stage():
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss

    calls = []
    out, num_tokens = forward_step_calc_loss(
        torch.nn.Identity(), torch.ones(3), lambda x: calls.append(x), _config(calculate_per_token_loss=True),
        vp_stage=None, collect_non_loss_data=False, num_microbatches=1, forward_data_store=[],
        cp_group_size=1, is_last_stage=False)
    assert not calls and int(num_tokens) == 0


def test_validate_megatron_config():
    validate_megatron_config(_config(**MEGATRON_CONFIG_OVERRIDES))
    with pytest.raises(ValueError, match="calculate_per_token_loss"):
        validate_megatron_config(_config(calculate_per_token_loss=False))


class _Stage(torch.nn.Module):
    """Stage 0: ``h = tanh(E[tokens] @ A)``; stage 1: ``logits = h @ W^T``. Activations are [S/CP, B, H]."""

    def __init__(self, stage: int, weights: dict):
        from megatron.core.enums import ModelType

        super().__init__()
        # What Megatron's schedule and finalize_model_grads look up on a GPT-like stage.
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = stage == 0, stage == 1
        self.share_embeddings_and_output_weights = False
        self.stage = stage
        self.weight = torch.nn.Parameter(weights["A" if stage == 0 else "W"].clone())
        self.embed = weights["E"]
        self.input_tensor = None

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    def forward(self, tokens):
        if self.stage == 0:
            return torch.tanh(self.embed[tokens.t()] @ self.weight)
        return (self.input_tensor @ self.weight.t()).transpose(0, 1)   # [B, S/CP, V], batch first


def _weights() -> dict:
    g = torch.Generator().manual_seed(11)
    return {"E": torch.randn(VOCAB, HIDDEN, generator=g), "A": torch.randn(HIDDEN, HIDDEN, generator=g) * 0.5,
            "W": torch.randn(VOCAB, HIDDEN, generator=g) * 0.5}


def _batches(case: int) -> list:
    name, _, layout = CASES[case]
    kind = "sft" if name == "sft" else "pairs"
    return [make_microbatch(300 + 10 * case + i, kind, layout) for i in range(MICROBATCHES * DP)]


def _reference(case: int) -> dict:
    name, hp, _ = CASES[case]
    w = {k: v.clone().requires_grad_(k != "E") for k, v in _weights().items()}
    parts = []
    for mb in _batches(case):
        logits = torch.tanh(w["E"][mb.tokens] @ w["A"]) @ w["W"].t()
        parts.append(ref_loss(name, get_loss(name).make_hparams(hp), logits, mb))
    norm = sum(p[1] for p in parts)
    loss = sum(p[0] for p in parts) / norm
    loss.backward()
    return {"loss": float(loss.detach()), "norm": norm, "A": w["A"].grad, "W": w["W"].grad}


def _schedule_rank() -> list[dict]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from redi_megatron.parallel.context import split_for_cp
    from redi_megatron.parallel.loss_scaling import reduce_step_metrics
    from redi_megatron.parallel.state import groups

    g = groups()
    stage, dp_rank = g.rank(g.pp), g.rank(g.dp)
    out = []
    for case, (name, hp, _) in enumerate(CASES):
        spec = get_loss(name)
        config = _config(pipeline_model_parallel_size=2, context_parallel_size=2, **MEGATRON_CONFIG_OVERRIDES)
        config.finalize_model_grads_func = finalize_model_grads
        model = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(),
                                        module=_Stage(stage, _weights()))
        config.no_sync_func = model.no_sync
        mine = _batches(case)[dp_rank * MICROBATCHES:(dp_rank + 1) * MICROBATCHES]
        seen_norms = []

        def forward_step(data_iterator, model_):
            mb = next(data_iterator)
            loss_func = make_loss_func(spec, spec.make_hparams(hp), mb, g)

            def recording_loss_func(logits):
                loss_sum, norm, metrics = loss_func(logits)
                seen_norms.append(int(norm))
                return loss_sum, norm, metrics
            return model_(split_for_cp(mb.tokens, g.cp, mb.cu_seqlens_padded)), recording_loss_func

        store = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mine), model=model,
            num_microbatches=MICROBATCHES, seq_length=mine[0].tokens.shape[1], micro_batch_size=1,
            forward_only=False)
        out.append({"stage": stage, "cp": g.rank(g.cp), "grad": model.module.weight.main_grad.clone(),
                    "norms": seen_norms, "metrics": reduce_step_metrics(store, g)})
    return out


def test_megatron_schedule_pp2_cp2_dp2_scales_by_global_normaliser():
    results = run_distributed(_schedule_rank, world_size=8, pp=2, cp=2)
    for case, (name, _, _) in enumerate(CASES):
        ref = _reference(case)
        last = [r[case] for r in results if r[case]["stage"] == 1]
        # Pairs are counted by CP rank 0 only; tokens by every CP rank; their total is the global count.
        assert sum(sum(r["norms"]) for r in last) == ref["norm"], name
        if name != "sft":
            assert all(sum(r["norms"]) == 0 for r in last if r["cp"] != 0)
        assert all(not r[case]["norms"] for r in results if r[case]["stage"] == 0)
        for r in results:
            res = r[case]
            expect = ref["A"] if res["stage"] == 0 else ref["W"]
            assert torch.allclose(res["grad"], expect, rtol=1e-5, atol=1e-6), (name, res["stage"])
            assert isclose(res["metrics"]["loss"], ref["loss"]), (name, res["metrics"], ref["loss"])
