"""Gather model parameters (or their gradients) from TP shards and PP stages into full tensors (tests,
benchmarks and the GPU check compare layouts with it)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.distributed as dist

from redi_megatron.models.sharding import global_names, unshard


def _all_gather(t: torch.Tensor, group: Optional[dist.ProcessGroup]) -> list[torch.Tensor]:
    if group is None or dist.get_world_size(group) == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def gather_stage_tensors(chunks: list[torch.nn.Module], tp_group: Optional[dist.ProcessGroup],
                         select: Callable[[torch.nn.Parameter], Optional[torch.Tensor]] = lambda p: p.data,
                         ) -> dict[str, torch.Tensor]:
    """Full (TP-gathered) tensors of this pipeline stage, keyed by full-model name.

    ``select`` picks what to gather per parameter (the weights by default; for gradients pass
    ``lambda p: p.main_grad`` under Megatron DDP). Every TP rank of the stage gets the same dict.
    """
    out: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        names = global_names(module)
        for name, param in module.named_parameters():
            value = select(param)
            if value is None:
                continue
            out[names[name]] = unshard(_all_gather(value.detach(), tp_group), param, name).clone()
    return out


def gather_full_state_dict(chunks: list[torch.nn.Module], tp_group: Optional[dist.ProcessGroup],
                           pp_group: Optional[dist.ProcessGroup], dst_global_rank: int = 0,
                           select: Callable = lambda p: p.data) -> Optional[dict[str, torch.Tensor]]:
    """The whole model's full state dict on ``dst_global_rank`` (None elsewhere). Collective over PP."""
    stage = gather_stage_tensors(chunks, tp_group, select)
    if pp_group is None or dist.get_world_size(pp_group) == 1:
        return stage if dist.get_rank() == dst_global_rank or not dist.is_initialized() else None
    stages: list = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(stages, stage, group=pp_group)
    if dist.get_rank() != dst_global_rank:
        return None
    merged: dict[str, torch.Tensor] = {}
    for s in stages:
        for key, value in s.items():
            merged.setdefault(key, value)  # tied embedding appears on first and last stage: same values
    return merged
