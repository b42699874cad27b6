"""Graders: every shipped gold grades correct against itself, a table of (non-)equivalent forms,
the rllm extraction rules, and the SIGALRM / kill time limits of the process pool."""
import os
import signal
import time

import pytest

from redi_megatron.eval import GradingPool, grade, grade_detailed, rllm_grader
from redi_megatron.eval.benchmarks import BENCHMARK_FILES, load_benchmark, load_benchmarks
from redi_megatron.eval.timeouts import GradeTimeout, InnerTimeout, deadline


def boxed(answer: str) -> str:
    return "<think>\nLet me work this out.\n</think>\n\nTherefore the answer is $\\boxed{%s}$." % answer


def test_shipped_benchmarks_have_the_documented_sizes():
    sizes = {name: len(load_benchmark(name)) for name in BENCHMARK_FILES}
    assert sizes == {"math500": 500, "aime24": 30, "amc": 83, "amc23": 40, "minerva": 272, "olympiadbench": 675}
    minerva = load_benchmark("minerva")
    assert sum(len(p.answers) > 1 for p in minerva) == 40  # rows with several accepted answers
    assert load_benchmark("aime24")[0].answers == ("204",)


@pytest.mark.parametrize("grader", ["rllm", "math_verify"])
def test_every_gold_answer_grades_correct_against_itself(grader):
    items = [(boxed(alt), list(p.answers))
             for probs in load_benchmarks(list(BENCHMARK_FILES)).values() for p in probs for alt in p.answers]
    assert len(items) == 1642
    with GradingPool(workers=2, timeout=20) as pool:
        results = pool.grade_many(items, grader, progress=False)
    wrong = [(items[i][1], r) for i, r in enumerate(results) if not r.correct]
    assert not wrong, wrong[:10]
    assert all(r.status == "ok" for r in results)


# (answer in the box, gold, rllm verdict, math-verify verdict)
EQUIVALENCE_TABLE = [
    # fractions vs decimals; rllm never simplifies an unreduced a/b into correctness
    ("0.5", "\\frac{1}{2}", True, True),
    ("1/2", "\\frac12", True, True),
    ("0.25", "\\frac{1}{4}", True, True),
    ("\\dfrac{3}{4}", "\\frac34", True, True),
    ("0.33", "\\frac{1}{3}", False, False),
    ("\\frac{2}{4}", "\\frac{1}{2}", False, True),
    ("3.5", "3.50", True, True),
    ("10.0", "10", True, True),
    # radicals
    ("\\sqrt{18}", "3\\sqrt{2}", True, True),
    ("3\\sqrt2", "3\\sqrt{2}", True, True),
    ("\\sqrt{2}\\cdot 3", "3\\sqrt{2}", True, True),
    ("2\\sqrt{3}", "3\\sqrt{2}", False, False),
    # intervals: endpoints and brackets both count
    ("(-\\infty, 3]", "(-\\infty,3]", True, True),
    ("(-\\infty, 3)", "(-\\infty,3]", False, False),
    ("[2,5)", "[2, 5)", True, True),
    ("(2,5)", "[2,5)", False, False),
    # tuples: order matters
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True, True),
    ("(\\frac{\\pi}{2}, 3)", "\\left( 3, \\frac{\\pi}{2} \\right)", False, False),
    ("(1,2)", "(2,1)", False, False),
    ("(1,8,19), (2,7,13), (4,5,7)", "(1,8,19), (2,7,13), (4,5,7)", True, True),
    # degrees
    ("90^\\circ", "90", True, True),
    ("90", "90^\\circ", True, True),
    ("41.8^\\circ", "41.8", True, True),
    ("45", "90^\\circ", False, False),
    # text choices and names
    ("(C)", "\\text{(C)}", True, True),
    ("C", "\\text{(C)}", True, True),
    ("\\textbf{(C)}", "\\text{(C)}", True, True),
    ("(D)", "\\text{(C)}", False, False),
    ("Evelyn", "\\text{Evelyn}", True, True),
    ("Bob", "\\text{Evelyn}", False, False),
    # zero-padded AIME answers compare as numbers
    ("025", "25", True, True),
    ("25", "025", True, True),
    ("52", "025", False, False),
    # prefixes, units, currency, separators, percent
    ("x=5", "5", True, True),
    ("5", "k=5", True, True),
    ("5 \\text{ cm}", "5", True, True),
    ("32348", "\\$32,\\!348", True, True),
    ("1,000", "1000", True, True),
    ("10\\%", "10", True, True),
    # expressions
    ("p-q", "p - q", True, True),
    ("q-p", "p - q", False, False),
    ("2x", "x\\cdot 2", True, True),
    ("8.7 \\times 10^{8}", "8.7 \\times 10^{8}", True, True),
]


