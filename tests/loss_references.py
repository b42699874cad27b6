"""Shared helpers for the loss tests: synthetic microbatches and plain single-device references.

The references are written from the formulas with Python loops over sequences and pairs (no code from
``redi_megatron.losses`` or ``redi_megatron.parallel``), so the parallel code is checked against
something independent. No test functions live here.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from redi_megatron.data.batch import ROLE_CHOSEN, ROLE_REJECTED, ROLE_SFT, SequenceSpec, build_microbatch

VOCAB = 64      # divisible by TP in {1, 2, 4}
ROW_LEN = 64    # one packed (THD) row; every sequence padded to a multiple of 2*CP for CP in {1, 2}


def make_microbatch(seed: int, kind: str, layout: str, with_ref: bool = False):
    """One packed row of ``kind`` "pairs" or "sft": "packed" holds four sequences of uneven lengths, each
    padded to a multiple of 4; "padded" holds two, each padded to half the row. Pairs never leave it."""
    rng = np.random.default_rng(seed)
    count, multiple = (4, 4) if layout == "packed" else (2, ROW_LEN // 2)
    roles = [ROLE_SFT] * count if kind == "sft" else [ROLE_CHOSEN, ROLE_REJECTED] * (count // 2)
    specs = []
    for i, role in enumerate(roles):
        sample = seed * 100 + (i if kind == "sft" else i // 2)
        length = int(rng.integers(4, ROW_LEN // 4 + 1))
        prompt = int(rng.integers(1, length - 1))
        ref = float(rng.normal(-20, 3)) if with_ref else None
        specs.append(SequenceSpec(rng.integers(1, VOCAB, size=length), prompt, role, sample, ref))
    return build_microbatch(specs, ROW_LEN, pad_id=0, pad_to_multiple_of=multiple, with_ref_logps=with_ref)


def make_logits(seed: int, mb, dtype: torch.dtype) -> torch.Tensor:
    """Full logits ``[1, T, VOCAB]`` in ``dtype`` (values on the bf16 grid, so sharding is exact)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*mb.labels.shape, VOCAB, generator=g) * 2.0
    return x.to(dtype)


def ref_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def ref_sequence_logps(tok: torch.Tensor, mb) -> list[torch.Tensor]:
    out = []
    for n in range(mb.roles.numel()):
        sel = (mb.seq_ids == n) & (mb.loss_mask > 0)
        out.append(tok[sel].sum())
    return out


def ref_pairs(mb) -> list[tuple[int, int]]:
    pairs = {}
    for n in range(mb.roles.numel()):
        if int(mb.roles[n]) in (ROLE_CHOSEN, ROLE_REJECTED):
            pairs.setdefault(int(mb.pair_ids[n]), {})[int(mb.roles[n])] = n
    return [(d[ROLE_CHOSEN], d[ROLE_REJECTED]) for _, d in sorted(pairs.items())]


def ref_loss(name: str, hp, logits: torch.Tensor, mb) -> tuple[torch.Tensor, float, dict[str, float]]:
    """(loss sum, normaliser, summed metrics) of one microbatch, from the formulas."""
    tok = ref_token_logps(logits, mb.labels) * mb.loss_mask
    if name == "sft":
        return -tok.sum(), float(mb.loss_mask.sum()), {}
    seq = ref_sequence_logps(tok, mb)
    lens = [float(x) for x in mb.num_loss_tokens]
    total = torch.zeros(())
    acc = margin = 0.0
    pairs = ref_pairs(mb)
    for c, r in pairs:
        cn, rn = seq[c] / lens[c], seq[r] / lens[r]
        if name == "redi":
            w = torch.exp(hp.neg_weighting_gamma * rn)
            total = total - hp.chosen_coef * cn + hp.alpha * w * rn
        elif name == "dpo":
            delta = (seq[c] - mb.ref_logps[c]) - (seq[r] - mb.ref_logps[r])
            total = total - F.logsigmoid(hp.beta * delta)
        elif name == "simpo":
            total = total - F.logsigmoid(hp.beta * (cn - rn) - hp.gamma)
        acc += float((cn > rn).detach())
        margin += float((cn - rn).detach())
    return total, float(len(pairs)), {"accuracy": acc, "margin": margin}


def ref_global(name: str, hp, logits_list: list[torch.Tensor], mbs: list) -> dict:
    """Reference over a whole global batch: mean loss and d(mean loss)/d(logits) of every microbatch."""
    leaves = [x.detach().clone().requires_grad_() for x in logits_list]
    parts = [ref_loss(name, hp, x, mb) for x, mb in zip(leaves, mbs)]
    norm = sum(p[1] for p in parts)
    loss = sum(p[0] for p in parts) / norm
    loss.backward()
    metrics = {"loss": float(loss.detach())}
    if name != "sft":
        metrics["accuracy"] = sum(p[2]["accuracy"] for p in parts) / norm
        metrics["margin"] = sum(p[2]["margin"] for p in parts) / norm
    return {"loss": float(loss.detach()), "norm": norm, "grads": [x.grad for x in leaves], "metrics": metrics}


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """fp32: within 1e-5; bf16 gradients: within one bf16 rounding step of the reference."""
    a, b = a.float(), b.float()
    if dtype == torch.float32:
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    return torch.allclose(a, b, rtol=2 ** -7, atol=1e-6)


def isclose(a: float, b: float, tol: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
