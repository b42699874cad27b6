"""Parameter names that differ between the two layer specs, in one place.

Megatron's local spec has separate norm modules (``input_layernorm``, ``pre_mlp_layernorm``);
Transformer Engine's spec fuses each norm into the linear layer after it (``LayerNormLinear``), so the
same RMSNorm gain is ``self_attention.linear_qkv.layer_norm_weight`` / ``mlp.linear_fc1.layer_norm_weight``.
The converter's tables (``convert.mappings``) take their TE names from :data:`TE_FUSED_NORMS`; the
initialiser and the GPU check classify and compare names through the functions here, so a TE-spec model
is never mistaken for a different set of tensors.
"""
from __future__ import annotations

# local-spec suffix -> TE-spec suffix of the same tensor (inside ``decoder.layers.{i}.``)
TE_FUSED_NORMS: dict[str, str] = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
FINAL_NORM = "decoder.final_layernorm.weight"  # the same name in both specs


def te_name(local: str) -> str:
    """The TE-spec name of a local-spec parameter name (unchanged when the specs agree)."""
    for suffix, te in TE_FUSED_NORMS.items():
        if local.endswith(suffix):
            return local[:-len(suffix)] + te
    return local


def local_name(name: str) -> str:
    """The local-spec name of a parameter named in either spec."""
    for suffix, te in TE_FUSED_NORMS.items():
        if name.endswith(te):
            return name[:-len(te)] + suffix
    return name


def is_norm_weight(name: str) -> bool:
    """Whether ``name`` (either spec, full or local to a chunk) is an RMSNorm gain."""
    local = local_name(name)
    # Qwen3's per-head q/k norms have the same name in both specs.
    return local.endswith((*TE_FUSED_NORMS, "final_layernorm.weight", "q_layernorm.weight", "k_layernorm.weight"))
