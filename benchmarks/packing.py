"""Packing efficiency (non-pad tokens / all tokens) of the REDI pair sampler vs padding to the batch max.

Length mix (REDI-like, documented in docs/data.md): prompt tokens uniform in [50, 800]; chosen and
rejected completion tokens independently log-normal with median 4,000 (sigma 0.75), capped at 19,000.

Baseline: microbatches of k pairs in data order, every sequence padded to the longest of its microbatch
(what a padded DPO collator does; k = 1 is the paper's per-device batch). Ours: PackedStepSampler with
THD rows (B = 1) under each ``row_shape``: "trim" (default; each microbatch as long as its content),
"step" (one row length per step, for fixed-shape pipelines) and "static" (always the full budget).
"balance" = useful tokens / (DP size x the busiest rank's tokens): ranks wait for the slowest one.

    python benchmarks/packing.py [--pairs 4096] [--dp 8] [--gbs 32] [--cp 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from redi_megatron.data.batch import ROLE_CHOSEN, ROLE_REJECTED, SequenceSpec  # noqa: E402
from redi_megatron.data.sampler import PackedStepSampler, PackingConfig  # noqa: E402


class LengthMix:
    """Pairs with REDI-like lengths; token ids are zeros (only the layout matters here)."""

    kind, has_ref_logps = "pair", False

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.prompt = rng.integers(50, 801, n)
        comp = rng.lognormal(mean=np.log(4000), sigma=0.75, size=(n, 2))
        self.comp = np.minimum(np.maximum(comp.round(), 1), 19000).astype(np.int64)

    def __len__(self) -> int:
        return self.prompt.shape[0]

    def seq_lengths(self) -> np.ndarray:
        return self.prompt[:, None] + self.comp

    def loss_token_counts(self) -> np.ndarray:
        return self.comp.copy()

    def sequences(self, i: int):
        return [SequenceSpec(np.zeros(int(self.prompt[i] + self.comp[i, j]), dtype=np.int64), int(self.prompt[i]), r, i)
                for j, r in enumerate((ROLE_CHOSEN, ROLE_REJECTED))]


def baseline_efficiency(lengths: np.ndarray, k: int) -> float:
    """Pad every sequence of each k-pair microbatch to that microbatch's longest sequence."""
    real = allocated = 0
    for s in range(0, lengths.shape[0], k):
        block = lengths[s:s + k]
        real += int(block.sum())
        allocated += int(block.size * block.max())
    return real / allocated


def ours_efficiency(ds: LengthMix, cfg: PackingConfig, dp: int) -> tuple:
    sampler = PackedStepSampler(ds, cfg, dp_rank=0, dp_size=dp)
    real = allocated = busiest = 0
    mbs, t0 = [], time.perf_counter()
    for step in range(sampler.steps_per_epoch):
        eff = sampler.efficiency(sampler.plan(0, step))
        real += eff["real_tokens"]
        allocated += eff["allocated_tokens"]
        busiest += eff["real_tokens"] / eff["balance"]  # = dp x the busiest rank's tokens
        mbs.append(eff["microbatches_per_rank"])
    plan_ms = 1000 * (time.perf_counter() - t0) / sampler.steps_per_epoch
    t0 = time.perf_counter()
    sampler.build(sampler.plan(0, 0))
    build_ms = 1000 * (time.perf_counter() - t0)
    return real / allocated, real / busiest, float(np.mean(mbs)), plan_ms, build_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=4096)
    p.add_argument("--dp", type=int, default=8)
    p.add_argument("--gbs", type=int, default=32, help="pairs per optimizer step (paper: 32)")
    p.add_argument("--cp", type=int, default=2, help="context parallel size; sequences padded to 2*CP")
    p.add_argument("--budget", type=int, default=40960, help="micro_batch_tokens (>= longest pair)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    ds = LengthMix(a.pairs, a.seed)
    lengths = ds.seq_lengths()
    q = np.percentile(lengths, [50, 90, 99, 100])
    print(f"mix: {a.pairs} pairs, sequence tokens p50 {q[0]:.0f} p90 {q[1]:.0f} p99 {q[2]:.0f} max {q[3]:.0f}")
    print(f"setup: dp {a.dp}, {a.gbs} pairs/step, THD rows, budget {a.budget} tokens, pad to multiple of {2 * a.cp}")
    base = {k: baseline_efficiency(lengths, k) for k in (1, 2, 4, 8)}
    for k, e in base.items():
        print(f"baseline pad-to-batch-max, {k} pair(s)/microbatch: efficiency {e:.4f}")
    for shape in ("trim", "step", "static"):
        cfg = PackingConfig(global_batch_size=a.gbs, micro_batch_tokens=a.budget, pad_to_multiple_of=2 * a.cp,
                            row_shape=shape, seed=a.seed)
        eff, bal, mbs, plan_ms, build_ms = ours_efficiency(ds, cfg, a.dp)
        print(f"ours, row_shape={shape}: efficiency {eff:.4f} (ratio vs baseline k=1 {eff / base[1]:.3f}, "
              f"k=4 {eff / base[4]:.3f}), DP balance {bal:.4f}, {mbs:.2f} microbatches/rank/step, "
              f"plan {plan_ms:.2f} ms/step, build {build_ms:.1f} ms/step/rank")


if __name__ == "__main__":
    main()
