"""Per-sequence sums of per-token values, for padded and packed rows, and their reduction over CP.

A row of a microbatch holds one sequence (padded) or several (packed, THD); ``seq_ids [B, S]`` says which
sequence each token belongs to (``-1`` on padding). Under context parallelism each rank holds part of
every row, so a per-sequence sum is a local partial sum followed by an all-reduce over the CP group.

Gradient of that all-reduce: every CP rank computes the same loss ``L(s)`` from the full sum
``s = sum_r s_r``; rank ``r``'s backward must send ``dL/ds`` into its own partial ``s_r`` (identity), so
that summing parameter gradients over CP (Megatron's DDP reduces over data x context parallel ranks)
counts ``dL/ds * ds_r/dtheta`` once per rank and the full gradient exactly once. A sum-all-reduce in
backward would count it CP times.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class _AllReduceSumIdentityBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def all_reduce_sum_identity_backward(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum ``tensor`` over ``group`` (forward); pass the gradient through unchanged (backward).

    ``group`` None or of size 1: returns ``tensor`` itself.
    """
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    return _AllReduceSumIdentityBackward.apply(tensor, group)


def sequence_sums(values: torch.Tensor, seq_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Sum ``values [B, S]`` per sequence: ``[N]``, differentiable. Tokens with ``seq_ids < 0`` are skipped.

    seq_ids: ``[B, S]`` long, local sequence index ``0..N-1`` or ``-1`` (padding); a sequence may span
    several rows or sit next to others in one row (packing).
    """
    if values.shape != seq_ids.shape:
        raise ValueError(f"sequence_sums: values {tuple(values.shape)} and seq_ids {tuple(seq_ids.shape)} "
                         "must have the same shape")
    flat_ids = seq_ids.reshape(-1).long()
    valid = flat_ids >= 0
    flat_vals = torch.where(valid, values.reshape(-1), torch.zeros((), dtype=values.dtype, device=values.device))
    # One spare slot so an empty microbatch (N = 0) still has somewhere to put its zeros.
    out = torch.zeros(max(num_sequences, 1), dtype=values.dtype, device=values.device)
    return out.index_add(0, torch.where(valid, flat_ids, torch.zeros_like(flat_ids)), flat_vals)[:num_sequences]


def sequence_sums_over_cp(values: torch.Tensor, seq_ids: torch.Tensor, num_sequences: int,
                          cp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Whole-sequence sums ``[N]`` from this CP rank's part of the rows (identity backward, see module doc)."""
    return all_reduce_sum_identity_backward(sequence_sums(values, seq_ids, num_sequences), cp_group)


def seq_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total_len: int) -> torch.Tensor:
    """Packed (THD) layout -> per-token sequence ids ``[total_len]``.

    cu_seqlens: ``[N+1]`` cumulative sequence lengths starting at 0 (flash-attention / TE convention);
    tokens past ``cu_seqlens[-1]`` are padding (``-1``).
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens must be a 1-D tensor starting at 0, got {cu_seqlens.tolist()}")
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()) or int(cu_seqlens[-1]) > total_len:
        raise ValueError(f"cu_seqlens must be non-decreasing and end at most at {total_len}, "
                         f"got {cu_seqlens.tolist()}")
    positions = torch.arange(total_len, device=cu_seqlens.device)
    ids = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    return torch.where(positions < cu_seqlens[-1], ids, torch.full_like(ids, -1))
