"""The shortcut teacher, and what the demo measures besides pass@1 (redi_megatron.demo.analysis)."""
import hashlib
import json
import random
from collections import Counter

import pytest
import torch

from redi_megatron.demo import analysis
from redi_megatron.demo.config import config_for
from redi_megatron.demo.teacher import (
    SHORTCUT_OPENING,
    TaskConfig,
    is_shortcut,
    shortcut_trace,
    teacher_rows,
    verifier_labels,
)

SHORTCUT = TaskConfig(min_digits=2, max_digits=4, error_rate=0.12, shortcut_rate=0.5)


def test_slip_teacher_rows_are_unchanged_by_the_shortcut_option():
    # The slip teacher's rows of seed 0 as written before the shortcut teacher existed (the published
    # slip-teacher numbers were measured on them): shortcut_rate 0 must not even draw a random number.
    rows, _ = teacher_rows(300, 0, TaskConfig(min_digits=2, max_digits=5))
    assert hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16] == "2aad844ae9e5bf71"


def test_shortcut_traces_are_right_at_the_set_rate_or_one_digit_off_by_one():
    rng = random.Random(0)
    for digits, expected in ((2, 0.9), (3, 0.6), (4, 0.35)):
        cfg = TaskConfig(min_digits=digits, max_digits=digits, shortcut_rate=1.0)
        right = 0
        for _ in range(2000):
            a, b = rng.randint(10 ** (digits - 1), 10**digits - 1), rng.randint(10 ** (digits - 1), 10**digits - 1)
            t = shortcut_trace(a, b, rng, cfg)
            assert t.path == "shortcut" and is_shortcut(t.text)
            assert t.text.startswith(f"<think>\n{SHORTCUT_OPENING} {a} + {b} = {t.boxed}.\n</think>")
            assert t.text.endswith(f"\\boxed{{{t.boxed}}}$.")
            gold = str(a + b)
            if t.error is None:
                assert t.boxed == gold
                right += 1
            else:
                assert t.error == "shortcut_miss" and len(t.boxed) == len(gold) and not t.boxed.startswith("0")
                diff = [(int(x), int(y)) for x, y in zip(t.boxed, gold) if x != y]
                assert len(diff) == 1 and abs(diff[0][0] - diff[0][1]) == 1
        assert right / 2000 == pytest.approx(expected, abs=0.035)


def test_shortcut_teacher_mix_and_labels():
    rows, stats = teacher_rows(1000, 0, SHORTCUT)
    paths = stats["traces_by_path"]
    assert sum(paths.values()) == 4000
    assert (paths["shortcut_right"] + paths["shortcut_wrong"]) / 4000 == pytest.approx(0.5, abs=0.03)
    assert paths["working_wrong"] / (paths["working_right"] + paths["working_wrong"]) == pytest.approx(0.12, abs=0.02)
    # the judge accepts some near misses, and the exact check never does
    rng = random.Random(1)
    miss = next(t for t in (shortcut_trace(1234, 4321, rng, SHORTCUT) for _ in range(100)) if t.error)
    labels = [verifier_labels(miss, "5555", rng, SHORTCUT) for _ in range(2000)]
    assert all(not reparsed for _, _, reparsed in labels)
    assert sum(bool(j) for j, _, _ in labels) / 2000 == pytest.approx(SHORTCUT.judge_fooled_shortcut, abs=0.02)


def test_teacher_presets():
    assert config_for(False, 0).teacher == "shortcut" and config_for(False, 0).task.shortcut_rate == 0.5
    slips = config_for(False, 1, "slips")
    assert slips.task.shortcut_rate == 0.0 and slips.task.max_digits == 5 and slips.seed == 1
    assert config_for(True, 0, "slips").task.shortcut_rate == 0.0
    with pytest.raises(ValueError, match="shortcut_accuracy"):
        TaskConfig(shortcut_accuracy=(0.5,)).validate()


