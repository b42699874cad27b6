"""Context parallelism over packed (THD) rows: the per-sequence load-balanced split and its inverse.

A microbatch is one row of ``T`` tokens holding several sequences back to back; ``cu_seqlens_padded``
``[N+1]`` are their offsets, each sequence padded to a multiple of ``2*CP``. With causal attention the
last tokens of a sequence do the most work, so every *sequence* (not the row) is cut into ``2*CP`` equal
chunks and CP rank ``r`` holds chunks ``r`` and ``2*CP-1-r`` of each, sequence after sequence. This is
Transformer Engine's ``thd_get_partitioned_indices`` (used by Megatron's ``get_thd_batch_on_this_cp_rank``)
and the layout Megatron's THD RoPE assumes; :func:`thd_partition_index` is the one definition here, on
both the CPU and the GPU path. Every tensor that lines up with the model's output on a CP rank (input ids,
labels, loss masks, sequence ids) is cut with it. A row holding one sequence is the special case
``cu_seqlens_padded = [0, T]``: the classic split of the row into ``2*CP`` chunks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# torch 2.13 renamed these (same arguments) and warns on the old names; older torch has only those.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def cp_chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two chunk indices (of ``2*cp_size``) that ``cp_rank`` holds of every sequence."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def check_thd_boundaries(cu_seqlens_padded: torch.Tensor, total: int, cp_size: int) -> None:
    """ValueError unless ``cu_seqlens_padded`` splits ``total`` tokens into segments of multiples of 2*CP."""
    cu = cu_seqlens_padded.detach().cpu().long()
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens_padded must be [N+1] from 0 to the row length {total}, got {cu.tolist()}")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths <= 0).any()) or (cp_size > 1 and bool((lengths % (2 * cp_size)).any())):
        raise ValueError(f"every packed sequence must have a positive length divisible by 2*CP = {2 * cp_size}, "
                         f"got lengths {lengths.tolist()}")


def thd_partition_index(cu_seqlens_padded: torch.Tensor, total: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Row positions held by ``cp_rank``, in its local order: ``[total // cp_size]`` long.

    For each sequence ``i`` (padded length ``L_i``, offset ``o_i``) the rank holds
    ``o_i + [r*c, (r+1)*c)`` then ``o_i + [(2CP-1-r)*c, (2CP-r)*c)`` with ``c = L_i / (2*CP)``.
    Vectorised (no host sync), on ``cu_seqlens_padded``'s device; boundaries are checked by
    :func:`check_thd_boundaries` where the batch is built.
    """
    device = cu_seqlens_padded.device
    if cp_size == 1:
        return torch.arange(total, device=device)
    cu = cu_seqlens_padded.long()
    local_cu = cu // cp_size                                    # each sequence's share on one rank
    local = torch.arange(total // cp_size, device=device)
    seq = torch.searchsorted(local_cu[1:].contiguous(), local, right=True)
    within = local - local_cu[seq]                              # position in the sequence's local share
    chunk = (local_cu[1:] - local_cu[:-1])[seq] // 2            # c = L_i / (2*CP)
    first = within < chunk
    first_id, second_id = cp_chunk_ids(cp_rank, cp_size)
    chunk_id = torch.where(first, torch.full_like(seq, first_id), torch.full_like(seq, second_id))
    return cu[seq] + chunk_id * chunk + within - torch.where(first, torch.zeros_like(chunk), chunk)


def split_for_cp(tensor: torch.Tensor, cp_group: Optional[dist.ProcessGroup], cu_seqlens_padded: torch.Tensor,
                 seq_dim: int = 1) -> torch.Tensor:
    """This CP rank's part of ``tensor`` along ``seq_dim``: ``[1, T] -> [1, T//CP]``. None/size 1: no-op."""
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return tensor
    index = thd_partition_index(cu_seqlens_padded.to(tensor.device), tensor.shape[seq_dim],
                                dist.get_world_size(cp_group), dist.get_rank(cp_group))
    return tensor.index_select(seq_dim, index)


def global_order_index(cu_seqlens_padded: torch.Tensor, total: int, cp_size: int) -> torch.Tensor:
    """``[total]`` long: row position of each element of an all-gather of every CP rank's local part
    (rank 0's part, then rank 1's, ...)."""
    return torch.cat([thd_partition_index(cu_seqlens_padded, total, cp_size, r) for r in range(cp_size)])


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
        _ALL_GATHER(out, tensor.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        out = torch.empty((grad.shape[0] // size, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        _REDUCE_SCATTER(out, grad.contiguous(), group=ctx.group)
        return out, None


def all_gather_cp(tensor: torch.Tensor, cp_group: Optional[dist.ProcessGroup], cu_seqlens_padded: torch.Tensor
                  ) -> torch.Tensor:
    """All-gather every CP rank's part along dim 0 and return it in row order: ``[T//CP, ...] -> [T, ...]``.

    Differentiable: each rank's gradient is the sum, over all ranks, of the gradient that flowed into
    its own slice.
    """
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return tensor
    cp_size = dist.get_world_size(cp_group)
    gathered = _AllGatherDim0.apply(tensor, cp_group)
    order = global_order_index(cu_seqlens_padded.to(tensor.device), gathered.shape[0], cp_size)
    return gathered.index_select(0, torch.argsort(order))
