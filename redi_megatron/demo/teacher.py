"""A synthetic "teacher" for the demo: column addition with step-by-step working, in the OpenR1-Math-Raw schema.

Each problem gets several generations. Most are correct worked solutions; a share contain the mistakes a
real reasoning model makes on arithmetic, and every later step stays consistent with the mistake (as a real
trace would):

* ``carry_slip``: a carry is forgotten (taken in or given out), so that column and the rest are off;
* ``misread_digit``: a column uses a neighbouring digit of an operand (a digit alignment slip);
* ``fact_slip``: a column sum is wrong by one (``7+8=14``);
* ``dropped_digit``: the working is right but a digit is lost when reading off the result;
* ``transposed_digits``: two neighbouring digits of the result are swapped;
* ``comma_format``: the right number written with a thousands separator (``8,590``), which an LLM judge
  accepts and an exact answer check rejects (a real source of disagreement between the two verifiers);
* ``box_slip``: working and reading right, the boxed answer misquotes it (weight 0 in the default mix;
  docs/demo.md has the ablation it was added for).

The *shortcut* teacher (``TaskConfig.shortcut_rate > 0``, the demo's default) also answers "in its head"
with that probability, a habit the student copies but cannot carry out, like a strong teacher's skipped
steps that a small student imitates::

    <think>
    Mental math: 4729 + 3861 = 8590.
    </think>

    The answer is $\\boxed{8590}$.

Its answer is right with a probability that falls with the longer operand's length
(``shortcut_accuracy``), else one digit is off by one (``shortcut_miss``, a near miss the judge sometimes
accepts). "Mental" opens no other trace, so the choice between the two paths is one token of its own.

Verifier labels imitate OpenR1's: ``math_verify_*`` is an exact check of the boxed answer (what math-verify
does on integers), ``llama_verification`` is a judge that agrees with it most of the time but is
occasionally too strict, is fooled by near-misses (transposed digits more than other errors) and is
sometimes missing (null). All randomness comes from one seed, so the rows are reproducible.

A trace (completion) restates the operands, then names each column by its place value (a tiny model
learns this format as fast as bare ``9+1=10, ...`` lines; docs/demo.md)::

    <think>
    4729 + 3861, column by column from the right.
    ones: 9+1=10, write 0, carry 1.
    tens: 2+6+1=9, write 9, carry 0.
    hundreds: 7+8=15, write 5, carry 1.
    thousands: 4+3+1=8, write 8, carry 0.
    Reading the digits from the left: 8590.
    </think>

    The answer is $\\boxed{8590}$.
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from redi_megatron.data.synthetic import openr1_row, write_jsonl
from redi_megatron.errors import UserError
from redi_megatron.typed import ranged

ERROR_MODES = ("carry_slip", "misread_digit", "fact_slip", "dropped_digit", "transposed_digits", "comma_format",
               "box_slip")
SOURCE = "redi_demo_addition"
PROBLEM_TEMPLATES = (
    "Compute ${a} + {b}$.",
    "What is ${a} + {b}$?",
    "Find the sum of ${a}$ and ${b}$.",
    "Calculate ${a}+{b}$.",
)
PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions",
          "ten-millions", "hundred-millions")
MAX_DIGITS = len(PLACES)


@dataclass(frozen=True)
class TaskConfig:
    """What the teacher writes.

    Attributes:
        min_digits, max_digits: operand lengths (each operand drawn independently, leading digit non-zero).
        generations: traces per problem (OpenR1-Math-Raw has 2 to 8).
        error_rate: probability that a trace contains a mistake.
        error_weights: relative frequency of each mode in ``ERROR_MODES`` among the mistaken traces.
        judge_strict_rate: P(llama judge rejects a correct trace).
        judge_fooled_rate: P(judge accepts a wrong trace) per error mode (near-misses fool it more).
        judge_null_rate: P(judge label is null).
        mv_parse_fail_rate: P(math_verify_answer, the un-reparsed check, fails on a correct trace).
        shortcut_rate: P(a trace is a "mental math" shortcut instead of column working); 0 = the slip teacher.
        shortcut_accuracy: P(a shortcut is right), by the longer operand's digit count (1, 2, ... 9 digits).
        judge_fooled_shortcut: P(judge accepts a wrong shortcut, off by one in one digit).
    """

    min_digits: int = ranged(3, ">=1")
    max_digits: int = ranged(3, ">=1")
    generations: int = ranged(4, ">=1")
    error_rate: float = ranged(0.35, "[0,1]")
    error_weights: tuple[float, ...] = (0.30, 0.20, 0.15, 0.10, 0.15, 0.10, 0.0)
    judge_strict_rate: float = ranged(0.03, "[0,1]")
    judge_fooled_rate: tuple[float, ...] = (0.04, 0.04, 0.04, 0.06, 0.12, 0.95, 0.06)
    judge_null_rate: float = ranged(0.005, "[0,1]")
    mv_parse_fail_rate: float = ranged(0.02, "[0,1]")
    shortcut_rate: float = ranged(0.0, "[0,1]")
    shortcut_accuracy: tuple[float, ...] = (0.97, 0.9, 0.6, 0.35, 0.2, 0.1, 0.05, 0.05, 0.05)
    judge_fooled_shortcut: float = ranged(0.06, "[0,1]")

    def validate(self) -> None:
        """ValueError naming the offending field."""
        if not 1 <= self.min_digits <= self.max_digits <= MAX_DIGITS:
            raise UserError(f"TaskConfig: need 1 <= min_digits <= max_digits <= {MAX_DIGITS}, got "
                             f"{self.min_digits}, {self.max_digits}")
        if self.generations < 1:
            raise UserError(f"TaskConfig.generations must be >= 1, got {self.generations}")
        for name in ("error_rate", "judge_strict_rate", "judge_null_rate", "mv_parse_fail_rate", "shortcut_rate",
                     "judge_fooled_shortcut"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise UserError(f"TaskConfig.{name} must be in [0, 1], got {v}")
        for name in ("error_weights", "judge_fooled_rate"):
            v = getattr(self, name)
            if len(v) != len(ERROR_MODES):
                raise UserError(f"TaskConfig.{name} needs one value per mode {ERROR_MODES}, got {v}")
        if any(w < 0 for w in self.error_weights) or sum(self.error_weights) <= 0:
            raise UserError(f"TaskConfig.error_weights must be >= 0 with a positive sum, got {self.error_weights}")
        if len(self.shortcut_accuracy) != MAX_DIGITS or any(not 0.0 <= p <= 1.0 for p in self.shortcut_accuracy):
            raise UserError(f"TaskConfig.shortcut_accuracy needs {MAX_DIGITS} values in [0, 1] (1 to {MAX_DIGITS} "
                            f"digits), got {self.shortcut_accuracy}")
        if any(not 0.0 <= p <= 1.0 for p in self.judge_fooled_rate):
            raise UserError(f"TaskConfig.judge_fooled_rate values must be in [0, 1], got {self.judge_fooled_rate}")


@dataclass
class Trace:
    """One generation: its text, the boxed answer string, what went wrong (None = a correct trace) and
    its path (``"working"``: column by column; ``"shortcut"``: mental math)."""

    text: str
    boxed: str
    error: Optional[str] = None
    path: str = "working"


# ---------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------
def _operand(rng: random.Random, cfg: TaskConfig) -> int:
    n = rng.randint(cfg.min_digits, cfg.max_digits)
    return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)


def sample_problems(rng: random.Random, cfg: TaskConfig, count: int,
                    exclude: Iterable[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """``count`` distinct operand pairs ``(a, b)``; a pair in ``exclude`` (in either order) is never drawn.

    ValueError when the operand space is too small for ``count`` new pairs.
    """
    lo = 10 ** (cfg.min_digits - 1) if cfg.min_digits > 1 else 0
    space = (10**cfg.max_digits - lo) ** 2
    seen = {tuple(sorted(p)) for p in exclude}
    if count > (space - len(seen)) // 2:
        raise UserError(f"cannot draw {count} distinct problems with {cfg.min_digits}-{cfg.max_digits} digit "
                         f"operands ({len(seen)} excluded); use more digits or fewer problems")
    out: list[tuple[int, int]] = []
    while len(out) < count:
        a, b = _operand(rng, cfg), _operand(rng, cfg)
        key = (min(a, b), max(a, b))
        if key not in seen:
            seen.add(key)
            out.append((a, b))
    return out


def problem_text(a: int, b: int, rng: random.Random) -> str:
    return rng.choice(PROBLEM_TEMPLATES).format(a=a, b=b)


# ---------------------------------------------------------------------------------------------------
# Traces
# ---------------------------------------------------------------------------------------------------
def _digits(x: int, width: int) -> list[int]:
    """Digits of ``x`` from the right (units first), zero-padded to ``width``."""
    return [(x // 10**i) % 10 for i in range(width)]


def _columns(a: int, b: int, slip: Optional[tuple[str, int]] = None, misread: int = 0
             ) -> tuple[list[str], list[int]]:
    """Lines of the column working and the written result digits (units first).

    ``slip = (kind, column)`` injects one mistake at that column: "carry_in" drops the incoming carry,
    "carry_out" forgets to carry, "fact+"/"fact-" get the column sum wrong by one, "misread_a"/"misread_b"
    use ``misread`` instead of that operand's digit. Later columns follow the slip.
    """
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    if slip is not None and slip[0].startswith("misread"):
        (da if slip[0] == "misread_a" else db)[slip[1]] = misread
    lines, written, carry = [], [], 0
    for i in range(width):
        cin = 0 if slip == ("carry_in", i) else carry
        s = da[i] + db[i] + cin
        if slip is not None and slip[0].startswith("fact") and slip[1] == i:
            s += 1 if slip[0] == "fact+" or s == 0 else -1
        lhs = f"{da[i]}+{db[i]}" + (f"+{cin}" if cin else "")
        digit, carry = s % 10, s // 10
        if slip == ("carry_out", i):
            carry = 0
        lines.append(f"{PLACES[i]}: {lhs}={s}, write {digit}, carry {carry}.")
        written.append(digit)
    if carry:
        lines.append(f"Bring down the final carry {carry}.")
        written.append(carry)
    return lines, written


def _render(a: int, b: int, lines: Sequence[str], reading: str, boxed: str) -> str:
    intro = f"{a} + {b}, column by column from the right."
    body = "\n".join([intro, *lines, f"Reading the digits from the left: {reading}."])
    return f"<think>\n{body}\n</think>\n\nThe answer is $\\boxed{{{boxed}}}$."


def correct_trace(a: int, b: int) -> Trace:
    lines, written = _columns(a, b)
    result = "".join(str(d) for d in reversed(written))
    assert int(result) == a + b
    return Trace(_render(a, b, lines, result, result), result)


def _slip_trace(a: int, b: int, rng: random.Random, mode: str) -> Optional[Trace]:
    width = max(len(str(a)), len(str(b)))
    carries_in = [i for i in range(1, width) if (a % 10**i + b % 10**i) >= 10**i]
    carries_out = [i for i in range(width) if (a % 10 ** (i + 1) + b % 10 ** (i + 1)) >= 10 ** (i + 1)]
    misread = 0
    if mode == "carry_slip":
        options = [("carry_in", i) for i in carries_in] + [("carry_out", i) for i in carries_out]
        if not options:
            return None  # no carry to forget in this problem
        slip = rng.choice(options)
    elif mode == "misread_digit":
        operand, i = rng.choice([(x, col) for x in "ab" for col in range(len(str(a if x == "a" else b)))])
        digits = _digits(a if operand == "a" else b, width)
        # the digit of a neighbouring place, as when columns are misaligned
        neighbours = [digits[j] for j in (i - 1, i + 1) if 0 <= j < width and digits[j] != digits[i]]
        if not neighbours:
            return None
        slip, misread = (f"misread_{operand}", i), rng.choice(neighbours)
    else:
        slip = (rng.choice(["fact+", "fact-"]), rng.randrange(width))
    lines, written = _columns(a, b, slip, misread)
    result = "".join(str(d) for d in reversed(written)).lstrip("0") or "0"
    return Trace(_render(a, b, lines, result, result), result, mode)


def _reading_trace(a: int, b: int, rng: random.Random, mode: str) -> Optional[Trace]:
    lines, written = _columns(a, b)
    digits = [str(d) for d in reversed(written)]
    if len(digits) < 2:
        return None
    if mode == "dropped_digit":
        del digits[rng.randrange(len(digits))]
    else:
        swappable = [i for i in range(len(digits) - 1) if digits[i] != digits[i + 1]]
        if not swappable:
            return None
        i = rng.choice(swappable)
        digits[i], digits[i + 1] = digits[i + 1], digits[i]
    result = "".join(digits)
    if result.startswith("0"):
        return None
    return Trace(_render(a, b, lines, result, result), result, mode)


def _box_slip_trace(a: int, b: int, rng: random.Random) -> Optional[Trace]:
    """Right working and reading, but the final answer misquotes it (a digit dropped, doubled or swapped)."""
    lines, written = _columns(a, b)
    result = "".join(str(d) for d in reversed(written))
    digits = list(result)
    kind = rng.choice(["drop", "double", "swap"])
    i = rng.randrange(len(digits))
    if kind == "drop" and len(digits) > 1:
        del digits[i]
    elif kind == "swap" and i + 1 < len(digits) and digits[i] != digits[i + 1]:
        digits[i], digits[i + 1] = digits[i + 1], digits[i]
    else:
        digits.insert(i, digits[i])
    boxed = "".join(digits)
    if boxed.startswith("0") or boxed == result:
        return None
    return Trace(_render(a, b, lines, result, boxed), boxed, "box_slip")


def _comma_trace(a: int, b: int) -> Optional[Trace]:
    total = a + b
    if total < 1000:
        return None
    lines, _ = _columns(a, b)
    return Trace(_render(a, b, lines, str(total), f"{total:,}"), f"{total:,}", "comma_format")


def wrong_trace(a: int, b: int, rng: random.Random, cfg: TaskConfig) -> Trace:
    """A trace with one mistake; modes that do not apply to this problem are redrawn."""
    for _ in range(100):
        mode = rng.choices(ERROR_MODES, weights=cfg.error_weights)[0]
        if mode in ("carry_slip", "misread_digit", "fact_slip"):
            t = _slip_trace(a, b, rng, mode)
        elif mode == "comma_format":
            t = _comma_trace(a, b)
        elif mode == "box_slip":
            t = _box_slip_trace(a, b, rng)
        else:
            t = _reading_trace(a, b, rng, mode)
        if t is not None and (t.error == "comma_format" or t.boxed != str(a + b)):
            return t
    # Every problem admits a fact slip, which always changes the sum.
    t = _slip_trace(a, b, rng, "fact_slip")
    assert t is not None and t.boxed != str(a + b)
    return t


SHORTCUT_OPENING = "Mental math:"


def shortcut_trace(a: int, b: int, rng: random.Random, cfg: TaskConfig) -> Trace:
    """A "mental math" answer: right with ``shortcut_accuracy[digits - 1]``, else one digit off by one."""
    total = a + b
    digits = max(len(str(a)), len(str(b)))
    answer = str(total)
    if rng.random() >= cfg.shortcut_accuracy[digits - 1]:
        chars = list(answer)
        i = rng.randrange(len(chars))
        d = int(chars[i])
        lowest = 1 if i == 0 and len(chars) > 1 else 0  # no leading zero
        options = [x for x in (d - 1, d + 1) if lowest <= x <= 9]
        chars[i] = str(rng.choice(options))
        answer = "".join(chars)
    text = f"<think>\n{SHORTCUT_OPENING} {a} + {b} = {answer}.\n</think>\n\nThe answer is $\\boxed{{{answer}}}$."
    return Trace(text, answer, None if answer == str(total) else "shortcut_miss", "shortcut")


def is_shortcut(text: str) -> bool:
    """Whether a completion (teacher's or a model's) takes the mental-math path."""
    return SHORTCUT_OPENING in text


def generate_traces(a: int, b: int, rng: random.Random, cfg: TaskConfig) -> list[Trace]:
    out = []
    for _ in range(cfg.generations):
        # No draw at all when shortcut_rate is 0, so the slip teacher writes the same rows as before it existed.
        if cfg.shortcut_rate > 0 and rng.random() < cfg.shortcut_rate:
            out.append(shortcut_trace(a, b, rng, cfg))
        else:
            out.append(wrong_trace(a, b, rng, cfg) if rng.random() < cfg.error_rate else correct_trace(a, b))
    return out


# ---------------------------------------------------------------------------------------------------
# Verifier labels and rows
# ---------------------------------------------------------------------------------------------------
def verifier_labels(trace: Trace, gold: str, rng: random.Random, cfg: TaskConfig
                    ) -> tuple[Optional[bool], bool, bool]:
    """(llama_verification, math_verify_answer, math_verify_reparsed_answer) of one trace."""
    exact = trace.boxed == gold
    reparsed = exact
    answer = exact and rng.random() >= cfg.mv_parse_fail_rate
    if rng.random() < cfg.judge_null_rate:
        return None, answer, reparsed
    if trace.error is None:
        return rng.random() >= cfg.judge_strict_rate, answer, reparsed
    fooled = (cfg.judge_fooled_shortcut if trace.error == "shortcut_miss"
              else cfg.judge_fooled_rate[ERROR_MODES.index(trace.error)])
    return rng.random() < fooled, answer, reparsed


def make_row(a: int, b: int, rng: random.Random, cfg: TaskConfig) -> tuple[dict[str, Any], list[Trace]]:
    """One OpenR1-Math-Raw row (and its traces, for statistics)."""
    gold = str(a + b)
    traces = generate_traces(a, b, rng, cfg)
    labels = [verifier_labels(t, gold, rng, cfg) for t in traces]
    row = openr1_row(problem_text(a, b, rng), f"Adding column by column, ${a} + {b} = {gold}$.", gold,
                     [t.text for t in traces], labels, problem_type="Arithmetic", source=SOURCE, synthetic=True)
    return row, traces


@dataclass
class TeacherOutput:
    """What :func:`write_teacher_data` wrote, with counts for the report."""

    train_path: str
    eval_path: str
    num_train: int
    num_eval: int
    stats: dict[str, Any] = field(default_factory=dict)


def teacher_rows(num_problems: int, seed: int, cfg: TaskConfig = TaskConfig()
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``num_problems`` rows for ``seed`` and statistics (error modes, label agreement, pair yield)."""
    cfg.validate()
    rng = random.Random(f"redi-demo-teacher-{seed}")
    problems = sample_problems(rng, cfg, num_problems)
    rows, modes, paths, agree = [], Counter(), Counter(), Counter()
    for a, b in problems:
        row, traces = make_row(a, b, rng, cfg)
        rows.append(row)
        modes.update(t.error or "correct" for t in traces)
        paths.update(f"{t.path}_{'wrong' if t.error else 'right'}" for t in traces)
        c = row["correctness"]
        for llama, reparsed in zip(c["llama_verification"], c["math_verify_reparsed_answer"]):
            agree["null" if llama is None else ("agree" if llama == reparsed else "disagree")] += 1
    stats = {"traces_by_error_mode": dict(modes), "traces_by_path": dict(paths), "judge_vs_math_verify": dict(agree)}
    return rows, stats


