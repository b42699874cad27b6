"""Deterministic, DP-sharded packing of samples into microbatches, one optimizer step at a time.

For step ``s`` of epoch ``e`` every rank computes the same plan locally, with no communication:

1. the epoch order is ``np.random.default_rng([seed, e]).permutation(n)``; step ``s`` takes the next
   ``global_batch_size`` samples (SFT sequences or pairs);
2. the samples are spread over the DP ranks largest first, each to the rank with the fewest tokens so
   far (balanced compute: ranks wait for the slowest at the gradient all-reduce);
3. on each rank, first-fit-decreasing packs its samples into microbatches, each one packed (THD) row of
   at most ``micro_batch_tokens`` tokens; a pair's chosen and rejected always land in the same
   microbatch; every sequence occupies a multiple of ``pad_to_multiple_of`` tokens; with
   ``equalize_microbatches`` ranks with fewer microbatches get empty (all-padding, zero-loss) ones so
   every rank runs the same number, rounded up to a multiple of ``microbatch_multiple`` (the
   interleaved pipeline schedule needs a multiple of the pipeline size);
4. the global normalizers (loss tokens, pairs, sequences) are summed over the whole step.

Row length ``T`` (``row_shape``): ``"trim"`` = the microbatch's packed length (variable_seq_lengths);
``"step"`` = one ``T`` for every microbatch of the step on every rank (the longest of the step; the
interleaved schedule exchanges no shapes, so they stay fixed within a step); ``"static"`` = always
``micro_batch_tokens``. The position
(epoch, step) is the checkpointable state.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from redi_megatron.errors import UserError

from .batch import Microbatch, SequenceSpec, StepBatch, build_microbatch

STATE_VERSION = 1
ROW_SHAPES = ("trim", "step", "static")


class PackableDataset(Protocol):
    """What the sampler needs from a dataset (``TokenizedDataset`` implements it)."""

    kind: str  # "sft" | "pair"
    has_ref_logps: bool

    def __len__(self) -> int: ...
    def seq_lengths(self) -> np.ndarray: ...  # int [n, k] total tokens per sequence
    def loss_token_counts(self) -> np.ndarray: ...  # int [n, k]
    def sequences(self, i: int) -> list[SequenceSpec]: ...


@dataclass(frozen=True)
class PackingConfig:
    """Batching schema. ``pad_to_multiple_of`` = 2*CP*(TP if sequence_parallel else 1) from the trainer."""

    global_batch_size: int  # samples per optimizer step over all DP ranks
    micro_batch_tokens: int  # token budget of one microbatch (one packed row)
    pad_to_multiple_of: int = 1
    microbatch_multiple: int = 1  # pad each rank's microbatch count to a multiple of this
    row_shape: str = "trim"  # trim | step | static
    equalize_microbatches: bool = True
    drop_last: bool = False  # drop the last, smaller step of an epoch
    shuffle: bool = True
    seed: int = 42

    def validate(self) -> None:
        for name in ("global_batch_size", "micro_batch_tokens", "pad_to_multiple_of", "microbatch_multiple"):
            if getattr(self, name) < 1:
                raise UserError(f"PackingConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.row_shape not in ROW_SHAPES:
            raise UserError(f"PackingConfig.row_shape {self.row_shape!r} not in {ROW_SHAPES}")
        if self.micro_batch_tokens % self.pad_to_multiple_of:
            raise UserError(f"PackingConfig.micro_batch_tokens ({self.micro_batch_tokens}) must be a multiple "
                             f"of pad_to_multiple_of ({self.pad_to_multiple_of})")


# A placed sequence: (sample id, index of the sequence within its sample).
Slot = tuple[int, int]


@dataclass
class _Bin:
    row: list[Slot]
    used: int = 0
    tokens: int = 0


@dataclass
class StepPlan:
    """The whole step (all DP ranks); ``ranks[r]`` = microbatches of rank r, each a list of slots (one row)."""

    epoch: int
    step: int
    sample_ids: np.ndarray
    ranks: list[list[list[Slot]]]
    num_loss_tokens: int
    num_pairs: int
    num_sequences: int
    num_real_tokens: int


class PackedStepSampler:
    """Yields this DP rank's :class:`StepBatch` for every optimizer step, forever (epochs roll over)."""

    def __init__(self, dataset: PackableDataset, config: PackingConfig, dp_rank: int = 0, dp_size: int = 1,
                 pad_id: int = 0) -> None:
        config.validate()
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        n = len(dataset)
        if n == 0:
            raise UserError("cannot sample from an empty dataset")
        if config.drop_last and n < config.global_batch_size:
            raise UserError(f"drop_last with {n} samples < global_batch_size {config.global_batch_size}: no steps")
        self.dataset, self.cfg, self.dp_rank, self.dp_size, self.pad_id = dataset, config, dp_rank, dp_size, pad_id
        self.is_pair = dataset.kind == "pair"
        m = config.pad_to_multiple_of
        self._lengths = np.asarray(dataset.seq_lengths(), dtype=np.int64)
        self._padded = -(-self._lengths // m) * m
        self._loss = np.asarray(dataset.loss_token_counts(), dtype=np.int64)
        self._check_fits()
        self.epoch, self.step = 0, 0
        self._perm_epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ planning
    def _check_fits(self) -> None:
        S = self.cfg.micro_batch_tokens
        bad = np.nonzero(self._padded.sum(axis=1) > S)[0]  # a sample (a whole pair) shares one row
        if bad.size:
            worst = int(bad[np.argmax(self._padded[bad].sum(axis=1))])
            raise UserError(
                f"{bad.size} sample(s) do not fit one microbatch of {S} tokens, e.g. sample ids "
                f"{bad[:10].tolist()} (sample {worst}: sequence lengths {self._lengths[worst].tolist()}); "
                "raise data.micro_batch_tokens or length-filter the data (nothing is truncated)"
            )

    @property
    def steps_per_epoch(self) -> int:
        n, g = len(self.dataset), self.cfg.global_batch_size
        return n // g if self.cfg.drop_last else -(-n // g)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = len(self.dataset)
            self._perm = (np.random.default_rng([self.cfg.seed, epoch]).permutation(n) if self.cfg.shuffle
                          else np.arange(n, dtype=np.int64))
            self._perm_epoch = epoch
        return self._perm

    def _pack(self, samples: np.ndarray) -> list[_Bin]:
        """First-fit-decreasing: each sample (all its sequences) goes to the first row it fits."""
        S = self.cfg.micro_batch_tokens
        order = sorted(samples.tolist(), key=lambda i: (-int(self._padded[i].sum()), i))
        bins: list[_Bin] = []
        for i in order:
            need = int(self._padded[i].sum())
            b = next((b for b in bins if b.used + need <= S), None)
            if b is None:
                b = _Bin([])
                bins.append(b)
            b.row.extend((i, j) for j in range(self._padded.shape[1]))
            b.used += need
            b.tokens += int(self._lengths[i].sum())
        return bins

    def _balance(self, samples: np.ndarray) -> list[list[int]]:
        """Samples per DP rank: largest first, each to the rank with the fewest padded tokens so far."""
        ranks: list[list[int]] = [[] for _ in range(self.dp_size)]
        load = [0] * self.dp_size
        for i in sorted(samples.tolist(), key=lambda i: (-int(self._padded[i].sum()), i)):
            r = min(range(self.dp_size), key=lambda r: (load[r], r))
            ranks[r].append(i)
            load[r] += int(self._padded[i].sum())
        return ranks

    def plan(self, epoch: int, step: int) -> StepPlan:
        """The plan of step ``step`` of epoch ``epoch`` for all DP ranks (pure function of its arguments)."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step {step} out of range [0, {self.steps_per_epoch})")
        g = self.cfg.global_batch_size
        samples = self._epoch_order(epoch)[step * g:(step + 1) * g]
        ranks = [self._pack(np.asarray(r, dtype=np.int64)) for r in self._balance(samples)]
        return StepPlan(
            epoch=epoch, step=step, sample_ids=samples.copy(),
            ranks=[[b.row for b in rank] for rank in ranks],
            num_loss_tokens=int(self._loss[samples].sum()),
            num_pairs=int(samples.size) if self.is_pair else 0,
            num_sequences=int(samples.size * self._lengths.shape[1]),
            num_real_tokens=int(self._lengths[samples].sum()),
        )

    # ------------------------------------------------------------- materializing
    def _row_tokens(self, row: list[Slot]) -> int:
        return sum(int(self._padded[i, j]) for i, j in row)

    def row_length(self, plan: StepPlan, row: list[Slot]) -> int:
        """``T`` of one microbatch of ``plan`` under ``row_shape``."""
        m, shape = self.cfg.pad_to_multiple_of, self.cfg.row_shape
        if shape == "static":
            return self.cfg.micro_batch_tokens
        rows = [r for rank in plan.ranks for r in rank] if shape == "step" else [row]
        return max([self._row_tokens(r) for r in rows] + [m])

    def microbatches_per_rank(self, plan: StepPlan) -> int:
        """How many microbatches every rank runs for ``plan`` (with ``equalize_microbatches``)."""
        k = self.cfg.microbatch_multiple
        return -(-max(len(r) for r in plan.ranks) // k) * k

    def _microbatch(self, row: list[Slot], row_len: int) -> Microbatch:
        cache: dict[int, list[SequenceSpec]] = {}
        specs = []
        for i, j in row:
            if i not in cache:
                cache[i] = self.dataset.sequences(i)
            specs.append(cache[i][j])
        return build_microbatch(specs, row_len, self.pad_id, self.cfg.pad_to_multiple_of,
                                with_ref_logps=self.dataset.has_ref_logps)

    def _rows_of_rank(self, plan: StepPlan, rank: int) -> list[list[Slot]]:
        mine = plan.ranks[rank]
        if self.cfg.equalize_microbatches:
            mine = mine + [[]] * (self.microbatches_per_rank(plan) - len(mine))
        return mine

    def build(self, plan: StepPlan) -> StepBatch:
        """This rank's StepBatch for ``plan``."""
        return StepBatch(
            microbatches=[self._microbatch(row, self.row_length(plan, row))
                          for row in self._rows_of_rank(plan, self.dp_rank)],
            global_num_loss_tokens=plan.num_loss_tokens,
            global_num_pairs=plan.num_pairs,
            global_num_sequences=plan.num_sequences,
        )

    def next_step(self) -> StepBatch:
        """The StepBatch at the current position, then advance (rolling over to the next epoch)."""
        batch = self.build(self.plan(self.epoch, self.step))
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[StepBatch]:
        while True:
            yield self.next_step()

    # --------------------------------------------------------------- checkpoint
    def _identity(self) -> dict[str, Any]:
        cfg = asdict(self.cfg)
        return {"num_samples": len(self.dataset), "kind": self.dataset.kind,
                "sequence_lengths_sum": int(self._lengths.sum()),
                **{k: cfg[k] for k in ("global_batch_size", "seed", "shuffle", "drop_last")}}

    def state_dict(self) -> dict[str, Any]:
        """Position plus what defines the sample order (checked on load)."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "step": self.step, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position. ValueError if the data or the order-defining settings changed
        (the resumed run would not see the same batches). DP size and packing settings may change:
        each step keeps the same samples, only their layout differs."""
        mine = self._identity()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise UserError(f"sampler state does not match this dataset/config: {diff} (saved, now)")
        if not 0 <= state["step"] < self.steps_per_epoch or state["epoch"] < 0:
            raise UserError(f"sampler state position epoch {state['epoch']} step {state['step']} is out of range")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    # ----------------------------------------------------------------- metrics
    def efficiency(self, plan: StepPlan) -> dict[str, float]:
        """Token accounting of ``plan`` over all DP ranks.

        efficiency = real tokens / allocated tokens (all microbatches, padding included);
        balance = real tokens / (dp_size x the busiest rank's allocated tokens): the share of the step's
        compute slots doing useful work when ranks wait for the slowest at the gradient all-reduce.
        """
        per_rank = [sum(self.row_length(plan, row) for row in self._rows_of_rank(plan, r))
                     for r in range(self.dp_size)]
        allocated = sum(per_rank)
        return {"real_tokens": plan.num_real_tokens, "allocated_tokens": allocated,
                "efficiency": plan.num_real_tokens / allocated,
                "balance": plan.num_real_tokens / (self.dp_size * max(per_rank)),
                "microbatches_per_rank": len(self._rows_of_rank(plan, 0))}
