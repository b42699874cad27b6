"""Per-token log-probs from vocabulary-parallel logits, chunked so no full fp32 softmax is ever stored.

``log p(t) = logit[t] - logsumexp(logits)``. With the vocabulary split over TP ranks (rank ``r`` holds
columns ``[r*V/TP, (r+1)*V/TP)``, Megatron's ``VocabUtility`` layout) the logsumexp is combined from each
rank's local logsumexp and the target logit comes from the one rank holding it: three all-reduces of
``[T]`` floats for the whole input, none per chunk, none in backward.

Memory: Megatron's ``vocab_parallel_cross_entropy`` keeps the fp32 softmax ``[T, V/TP]`` from forward to
backward (in the fp32 logits themselves, which it overwrites, or in an fp32 copy of bf16 logits). Here
forward keeps only the input and one fp32 number per token (the logsumexp) and works on ``chunk_size``
tokens at a time in one fp32 workspace ``[chunk_size, V/TP]``; backward recomputes the softmax chunk by
chunk, in the same kind of workspace for bf16 logits and directly in the gradient buffer for fp32 ones
(tests/test_parallel_logprobs.py checks both, benchmarks/logprob_memory.py measures them). With
``inplace_backward=True``
the gradient is written into the logits' own storage (as Megatron does in forward for fp32), which is safe
when nothing else needs the logits after the loss (true of Megatron's output layer: its backward needs
only its input and weight). Anything that did save them would fail loudly in backward: autograd's version
counter flags the in-place write.

The gradient of ``log p(t)`` with respect to the local logits is ``onehot(t) - softmax``: it needs the
global logsumexp only, so backward runs without communication. Same idea as NeMo-RL's chunked
distributed log-prob; written from the formulas.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

# Default chunk: this many logits per fp32 workspace (32 MiB), i.e. ~55 tokens at V = 151,936.
CHUNK_ELEMENTS = 1 << 23


def default_chunk_size(local_vocab: int) -> int:
    """Tokens per chunk for a vocabulary shard of ``local_vocab`` columns."""
    return max(1, CHUNK_ELEMENTS // max(1, local_vocab))


def _group_size_rank(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _local_targets(targets: torch.Tensor, vocab_start: int, local_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index into the local shard, clamped to 0 off-shard ``[T]``; bool ``[T]`` target is on this shard)."""
    local = targets - vocab_start
    on_shard = (local >= 0) & (local < local_vocab)
    return torch.where(on_shard, local, torch.zeros_like(local)), on_shard


