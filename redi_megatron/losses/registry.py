"""Loss registry: what the trainer needs to know about a loss, looked up by name.

A loss is a :class:`LossSpec`: its normaliser (``"tokens"``: the loss is a sum over loss tokens and the
global batch is averaged per token; ``"pairs"``: a sum over preference pairs averaged per pair), whether
a pair's two sequences must sit in one microbatch, whether it needs stored reference log-probs, its
hyper-parameter dataclass and the function that turns log-probs into a loss sum and metrics.

Adding a loss = a new file in this package that calls :func:`register_loss` + an import line in
``redi_megatron/losses/__init__.py``. Nothing here knows about parallelism:
``redi_megatron.parallel.loss_scaling.make_loss_func`` builds :class:`LossInputs` (already reduced over
context parallelism) and hands them to ``spec.compute``.

Metrics convention (what ``compute`` returns): a dict of detached tensors, each either a ``[2]`` tensor
``(sum, count)`` logged as the mean ``sum / count`` over the whole step, or a scalar logged as a total.
Sums, not means, so they can be added over microbatches and data-parallel ranks exactly.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from redi_megatron.data.batch import ROLE_CHOSEN, ROLE_REJECTED, ROLE_SFT  # noqa: F401  (re-exported)
from redi_megatron.errors import UserError
from redi_megatron.typed import from_mapping

NORMALIZERS = ("tokens", "pairs")


@dataclass
class LossInputs:
    """Everything a loss may use for one microbatch (N sequences, P complete pairs) on one rank.

    token_logps: ``[B, S_local]`` fp32 log-prob of each label, already multiplied by ``loss_mask``;
        ``S_local`` is this context-parallel rank's part of the row.
    loss_mask: ``[B, S_local]`` float, 1 on completion tokens.
    seq_logps: ``[N]`` fp32 summed completion log-prob of each *whole* sequence (reduced over context
        parallelism), or None for ``"tokens"`` losses, which never need it.
    seq_lengths: ``[N]`` fp32 ``|y|``, completion tokens of each whole sequence (end-of-turn/EOS included).
    roles: ``[N]`` long, ``ROLE_SFT``/``ROLE_CHOSEN``/``ROLE_REJECTED``.
    chosen_index, rejected_index: ``[P]`` long, sequence index of the chosen / rejected side of each pair
        whose two sequences are both in this microbatch.
    ref_logps: ``[N]`` fp32 reference-model summed log-probs (DPO), else None.
    """

    token_logps: torch.Tensor
    loss_mask: torch.Tensor
    seq_logps: Optional[torch.Tensor]
    seq_lengths: torch.Tensor
    roles: torch.Tensor
    chosen_index: torch.Tensor
    rejected_index: torch.Tensor
    ref_logps: Optional[torch.Tensor] = None


ComputeFn = Callable[[LossInputs, Any], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass(frozen=True)
class LossSpec:
    """How the trainer must treat one loss.

    compute: ``(inputs: LossInputs, hparams) -> (loss_sum: scalar tensor, metrics: dict)``; ``loss_sum``
        is differentiable and *unnormalised* (a sum over this microbatch's tokens or pairs).
    config_cls: dataclass of the loss hyper-parameters (validated in its ``__post_init__``).
    needs_pairs_together: the loss couples a pair's two sequences (DPO, SimPO), so the batch layout must
        keep them in one microbatch. REDI and SFT are separable per sequence.
    needs_reference: the microbatch must carry ``ref_logps`` (offline reference log-probs).
    needs_sequence_logps: the loss reads ``LossInputs.seq_logps`` (whole-sequence log-probs, which cost
        an all-reduce over context parallelism); independent of the normaliser, so a loss may mix a
        per-token and a per-sequence term.
    roles: the sequence roles the loss accepts; any other role in a microbatch is a data-layout error.
    """

    name: str
    normalizer: Literal["tokens", "pairs"]
    needs_pairs_together: bool
    needs_reference: bool
    config_cls: type
    compute: ComputeFn
    needs_sequence_logps: bool = False
    roles: tuple[int, ...] = (ROLE_CHOSEN, ROLE_REJECTED)
    description: str = ""

    def __post_init__(self) -> None:
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"loss {self.name!r}: normalizer must be one of {NORMALIZERS}, "
                             f"got {self.normalizer!r}")
        if self.needs_reference and not self.needs_sequence_logps:
            raise ValueError(f"loss {self.name!r}: reference log-probs are per sequence, so "
                             "needs_sequence_logps must be True")
        if not dataclasses.is_dataclass(self.config_cls):
            raise ValueError(f"loss {self.name!r}: config_cls must be a dataclass")

    @property
    def per_pair(self) -> bool:
        """Averaged over preference pairs (counted once each, by their chosen sequence)."""
        return self.normalizer == "pairs"

    def make_hparams(self, values: Optional[Mapping[str, Any]] = None) -> Any:
        """The hyper-parameter dataclass from a dict (e.g. ``loss.params``), typed like the rest of the
        config (``redi_megatron.typed``: ``true``, ``'0.8'``, ``null`` or ``[0.8]`` is not a float) and
        range-checked by the dataclass; unknown keys are errors. ValueError naming ``loss.params.<key>``."""
        return from_mapping(self.config_cls, values, source=f"loss {self.name!r}", prefix="loss.params.")


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(spec: LossSpec) -> LossSpec:
    """Add ``spec`` to the registry; a second loss with the same name is an error."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"a loss named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtin_losses() -> None:
    # The built-in losses register themselves when the package is imported.
    import redi_megatron.losses  # noqa: F401


def get_loss(name: str) -> LossSpec:
    """The spec registered as ``name``; a one-line UserError (with a suggestion) otherwise."""
    _load_builtin_losses()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"; did you mean 'loss.name={close[0]}'?" if close else ""
        raise UserError(f"'loss.name': unknown loss {name!r}{hint} Known losses: {', '.join(available_losses())}")
    return _REGISTRY[name]


def available_losses() -> list[str]:
    """Sorted names of all registered losses."""
    _load_builtin_losses()
    return sorted(_REGISTRY)
