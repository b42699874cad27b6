"""Grading with HF math-verify (the checker behind open-r1 / lighteval's math metrics).

Answer region: the same text the rllm grader looks at (after ``</think>``), so that the two graders
differ only in how they judge equivalence. The answer is the last ``\\boxed{}`` there when there is
one; otherwise math-verify's own "final answer is" / LaTeX / plain-expression patterns pick it.
Gold answers are wrapped in ``\\boxed{}`` before parsing: a bare ``\\sqrt{18}`` parses to nothing.

math-verify's own timeouts use ``signal.alarm`` and reset it on exit, which would cancel the
caller's per-answer deadline; they are disabled here and the caller's
:func:`redi_megatron.eval.timeouts.deadline` bounds the whole answer instead.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Optional

from redi_megatron.eval.rllm_grader import last_boxed_content, solution_after_think


class _DropDisabledTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


@functools.lru_cache(maxsize=1)
def _math_verify():
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropDisabledTimeoutWarning())
    pred_config = [math_verify.LatexExtractionConfig(boxed_match_priority=0), math_verify.ExprExtractionConfig()]
    gold_config = [math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig()]
    return math_verify, pred_config, gold_config


@functools.lru_cache(maxsize=8192)
def _parsed_gold(gold: str):
    # Cached: every problem's gold is graded n times.
    mv, _, gold_config = _math_verify()
    return mv.parse("\\boxed{" + gold + "}", extraction_config=gold_config, parsing_timeout=None)


def grade_math_verify(
    response: str, gold: str | Sequence[str], require_think: bool = True
) -> tuple[bool, Optional[str]]:
    """Grade one response with math-verify; returns (correct, extracted answer text or None)."""
    region = solution_after_think(response)
    if region is None:
        if require_think:
            return False, None
        region = response
    mv, pred_config, _ = _math_verify()
    boxed = last_boxed_content(region)
    if boxed is not None:
        # math-verify's own box handling joins several boxes into a set ("\\boxed{1} ... no,
        # \\boxed{2}" becomes {1, 2}); hand it only the last box, as rllm grades.
        region = "\\boxed{" + boxed + "}"
    parsed = mv.parse(region, extraction_config=pred_config, parsing_timeout=None)
    if not parsed:
        return False, None
    # parse() returns [sympy object, matched string] (or just the string when sympy failed).
    extracted = str(parsed[-1])
    golds = [gold] if isinstance(gold, str) else list(gold)
    for g in golds:
        if mv.verify(_parsed_gold(str(g)), parsed, timeout_seconds=None):
            return True, extracted
    return False, extracted
