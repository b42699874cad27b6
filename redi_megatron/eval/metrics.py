"""pass@k estimators and rllm's standard error of pass@1.

Definitions (n samples per problem, c of them correct):

* pass@k (unbiased, Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)``, averaged over problems.
* pass@1 is its k = 1 case, ``c / n``, i.e. the mean verdict over all problems and samples.
* SEM as rllm computes it (``verl/trainer/main_generation.py``): score the benchmark once per
  sample index j (mean over problems of sample j's verdict), take the population std (ddof 0) of
  those n scores and divide by sqrt(n). It measures sampling noise across the n runs, not across
  problems.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np

from redi_megatron.errors import UserError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``c`` correct out of ``n`` samples.

    Computed as ``1 - prod_{i<k} (n-c-i)/(n-i)``, which equals ``1 - C(n-c,k)/C(n,k)`` without
    forming huge binomials.
    """
    try:
        n, c, k = operator.index(n), operator.index(c), operator.index(k)
    except TypeError:
        raise UserError(f"pass_at_k needs integers, got n={n!r}, c={c!r}, k={k!r}") from None
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise UserError(f"pass_at_k needs n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(k):
        miss *= (n - c - i) / (n - i)
    return 1.0 - miss


def default_ks(n: int) -> list[int]:
    """Powers of two up to n, plus n itself: 1, 2, 4, 8, 16 for n = 16."""
    ks = [2**p for p in range(int(math.log2(n)) + 1)] if n >= 1 else []
    return sorted(set(ks + [n])) if n >= 1 else []


def per_sample_scores(verdicts: np.ndarray) -> np.ndarray:
    """Benchmark score of each sample index. verdicts: [num_problems, n] of 0/1 -> [n]."""
    assert verdicts.ndim == 2 and verdicts.shape[0] > 0, verdicts.shape
    return verdicts.mean(axis=0)


def sem_rllm(verdicts: np.ndarray) -> tuple[float, float]:
    """(std, sem) of pass@1 as rllm reports them. verdicts: [num_problems, n] of 0/1."""
    scores = per_sample_scores(verdicts)
    std = float(np.std(scores))
    return std, std / math.sqrt(verdicts.shape[1])


def summarize(verdicts: np.ndarray, ks: Sequence[int] | None = None) -> dict:
    """Metrics of one benchmark. verdicts: [num_problems, n] of 0/1 (bool or int).

    Returns ``{"num_problems", "n", "pass@1", "std", "sem", "pass@k": {k: value}}`` with values
    as fractions in [0, 1].
    """
    verdicts = np.asarray(verdicts, dtype=np.float64)
    num_problems, n = verdicts.shape
    ks = default_ks(n) if ks is None else [k for k in ks if k <= n]
    correct = verdicts.sum(axis=1).astype(int)
    std, sem = sem_rllm(verdicts)
    return {
        "num_problems": int(num_problems),
        "n": int(n),
        "pass@1": float(verdicts.mean()),
        "std": std,
        "sem": sem,
        "pass@k": {str(k): float(np.mean([pass_at_k(n, int(c), k) for c in correct])) for k in ks},
    }


def summarize_average(per_benchmark: dict[str, np.ndarray]) -> dict:
    """Unweighted mean over benchmarks (the paper's "Avg." column) with rllm-style SEM.

    The per-sample-index score of the average is the mean of the benchmarks' per-sample-index
    scores, so the SEM reflects how the n runs vary as a whole. All benchmarks need the same n.
    """
    if not per_benchmark:
        raise UserError("no benchmarks to average")
    ns = {name: v.shape[1] for name, v in per_benchmark.items()}
    if len(set(ns.values())) != 1:
        raise UserError(f"benchmarks have different sample counts {ns}; cannot average")
    n = next(iter(ns.values()))
    scores = np.mean([per_sample_scores(np.asarray(v, dtype=np.float64)) for v in per_benchmark.values()], axis=0)
    std = float(np.std(scores))
    return {"benchmarks": list(per_benchmark), "n": int(n), "pass@1": float(scores.mean()), "std": std,
            "sem": std / math.sqrt(n)}
