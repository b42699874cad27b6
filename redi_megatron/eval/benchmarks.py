"""The five evaluation benchmarks of REDI's Table 1, shipped in ``redi_megatron/eval/data``.

Names accepted by ``--benchmarks`` (rllm's dataset names work too):

=============== ======================= ======== =================================================
name            file                    problems notes
=============== ======================= ======== =================================================
math500         math500.jsonl           500      MATH-500 (rllm ``math``)
aime24          aime24.jsonl            30       answers zero-padded ("025")
amc             amc_rllm83.jsonl        83       AMC 12 2022+2023, the set REDI scored as "AMC23"
amc23           amc23.jsonl             40       the 40 AMC 2023 problems other papers use
minerva         minerva.jsonl           272      several accepted answers per problem
olympiadbench   olympiadbench.jsonl     675      tuples, intervals, expressions, units
=============== ======================= ======== =================================================

Any other ``--benchmarks`` entry ending in ``.jsonl`` is read as a file with the same schema:
one JSON object per line with ``id`` (unique), ``problem`` and ``answer`` (a string), and
optionally ``answers`` (a list of accepted alternatives, which then takes precedence).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from redi_megatron.errors import UserError

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

BENCHMARK_FILES = {
    "math500": "math500.jsonl",
    "aime24": "aime24.jsonl",
    "amc": "amc_rllm83.jsonl",
    "amc23": "amc23.jsonl",
    "minerva": "minerva.jsonl",
    "olympiadbench": "olympiadbench.jsonl",
}
ALIASES = {"math": "math500", "aime": "aime24", "olympiad_bench": "olympiadbench", "amc83": "amc"}
PAPER_BENCHMARKS = ("math500", "aime24", "amc", "minerva", "olympiadbench")


@dataclass(frozen=True)
class Problem:
    """One benchmark problem; ``answers`` holds every accepted gold string (>= 1)."""

    benchmark: str
    id: str
    problem: str
    answers: tuple[str, ...]


def resolve_name(name: str) -> tuple[str, str]:
    """``(benchmark name, path)`` for a registered name, an alias, or a ``.jsonl`` path."""
    name = name.strip()
    if name.endswith(".jsonl"):
        if not os.path.isfile(name):
            raise UserError(f"benchmark file {name} does not exist")
        return os.path.splitext(os.path.basename(name))[0], name
    key = ALIASES.get(name, name)
    if key not in BENCHMARK_FILES:
        known = ", ".join(list(BENCHMARK_FILES) + list(ALIASES))
        raise UserError(f"unknown benchmark {name!r}; known: {known}, or a path to a .jsonl file")
    return key, os.path.join(DATA_DIR, BENCHMARK_FILES[key])


def _answers_of(row: dict, where: str) -> tuple[str, ...]:
    if "answers" in row:
        answers = row["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise UserError(f"{where}: 'answers' must be a non-empty list of non-empty strings, got {answers!r}")
        return tuple(answers)
    answer = row.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise UserError(f"{where}: 'answer' must be a non-empty string, got {answer!r}")
    return (answer,)


def load_benchmark(name: str, limit: Optional[int] = None) -> list[Problem]:
    """Problems of one benchmark in file order (the first ``limit`` of them if given)."""
    bench, path = resolve_name(name)
    problems: list[Problem] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(row, dict) or "id" not in row:
                raise UserError(f"{where}: expected an object with an 'id' field")
            pid = str(row["id"])
            if pid in seen:
                raise UserError(f"{where}: duplicate id {pid!r}")
            seen.add(pid)
            text = row.get("problem")
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{where}: 'problem' must be a non-empty string")
            problems.append(Problem(bench, pid, text, _answers_of(row, where)))
    if not problems:
        raise UserError(f"{path}: no problems")
    if limit is not None:
        if limit < 1:
            raise UserError(f"limit must be >= 1, got {limit}")
        problems = problems[:limit]
    return problems


def load_benchmarks(names: list[str], limit: Optional[int] = None) -> dict[str, list[Problem]]:
    """``{benchmark name: problems}`` in the order given; duplicate names are an error."""
    out: dict[str, list[Problem]] = {}
    for name in names:
        problems = load_benchmark(name, limit)
        bench = problems[0].benchmark
        if bench in out:
            raise UserError(f"benchmark {bench!r} listed twice in {names}")
        out[bench] = problems
    return out
