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
