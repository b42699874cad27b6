"""Shared pieces of the pair losses: input checks, per-pair metrics and their step summaries."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch

from redi_megatron.errors import UserError
from redi_megatron.losses.registry import LossInputs


def check_pair_tensors(loss: str, **tensors: Optional[torch.Tensor]) -> None:
    """ValueError unless every given tensor is 1-D and all have the same length ``[P]``."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    for name, shape in shapes.items():
        if len(shape) != 1:
            raise ValueError(f"{loss}: {name} must be a 1-D tensor [P] (one value per pair), got shape {shape}")
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{loss}: mismatched shapes {shapes}; all must be [P]")
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{loss}: {name} must be a floating-point tensor, got {t.dtype}")


def check_lengths(loss: str, **lengths: torch.Tensor) -> None:
    """ValueError if any completion length is < 1 (|y| = 0 would divide by zero)."""
    for name, t in lengths.items():
        bad = t < 1
        if bool(bad.any()):
            idx = bad.nonzero().flatten().tolist()[:8]
            raise ValueError(f"{loss}: {name} has completions of length < 1 at pair index(es) {idx}; "
                             "every completion needs at least one loss token")


def normalized_pair_logps(loss: str, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                          chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
                          validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked ``logp(y)/|y|`` of both sides, ``[P]`` each (the length-normalised losses' common start).

    ``validate=False`` skips the length check, which synchronises with the device.
    """
    check_pair_tensors(loss, chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                       chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    if validate:
        check_lengths(loss, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    return (chosen_logps / chosen_lengths.to(chosen_logps.dtype),
            rejected_logps / rejected_lengths.to(rejected_logps.dtype))


def pair_metrics(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
                 rejected_lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached per-pair metrics ``[P]``: raw and length-normalised log-probs, margin, accuracy, lengths.

    ``margin`` is ``chosen_norm - rejected_norm`` and ``accuracy`` is ``margin > 0`` (as 0/1 floats).
    """
    c, r = chosen_logps.detach().float(), rejected_logps.detach().float()
    lc, lr = chosen_lengths.detach().float(), rejected_lengths.detach().float()
    cn, rn = c / lc, r / lr
    return {
        "chosen_logps": c, "rejected_logps": r, "chosen_logps_norm": cn, "rejected_logps_norm": rn,
        "margin": cn - rn, "accuracy": (cn > rn).float(), "chosen_len": lc, "rejected_len": lr,
    }


def summarize(per_pair: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-pair metrics ``[P]`` -> ``{name: [sum, P]}`` (the registry's mean-metric convention)."""
    out = {}
    for name, v in per_pair.items():
        count = torch.full((), v.numel(), dtype=torch.float32, device=v.device)
        out[name] = torch.stack([v.float().sum(), count])
    return out


def gather_pairs(inputs: LossInputs, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values [N]`` -> (chosen side ``[P]``, rejected side ``[P]``) of this microbatch's complete pairs."""
    return values[inputs.chosen_index], values[inputs.rejected_index]


def compute_pair_loss(inputs: LossInputs, loss_fn: Callable[..., tuple[torch.Tensor, dict]], *,
                      with_reference: bool = False, sft_weight: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The registry adapter of every loss that couples both sides of a pair (DPO, SimPO).

    ``loss_fn(chosen, rejected, [ref_chosen, ref_rejected,] chosen_lengths=, rejected_lengths=, ...)``
    returns per-pair losses ``[P]`` and per-pair metrics. ``sft_weight`` adds the chosen trace's
    length-normalised NLL, ``-sft_weight * logp(y_w)/|y_w|``, to each pair (an SFT anchor, as in RPO or
    NeMo-RL's ``sft_loss_weight``; still averaged over pairs). Returns the sum over pairs and summaries.
    """
    assert inputs.seq_logps is not None, "pair losses need whole-sequence log-probs"
    chosen, rejected = gather_pairs(inputs, inputs.seq_logps)
    len_c, len_r = gather_pairs(inputs, inputs.seq_lengths)
    refs = ()
    if with_reference:
        assert inputs.ref_logps is not None, "this loss needs reference log-probs"
        refs = gather_pairs(inputs, inputs.ref_logps)
    losses, per_pair = loss_fn(chosen, rejected, *refs, chosen_lengths=len_c, rejected_lengths=len_r,
                               validate=False, **kwargs)
    if sft_weight:
        nll = -chosen / len_c
        losses = losses + sft_weight * nll
        per_pair["sft_nll"] = nll.detach()
    metrics = summarize(per_pair)
    metrics["num_pairs"] = torch.full((), float(losses.numel()), device=losses.device)
    return losses.sum(), metrics


def check_sft_weight(loss: str, sft_weight: float) -> None:
    if not (math.isfinite(sft_weight) and sft_weight >= 0):
        raise UserError(f"{loss}: sft_weight must be finite and >= 0, got {sft_weight}")
