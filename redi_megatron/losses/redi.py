"""REDI (Reinforcement Distillation, arXiv 2505.24850, eq. 5): reference-free, asymmetric, length-normalised.

    L(pair) = -chosen_coef * logp(y_w|x)/|y_w| + alpha * w * logp(y_l|x)/|y_l|,
    w = exp(neg_weighting_gamma * logp(y_l|x)/|y_l|)   (w = 1 when gamma = 0)

averaged over the pairs of the global batch. ``alpha`` in [0, 1] (0.8 in the paper; 1 = symmetric REDI,
0 = SFT on the positives). ``chosen_coef`` and the negative weighting follow the authors' TRL fork
(``loss_type="reinforce"`` with ``reinforce_chosen_coef`` / ``reinforce_rejected_coef`` = alpha /
``use_neg_weighting`` + ``neg_weighting_gamma``): there the weight is computed from the live normalised
log-prob and is *not* detached, so gradient also flows through ``w``; we do the same. ``|y|`` counts every
completion token, end-of-turn and EOS included.

The loss is a sum of one term per sequence, so a pair's two sequences may sit in different microbatches:
:func:`redi_sequence_terms` is the per-sequence form, :func:`redi_loss` the per-pair form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from redi_megatron.errors import UserError
from redi_megatron.losses.common import gather_pairs, normalized_pair_logps, pair_metrics, summarize
from redi_megatron.losses.registry import ROLE_CHOSEN, ROLE_REJECTED, LossInputs, LossSpec, register_loss
from redi_megatron.typed import ranged


@dataclass(frozen=True)
class RediConfig:
    """REDI hyper-parameters: ``alpha`` weights the negatives, ``chosen_coef`` the positives."""

    alpha: float = ranged(0.8, "[0,1]")
    chosen_coef: float = ranged(1.0, ">=0")
    neg_weighting_gamma: float = ranged(0.0, ">=0")

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"redi: alpha must be in [0, 1] (paper: 0.8), got {self.alpha}")
        if not (math.isfinite(self.chosen_coef) and self.chosen_coef >= 0):
            raise UserError(f"redi: chosen_coef must be finite and >= 0, got {self.chosen_coef}")
        if not (math.isfinite(self.neg_weighting_gamma) and self.neg_weighting_gamma >= 0):
            raise UserError(f"redi: neg_weighting_gamma must be finite and >= 0, got {self.neg_weighting_gamma}")


def _neg_weight(rejected_norm: torch.Tensor, gamma: float) -> torch.Tensor:
    if gamma == 0.0:
        return torch.ones_like(rejected_norm)
    return torch.exp(gamma * rejected_norm)


def redi_sequence_terms(logps: torch.Tensor, lengths: torch.Tensor, is_chosen: torch.Tensor, *,
                        alpha: float = 0.8, chosen_coef: float = 1.0, neg_weighting_gamma: float = 0.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence REDI terms.

    logps: ``[N]`` summed completion log-probs; lengths: ``[N]`` ``|y|`` (>= 1); is_chosen: ``[N]`` bool.
    Returns ``(terms [N], neg_weight [N])``: ``-chosen_coef*logp/|y|`` for chosen sequences and
    ``alpha*w*logp/|y|`` for rejected ones; ``neg_weight`` is ``w`` (1 on chosen sequences), detached.
    """
    norm = logps / lengths.to(logps.dtype)
    w = torch.where(is_chosen, torch.ones_like(norm), _neg_weight(norm, neg_weighting_gamma))
    terms = torch.where(is_chosen, -chosen_coef * norm, alpha * w * norm)
    return terms, w.detach()


def redi_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
              rejected_lengths: torch.Tensor, *, alpha: float = 0.8, chosen_coef: float = 1.0,
              neg_weighting_gamma: float = 0.0, validate: bool = True
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair REDI loss.

    chosen_logps, rejected_logps: ``[P]`` summed completion log-probs of y_w and y_l.
    chosen_lengths, rejected_lengths: ``[P]`` ``|y_w|``, ``|y_l|`` (>= 1).
    Returns ``(losses [P], metrics)``; metrics are detached ``[P]`` tensors (see
    ``losses.common.pair_metrics``) plus ``neg_weight``. ``validate=False`` skips the length check
    (it synchronises with the device; the trainer validates once per microbatch instead).
    """
    RediConfig(alpha, chosen_coef, neg_weighting_gamma)
    chosen_norm, rejected_norm = normalized_pair_logps("redi_loss", chosen_logps, rejected_logps, chosen_lengths,
                                                       rejected_lengths, validate)
    w = _neg_weight(rejected_norm, neg_weighting_gamma)
    losses = -chosen_coef * chosen_norm + alpha * w * rejected_norm
    metrics = pair_metrics(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)
    metrics["neg_weight"] = w.detach()
    return losses, metrics


def _compute(inputs: LossInputs, hp: RediConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    assert inputs.seq_logps is not None, "REDI needs whole-sequence log-probs"
    is_chosen = inputs.roles == ROLE_CHOSEN
    is_pair = is_chosen | (inputs.roles == ROLE_REJECTED)
    terms, w = redi_sequence_terms(inputs.seq_logps, inputs.seq_lengths, is_chosen, alpha=hp.alpha,
                                   chosen_coef=hp.chosen_coef, neg_weighting_gamma=hp.neg_weighting_gamma)
    loss_sum = (terms * is_pair.to(terms.dtype)).sum()
    chosen, rejected = gather_pairs(inputs, inputs.seq_logps)
    len_c, len_r = gather_pairs(inputs, inputs.seq_lengths)
    metrics = summarize(pair_metrics(chosen, rejected, len_c, len_r))
    is_rej = (inputs.roles == ROLE_REJECTED).to(w.dtype)
    metrics["neg_weight"] = torch.stack([(w * is_rej).sum(), is_rej.sum()])
    metrics["num_pairs"] = is_chosen.to(torch.float32).sum()
    return loss_sum, metrics


REDI = register_loss(LossSpec(
    name="redi", normalizer="pairs", needs_pairs_together=False, needs_reference=False,
    needs_sequence_logps=True, config_cls=RediConfig, compute=_compute,
    description="REDI: -chosen_coef*logp_w/|y_w| + alpha*w*logp_l/|y_l|, mean over pairs, no reference",
))
