"""Transformer Engine code paths checked without TE: names of the TE spec's tensors, FP8 padding, FP8
recipes, the fusion and ``cu_seqlens`` decisions. None of these tests imports TE; each checks the rule
our code applies under TE (a GPU run checks that TE agrees, docs/gpu.md)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from redi_megatron.convert.mappings import FAMILIES, Direct, megatron_index
from redi_megatron.models.config import ModelConfig
from redi_megatron.models.init import init_kind
from redi_megatron.models.param_names import TE_FUSED_NORMS, is_norm_weight, local_name, te_name

CFG = ModelConfig(num_layers=3)


def _names_of_both_specs(family, cfg):
    """{megatron name (local or TE spelling): HF name} from the converter's table."""
    out = {}
    for name, (m, layer) in megatron_index(family, cfg).items():
        hf = m.hf if isinstance(m, Direct) else m.hf[0]
        out[name] = hf.format(i=layer)
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tied", [True, False])
def test_init_treats_every_norm_of_both_specs_as_a_norm(family, tied):
    """The HF name says which tensors are RMSNorm gains; init must fill exactly those with ones, under
    either spec's spelling (main drew TE's ``layer_norm_weight`` from N(0, 0.02))."""
    names = _names_of_both_specs(FAMILIES[family], replace(CFG, family=family, tie_word_embeddings=tied))
    te_only = [n for n in names if n != local_name(n)]
    assert len(te_only) == 2 * CFG.num_layers  # two fused norms per layer
    for name, hf in names.items():
        hf_is_norm = hf.endswith("norm.weight")
        assert (init_kind(name) == "norm") == hf_is_norm, (name, hf)
        assert is_norm_weight(name) == hf_is_norm
    assert init_kind("decoder.layers.0.self_attention.linear_qkv.bias") == "bias"
    assert init_kind("decoder.layers.0.mlp.linear_fc2.weight") == "scaled"
    assert init_kind("decoder.layers.0.self_attention.linear_qkv.weight") == "normal"


