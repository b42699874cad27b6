"""The one file that knows how Megatron-Core's schedules scale the loss, and the loss_func built on it.

Megatron-Core 0.16.1 contract (read from the source; pinned by tests/test_loss_scaling.py, which calls
Megatron's own ``forward_step_calc_loss``, ``finalize_model_grads`` and pipeline schedule):

1. ``pipeline_parallel/schedules.py::forward_step_calc_loss`` calls ``loss_func(output_tensor)`` on the last
   pipeline stage only. If it returns a 3-tuple ``(loss, num_tokens, metrics)``:
   - with ``config.calculate_per_token_loss=True`` the loss is backpropagated *as returned*;
   - otherwise it is divided by ``num_tokens`` (clamped to >= 1) and by ``num_microbatches``.
   A 2-tuple ``(loss, metrics)`` is multiplied by the CP size and divided by ``num_microbatches``.
   ``metrics`` is appended to the returned ``forward_data_store`` untouched.
2. The schedules add each microbatch's ``num_tokens`` into an ``int32`` scalar (``total_num_tokens +=
   num_tokens``, so a floating-point count is a type error) and, when ``calculate_per_token_loss``, pass it
   to ``config.finalize_model_grads_func``.
3. ``distributed/finalize_model_grads.py::finalize_model_grads(model, num_tokens)`` first reduces gradients
   (DDP ``finish_grad_sync``), then broadcasts ``num_tokens`` from the last PP stage over the PP group,
   all-reduces it (sum) over the data x context parallel group and scales every gradient by
   ``1 / num_tokens`` (skipped when it is 0).
4. ``distributed/distributed_data_parallel.py``: with ``calculate_per_token_loss`` the gradient buffers use
   ``gradient_scaling_factor = 1`` (a plain *sum* over the data x context parallel group;
   ``average_in_collective`` is refused); without it, ``1 / (DP*CP)`` (a mean).

So we always set ``calculate_per_token_loss=True`` and return, per microbatch, the *unnormalised* local
loss sum and a normaliser contribution whose sum over microbatches and data x context parallel ranks is
the global denominator. The parameter gradient is then ``sum_{mb, dp, cp} grad(loss_sum) / sum(norm)``:
the gradient of the global-batch mean, whatever the microbatch count, DP size, CP size or PP size.

- ``"tokens"`` losses (SFT): loss sum over this CP rank's tokens, normaliser = this CP rank's loss-token
  count; both add up over CP to the whole sequence.
- ``"pairs"`` losses (REDI, DPO, SimPO): per-sequence log-probs are all-reduced over CP with an identity
  backward (``reductions.all_reduce_sum_identity_backward``), so every CP rank computes the same pair loss
  and its backward reaches only its own tokens; summing gradients over CP gives the full gradient exactly
  once. The normaliser (number of pairs, counted by their chosen sequence) is contributed by CP rank 0
  only, so each pair is counted once per global batch.

Metrics: ``loss_func`` returns detached metric sums (see ``redi_megatron.losses.registry``); pair metrics
are zeroed on CP ranks other than 0 for the same reason, so :func:`reduce_step_metrics` just adds
everything over microbatches and the data x context parallel group, then hands the result from the last
pipeline stage to every rank of the pipeline.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from redi_megatron.losses.registry import ROLE_CHOSEN, ROLE_REJECTED, LossInputs, LossSpec
from redi_megatron.parallel.context import check_thd_boundaries, split_for_cp
from redi_megatron.parallel.fused_logprobs import fused_output_logprobs
from redi_megatron.parallel.logprobs import vocab_parallel_logprobs
from redi_megatron.parallel.reductions import sequence_sums, sequence_sums_over_cp
from redi_megatron.parallel.state import ParallelGroups

# Settings the trainer must give Megatron's TransformerConfig for the contract above to hold.
MEGATRON_CONFIG_OVERRIDES = {"calculate_per_token_loss": True}

LossFunc = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]"]


def validate_megatron_config(config: Any) -> None:
    """ValueError unless ``config`` (a Megatron ``TransformerConfig``) follows the loss-scaling contract."""
    if not getattr(config, "calculate_per_token_loss", False):
        raise ValueError("Megatron config: calculate_per_token_loss must be True: redi_megatron's loss_func "
                         "returns unnormalised sums and a global normaliser (see parallel/loss_scaling.py)")


@dataclass
class _Prepared:
    """A microbatch's loss inputs, validated and cut to this CP rank."""

    labels: torch.Tensor        # [1, T/CP]
    loss_mask: torch.Tensor     # [1, T/CP] float
    seq_ids: torch.Tensor       # [1, T/CP] long
    num_sequences: int
    seq_lengths: torch.Tensor   # [N] fp32
    roles: torch.Tensor         # [N] long
    chosen_index: torch.Tensor  # [P]
    rejected_index: torch.Tensor
    num_chosen: torch.Tensor    # scalar int32
    ref_logps: Optional[torch.Tensor]


