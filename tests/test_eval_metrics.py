"""pass@k against exact combinatorics; rllm's SEM on a hand-computed case."""
import math
from fractions import Fraction

import numpy as np
import pytest

from redi_megatron.eval import pass_at_k
from redi_megatron.eval.metrics import default_ks, sem_rllm, summarize, summarize_average


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    # Probability that a uniformly drawn k-subset of the n samples holds at least one correct one.
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_exact_combinatorics():
    for n in range(1, 17):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_special_cases():
    assert pass_at_k(16, 4, 1) == 0.25  # pass@1 is c/n
    assert pass_at_k(16, 0, 16) == 0.0 and pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(16, 3, 8) == pytest.approx(0.9)  # 1 - C(13,8)/C(16,8) = 1 - 1287/12870
    assert pass_at_k(np.int64(4), np.int64(2), 2) == pytest.approx(5 / 6)
    # large n stays finite and exact enough (binomials of 1024 would overflow a float)
    assert pass_at_k(1024, 10, 512) == pytest.approx(float(exact_pass_at_k(1024, 10, 512)), rel=1e-12)


@pytest.mark.parametrize("n,c,k", [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5), (4.0, 2, 1)])
def test_pass_at_k_rejects_invalid_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# 3 problems x 4 samples. Per-sample-index benchmark scores: 2/3, 1/3, 1, 1/3 (mean 7/12).
# Deviations from the mean: 1/12, -3/12, 5/12, -3/12 -> population variance 44/144/4 = 11/144,
# std = sqrt(11)/12, SEM = std/sqrt(4) = sqrt(11)/24.
VERDICTS = np.array([[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 0]])


def test_sem_matches_hand_computation():
    std, sem = sem_rllm(VERDICTS)
    assert std == pytest.approx(math.sqrt(11) / 12)
    assert sem == pytest.approx(math.sqrt(11) / 24)


def test_summarize():
    s = summarize(VERDICTS)
    assert s["num_problems"] == 3 and s["n"] == 4
    assert s["pass@1"] == pytest.approx(7 / 12)
    assert s["sem"] == pytest.approx(math.sqrt(11) / 24)
    # pass@2 per problem: c=3 -> 1, c=1 -> 1 - C(3,2)/C(4,2) = 1/2, c=3 -> 1
    assert s["pass@k"] == pytest.approx({"1": 7 / 12, "2": 5 / 6, "4": 1.0})
    assert default_ks(16) == [1, 2, 4, 8, 16] and default_ks(6) == [1, 2, 4, 6]


def test_average_over_benchmarks():
    other = np.array([[1, 1, 0, 0]])  # per-sample scores 1, 1, 0, 0
    avg = summarize_average({"a": VERDICTS, "b": other})
    # per-sample scores of the average: (2/3+1)/2, (1/3+1)/2, (1+0)/2, (1/3+0)/2 = 5/6, 2/3, 1/2, 1/6
    scores = np.array([5 / 6, 2 / 3, 1 / 2, 1 / 6])
    assert avg["pass@1"] == pytest.approx(scores.mean())
    assert avg["pass@1"] == pytest.approx((7 / 12 + 1 / 2) / 2)  # = unweighted mean of the pass@1s
    assert avg["sem"] == pytest.approx(scores.std() / 2)
    with pytest.raises(ValueError, match="different sample counts"):
        summarize_average({"a": VERDICTS, "b": np.ones((2, 3))})
