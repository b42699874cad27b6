"""Supervised fine-tuning: negative log-likelihood of the completion tokens, averaged per token."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from redi_megatron.losses.registry import ROLE_CHOSEN, ROLE_SFT, LossInputs, LossSpec, register_loss


@dataclass(frozen=True)
class SFTConfig:
    """SFT has no hyper-parameters."""


def sft_loss(token_logps: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token negative log-likelihood.

    token_logps: ``[...]`` log-prob of each label (any shape, e.g. ``[B, S]``).
    loss_mask: same shape, 1 on completion tokens, 0 on prompt and padding.
    Returns ``(nll [...], metrics)``: ``nll = -token_logps * loss_mask`` (so ``nll.sum()`` is the loss sum
    and ``metrics["num_tokens"]`` its per-token normaliser); metrics are detached scalars.
    """
    if token_logps.shape != loss_mask.shape:
        raise ValueError(f"sft_loss: token_logps {tuple(token_logps.shape)} and loss_mask "
                         f"{tuple(loss_mask.shape)} must have the same shape")
    if not token_logps.is_floating_point():
        raise ValueError(f"sft_loss: token_logps must be floating point, got {token_logps.dtype}")
    mask = loss_mask.to(token_logps.dtype)
    nll = -token_logps * mask
    return nll, {"num_tokens": mask.detach().sum(), "nll_sum": nll.detach().sum()}


def _compute(inputs: LossInputs, hparams: SFTConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    nll, m = sft_loss(inputs.token_logps, inputs.loss_mask)
    loss_sum = nll.sum()
    # A local sum: adding it over context-parallel ranks gives the full count. The trainer adds
    # "loss" = [loss_sum, normaliser], which for SFT is the mean NLL per token.
    return loss_sum, {"num_tokens": m["num_tokens"]}


SFT = register_loss(LossSpec(
    name="sft", normalizer="tokens", needs_pairs_together=False, needs_reference=False,
    config_cls=SFTConfig, compute=_compute,
    # SFT on the chosen side of pair data is fine; training on rejected (incorrect) traces is a bug.
    roles=(ROLE_SFT, ROLE_CHOSEN),
    description="negative log-likelihood of completion tokens, mean over all loss tokens of the global batch",
))
