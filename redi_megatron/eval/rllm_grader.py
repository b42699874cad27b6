"""An rllm/DeepScaleR-compatible answer grader, written from its documented behaviour.

REDI scored its models with rllm (``rllm/rewards/math_reward.py`` + ``math_utils/utils.py``).
Matching its verdicts matters more than being clever, so this module reproduces the same rules,
quirks included:

* Extraction: the response must contain ``</think>``; the solution is the text between the first
  ``</think>`` and the next one (rllm takes ``split("</think>")[1]``). The answer is the content of
  the *last* ``\\boxed{...}`` in it, with braces matched naively; if that last ``\\boxed`` is not
  immediately followed by ``{`` (``\\boxed 5``) or its braces never close, there is no answer.
* A verdict is ``mathd_equal(answer, gold) or sympy_equal(answer, gold)`` for any gold alternative.
* ``mathd_equal`` compares the Hendrycks MATH ``_strip_string`` normal forms (``\\left``, ``^\\circ``,
  ``\\$``, trailing ``\\text{ unit}``, ``dfrac``, ``x = `` prefixes, ``a/b`` → ``\\frac``...).
* ``sympy_equal`` normalizes harder (units, ``\\text{}``, thousands separators, LaTeX → text via
  pylatexenc, lower case), splits tuples/intervals element-wise (brackets must match), refuses to
  simplify when either element is an integer and the other is not, compares ``a/b`` fractions as
  strings (unreduced fractions are wrong), and otherwise accepts ``simplify(gold - answer) == 0``
  under a 2 s limit. Expressions with more than two distinct letters or large powers are never
  handed to sympy (rllm's guard against hangs).

The rllm snapshot REDI used anchors the ``\\text{...}`` unwrapping at both ends; that is the
variant implemented here.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional

from redi_megatron.errors import UserError
from redi_megatron.eval.timeouts import InnerTimeout, deadline

THINK_END = "</think>"
SYMPY_TIMEOUT_S = 2.0

_TEXT_WRAPPED = re.compile(r"^\\text\{(?P<text>.+?)\}$")


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------
def solution_after_think(response: str) -> Optional[str]:
    """Text between the first ``</think>`` and the next one; None when ``</think>`` is missing."""
    if THINK_END not in response:
        return None
    return response.split(THINK_END)[1]


def last_boxed_content(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` in ``text`` (None if absent or malformed)."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    depth = 0
    for pos in range(start, len(text)):
        char = text[pos]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                boxed = text[start : pos + 1]
                prefix = "\\boxed{"
                return boxed[len(prefix) : -1] if boxed.startswith(prefix) else None
    return None


def extract_answer(response: str, require_think: bool = True) -> Optional[str]:
    """The answer string rllm would grade, or None (no ``</think>``, no well-formed box)."""
    solution = solution_after_think(response)
    if solution is None:
        if require_think:
            return None
        solution = response
    return last_boxed_content(solution)


def gold_candidates(gold: str | Sequence[str]) -> list[str]:
    """Gold alternatives as rllm processes them: a boxed gold is unboxed, a malformed one dropped."""
    golds = [gold] if isinstance(gold, (str, int, float)) else list(gold)
    out = []
    for item in golds:
        item = str(item)
        if "\\boxed" in item:
            unboxed = last_boxed_content(item)
            if unboxed is not None:
                out.append(unboxed)
        else:
            out.append(item)
    return out


# ----------------------------------------------------------------------------------------------
# mathd (Hendrycks MATH) normalization
# ----------------------------------------------------------------------------------------------
def _braced_fracs(s: str) -> str:
    r"""``\frac12`` → ``\frac{1}{2}``, ``\frac1{7}`` → ``\frac{1}{7}``; unchanged if too short."""
    head, *pieces = s.split("\\frac")
    out = [head]
    for piece in pieces:
        out.append("\\frac")
        if piece[0] == "{":  # IndexError on a trailing \frac is intended: caller falls back
            out.append(piece)
            continue
        if len(piece) < 2:
            return s
        num, den, rest = piece[0], piece[1], piece[2:]
        out.append("{" + num + "}" + ("{" + den + "}" if den != "{" else den) + rest)
    return "".join(out)


def _slash_to_frac(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        num, den = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return "\\frac{%d}{%d}" % (num, den) if s == f"{num}/{den}" else s


def _braced_sqrt(s: str) -> str:
    r"""``\sqrt3`` → ``\sqrt{3}`` (one character only, as in MATH)."""
    if "\\sqrt" not in s:
        return s
    head, *pieces = s.split("\\sqrt")
    out = [head]
    for piece in pieces:
        out.append("\\sqrt" + piece if piece[0] == "{" else "\\sqrt{" + piece[0] + "}" + piece[1:])
    return "".join(out)


def _drop_right_units(s: str) -> str:
    # In MATH, "\text{ " (with the space) only ever introduces a trailing unit.
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise UserError("several \\text{ units")
    return parts[0]


_MATHD_DELETIONS = ("\n", "\\!")
_MATHD_REPLACEMENTS_1 = (("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""),
                         ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""))


def _mathd_strip(s: str) -> str:
    for token in _MATHD_DELETIONS:
        s = s.replace(token, "")
    for old, new in _MATHD_REPLACEMENTS_1:
        s = s.replace(old, new)
    s = _drop_right_units(s)
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5" -> "5"
        s = sides[1]
    s = _braced_sqrt(s)
    s = s.replace(" ", "")
    s = _braced_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_to_frac(s)


def mathd_normalize(answer: Optional[str]) -> Optional[str]:
    """Hendrycks-MATH normal form; on a malformed string, the (unwrapped) string itself."""
    if answer is None:
        return None
    answer = answer.strip()
    wrapped = _TEXT_WRAPPED.search(answer)
    if wrapped is not None:
        answer = wrapped.group("text").strip()
    try:
        return _mathd_strip(answer)
    except (IndexError, ValueError):
        return answer


def mathd_equal(answer: str, gold: str) -> bool:
    return mathd_normalize(gold) == mathd_normalize(answer)


# ----------------------------------------------------------------------------------------------
# sympy path normalization
# ----------------------------------------------------------------------------------------------
_UNITS = ("degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week",
          "month", "year", "foot", "feet", "inch", "yard")
_UNIT_RES = [re.compile(unit + r"(es)?(s)? *(\^[0-9]+)?") for unit in _UNITS]
_THOUSANDS = re.compile(r"(\d)(,)(\d\d\d)($|\D)")
_MIXED_NUMBER = re.compile(r"([0-9]) +([0-9])")
_FRACTION = re.compile(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$")
_UNICODE_TO_SYMPY = (("√", "sqrt"), ("π", "pi"), ("∞", "inf"), ("∪", "U"), ("·", "*"), ("×", "*"))
_latex_to_text = None


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _is_integral(x: float) -> bool:
    try:
        return abs(x - int(round(x))) <= 1e-7
    except (OverflowError, ValueError):
        return False


def _strip_thousands(s: str) -> str:
    while True:
        stripped = _THOUSANDS.sub(r"\1\3\4", s)
        if stripped == s:
            return s
        s = stripped


def _str_is_int(s: str) -> bool:
    try:
        return _is_integral(float(_strip_thousands(s)))
    except ValueError:
        return False


def _latex_as_text(s: str) -> str:
    global _latex_to_text
    if _latex_to_text is None:
        from pylatexenc.latex2text import LatexNodes2Text

        _latex_to_text = LatexNodes2Text()
    s = s.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac")
    s = s.replace("\\frac", " \\frac")  # "1\frac{1}{2}" must stay a mixed number
    s = _latex_to_text.latex_to_text(s)
    for old, new in _UNICODE_TO_SYMPY:
        s = s.replace(old, new)
    return s.strip()


def sympy_normalize(expr: Optional[str]) -> Optional[str]:
    """rllm's ``_normalize``: a lower-case, brace-free, space-free string for sympy."""
    if expr is None:
        return None
    wrapped = _TEXT_WRAPPED.search(expr)
    if wrapped is not None:
        expr = wrapped.group("text")
    expr = expr.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
    expr = expr.replace(" or ", " , ").replace(" and ", " , ")
    expr = expr.replace("million", "*10^6").replace("billion", "*10^9").replace("trillion", "*10^12")
    for unit_re in _UNIT_RES:
        expr = unit_re.sub("", expr)
    expr = re.sub(r"\^ *\\circ", "", expr)
    if expr and expr[0] == "{" and expr[-1] == "}":
        expr = expr[1:-1]
    expr = re.sub(r",\\! *", "", expr)
    if _is_float(expr) and _is_integral(float(expr)):
        expr = str(int(round(float(expr))))
    if "\\" in expr:
        try:
            expr = _latex_as_text(expr)
        except Exception:  # pylatexenc rejects some malformed LaTeX: keep the raw string
            pass
    expr = re.sub("- *", "-", expr)
    expr = _MIXED_NUMBER.sub(r"\1+\2", expr)
    expr = expr.replace(" ", "").replace("{", "").replace("}", "").lower()
    if _str_is_int(expr):
        expr = str(int(float(expr.replace(",", ""))))
    return expr