@pytest.mark.parametrize("answer,gold,rllm_ok,mv_ok", EQUIVALENCE_TABLE)
def test_equivalence_table(answer, gold, rllm_ok, mv_ok):
    assert grade(boxed(answer), gold, "rllm") is rllm_ok
    assert grade(boxed(answer), gold, "math_verify") is mv_ok


def test_rllm_integer_rule_rejects_an_integer_against_scientific_notation():
    # rllm refuses sympy when exactly one side is an integer string: a documented rllm quirk.
    assert grade(boxed("870000000"), "8.7 \\times 10^{8}", "rllm") is False


@pytest.mark.parametrize("grader", ["rllm", "math_verify"])
def test_missing_think_end_is_wrong_unless_disabled(grader):
    response = "The answer is $\\boxed{5}$."
    assert grade(response, "5", grader) is False
    assert grade(response, "5", grader, require_think=False) is True
    assert grade("<think>I think \\boxed{5}</think> and I stop here.", "5", grader) is False


@pytest.mark.parametrize("grader", ["rllm", "math_verify"])
def test_last_box_after_think_counts(grader):
    response = "<think>maybe \\boxed{7}</think> First \\boxed{1}, no wait: \\boxed{2}."
    assert grade(response, "2", grader) and not grade(response, "1", grader) and not grade(response, "7", grader)


def test_rllm_extraction_rules():
    extract = rllm_grader.extract_answer
    assert extract("a</think> \\boxed{5} </think> \\boxed{6}") == "5"  # rllm: split("</think>")[1]
    assert extract("</think> \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract("</think> \\boxed 5") is None  # a box must open with a brace
    assert extract("</think> \\boxed{5") is None  # never closed
    assert extract("</think> \\boxed{}") == ""
    assert rllm_grader.gold_candidates(["\\boxed{3}", "4"]) == ["3", "4"]


@pytest.mark.parametrize("grader", ["rllm", "math_verify"])
def test_minerva_alternatives(grader):
    golds = ["\\arcsin{\\frac{1}{1.3}}", "\\arcsin{\\frac{10}{13}}"]
    assert grade(boxed("\\arcsin{\\frac{10}{13}}"), golds, grader)
    assert grade(boxed("\\arcsin{\\frac{1}{1.3}}"), golds, grader)
    assert not grade(boxed("\\arcsin{\\frac{1}{13}}"), golds, grader)


def test_grade_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown grader"):
        grade("x", "1", grader="exact")
    with pytest.raises(ValueError, match="gold"):
        grade("x", [])


# ----------------------------------------------------------------------------------------------
# Time limits
# ----------------------------------------------------------------------------------------------
def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_nested_deadlines_keep_the_outer_limit():
    start = time.monotonic()
    with pytest.raises(GradeTimeout):
        with deadline(0.6):
            with pytest.raises(InnerTimeout):
                with deadline(0.1, InnerTimeout):
                    _spin(5)
            assert time.monotonic() - start < 0.4
            _spin(5)  # the outer limit must still fire after the inner block exits
    assert 0.5 < time.monotonic() - start < 1.5
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def _patched_grade_rllm(response, gold, require_think=True):
    if response == "DIE":
        os._exit(3)  # like a segfault in a C extension
    if response == "SPIN":
        _spin(60)  # Python code: SIGALRM interrupts it
    if response == "STUCK":
        # Like a long C call: the alarm cannot be delivered, the parent has to kill the worker.
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        time.sleep(60)
    return response == gold, response


def test_grade_detailed_times_out_in_process(monkeypatch):
    monkeypatch.setattr(rllm_grader, "grade_rllm", _patched_grade_rllm)
    start = time.monotonic()
    result = grade_detailed("SPIN", "1", timeout=0.3)
    assert result.status == "timeout" and not result.correct
    assert time.monotonic() - start < 2


def test_pool_times_out_and_replaces_stuck_workers(monkeypatch):
    # "fork" so that the workers inherit the patched grader.
    monkeypatch.setattr(rllm_grader, "grade_rllm", _patched_grade_rllm)
    items = [("1", "1"), ("SPIN", "1"), ("2", "2"), ("STUCK", "1"), ("3", "4"), ("DIE", "1"), ("5", "5")]
    start = time.monotonic()
    with GradingPool(workers=2, timeout=0.5, kill_grace=1.0, start_method="fork") as pool:
        results = pool.grade_many(items, "rllm", progress=False)
        again = pool.grade_many([("7", "7")], "rllm", progress=False)
    assert [r.status for r in results] == ["ok", "timeout", "ok", "killed", "ok", "error: grading worker died", "ok"]
    assert [r.correct for r in results] == [True, False, True, False, False, False, True]
    assert again[0].correct
    assert time.monotonic() - start < 10