def _combine_over_tp(local_lse: torch.Tensor, target_logit: torch.Tensor,
                     group: Optional[dist.ProcessGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    """Global logsumexp and target logit from per-shard values (sum over shards; max for stability)."""
    if _group_size_rank(group)[0] == 1:
        return local_lse, target_logit
    lse_max = local_lse.clone()
    dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(local_lse - lse_max)
    dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(target_logit, op=dist.ReduceOp.SUM, group=group)
    return lse_max + torch.log(sum_exp), target_logit


def _shifted_into(ws: torch.Tensor, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``ws = x - shift`` in fp32 without temporaries (a mixed-dtype ``torch.sub`` would first make an
    fp32 copy of ``x``; ``copy_`` casts in place)."""
    if x.dtype == ws.dtype:
        return torch.sub(x, shift, out=ws)
    return ws.copy_(x).sub_(shift)


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d: torch.Tensor, targets1d: torch.Tensor, group: Optional[dist.ProcessGroup],
                chunk_size: int, inplace_backward: bool, valid_local: int) -> torch.Tensor:
        tokens, local_vocab = logits2d.shape
        tp_size, tp_rank = _group_size_rank(group)
        # Columns >= valid_local are vocabulary padding: excluded from the softmax (weight 0).
        pad = slice(valid_local, None)
        local_t, on_shard = _local_targets(targets1d, tp_rank * local_vocab, local_vocab)
        # Target logits read straight from the input: exact, whatever the dtype.
        target_logit = logits2d.gather(1, local_t.unsqueeze(1)).squeeze(1).float()
        target_logit = torch.where(on_shard, target_logit, torch.zeros_like(target_logit))
        local_lse = torch.empty(tokens, dtype=torch.float32, device=logits2d.device)
        work = torch.empty(min(chunk_size, tokens), local_vocab, dtype=torch.float32, device=logits2d.device)
        for start in range(0, tokens, chunk_size):
            x = logits2d[start:start + chunk_size]
            ws = work[:x.shape[0]]
            if valid_local == 0:  # this shard is all padding
                local_lse[start:start + x.shape[0]] = float("-inf")
                continue
            row_max = x[:, :valid_local].amax(dim=1, keepdim=True).float()
            _shifted_into(ws, x, row_max)[:, pad].fill_(float("-inf"))
            ws.exp_()
            local_lse[start:start + x.shape[0]] = ws.sum(dim=1).log_() + row_max.squeeze(1)
        del work
        lse, target_logit = _combine_over_tp(local_lse, target_logit, group)
        ctx.save_for_backward(logits2d, local_t, on_shard, lse)
        ctx.chunk_size, ctx.inplace_backward, ctx.valid_local = chunk_size, inplace_backward, valid_local
        return target_logit - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits2d, local_t, on_shard, lse = ctx.saved_tensors
        grad_out = grad_out.float()
        grad = logits2d if ctx.inplace_backward else torch.empty_like(logits2d)
        chunk = ctx.chunk_size
        # d logp / d logits = onehot(target) - softmax, scaled by the incoming gradient.
        target_grad = torch.where(on_shard, grad_out, torch.zeros_like(grad_out))
        # fp32 logits: the gradient buffer itself is the workspace; otherwise an fp32 chunk buffer keeps
        # the softmax exact before the single rounding to the logits' dtype.
        direct = logits2d.dtype == torch.float32
        work = None if direct else torch.empty(min(chunk, logits2d.shape[0]), logits2d.shape[1],
                                               dtype=torch.float32, device=logits2d.device)
        for start in range(0, logits2d.shape[0], chunk):
            end = min(start + chunk, logits2d.shape[0])
            ws = grad[start:end] if direct else work[:end - start]
            _shifted_into(ws, logits2d[start:end], lse[start:end].unsqueeze(1))[:, ctx.valid_local:].fill_(
                float("-inf"))
            ws.exp_().mul_(grad_out[start:end].neg().unsqueeze(1))
            ws.scatter_add_(1, local_t[start:end].unsqueeze(1), target_grad[start:end].unsqueeze(1))
            if not direct:
                grad[start:end].copy_(ws)
        return grad, None, None, None, None, None


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                            tp_group: Optional[dist.ProcessGroup] = None, *,
                            chunk_size: Optional[int] = None, inplace_backward: bool = False,
                            validate: bool = True, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Log-prob of each target under vocabulary-parallel logits; exact, differentiable, fp32.

    logits: ``[..., V/TP]`` in any float dtype (``[T, V/TP]``, Megatron's ``[S, B, V/TP]``, or
        batch-first ``[B, S, V/TP]``); this rank's slice of the vocabulary.
    targets: ``[...]`` (the leading shape of ``logits``) global token ids in ``[0, V)``.
    tp_group: the tensor-parallel group the vocabulary is split over; None or size 1 = single device.
    chunk_size: tokens per chunk; the fp32 workspace is ``[chunk_size, V/TP]``. None: as many tokens as
        fit ``CHUNK_ELEMENTS`` logits (32 MiB of fp32).
    inplace_backward: write the gradient into ``logits``' storage (saves a logits-sized buffer; only when
        nothing else uses the logits after this call).
    validate: check ``targets`` range (one device synchronisation).
    vocab_size: the real vocabulary when the logits carry padding columns (Megatron pads the embedding
        for TP); those columns are left out of the softmax, as they are in the exported HF model. None:
        every column is a real token.
    Returns ``[...]`` fp32 log-probs; its gradient flows to ``logits`` (in the logits' dtype).
    """
    if logits.dim() < 2:
        raise ValueError(f"vocab_parallel_logprobs: logits must be [..., V/TP], got shape {tuple(logits.shape)}")
    if tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"vocab_parallel_logprobs: targets shape {tuple(targets.shape)} must equal the leading "
                         f"shape of logits {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"vocab_parallel_logprobs: logits must be floating point, got {logits.dtype}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"vocab_parallel_logprobs: targets must be integer token ids, got {targets.dtype}")
    local_vocab = logits.shape[-1]
    chunk_size = default_chunk_size(local_vocab) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"vocab_parallel_logprobs: chunk_size must be >= 1, got {chunk_size}")
    tp_size, tp_rank = _group_size_rank(tp_group)
    vocab = local_vocab * tp_size
    if vocab_size is not None:
        if not 0 < vocab_size <= vocab:
            raise ValueError(f"vocab_parallel_logprobs: vocab_size {vocab_size} not in (0, {vocab}]")
        vocab = vocab_size
    valid_local = max(0, min(local_vocab, vocab - tp_rank * local_vocab))
    if validate and targets.numel() and bool(((targets < 0) | (targets >= vocab)).any()):
        bad = targets[(targets < 0) | (targets >= vocab)]
        raise ValueError(f"vocab_parallel_logprobs: {bad.numel()} target(s) outside the vocabulary [0, {vocab}) "
                         f"(e.g. {bad[:4].tolist()}); ignored positions must hold a valid id such as 0")
    if targets.numel() == 0:
        return logits.new_zeros(targets.shape, dtype=torch.float32) + 0 * logits.sum()
    logits2d = logits.reshape(-1, local_vocab)
    out = _VocabParallelLogprobs.apply(logits2d, targets.reshape(-1).long(), tp_group, chunk_size,
                                       inplace_backward, valid_local)
    return out.view(targets.shape)