def split_tuple(expr: str) -> list[str]:
    """Elements of ``(a,b)`` / ``[a,b)``...; a single-element list for anything else."""
    expr = _strip_thousands(expr)
    if not expr:
        return []
    brackets = "()[]"
    inner = expr[1:-1]
    if len(expr) > 2 and expr[0] in brackets and expr[-1] in brackets and not any(b in inner for b in brackets):
        return [elem.strip() for elem in inner.split(",")]
    return [expr]


def _safe_for_sympy(expr: str) -> bool:
    letters = {ch for ch in expr.replace("sqrt", "").replace("frac", "") if ch.isalpha()}
    if len(letters) > 2 or "^{" in expr or "^(" in expr:
        return False
    return re.search(r"\^[0-9]+\^", expr) is None and re.search(r"\^[0-9][0-9]+", expr) is None


def _sympy_difference_is_zero(gold: str, answer: str) -> bool:
    expr = f"({gold})-({answer})"
    if not _safe_for_sympy(expr):
        return False
    import sympy
    from sympy.parsing import sympy_parser

    transformations = sympy_parser.standard_transformations + (sympy_parser.implicit_multiplication_application,)
    try:
        with deadline(SYMPY_TIMEOUT_S, InnerTimeout):
            diff = sympy_parser.parse_expr(expr.replace("^", "**"), transformations=transformations)
            return sympy.simplify(diff) == 0
    except Exception:  # unparsable, or the 2 s limit: rllm counts both as "not equal"
        return False


