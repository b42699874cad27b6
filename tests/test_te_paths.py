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
