"""Log-probs without logits: the output layer and the per-token log-prob fused, chunked, vocab-parallel.

At 32k tokens, Qwen's 151,936-word vocabulary and bf16, the output layer's logits ``[T, V/TP]`` are
9.3 GB, kept for backward, plus a gradient of the same size. Here the final hidden states go straight
to log-probs, ``chunk_size`` tokens at a time: each chunk's logits ``hidden_c @ W^T`` exist only inside
one fp32 workspace ``[chunk_size, V/TP]``; forward keeps the hidden states (the layer's own input) and one
fp32 logsumexp per token; backward recomputes each chunk's logits, forms the logits' gradient in fp32
and runs its two GEMMs (hidden-state and weight gradient) in the activations' dtype (bf16 operands, fp32
accumulation inside the GEMM, as Megatron's output layer), summing the weight gradient over chunks in
fp32. Only positions that carry a loss token are projected (prompts and padding skip the vocabulary
matmul), as TRL's fused LM head does.

Vocab-parallel exactly like ``parallel.logprobs``: per-token max/sum-exp/target logit are combined over
TP (three all-reduces of ``[N]`` floats for the whole input), padded vocabulary columns stay out of the
softmax, and backward needs no communication of its own: the hidden-state gradient is a partial sum
over this rank's vocabulary shard, which Megatron's region functions reduce (``copy_to`` all-reduces it;
under sequence parallelism ``gather_from_sequence_parallel_region`` reduce-scatters it), just as for
Megatron's ``ColumnParallelLinear`` output layer. Written from the formulas.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from redi_megatron.parallel.logprobs import _combine_over_tp, _group_size_rank, _local_targets

CHUNK_ELEMENTS = 1 << 25  # logits per fp32 workspace (128 MiB): ~220 tokens at V = 151,936 (bigger matmuls)


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                group: Optional[dist.ProcessGroup], chunk_size: int, valid_local: int) -> torch.Tensor:
        tokens = hidden.shape[0]
        local_vocab = weight.shape[0]
        _, tp_rank = _group_size_rank(group)
        local_t, on_shard = _local_targets(targets, tp_rank * local_vocab, local_vocab)
        local_lse = torch.full((tokens,), float("-inf"), dtype=torch.float32, device=hidden.device)
        target_logit = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
        for start in range(0, tokens if valid_local else 0, chunk_size):
            logits = _chunk_logits(hidden[start:start + chunk_size], weight, valid_local)
            rows = torch.arange(logits.shape[0], device=hidden.device)
            picked = logits[rows, local_t[start:start + chunk_size]]
            target_logit[start:start + logits.shape[0]] = torch.where(on_shard[start:start + chunk_size], picked, 0.0)
            local_lse[start:start + logits.shape[0]] = torch.logsumexp(logits, dim=1)
        lse, target_logit = _combine_over_tp(local_lse, target_logit, group)
        ctx.save_for_backward(hidden, weight, local_t, on_shard, lse)
        ctx.chunk_size, ctx.valid_local = chunk_size, valid_local
        return target_logit - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, local_t, on_shard, lse = ctx.saved_tensors
        grad_out = grad_out.float()
        # GEMM operands in the activations' dtype (bf16: tensor-core rate, fp32 accumulation inside the
        # GEMM, as Megatron's output layer); fp32 inputs stay fp32 throughout, hence exact as before.
        mm_dtype = hidden.dtype if hidden.dtype == weight.dtype else torch.float32
        w_mm = weight if weight.dtype == mm_dtype else weight.float()
        # Each row of grad_hidden comes from one chunk's GEMM (no sum over chunks): written in mm_dtype.
        grad_hidden = torch.zeros(hidden.shape, dtype=mm_dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # sum over chunks
        target_grad = torch.where(on_shard, grad_out, torch.zeros_like(grad_out))
        for start in range(0, hidden.shape[0] if ctx.valid_local else 0, ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            h = hidden[start:end]
            # d logp / d logits = onehot(target) - softmax, times the incoming gradient: fp32 math.
            d = _chunk_logits(h, weight, ctx.valid_local).sub_(lse[start:end, None]).exp_()
            d.mul_(grad_out[start:end].neg()[:, None])
            d.scatter_add_(1, local_t[start:end, None], target_grad[start:end, None])
            d = d.to(mm_dtype)  # no copy in fp32; bf16 like Megatron's logits gradient
            h = h if h.dtype == mm_dtype else h.float()
            torch.mm(d, w_mm, out=grad_hidden[start:end])
            _add_weight_grad(grad_weight, d, h)
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None, None


def _add_weight_grad(acc: torch.Tensor, d: torch.Tensor, h: torch.Tensor) -> None:
    """``acc [V/TP, H] += d^T @ h`` for one chunk (``d [c, V/TP]``, ``h [c, H]``). fp32: one in-place addmm.
    bf16: bf16 GEMMs (fp32 accumulation inside) over blocks of vocabulary rows, each added to the fp32
    ``acc``, so the GEMM's own output is at most one workspace, not a second ``[V/TP, H]``."""
    if acc.dtype == d.dtype:
        acc.addmm_(d.t(), h)
        return
    rows = max(1, CHUNK_ELEMENTS // max(1, h.shape[1]))
    for v0 in range(0, acc.shape[0], rows):
        acc[v0:v0 + rows] += d[:, v0:v0 + rows].t() @ h


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, valid_local: int) -> torch.Tensor:
    """fp32 logits ``[c, V/TP]`` of one chunk (matmul in the weights' dtype, fp32 accumulate); padded
    vocabulary columns set to -inf so they stay out of the softmax."""
    logits = (h @ weight.t()).float() if h.dtype == weight.dtype else h.float() @ weight.float().t()
    if valid_local < weight.shape[0]:
        logits[:, valid_local:] = float("-inf")
    return logits


