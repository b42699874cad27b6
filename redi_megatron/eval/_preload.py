"""Imported once by the grading pool's forkserver so that forked workers start warm."""
import sympy  # noqa: F401
from pylatexenc import latex2text  # noqa: F401

from redi_megatron.eval import grading, mv_grader, rllm_grader  # noqa: F401

try:
    mv_grader._math_verify()
except ImportError:  # math-verify missing: only the rllm grader will be usable
    pass