def test_te_names_come_from_one_table():
    """The converter's TE names are the ones ``param_names`` derives, and the two spellings invert."""
    index = megatron_index(FAMILIES["qwen2"], CFG)
    for name, (m, layer) in index.items():
        local = m.megatron.format(i=layer)
        assert local_name(name) == local
        if getattr(m, "te_megatron", None):
            assert m.te_megatron.format(i=layer) == te_name(local) != local
    assert set(TE_FUSED_NORMS.values()) == {"self_attention.linear_qkv.layer_norm_weight",
                                           "mlp.linear_fc1.layer_norm_weight"}


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("tp_sp", [1, 2])   # TP under sequence parallelism (1: no SP)
@pytest.mark.parametrize("fp8", [False, True])
def test_fp8_padding_gives_every_rank_a_multiple_of_16(cp, tp_sp, fp8):
    """Pack odd-length sequences with the trainer's rule, cut the row for each CP rank exactly as the model
    input is cut, and scatter over TP under SP: under FP8 every rank's GEMM token count is a multiple of
    16, and CP's 2*CP chunks stay whole in any case."""
    import numpy as np
    import torch

    from redi_megatron.config.schema import RunConfig
    from redi_megatron.data.batch import ROLE_SFT, SequenceSpec, build_microbatch, padded_length
    from redi_megatron.parallel.context import check_thd_boundaries, thd_partition_index
    from redi_megatron.training.components import sequence_multiple

    cfg = RunConfig()
    cfg.parallel = replace(cfg.parallel, cp=cp, tp=max(tp_sp, 1), sequence_parallel=tp_sp > 1)
    cfg.train.fp8 = "delayed" if fp8 else None
    m = sequence_multiple(cfg)
    rng = np.random.default_rng(cp * 10 + tp_sp)
    for lengths in ([7], [5, 33, 101], [m + 1, 3 * m - 1, 17]):
        seqs = [SequenceSpec(rng.integers(0, 50, n), 1, ROLE_SFT, i) for i, n in enumerate(lengths)]
        T = sum(padded_length(n, m) for n in lengths)
        mb = build_microbatch(seqs, T, pad_id=0, pad_to_multiple_of=m)
        check_thd_boundaries(mb.cu_seqlens_padded, T, cp)
        for r in range(cp):
            local = thd_partition_index(mb.cu_seqlens_padded, T, cp, r).numel()
            assert local * cp == T and local % tp_sp == 0
            if fp8:  # the GEMMs of this rank: T/CP tokens, T/(CP*TP) before SP's all-gather
                assert local % 16 == 0 and (local // tp_sp) % 16 == 0, (m, lengths, local)
    assert torch.is_tensor(mb.tokens)
    if not fp8:  # no FP8: no extra padding beyond what CP/SP need
        assert m == (2 * cp if cp > 1 else 1) * tp_sp


def _kwargs(**kw):
    from redi_megatron.models.config import ParallelConfig, transformer_config_kwargs

    return transformer_config_kwargs(ModelConfig(num_layers=4), ParallelConfig(), **kw)


def test_fp8_recipes_follow_megatron_bridge():
    """Delayed: amax history 1024 reduced by "max" (main inherited Megatron's 1 / "most_recent"); current
    (tensorwise): first and last layer in bf16. Megatron accepts both (the config is built: no TE needed)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from redi_megatron.models.config import FP8Options

    delayed = _kwargs(fp8="delayed")
    assert (delayed["fp8"], delayed["fp8_recipe"]) == ("hybrid", "delayed")
    assert (delayed["fp8_amax_history_len"], delayed["fp8_amax_compute_algo"]) == (1024, "max")
    assert not delayed.get("first_last_layers_bf16", False)
    current = _kwargs(fp8="current")
    assert (current["fp8"], current["fp8_recipe"]) == ("hybrid", "tensorwise")
    assert current["first_last_layers_bf16"] is True
    assert current["num_layers_at_start_in_bf16"] == current["num_layers_at_end_in_bf16"] == 1
    assert "first_last_layers_bf16" not in _kwargs(fp8="current", fp8_options=FP8Options(bf16_edge_layers=0))
    mine = _kwargs(fp8="delayed", fp8_options=FP8Options(amax_history_len=16, amax_compute_algo="most_recent"))
    assert (mine["fp8_amax_history_len"], mine["fp8_amax_compute_algo"]) == (16, "most_recent")
    for kw in (delayed, current):
        config = TransformerConfig(**kw)
        assert config.fp8 == "hybrid"
    assert _kwargs()["fp8"] is None


def test_fp8_options_are_config_fields_and_checked():
    from redi_megatron.config.loader import apply_overrides
    from redi_megatron.config.schema import RunConfig
    from redi_megatron.errors import UserError
    from redi_megatron.models.config import FP8Options

    cfg = apply_overrides(RunConfig(), ["train.fp8=current", "train.fp8_options.bf16_edge_layers=2"])
    assert cfg.train.fp8_options.bf16_edge_layers == 2 and cfg.train.fp8_options.amax_history_len == 1024
    with pytest.raises(UserError, match="bf16_edge_layers"):
        FP8Options(bf16_edge_layers=3).validate(num_layers=4, pp=2)
    with pytest.raises(UserError, match="amax_history_len"):
        FP8Options(amax_history_len=0).validate(num_layers=4, pp=1)


@pytest.mark.parametrize("on_gpu,use_te,apex", [(False, False, False), (True, False, True), (True, True, False),
                                                 (True, True, True)])
def test_rope_and_grad_accum_fusions_only_under_te(on_gpu, use_te, apex):
    """RoPE fusion is a TE kernel; gradient-accumulation fusion needs TE's layers and, for Megatron's own
    output layer, apex's extension (NGC has it). Main had both off everywhere."""
    kw = _kwargs(on_gpu=on_gpu, use_te=use_te, grad_accum_ext=apex)
    assert kw["apply_rope_fusion"] is (on_gpu and use_te)
    assert kw["gradient_accumulation_fusion"] is (on_gpu and use_te and apex)
    assert kw["bias_activation_fusion"] is on_gpu
    if not on_gpu:  # what the CPU tests build: Megatron accepts it without TE
        from megatron.core.transformer.transformer_config import TransformerConfig

        assert TransformerConfig(**kw).apply_rope_fusion is False


def test_padded_cu_seqlens_only_when_the_row_has_padding():
    """Bridge passes ``cu_seqlens_*_padded`` only for padded rows (TE's faster kernel otherwise)."""
    import numpy as np

    from redi_megatron.data.batch import ROLE_SFT, SequenceSpec, build_microbatch
    from redi_megatron.models.inputs import packed_seq_params

    seqs = [SequenceSpec(np.arange(n) % 7, 1, ROLE_SFT, i) for i, n in enumerate((8, 16))]
    exact = build_microbatch(seqs, 24, pad_id=0, pad_to_multiple_of=8)
    assert not exact.has_padding
    p = packed_seq_params(exact)
    assert p.cu_seqlens_q_padded is None and p.cu_seqlens_kv_padded is None
    assert p.cu_seqlens_q.tolist() == [0, 8, 24]
    for padded in (build_microbatch(seqs, 32, pad_id=0, pad_to_multiple_of=8),     # tail padding
                   build_microbatch(seqs[:1] + [SequenceSpec(np.arange(13) % 7, 1, ROLE_SFT, 2)], 24, 0, 8)):
        assert padded.has_padding
        p = packed_seq_params(padded)
        assert p.cu_seqlens_q_padded is padded.cu_seqlens_padded is p.cu_seqlens_kv_padded
    assert not exact.to("cpu").has_padding
