"""Layout-independent random initialisation: every layout of a run starts from the same weights.

Megatron's CPU initialisation draws each stage's layers from one RNG stream, so a PP=2 model starts
from different weights than the single-rank model. Here each parameter's *full* tensor is drawn from a
generator seeded by (seed, its full-model name) and then sliced for this rank, which makes random-init
runs comparable across TP/PP/CP/DP (and is what the layout tests rely on).
"""
from __future__ import annotations

import hashlib
import math

import torch

from redi_megatron.models.config import ModelConfig
from redi_megatron.models.param_names import is_norm_weight, local_name
from redi_megatron.models.sharding import global_names, shard

_SCALED = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def full_shape(param: torch.nn.Parameter, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def init_kind(full_name: str) -> str:
    """How :func:`init_by_name` fills a parameter named ``full_name`` (local or TE spec): "norm" (ones),
    "bias" (zeros), "scaled" (N(0, std / sqrt(2 * layers))) or "normal" (N(0, std))."""
    if is_norm_weight(full_name):
        return "norm"
    if full_name.endswith(".bias"):
        return "bias"
    return "scaled" if local_name(full_name).endswith(_SCALED) else "normal"


@torch.no_grad()
def init_by_name(chunks: list, model: ModelConfig, seed: int, tp_rank: int, tp_size: int) -> None:
    """Normal(0, std) weights (std / sqrt(2 * layers) for output projections, as Megatron), zero biases,
    unit norms; identical full tensors whatever the layout."""
    scaled_std = model.init_method_std / math.sqrt(2.0 * model.num_layers)
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        names = global_names(module)
        for name, param in module.named_parameters():
            full_name = names[name]
            kind = init_kind(full_name)
            if kind == "norm":
                param.fill_(1.0)
                continue
            if kind == "bias":
                param.zero_()
                continue
            std = scaled_std if kind == "scaled" else model.init_method_std
            # seeded by the local-spec name: a TE-spec model draws the same weights
            gen = _generator(seed, local_name(full_name))
            full = torch.empty(full_shape(param, tp_size)).normal_(0.0, std, generator=gen)
            param.copy_(shard(full, param, name, tp_rank, tp_size).to(param.dtype))