def fused_output_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          loss_mask: torch.Tensor, tp_group: Optional[dist.ProcessGroup] = None, *,
                          sequence_parallel: bool = False, vocab_size: Optional[int] = None,
                          chunk_size: Optional[int] = None) -> torch.Tensor:
    """Per-token log-probs of ``targets`` under ``hidden @ weight^T``, never holding more than a chunk of logits.

    hidden: the final hidden states, batch first as the model returns them, ``[B, S_local, H]``
        (``S_local = T/CP``, or ``T/CP/TP`` under sequence parallelism, then gathered here over TP).
    weight: this rank's output-weight shard ``[V_padded/TP, H]`` (the embedding when tied): the same
        Parameter the model holds, so its gradient reaches DDP as usual.
    targets, loss_mask: ``[B, T/CP]`` (batch first, as the loss sees them); only positions with
        ``loss_mask != 0`` are projected.
    vocab_size: the real vocabulary (columns past it are padding, left out of the softmax).
    Returns ``[B, T/CP]`` fp32 log-probs, 0 where ``loss_mask`` is 0; differentiable in ``hidden`` and
    ``weight``.
    """
    from megatron.core import tensor_parallel

    tp_size, tp_rank = _group_size_rank(tp_group)
    hidden = hidden.transpose(0, 1)  # Megatron's [S, B, H] for its region functions
    if sequence_parallel and tp_size > 1:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, group=tp_group)
    elif tp_size > 1:
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    seq, batch, width = hidden.shape
    if (batch, seq) != tuple(targets.shape) or targets.shape != loss_mask.shape:
        raise ValueError(f"fused_output_logprobs: hidden {tuple(hidden.shape)} (gathered [T, B, H]) does not match "
                         f"targets {tuple(targets.shape)} / loss_mask {tuple(loss_mask.shape)} [B, T]")
    local_vocab = weight.shape[0]
    vocab = vocab_size if vocab_size is not None else local_vocab * tp_size
    valid_local = max(0, min(local_vocab, vocab - tp_rank * local_vocab))
    flat_hidden = hidden.transpose(0, 1).reshape(batch * seq, width)
    positions = loss_mask.reshape(-1).nonzero().squeeze(1)
    out = torch.zeros(batch * seq, dtype=torch.float32, device=hidden.device)
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // max(1, local_vocab))
    picked = _FusedLinearLogprobs.apply(flat_hidden.index_select(0, positions), weight,
                                        targets.reshape(-1)[positions].long(), tp_group, chunk, valid_local)
    return out.index_copy(0, positions, picked).view(batch, seq)
