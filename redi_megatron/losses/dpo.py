"""DPO (Rafailov et al. 2023), offline: reference log-probs are precomputed and stored with the pairs.

    L(pair) = -log sigmoid(beta * [(logp(y_w) - ref(y_w)) - (logp(y_l) - ref(y_l))])

averaged over pairs. The reference log-probs come from one forward-only pass of the frozen starting model
over the pair data (``redi_megatron.parallel.loss_scaling.make_sequence_logps_func``), so no second model
sits in memory during training. As beta -> 0 the gradient tends to ``-beta/2 * grad(logp_w - logp_l)``:
the symmetric, unnormalised REINFORCE-style update the REDI paper compares against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from redi_megatron.errors import UserError
from redi_megatron.losses.common import (
    check_lengths,
    check_pair_tensors,
    check_sft_weight,
    compute_pair_loss,
    pair_metrics,
)
from redi_megatron.losses.registry import LossInputs, LossSpec, register_loss
from redi_megatron.typed import ranged


@dataclass(frozen=True)
class DPOConfig:
    """``beta`` scales the implicit reward ``logp - ref``; ``sft_weight`` adds ``-logp(y_w)/|y_w|`` per pair
    (an SFT anchor on the chosen trace; 0 = plain DPO, the paper's baseline)."""

    beta: float = ranged(0.1, ">0")
    sft_weight: float = ranged(0.0, ">=0")

    def __post_init__(self) -> None:
        check_sft_weight("dpo", self.sft_weight)
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise UserError(f"dpo: beta must be finite and > 0, got {self.beta}")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
             *, beta: float = 0.1, validate: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair DPO loss.

    chosen_logps, rejected_logps: ``[P]`` policy summed completion log-probs.
    ref_chosen_logps, ref_rejected_logps: ``[P]`` reference summed log-probs (no gradient flows to them).
    chosen_lengths, rejected_lengths: ``[P]`` ``|y|``, used for the length-normalised metrics only.
    Returns ``(losses [P], metrics)``: the common pair metrics plus ``reward_chosen``/``reward_rejected``
    (``beta * (logp - ref)``), ``reward_margin`` and ``reward_accuracy``, all detached ``[P]``.
    """
    DPOConfig(beta)  # validates beta
    check_pair_tensors("dpo_loss", chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                       ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                       chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    if validate:
        check_lengths("dpo_loss", chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    chosen_ratio = chosen_logps - ref_chosen_logps.detach().to(chosen_logps.dtype)
    rejected_ratio = rejected_logps - ref_rejected_logps.detach().to(rejected_logps.dtype)
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    metrics = pair_metrics(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)
    rc, rr = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics.update(reward_chosen=rc, reward_rejected=rr, reward_margin=rc - rr,
                   reward_accuracy=(rc > rr).float())
    return losses, metrics


def _compute(inputs: LossInputs, hp: DPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return compute_pair_loss(inputs, dpo_loss, with_reference=True, sft_weight=hp.sft_weight, beta=hp.beta)


DPO = register_loss(LossSpec(
    name="dpo", normalizer="pairs", needs_pairs_together=True, needs_reference=True,
    needs_sequence_logps=True, config_cls=DPOConfig, compute=_compute,
    description="DPO with offline (precomputed) reference log-probs, mean over pairs",
))
