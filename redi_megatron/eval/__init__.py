"""Evaluation: sampling (vLLM / HF), rllm-compatible or math-verify grading, pass@k reports.

Public API::

    from redi_megatron.eval import grade, pass_at_k
    grade("<think>...</think> so $\\boxed{025}$", "25")        # True (rllm grader)
    grade(response, ["\\arcsin{\\frac{10}{13}}", "..."], grader="math_verify")
    pass_at_k(n=16, c=3, k=8)

Heavier pieces are imported lazily: :class:`GradingPool` (process pool with per-answer SIGALRM
timeouts), :class:`EvalConfig` and :func:`run_eval` (the ``redi-eval`` pipeline).
"""
from redi_megatron.eval.grading import GRADERS, GradeResult, GradingPool, grade, grade_detailed
from redi_megatron.eval.metrics import pass_at_k

__all__ = ["grade", "grade_detailed", "pass_at_k", "GradeResult", "GradingPool", "GRADERS", "EvalConfig",
           "run_eval", "load_benchmark"]


def __getattr__(name: str):
    # Keep `import redi_megatron.eval` free of torch/transformers.
    if name == "EvalConfig":
        from redi_megatron.eval.config import EvalConfig

        return EvalConfig
    if name == "run_eval":
        from redi_megatron.eval.runner import run_eval

        return run_eval
    if name == "load_benchmark":
        from redi_megatron.eval.benchmarks import load_benchmark

        return load_benchmark
    raise AttributeError(f"module 'redi_megatron.eval' has no attribute {name!r}")