def sympy_equal(answer: str, gold: str) -> bool:
    gold_n = sympy_normalize(gold)
    answer_n = sympy_normalize(answer)
    if gold_n is None:
        return False
    if gold_n == answer_n:
        return True
    if not answer_n:
        return False
    gold_elems, answer_elems = split_tuple(gold_n), split_tuple(answer_n)
    if len(gold_elems) > 1 and (gold_n[0] != answer_n[0] or gold_n[-1] != answer_n[-1]):
        return False  # "(1,2]" vs "(1,2)": brackets are part of the answer
    if len(gold_elems) != len(answer_elems):
        return False
    for g, a in zip(gold_elems, answer_elems):
        if _FRACTION.search(g) and _FRACTION.search(a):
            ok = g == a  # unreduced fractions must not be simplified into correctness
        elif _str_is_int(g) != _str_is_int(a):
            ok = False
        else:
            ok = _sympy_difference_is_zero(g, a)
        if not ok:
            return False
    return True


def answers_equal(answer: str, gold: str) -> bool:
    """rllm's per-gold verdict: mathd normal forms equal, or sympy says so."""
    return mathd_equal(answer, gold) or sympy_equal(answer, gold)


def grade_rllm(response: str, gold: str | Sequence[str], require_think: bool = True) -> tuple[bool, Optional[str]]:
    """Grade one response; returns (correct, extracted answer or None)."""
    answer = extract_answer(response, require_think=require_think)
    if answer is None:
        return False, None
    return any(answers_equal(answer, g) for g in gold_candidates(gold)), answer
