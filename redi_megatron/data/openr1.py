"""OpenR1-Math schemas and the per-row curation rules (pure Python, no I/O).

Three published schemas are recognised from their columns:

* ``openr1-raw`` (current OpenR1-Math-Raw): ``generations: list[str]`` and ``correctness`` = struct of
  ``llama_verification``, ``math_verify_answer``, ``math_verify_reparsed_answer`` (lists aligned with
  ``generations``), plus ``problem_is_valid``, ``source``, ``answer``, ``problem``.
* ``openr1-raw-v1`` (earlier OpenR1-Math-Raw): ``correctness_math_verify: list[bool]`` and ``correct_count``.
* ``openr1-220k`` (OpenR1-Math-220k): ``correctness_math_verify``, ``correctness_llama`` (list or null),
  ``is_reasoning_complete``; no ``problem_is_valid``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from redi_megatron.errors import UserError

SCHEMA_RAW = "openr1-raw"
SCHEMA_RAW_V1 = "openr1-raw-v1"
SCHEMA_220K = "openr1-220k"
SCHEMAS = (SCHEMA_RAW, SCHEMA_RAW_V1, SCHEMA_220K)

# label name -> where it lives in each schema: (top-level column, key inside it or None)
_LABEL_FIELDS: dict[str, dict[str, tuple[str, Optional[str]]]] = {
    SCHEMA_RAW: {
        "llama": ("correctness", "llama_verification"),
        "math_verify": ("correctness", "math_verify_answer"),
        "reparsed": ("correctness", "math_verify_reparsed_answer"),
    },
    SCHEMA_RAW_V1: {"math_verify": ("correctness_math_verify", None)},
    SCHEMA_220K: {"math_verify": ("correctness_math_verify", None), "llama": ("correctness_llama", None)},
}

# rule name -> (labels it reads, combine op)
CORRECTNESS_RULES: dict[str, tuple[tuple[str, ...], str]] = {
    "llama_and_reparsed": (("llama", "reparsed"), "and"),  # the paper's "LandMV"
    "llama_or_reparsed": (("llama", "reparsed"), "or"),
    "llama_and_math_verify": (("llama", "math_verify"), "and"),
    "llama_or_math_verify": (("llama", "math_verify"), "or"),
    "reparsed": (("reparsed",), "and"),
    "math_verify": (("math_verify",), "and"),
    "llama": (("llama",), "and"),
}
DEFAULT_RULE = {SCHEMA_RAW: "llama_and_reparsed", SCHEMA_RAW_V1: "math_verify", SCHEMA_220K: "math_verify"}

# Columns read from the input (everything else, e.g. the large `messages`/`solution`, is skipped).
WANTED_COLUMNS = (
    "problem", "generations", "answer", "source", "problem_is_valid", "uuid", "correctness",
    "correctness_math_verify", "correctness_llama", "is_reasoning_complete",
)


def detect_schema(columns: Sequence[str], where: str) -> str:
    """Schema name from a file's column names; ValueError naming the file when none matches."""
    cols = set(columns)
    if "correctness" in cols:
        return SCHEMA_RAW
    if "correctness_llama" in cols or "is_reasoning_complete" in cols:
        return SCHEMA_220K
    if "correctness_math_verify" in cols:
        return SCHEMA_RAW_V1
    raise UserError(
        f"{where}: unrecognised schema (columns {sorted(cols)}); expected OpenR1-Math-Raw "
        "('correctness' struct or 'correctness_math_verify') or OpenR1-Math-220k"
    )


def resolve_rule(schema: str, rule: str) -> str:
    """The correctness rule for ``schema`` ('auto' = that schema's default); ValueError if unusable."""
    if rule == "auto":
        return DEFAULT_RULE[schema]
    if rule not in CORRECTNESS_RULES:
        raise UserError(f"unknown correctness rule {rule!r}; choose from {sorted(CORRECTNESS_RULES)} or 'auto'")
    missing = [lab for lab in CORRECTNESS_RULES[rule][0] if lab not in _LABEL_FIELDS[schema]]
    if missing:
        raise UserError(f"correctness rule {rule!r} needs labels {missing} that schema {schema} does not have")
    return rule


@dataclass(frozen=True)
class RowRules:
    """The per-row selection rules (paper defaults)."""

    schema: str
    correctness_rule: str  # resolved, never 'auto'
    require_valid: bool = True
    valid_values: tuple[str, ...] = ("yes",)
    exclude_sources: tuple[str, ...] = ("cn_k12",)
    require_complete_reasoning: bool = True  # 220k only: incomplete traces are neither positive nor negative


# Outcome of one row. `status` is one of the STATUS_* names; `reason` explains a bad row.
STATUS_BAD = "bad"
STATUS_INVALID = "problem_not_valid"
STATUS_SOURCE = "source_excluded"
STATUS_OK = "ok"


@dataclass
class RowOutcome:
    status: str
    reason: str = ""
    positive: Optional[int] = None  # index of the first correct generation
    negative: Optional[int] = None  # index of the first incorrect generation
    num_generations: int = 0
    null_labels: int = 0  # label entries that were null (treated as false, as bool(None) in the paper)
    incomplete: int = 0  # 220k: generations excluded as incomplete
    fields: dict[str, Any] = field(default_factory=dict)  # problem, generations, answer, source, uuid