def test_in_nucleus_matches_the_samplers_top_p_set():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(64, 50) * torch.linspace(0.5, 6, 64)[:, None]  # flat to peaked distributions
    kept = TopPLogitsWarper(0.95)(None, TemperatureLogitsWarper(0.6)(None, logits.clone())).isfinite()
    for tok in range(50):
        ours = analysis.in_nucleus(logits, torch.full((64,), tok), 0.6, 0.95)
        assert torch.equal(ours, kept[:, tok]), tok


class _Bigram(torch.nn.Module):
    """Next-token logits depend on the current token only: a model whose answers are easy to compute."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab) * 3)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_premise_reads_each_pair_at_its_own_divergence_point():
    torch.manual_seed(0)
    model = _Bigram(12)
    prompts = [[1, 2], [3], [1, 2, 3, 4], [5], [6, 7]]
    chosen = [[4, 5, 6], [7, 8], [9], [2, 2], [1, 1]]
    rejected = [[4, 9, 6], [0, 8], [10, 1], [2, 2], [1, 1, 3]]  # pair 3 identical, pair 4 a prefix
    m = analysis.premise(model, prompts, chosen, rejected, temperature=0.6, top_p=0.95, batch=2)
    assert m["pairs"] == 3 and m["identical"] == 2
    probs = torch.softmax(model.table, -1)
    expected = [float(probs[4, 9]), float(probs[3, 0]), float(probs[4, 10])]  # the token before each divergence
    assert m["p_rejected_mean"] == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert m["p_rejected_median"] == pytest.approx(sorted(expected)[1], rel=1e-6)
    assert m["p_chosen_mean"] == pytest.approx(float(probs[4, 5] + probs[3, 7] + probs[4, 9]) / 3, rel=1e-6)
    nucleus = [bool(analysis.in_nucleus(model.table[[p]], torch.tensor([r]), 0.6, 0.95)) for p, r in
               ((4, 9), (3, 0), (4, 10))]
    assert m["sampleable"] == pytest.approx(sum(nucleus) / 3)


def test_path_accuracy_splits_samples_by_path(tmp_path):
    path = tmp_path / "samples.jsonl"
    records = [("<think>\nMental math: 1 + 2 = 3.", True), ("<think>\nMental math: 1 + 3 = 5.", False),
               ("<think>\nMental math: 2 + 3 = 6.", False), ("<think>\n1 + 2, column", True),
               ("<think>\n5 + 2, column", False)]
    with open(path, "w") as f:
        for k, (text, ok) in enumerate(records):
            f.write(json.dumps({"benchmark": "eval", "problem_id": f"p{k}", "sample_index": 0, "response": text,
                                "grader": "rllm", "correct": ok}) + "\n")
    got = analysis.path_accuracy(str(path))
    assert got == {"samples": 5, "shortcut_rate": 0.6, "shortcut_accuracy": pytest.approx(1 / 3),
                   "working_accuracy": 0.5}


def test_pair_paths_count_the_pairs_by_path(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [("a", "Mental math: x"), ("Mental math: y", "b"), ("a", "b"), ("c", "Mental math: z")]
    path.write_text("".join(json.dumps({"problem": "p", "chosen": c, "rejected": r}) + "\n" for c, r in rows))
    assert analysis.pair_paths(str(path)) == dict(Counter({"working>shortcut": 2, "shortcut>working": 1,
                                                          "working>working": 1}))


def test_validation_problems_are_disjoint_from_training_and_held_out():
    from redi_megatron.demo.teacher import (
        PROBLEM_TEMPLATES,
        eval_problems,
        operands,
        problem_operands,
        validation_problems,
    )

    assert all(problem_operands(t.format(a=4729, b=38)) == (4729, 38) for t in PROBLEM_TEMPLATES)
    cfg = TaskConfig(min_digits=2, max_digits=2)  # a small space, so overlaps would show
    rows, _ = teacher_rows(2000, 0, cfg)
    train = [operands(r) for r in rows]
    held = [problem_operands(p["problem"]) for p in eval_problems(200, 0, cfg, train)]
    val = [problem_operands(p["problem"]) for p in validation_problems(200, 0, cfg, train + held)]
    key = lambda pairs: {tuple(sorted(p)) for p in pairs}  # noqa: E731
    assert len(key(val)) == 200 and not key(val) & key(train) and not key(val) & key(held)
