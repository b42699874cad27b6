"""Small collectives the trainer needs for bookkeeping (never for gradients). None group = no-op."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def sum_over(group: Optional[dist.ProcessGroup], *values: float) -> list[float]:
    """Sum a few Python numbers over ``group`` (e.g. token counts over data-parallel ranks)."""
    t = torch.tensor(values, dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t.tolist()


def count_over_world(flag: bool) -> int:
    """How many ranks of the whole job have ``flag`` set (1 or 0 without torch.distributed)."""
    group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    return int(sum_over(group, float(flag))[0])


def gather_objects(obj: Any, group: Optional[dist.ProcessGroup]) -> list[Any]:
    """Every rank of ``group`` gets the list of all ranks' ``obj`` (picklable), in group-rank order."""
    if group is None or dist.get_world_size(group) == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src_global_rank: int = 0) -> Any:
    """``obj`` from ``src_global_rank`` on every rank of the world (no-op without torch.distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src_global_rank)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def groups_initialized() -> bool:
    """Whether torch.distributed's default process group exists (a run got past its start-up)."""
    return dist.is_available() and dist.is_initialized()


def is_global_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def gather_objects_world(obj: Any) -> list[Any]:
    """Every rank gets every rank's ``obj``, in global rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    return gather_objects(obj, dist.group.WORLD)


def world_size() -> int:
    """The world size: torch.distributed's when initialised, else torchrun's ``WORLD_SIZE`` (or 1)."""
    import os

    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def any_over_world(flag: bool) -> bool:
    """Whether any rank of the whole job has ``flag`` set: an all-reduce max, so all ranks agree."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
