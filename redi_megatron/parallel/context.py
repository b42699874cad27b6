"""Context parallelism: Megatron's load-balanced sequence split and its inverse.

With causal attention the last tokens of a sequence do the most work, so Megatron cuts each row into
``2*CP`` equal chunks and gives CP rank ``r`` chunks ``r`` and ``2*CP-1-r``
(``get_batch_on_this_cp_rank``). Every tensor that lines up with the model's output on a CP rank
(labels, loss masks, sequence ids) must be cut the same way; these functions are the one definition.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def cp_chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two chunk indices (of ``2*cp_size``) held by ``cp_rank``."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def cp_local_positions(seq_len: int, cp_rank: int, cp_size: int,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Global positions ``[seq_len // cp_size]`` held by ``cp_rank``, in local order."""
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} must be a multiple of 2*CP = {2 * cp_size}")
    chunk = seq_len // (2 * cp_size)
    first, second = cp_chunk_ids(cp_rank, cp_size)
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk, device=device),
                      torch.arange(second * chunk, (second + 1) * chunk, device=device)])


def split_for_cp(tensor: torch.Tensor, cp_group: Optional[dist.ProcessGroup], seq_dim: int = 1
                 ) -> torch.Tensor:
    """This CP rank's part of ``tensor`` along ``seq_dim``: ``[B, S] -> [B, S//CP]``. None/size 1: no-op."""
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return tensor
    cp_size, cp_rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    index = cp_local_positions(tensor.shape[seq_dim], cp_rank, cp_size, tensor.device)
    return tensor.index_select(seq_dim, index)


def global_order_from_cp_chunks(gathered: torch.Tensor, cp_size: int, seq_dim: int = 0) -> torch.Tensor:
    """Undo the load-balanced order of an all-gathered tensor.

    ``gathered`` concatenates every CP rank's local part along ``seq_dim`` in rank order
    (rank 0's two chunks, then rank 1's, ...); the result is in global sequence order.
    """
    if cp_size == 1:
        return gathered
    chunks = gathered.chunk(2 * cp_size, dim=seq_dim)
    ordered: list[Optional[torch.Tensor]] = [None] * (2 * cp_size)
    for r in range(cp_size):
        first, second = cp_chunk_ids(r, cp_size)
        ordered[first], ordered[second] = chunks[2 * r], chunks[2 * r + 1]
    return torch.cat(ordered, dim=seq_dim)  # type: ignore[arg-type]


class _AllGatherDim0(torch.autograd.Function):
    """All-gather along dim 0 in rank order; backward reduce-scatters (sums) the gradient.

    ``torch.distributed.nn.functional.all_gather`` is not used: on non-NCCL backends its backward
    confuses global and group ranks and fails for any group that is not the whole world.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        out = torch.empty((size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype,
                          device=tensor.device)
        dist.all_gather_into_tensor(out, tensor.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        out = torch.empty((grad.shape[0] // size, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


def all_gather_cp(tensor: torch.Tensor, cp_group: Optional[dist.ProcessGroup], seq_dim: int = 0
                  ) -> torch.Tensor:
    """All-gather this CP rank's part along ``seq_dim`` and return it in global sequence order.

    Differentiable: each rank's gradient is the sum, over all ranks, of the gradient that flowed into
    its own slice. ``[S//CP, ...] -> [S, ...]``.
    """
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return tensor
    moved = tensor.movedim(seq_dim, 0)
    gathered = _AllGatherDim0.apply(moved, cp_group)
    return global_order_from_cp_chunks(gathered, dist.get_world_size(cp_group), 0).movedim(0, seq_dim)