def _field(mb: Any, name: str, required: bool = True) -> Optional[torch.Tensor]:
    value = getattr(mb, name, None)
    if value is None and required:
        raise ValueError(f"microbatch: field {name!r} is missing")
    return value


def _sample_list(mb: Any, seq_mask: torch.Tensor) -> list:
    ids = getattr(mb, "sample_ids", None)
    idx = seq_mask.nonzero().flatten()
    return (ids[idx] if ids is not None else idx).tolist()[:8]


def _check_token_fields(mb: Any, labels, loss_mask, seq_ids, n: int) -> None:
    shapes = {k: tuple(v.shape) for k, v in (("labels", labels), ("loss_mask", loss_mask), ("seq_ids", seq_ids))}
    if len(set(shapes.values())) != 1 or len(shapes["labels"]) != 2:
        raise ValueError(f"microbatch: labels, loss_mask and seq_ids must all be [B, S], got {shapes}")
    if bool(((loss_mask != 0) & (loss_mask != 1)).any()):
        raise ValueError("microbatch: loss_mask must hold only 0 and 1")
    if bool(((seq_ids < -1) | (seq_ids >= n)).any()):
        raise ValueError(f"microbatch: seq_ids must be in [-1, {n}) for {n} sequences")
    if bool(((seq_ids < 0) & (loss_mask != 0)).any()):
        raise ValueError("microbatch: loss_mask is set on padding tokens (seq_ids == -1)")


