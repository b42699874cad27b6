"""Map between a *full* Megatron state dict (TP=1, PP=1 names and shapes) and one rank's model chunk.

A full state dict is the layout-independent form of a model: checkpoint conversion produces and
consumes it, and tests load it into any TP/PP/CP layout to get exactly the single-rank weights.
Slicing rules come from the attributes Megatron puts on each parameter (``tensor_model_parallel``,
``partition_dim``), plus one special case: the gated MLP's ``linear_fc1`` stores ``[gate; up]`` and a
TP rank holds ``[gate_r; up_r]``, not a contiguous slice of the full tensor.
Pure tensor code: the collectives that invert it live in ``redi_megatron.testing.params``.
"""
from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_names(chunk: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> full-model name (global layer index; tied output -> embedding)."""
    module = getattr(chunk, "module", chunk)  # unwrap DDP
    offsets = {i: layer.layer_number - 1 - i for i, layer in enumerate(module.decoder.layers)}
    tied = getattr(module, "share_embeddings_and_output_weights", False)
    names = {}
    for name, _ in module.named_parameters():
        full = _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offsets[int(m.group(1))]}.", name)
        if tied and full == "output_layer.weight":
            full = "embedding.word_embeddings.weight"
        names[name] = full
    return names


def is_gated_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias")


def shard(full: torch.Tensor, param: torch.nn.Parameter, name: str, tp_rank: int, tp_size: int
          ) -> torch.Tensor:
    """This TP rank's part of ``full`` for ``param``."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if is_gated_fc1(name):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp_size, dim=dim)[tp_rank], up.chunk(tp_size, dim=dim)[tp_rank]], dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def unshard(parts: list[torch.Tensor], param: torch.nn.Parameter, name: str) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every TP rank's part, in TP rank order."""
    if len(parts) == 1 or not getattr(param, "tensor_model_parallel", False):
        return parts[0]
    dim = param.partition_dim
    if is_gated_fc1(name):
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)], dim)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def load_full_state_dict(chunk: torch.nn.Module, full: dict[str, torch.Tensor], tp_rank: int,
                         tp_size: int, *, strict: bool = True) -> None:
    """Copy this rank's slices of ``full`` into ``chunk`` (a GPTModel or its DDP wrapper)."""
    module = getattr(chunk, "module", chunk)
    names = global_names(module)
    for name, param in module.named_parameters():
        key = names[name]
        if key not in full:
            if strict:
                raise ValueError(f"state dict has no tensor {key!r} (needed by parameter {name})")
            continue
        part = shard(full[key], param, name, tp_rank, tp_size)
        if part.shape != param.shape:
            raise ValueError(f"tensor {key!r} has shape {tuple(full[key].shape)}; its TP{tp_size} shard "
                             f"{tuple(part.shape)} does not fit parameter {name} {tuple(param.shape)}")
        param.copy_(part.to(param.dtype))
