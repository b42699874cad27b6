"""Deterministic, DP-sharded packing of samples into microbatches, one optimizer step at a time.

For step ``s`` of epoch ``e`` every rank computes the same plan locally, with no communication:

1. the epoch order is ``np.random.default_rng([seed, e]).permutation(n)``; step ``s`` takes the next
   ``global_batch_size`` samples (SFT sequences or pairs);
2. first-fit-decreasing packs those samples into microbatches of ``rows_per_microbatch`` rows x
   ``micro_batch_tokens`` tokens; a pair's chosen and rejected always land in the same microbatch;
   every sequence occupies a multiple of ``pad_to_multiple_of`` tokens;
3. microbatches go to DP ranks largest first, each to the least-loaded rank (in tokens) that still has
   room (at most ``ceil(M / dp_size)`` each); with ``equalize_microbatches`` ranks with fewer get empty
   (all-padding) microbatches so every rank runs the same number;
4. the global normalizers (loss tokens, pairs, sequences) are summed over the whole step.

Rows are trimmed to their content rounded up to ``pad_to_multiple_of`` unless ``static_shape`` pads
every row to ``micro_batch_tokens`` (fixed shapes, e.g. pipeline parallelism without
``variable_seq_lengths``). The position (epoch, step) is the checkpointable state.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Protocol, Sequence, Tuple

import numpy as np

from .batch import Microbatch, SequenceSpec, StepBatch, build_microbatch, padded_length

STATE_VERSION = 1


class PackableDataset(Protocol):
    """What the sampler needs from a dataset (``TokenizedDataset`` implements it)."""

    kind: str  # "sft" | "pair"
    has_ref_logps: bool

    def __len__(self) -> int: ...
    def seq_lengths(self) -> np.ndarray: ...  # int [n, k] total tokens per sequence
    def loss_token_counts(self) -> np.ndarray: ...  # int [n, k]
    def sequences(self, i: int) -> List[SequenceSpec]: ...


@dataclass(frozen=True)
class PackingConfig:
    """Batching schema. ``pad_to_multiple_of`` = 2*CP*(TP if sequence_parallel else 1) from the trainer."""

    global_batch_size: int  # samples per optimizer step over all DP ranks
    micro_batch_tokens: int  # token budget of one row
    rows_per_microbatch: int = 1  # B; 1 = THD layout
    pad_to_multiple_of: int = 1
    static_shape: bool = False
    equalize_microbatches: bool = True
    drop_last: bool = False  # drop the last, smaller step of an epoch
    shuffle: bool = True
    seed: int = 42

    def validate(self) -> None:
        for name in ("global_batch_size", "micro_batch_tokens", "rows_per_microbatch", "pad_to_multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"PackingConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_tokens % self.pad_to_multiple_of:
            raise ValueError(f"PackingConfig.micro_batch_tokens ({self.micro_batch_tokens}) must be a multiple "
                             f"of pad_to_multiple_of ({self.pad_to_multiple_of})")


# A placed sequence: (sample id, index of the sequence within its sample).
Slot = Tuple[int, int]


@dataclass
class _Bin:
    rows: List[List[Slot]]
    used: List[int]
    tokens: int = 0


@dataclass
class StepPlan:
    """The whole step (all DP ranks); ``ranks[r]`` = microbatches of rank r, each a list of rows of slots."""

    epoch: int
    step: int
    sample_ids: np.ndarray
    ranks: List[List[List[List[Slot]]]]
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
            raise ValueError("cannot sample from an empty dataset")
        if config.drop_last and n < config.global_batch_size:
            raise ValueError(f"drop_last with {n} samples < global_batch_size {config.global_batch_size}: no steps")
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
        S, B = self.cfg.micro_batch_tokens, self.cfg.rows_per_microbatch
        pad = self._padded
        if pad.shape[1] == 1 or B >= pad.shape[1]:
            too_big = pad.max(axis=1) > S
        else:  # a pair in a single row
            too_big = pad.sum(axis=1) > S
        bad = np.nonzero(too_big)[0]
        if bad.size:
            worst = int(bad[np.argmax(pad[bad].sum(axis=1))])
            raise ValueError(
                f"{bad.size} sample(s) do not fit one microbatch of {B} row(s) x {S} tokens, e.g. sample ids "
                f"{bad[:10].tolist()} (sample {worst}: sequence lengths {self._lengths[worst].tolist()}); "
                "raise micro_batch_tokens or rows_per_microbatch, or length-filter the data (nothing is truncated)"
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

    def _pack(self, samples: np.ndarray) -> List[_Bin]:
        S, B = self.cfg.micro_batch_tokens, self.cfg.rows_per_microbatch
        order = sorted(samples.tolist(), key=lambda i: (-int(self._padded[i].sum()), i))
        bins: List[_Bin] = []
        for i in order:
            seqs = sorted(range(self._padded.shape[1]), key=lambda j: -int(self._padded[i, j]))
            fresh = _Bin([[] for _ in range(B)], [0] * B)
            for b in bins + [fresh]:
                used, placed = list(b.used), []
                for j in seqs:
                    r = next((r for r in range(B) if used[r] + self._padded[i, j] <= S), None)
                    if r is None:
                        break
                    used[r] += int(self._padded[i, j])
                    placed.append((r, j))
                if len(placed) < len(seqs):
                    continue
                if b is fresh:
                    bins.append(b)
                for r, j in placed:
                    b.rows[r].append((i, j))
                b.used, b.tokens = used, b.tokens + int(self._lengths[i].sum())
                break
            else:  # pragma: no cover - _check_fits guarantees an empty bin takes any sample
                raise AssertionError(f"sample {i} did not fit an empty microbatch")
        return bins

    def _distribute(self, bins: List[_Bin]) -> List[List[_Bin]]:
        cap = -(-len(bins) // self.dp_size)
        ranks: List[List[_Bin]] = [[] for _ in range(self.dp_size)]
        load = [0] * self.dp_size
        for b in sorted(bins, key=lambda b: (-b.tokens, min(s for row in b.rows for s in row))):
            r = min((r for r in range(self.dp_size) if len(ranks[r]) < cap), key=lambda r: (load[r], r))
            ranks[r].append(b)
            load[r] += b.tokens
        return ranks

    def plan(self, epoch: int, step: int) -> StepPlan:
        """The plan of step ``step`` of epoch ``epoch`` for all DP ranks (pure function of its arguments)."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step {step} out of range [0, {self.steps_per_epoch})")
        g = self.cfg.global_batch_size
        samples = self._epoch_order(epoch)[step * g:(step + 1) * g]
        ranks = self._distribute(self._pack(samples))
        return StepPlan(
            epoch=epoch, step=step, sample_ids=samples.copy(),
            ranks=[[b.rows for b in rank] for rank in ranks],
            num_loss_tokens=int(self._loss[samples].sum()),
            num_pairs=int(samples.size) if self.is_pair else 0,
            num_sequences=int(samples.size * self._lengths.shape[1]),
            num_real_tokens=int(self._lengths[samples].sum()),
        )

    # ------------------------------------------------------------- materializing
    def _microbatch(self, rows: List[List[Slot]]) -> Microbatch:
        cache: Dict[int, List[SequenceSpec]] = {}
        specs = []
        for row in rows:
            specs.append([])
            for i, j in row:
                if i not in cache:
                    cache[i] = self.dataset.sequences(i)
                specs[-1].append(cache[i][j])
        m = self.cfg.pad_to_multiple_of
        if self.cfg.static_shape:
            row_len = self.cfg.micro_batch_tokens
        else:
            row_len = max([sum(padded_length(s.length, m) for s in r) for r in specs] + [m])
        return build_microbatch(specs, row_len, self.pad_id, m, with_ref_logps=self.dataset.has_ref_logps)

    def build(self, plan: StepPlan) -> StepBatch:
        """This rank's StepBatch for ``plan``."""
        mine = plan.ranks[self.dp_rank]
        if self.cfg.equalize_microbatches:
            target = max(len(r) for r in plan.ranks)
            empty = [[] for _ in range(self.cfg.rows_per_microbatch)]
            mine = mine + [empty] * (target - len(mine))
        return StepBatch(
            microbatches=[self._microbatch(rows) for rows in mine],
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
    def _identity(self) -> Dict[str, Any]:
        cfg = asdict(self.cfg)
        return {"num_samples": len(self.dataset), "kind": self.dataset.kind,
                "sequence_lengths_sum": int(self._lengths.sum()),
                **{k: cfg[k] for k in ("global_batch_size", "seed", "shuffle", "drop_last")}}

    def state_dict(self) -> Dict[str, Any]:
        """Position plus what defines the sample order (checked on load)."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "step": self.step, **self._identity()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume at ``state``'s position. ValueError if the data or the order-defining settings changed
        (the resumed run would not see the same batches). DP size and packing settings may change:
        each step keeps the same samples, only their layout differs."""
        mine = self._identity()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"sampler state does not match this dataset/config: {diff} (saved, now)")
        if not 0 <= state["step"] < self.steps_per_epoch or state["epoch"] < 0:
            raise ValueError(f"sampler state position epoch {state['epoch']} step {state['step']} is out of range")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    # ----------------------------------------------------------------- metrics
    def efficiency(self, plan: StepPlan) -> Dict[str, float]:
        """Real tokens / allocated tokens over all ranks of ``plan`` (trimmed or static rows)."""
        m, B = self.cfg.pad_to_multiple_of, self.cfg.rows_per_microbatch
        allocated = 0
        target = max(len(r) for r in plan.ranks)
        for rank in plan.ranks:
            for rows in rank:
                if self.cfg.static_shape:
                    allocated += B * self.cfg.micro_batch_tokens
                else:
                    allocated += B * max([sum(int(self._padded[i, j]) for i, j in row) for row in rows] + [m])
            if self.cfg.equalize_microbatches:
                pad_rows = self.cfg.micro_batch_tokens if self.cfg.static_shape else m
                allocated += (target - len(rank)) * B * pad_rows
        return {"real_tokens": plan.num_real_tokens, "allocated_tokens": allocated,
                "efficiency": plan.num_real_tokens / allocated,
                "microbatches_per_rank": target}