def _pair_indices(mb: Any, roles: torch.Tensor, pair_ids: torch.Tensor, together: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence indices (chosen, rejected) of the pairs complete in this microbatch, ordered by pair id."""
    sides = {}
    for role, side in ((ROLE_CHOSEN, "chosen"), (ROLE_REJECTED, "rejected")):
        idx = (roles == role).nonzero().flatten()
        pid = pair_ids[idx]
        if bool((pid < 0).any()):
            raise ValueError(f"microbatch: {side} sequence(s) without a pair id (pair_ids == -1), samples "
                             f"{_sample_list(mb, (roles == role) & (pair_ids < 0))}")
        if pid.unique().numel() != pid.numel():
            raise ValueError(f"microbatch: a pair has more than one {side} sequence (pair_ids {pid.tolist()})")
        sides[side] = dict(zip(pid.tolist(), idx.tolist()))
    complete = sorted(set(sides["chosen"]) & set(sides["rejected"]))
    lonely = sorted(set(sides["chosen"]) ^ set(sides["rejected"]))
    if together and lonely:
        raise ValueError(f"microbatch: pair(s) {lonely[:8]} have only one side here; this loss needs a pair's "
                         "chosen and rejected sequences in the same microbatch")
    as_index = lambda side: torch.tensor([sides[side][p] for p in complete], dtype=torch.long,  # noqa: E731
                                         device=roles.device)
    return as_index("chosen"), as_index("rejected")


def _check_sequence_fields(mb: Any, roles, lengths, loss_mask, seq_ids, roles_allowed, loss_name: str) -> None:
    if roles_allowed is not None:
        bad = ~torch.isin(roles, torch.tensor(roles_allowed, device=roles.device))
        if bool(bad.any()):
            raise ValueError(f"microbatch: loss {loss_name!r} accepts roles {list(roles_allowed)}, but samples "
                             f"{_sample_list(mb, bad)} have roles {roles[bad].unique().tolist()}")
    if bool((lengths < 1).any()):
        raise ValueError(f"microbatch: samples {_sample_list(mb, lengths < 1)} have an empty completion "
                         "(num_loss_tokens == 0)")
    counted = sequence_sums(loss_mask.float(), seq_ids.long(), roles.numel())
    if not torch.equal(counted, lengths.float()):
        raise ValueError(f"microbatch: num_loss_tokens disagrees with loss_mask for samples "
                         f"{_sample_list(mb, counted != lengths.float())}")


def _prepare(mb: Any, groups: ParallelGroups, *, roles_allowed: Optional[tuple[int, ...]], per_pair: bool,
             together: bool, needs_reference: bool, loss_name: str) -> _Prepared:
    labels, loss_mask, seq_ids = _field(mb, "labels"), _field(mb, "loss_mask"), _field(mb, "seq_ids")
    roles, pair_ids = _field(mb, "roles").long(), _field(mb, "pair_ids").long()
    lengths = _field(mb, "num_loss_tokens")
    n = roles.numel()
    if roles.dim() != 1 or pair_ids.shape != roles.shape or lengths.shape != roles.shape:
        raise ValueError(f"microbatch: roles, pair_ids and num_loss_tokens must all be [N], got "
                         f"{tuple(roles.shape)}, {tuple(pair_ids.shape)}, {tuple(lengths.shape)}")
    _check_token_fields(mb, labels, loss_mask, seq_ids, n)
    _check_sequence_fields(mb, roles, lengths, loss_mask, seq_ids, roles_allowed, loss_name)
    ref = _field(mb, "ref_logps", required=needs_reference)
    if needs_reference and ref.shape != roles.shape:
        raise ValueError(f"microbatch: ref_logps must be [N]={n}, got {tuple(ref.shape)}")
    no_pairs = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    chosen_idx, rejected_idx = _pair_indices(mb, roles, pair_ids, together) if per_pair else no_pairs
    cp_size = ParallelGroups.size(groups.cp)
    cu = _field(mb, "cu_seqlens_padded", required=cp_size > 1)
    if cp_size > 1:
        check_thd_boundaries(cu, labels.shape[1], cp_size)
    cut = lambda t: split_for_cp(t, groups.cp, cu)  # noqa: E731  (the model's per-sequence CP partition)
    return _Prepared(
        labels=cut(labels).long(), loss_mask=cut(loss_mask).float(),
        seq_ids=cut(seq_ids).long(), num_sequences=n, seq_lengths=lengths.float(),
        roles=roles, chosen_index=chosen_idx, rejected_index=rejected_idx,
        num_chosen=(roles == ROLE_CHOSEN).sum().to(torch.int32),
        ref_logps=None if ref is None else ref.float())


def _token_logps(p: _Prepared, output: torch.Tensor, groups: ParallelGroups, chunk_size: Optional[int],
                 inplace_backward: bool, vocab_size: Optional[int], head: Optional["OutputHead"]) -> torch.Tensor:
    """Masked per-token log-probs ``[1, T/CP]`` from the model's output: logits ``[1, T/CP, V/TP]``, or with
    ``head`` the final hidden states ``[1, T/CP(/TP), H]`` (fused output layer, no logits)."""
    dev = output.device
    labels, mask = p.labels.to(dev, non_blocking=True), p.loss_mask.to(dev, non_blocking=True)
    if head is not None:
        return fused_output_logprobs(output, head.weight, labels, mask, groups.tp,
                                     sequence_parallel=head.sequence_parallel, vocab_size=vocab_size,
                                     chunk_size=chunk_size)
    if tuple(output.shape[:2]) != tuple(p.labels.shape):
        raise ValueError(f"loss_func: logits {tuple(output.shape)} do not match this CP rank's labels "
                         f"{tuple(p.labels.shape)} (expected [B, S/CP, V/TP], batch first)")
    tok = vocab_parallel_logprobs(output, labels, groups.tp, chunk_size=chunk_size,
                                  inplace_backward=inplace_backward, validate=vocab_size is None,
                                  vocab_size=vocab_size)
    return tok * mask


@dataclass(frozen=True)
class OutputHead:
    """The output projection for a model that returns hidden states (``models.output_head``)."""

    weight: torch.Tensor            # [V_padded/TP, H]: the model's own Parameter
    sequence_parallel: bool = False


def make_loss_func(spec: LossSpec, hparams: Any, microbatch: Any, groups: ParallelGroups, *,
                   chunk_size: Optional[int] = None, vocab_size: Optional[int] = None,
                   inplace_backward: bool = True, head: Optional[OutputHead] = None) -> LossFunc:
    """Build Megatron's ``loss_func`` for one microbatch (call it in ``forward_step``).

    microbatch: the data contract's ``Microbatch`` (one packed THD row) with full (not CP-split)
        ``labels``/``loss_mask``/``seq_ids [1, T]``, ``cu_seqlens_padded`` (cut per sequence under CP)
        and ``roles``/``pair_ids``/``num_loss_tokens``/(``ref_logps``) ``[N]``; it is validated here,
        once, before the forward pass.
    vocab_size: the real vocabulary: labels are range-checked here instead of inside the step (saves a
        sync), and the logits' padding columns (``V_padded - vocab_size``) are left out of the softmax.
    inplace_backward: write the logits gradient into the logits buffer (see ``parallel.logprobs``).
    head: set when the model returns final hidden states instead of logits: log-probs then come from
        ``parallel.fused_logprobs`` (no ``[T, V/TP]`` logits; only loss positions are projected).
    Returns ``loss_func(logits [1, T/CP, V/TP]) -> (loss_sum, normaliser int32, metrics)`` for Megatron
    with ``calculate_per_token_loss=True`` (module docstring).
    """
    if not isinstance(hparams, spec.config_cls):
        raise ValueError(f"loss {spec.name!r}: hparams must be a {spec.config_cls.__name__}, "
                         f"got {type(hparams).__name__}")
    p = _prepare(microbatch, groups, roles_allowed=spec.roles, per_pair=spec.per_pair,
                 together=spec.needs_pairs_together, needs_reference=spec.needs_reference, loss_name=spec.name)
    if vocab_size is not None and bool(((p.labels < 0) | (p.labels >= vocab_size)).any()):
        raise ValueError(f"microbatch: labels outside the vocabulary [0, {vocab_size})")
    first_cp_rank = ParallelGroups.rank(groups.cp) == 0

    def loss_func(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        dev = logits.device
        tok = _token_logps(p, logits, groups, chunk_size, inplace_backward, vocab_size, head)
        seq = (sequence_sums_over_cp(tok, p.seq_ids.to(dev), p.num_sequences, groups.cp)
               if spec.needs_sequence_logps else None)
        inputs = LossInputs(token_logps=tok, loss_mask=p.loss_mask.to(dev), seq_logps=seq,
                            seq_lengths=p.seq_lengths.to(dev), roles=p.roles.to(dev),
                            chosen_index=p.chosen_index.to(dev), rejected_index=p.rejected_index.to(dev),
                            ref_logps=None if p.ref_logps is None else p.ref_logps.to(dev))
        loss_sum, metrics = spec.compute(inputs, hparams)
        if spec.per_pair:
            normaliser = p.num_chosen.to(dev) if first_cp_rank else torch.zeros((), dtype=torch.int32, device=dev)
        else:
            normaliser = p.loss_mask.sum().to(device=dev, dtype=torch.int32)
        metrics["loss"] = torch.stack([loss_sum.detach().float(), normaliser.float()])
        if spec.per_pair and not first_cp_rank:
            # Every CP rank holds the same pair metrics; only CP rank 0's are counted.
            metrics = {k: torch.zeros_like(v) for k, v in metrics.items()}
        return loss_sum, normaliser, metrics

    return loss_func


def make_sequence_logps_func(microbatch: Any, groups: ParallelGroups, *, chunk_size: Optional[int] = None,
                             vocab_size: Optional[int] = None, head: Optional[OutputHead] = None) -> LossFunc:
    """``loss_func`` for a forward-only pass that records whole-sequence log-probs (DPO reference pass).

    Returns ``(0, 0, {"seq_logps": [N], "sample_ids": [N]})``; ``seq_logps`` is reduced over CP, so any
    CP rank's copy is complete (take CP rank 0's).
    """
    p = _prepare(microbatch, groups, roles_allowed=None, per_pair=False, together=False,
                 needs_reference=False, loss_name="reference log-probs")
    sample_ids = getattr(microbatch, "sample_ids", None)

    def loss_func(logits: torch.Tensor):
        with torch.no_grad():
            tok = _token_logps(p, logits, groups, chunk_size, False, vocab_size, head)
            seq = sequence_sums_over_cp(tok, p.seq_ids.to(logits.device), p.num_sequences, groups.cp)
        zero = torch.zeros((), device=logits.device)
        out = {"seq_logps": seq}
        if sample_ids is not None:
            out["sample_ids"] = sample_ids
        return zero, torch.zeros((), dtype=torch.int32, device=logits.device), out

    return loss_func


def _sum_metrics(metrics_list: list[dict[str, torch.Tensor]]) -> tuple[list[str], list[int], torch.Tensor]:
    keys = sorted(metrics_list[0])
    for i, m in enumerate(metrics_list):
        if sorted(m) != keys:
            raise ValueError(f"microbatch {i} has metrics {sorted(m)}, microbatch 0 has {keys}")
    parts = [torch.stack([m[k].detach().float().reshape(-1) for m in metrics_list]).sum(0) for k in keys]
    for k, v in zip(keys, parts):
        assert v.numel() in (1, 2), f"metric {k!r} must be a scalar total or a [sum, count] pair"
    return keys, [v.numel() for v in parts], torch.cat(parts)


def reduce_step_metrics(metrics_list: list[dict[str, torch.Tensor]], groups: ParallelGroups) -> dict[str, float]:
    """One step's per-microbatch metrics -> logged scalars, identical on every rank of the pipeline.

    Call on every rank after the schedule (``metrics_list`` is the schedule's returned list; empty on
    non-last pipeline stages). ``[sum, count]`` metrics become ``sum / count`` over the whole global batch
    (NaN when the count is 0), scalars become totals; ``"loss"`` is the objective per normaliser unit.
    Collectives: one all-reduce over data x context parallel ranks (last stage), one object broadcast
    over the pipeline group.
    """
    pp_size, pp_rank = ParallelGroups.size(groups.pp), ParallelGroups.rank(groups.pp)
    result: Optional[dict[str, float]] = None
    if pp_rank == pp_size - 1:
        if not metrics_list:
            raise ValueError("reduce_step_metrics: no metrics on the last pipeline stage")
        keys, sizes, vec = _sum_metrics(metrics_list)
        if ParallelGroups.size(groups.dp_cp) > 1:
            dist.all_reduce(vec, group=groups.dp_cp)
        result = {}
        for key, part in zip(keys, vec.double().cpu().split(sizes)):
            if part.numel() == 2:
                result[key] = float(part[0] / part[1]) if part[1] > 0 else math.nan
            else:
                result[key] = float(part[0])
    if pp_size > 1:
        box = [result]
        dist.broadcast_object_list(box, src=dist.get_global_rank(groups.pp, pp_size - 1), group=groups.pp)
        result = box[0]
    assert result is not None
    return result
