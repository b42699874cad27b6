"""Layer specs: Transformer Engine where it imports, else Megatron's local modules plus our THD attention and
sequence-parallel RMSNorm (CPU, or CUDA without TE)."""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from redi_megatron.errors import UserError


class SPRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` that accepts sequence parallelism (Megatron's torch-norm wrapper refuses it).

    Under SP each TP rank normalises its own sequence slice, so the weight gradient is partial per
    rank; tagging the weight ``sequence_parallel`` makes ``finalize_model_grads`` all-reduce it over TP.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install
        return False
    return True


def require_transformer_engine(feature: str) -> None:
    if not have_transformer_engine():
        raise UserError(f"{feature} needs Transformer Engine (pip extra 'gpu', or an NGC PyTorch "
                         f"container); it is not importable here")


def block_spec(config: TransformerConfig, use_te: bool, vp_stage: Optional[int] = None
               ) -> TransformerBlockSubmodules | ModuleSpec:
    """Spec of the decoder stack on this pipeline stage."""
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    from redi_megatron.models.thd_attention import THDCoreAttention

    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.input_layernorm = SPRMSNorm
    layer.submodules.pre_mlp_layernorm = SPRMSNorm
    layer.submodules.self_attention.submodules.core_attention = THDCoreAttention
    if config.qk_layernorm:  # per-head RMSNorm over head_dim; Megatron all-reduces its grads over TP
        layer.submodules.self_attention.submodules.q_layernorm = SPRMSNorm
        layer.submodules.self_attention.submodules.k_layernorm = SPRMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=SPRMSNorm)