def _is_bool_like(v: Any) -> bool:
    # numpy bools arrive as Python bools via Arrow; ints 0/1 are accepted as the paper's bool(v) would.
    return v is None or isinstance(v, bool) or (isinstance(v, int) and v in (0, 1))


def _label_list(row: Mapping[str, Any], schema: str, label: str) -> tuple[Optional[list], str]:
    col, key = _LABEL_FIELDS[schema][label]
    if col not in row or row[col] is None:
        return None, f"missing field {col}"
    value = row[col]
    if key is not None:
        if not isinstance(value, Mapping):
            return None, f"{col} is {type(value).__name__}, expected a struct"
        if key not in value or value[key] is None:
            return None, f"missing field {col}.{key}"
        value = value[key]
        col = f"{col}.{key}"
    if not isinstance(value, (list, tuple)):
        return None, f"{col} is {type(value).__name__}, expected a list"
    if not all(_is_bool_like(v) for v in value):
        return None, f"{col} has non-boolean entries"
    return list(value), col


def _check_generations(row: Mapping[str, Any]) -> tuple[Optional[list], str]:
    gens = row.get("generations")
    if gens is None:
        return None, "missing field generations"
    if not isinstance(gens, (list, tuple)):
        return None, f"generations is {type(gens).__name__}, expected a list"
    if len(gens) == 0:
        return None, "empty generations list"
    for i, g in enumerate(gens):
        if not isinstance(g, str):
            return None, f"generations[{i}] is {type(g).__name__}, expected a string"
        if not g.strip():
            return None, f"generations[{i}] is empty"
    return list(gens), ""


def _passes_row_filters(row: Mapping[str, Any], rules: RowRules) -> Optional[RowOutcome]:
    """Validity and source filters, in the authors' order; None when the row passes."""
    if rules.require_valid and rules.schema != SCHEMA_220K:
        if "problem_is_valid" not in row:
            return RowOutcome(STATUS_BAD, "missing field problem_is_valid")
        valid = row["problem_is_valid"]
        if valid is not None and not isinstance(valid, str):
            return RowOutcome(STATUS_BAD, f"problem_is_valid is {type(valid).__name__}, expected a string")
        # null counts as "not valid", as in the authors' isinstance(..., str) check
        if valid is None or valid.strip().lower() not in rules.valid_values:
            return RowOutcome(STATUS_INVALID)
    source = row.get("source")
    if not isinstance(source, str):
        what = "missing field source" if source is None else f"source is {type(source).__name__}, expected a string"
        return RowOutcome(STATUS_BAD, what)
    if source in rules.exclude_sources:
        return RowOutcome(STATUS_SOURCE)
    return None


def evaluate_row(row: Mapping[str, Any], rules: RowRules) -> RowOutcome:
    """Apply the filters and pick the first correct / first incorrect generation of one row."""
    if not isinstance(row, Mapping):
        return RowOutcome(STATUS_BAD, f"row is {type(row).__name__}, expected an object")
    early = _passes_row_filters(row, rules)
    if early is not None:
        return early
    problem = row.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        what = "missing field problem" if problem is None else "problem is empty or not a string"
        return RowOutcome(STATUS_BAD, what)
    gens, why = _check_generations(row)
    if gens is None:
        return RowOutcome(STATUS_BAD, why)
    labels_needed, op = CORRECTNESS_RULES[rules.correctness_rule]
    columns = []
    for label in labels_needed:
        values, col = _label_list(row, rules.schema, label)
        if values is None:
            return RowOutcome(STATUS_BAD, col)
        if len(values) != len(gens):
            return RowOutcome(STATUS_BAD, f"{col} has {len(values)} entries for {len(gens)} generations")
        columns.append(values)
    complete = [True] * len(gens)
    if rules.schema == SCHEMA_220K and rules.require_complete_reasoning:
        flags = row.get("is_reasoning_complete")
        if not isinstance(flags, (list, tuple)) or not all(_is_bool_like(v) for v in flags):
            return RowOutcome(STATUS_BAD, "is_reasoning_complete missing or not a list of booleans")
        if len(flags) != len(gens):
            return RowOutcome(STATUS_BAD, f"is_reasoning_complete has {len(flags)} entries for {len(gens)} generations")
        complete = [bool(v) for v in flags]
    null_labels = sum(v is None for col in columns for v in col)
    correct = [
        (all(bool(c[i]) for c in columns) if op == "and" else any(bool(c[i]) for c in columns))
        for i in range(len(gens))
    ]
    pos = next((i for i in range(len(gens)) if complete[i] and correct[i]), None)
    neg = next((i for i in range(len(gens)) if complete[i] and not correct[i]), None)
    answer = row.get("answer")
    uuid = row.get("uuid")
    return RowOutcome(
        STATUS_OK,
        positive=pos,
        negative=neg,
        num_generations=len(gens),
        null_labels=null_labels,
        incomplete=complete.count(False),
        fields={
            "problem": problem,
            "generations": gens,
            "answer": answer if isinstance(answer, str) else None,
            "source": row["source"],
            "uuid": uuid if isinstance(uuid, str) else None,
        },
    )