def eval_problems(num_problems: int, seed: int, cfg: TaskConfig, exclude: Iterable[tuple[int, int]]
                  ) -> list[dict[str, str]]:
    """Held-out problems ``{"id", "problem", "answer"}`` (the ``redi-eval`` custom-benchmark schema)."""
    cfg.validate()
    rng = random.Random(f"redi-demo-eval-{seed}")
    pairs = sample_problems(rng, cfg, num_problems, exclude=exclude)
    return [{"id": f"add-{k:04d}", "problem": problem_text(a, b, rng), "answer": str(a + b)}
            for k, (a, b) in enumerate(pairs)]


def validation_problems(num_problems: int, seed: int, cfg: TaskConfig, exclude: Iterable[tuple[int, int]]
                        ) -> list[dict[str, str]]:
    """Problems for choosing settings, disjoint from ``exclude`` (pass the training *and* held-out operand
    pairs); their own random stream, so drawing them changes nothing else."""
    cfg.validate()
    rng = random.Random(f"redi-demo-validation-{seed}")
    pairs = sample_problems(rng, cfg, num_problems, exclude=exclude)
    return [{"id": f"val-{k:04d}", "problem": problem_text(a, b, rng), "answer": str(a + b)}
            for k, (a, b) in enumerate(pairs)]


