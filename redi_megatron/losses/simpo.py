"""SimPO (Meng et al. 2024): reference-free, length-normalised, with a target reward margin.

    L(pair) = -log sigmoid(beta * (logp(y_w)/|y_w| - logp(y_l)/|y_l|) - gamma)

averaged over pairs. ``gamma`` is the absolute margin (TRL's ``gamma_beta_ratio`` is ``gamma / beta``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from redi_megatron.errors import UserError
from redi_megatron.losses.common import check_sft_weight, compute_pair_loss, normalized_pair_logps, pair_metrics
from redi_megatron.losses.registry import LossInputs, LossSpec, register_loss
from redi_megatron.typed import ranged


@dataclass(frozen=True)
class SimPOConfig:
    """``beta`` scales the normalised log-prob margin, ``gamma`` is the target margin; ``sft_weight`` adds
    ``-logp(y_w)/|y_w|`` per pair (an SFT anchor; 0 = plain SimPO)."""

    beta: float = ranged(2.0, ">0")
    gamma: float = ranged(1.0, "finite")
    sft_weight: float = ranged(0.0, ">=0")

    def __post_init__(self) -> None:
        check_sft_weight("simpo", self.sft_weight)
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise UserError(f"simpo: beta must be finite and > 0, got {self.beta}")
        if not math.isfinite(self.gamma):
            raise UserError(f"simpo: gamma must be finite, got {self.gamma}")


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
               rejected_lengths: torch.Tensor, *, beta: float = 2.0, gamma: float = 1.0, validate: bool = True
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair SimPO loss.

    chosen_logps, rejected_logps: ``[P]`` summed completion log-probs; chosen_lengths, rejected_lengths:
    ``[P]`` ``|y|`` (>= 1). Returns ``(losses [P], metrics)`` with the common detached ``[P]`` pair metrics.
    """
    SimPOConfig(beta, gamma)  # validates beta and gamma
    chosen_norm, rejected_norm = normalized_pair_logps("simpo_loss", chosen_logps, rejected_logps, chosen_lengths,
                                                       rejected_lengths, validate)
    losses = -F.logsigmoid(beta * (chosen_norm - rejected_norm) - gamma)
    return losses, pair_metrics(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)


def _compute(inputs: LossInputs, hp: SimPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return compute_pair_loss(inputs, simpo_loss, sft_weight=hp.sft_weight, beta=hp.beta, gamma=hp.gamma)


SIMPO = register_loss(LossSpec(
    name="simpo", normalizer="pairs", needs_pairs_together=True, needs_reference=False,
    needs_sequence_logps=True, config_cls=SimPOConfig, compute=_compute,
    description="SimPO: -log sigmoid(beta*(logp_w/|y_w| - logp_l/|y_l|) - gamma), mean over pairs",
))