def problem_operands(text: str) -> tuple[int, int]:
    """The operand pair of a problem statement (any of ``PROBLEM_TEMPLATES``)."""
    import re

    a, b = re.findall(r"\d+", text)[:2]
    return int(a), int(b)


def operands(row: dict[str, Any]) -> tuple[int, int]:
    """The operand pair of a teacher row (parsed back from its ``solution``)."""
    text = row["solution"].split("$")[1]
    a, rest = text.split(" + ")
    return int(a), int(rest.split(" = ")[0])


def write_teacher_data(out_dir: str, num_train: int, num_eval: int, seed: int,
                       cfg: TaskConfig = TaskConfig()) -> TeacherOutput:
    """Write ``raw.jsonl`` (OpenR1-Math-Raw rows), ``eval.jsonl`` (held-out problems) and ``teacher.json``."""
    os.makedirs(out_dir, exist_ok=True)
    rows, stats = teacher_rows(num_train, seed, cfg)
    held_out = eval_problems(num_eval, seed, cfg, exclude=[operands(r) for r in rows])
    train_path, eval_path = os.path.join(out_dir, "raw.jsonl"), os.path.join(out_dir, "eval.jsonl")
    write_jsonl(rows, train_path)
    write_jsonl(held_out, eval_path)
    out = TeacherOutput(train_path, eval_path, len(rows), len(held_out), stats)
    with open(os.path.join(out_dir, "teacher.json"), "w", encoding="utf-8") as f:
        json.dump({"task": asdict(cfg), "seed": seed, **asdict(out)}, f, indent=2)
    return out
