"""``redi-eval``: sample, grade and report pass@1 on the paper's five math benchmarks.

Example (the paper's protocol, 8 GPUs as 8 vLLM engines)::

    redi-eval --model ckpt/hf --benchmarks math500,aime24,amc,minerva,olympiadbench --n 16 \\
        --temperature 0.6 --top-p 0.95 --max-new-tokens 30720 --dp 8 --out evals/redi

Rerunning the same command resumes; ``--grader math_verify`` on a finished directory regrades it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Optional

from redi_megatron.data.templates import TEMPLATES as CHAT_TEMPLATES
from redi_megatron.errors import UserError
from redi_megatron.eval.benchmarks import PAPER_BENCHMARKS
from redi_megatron.eval.config import BACKENDS, DTYPES, EvalConfig
from redi_megatron.eval.grading import GRADERS
from redi_megatron.eval.prompts import CHAT_FORMATS, TEMPLATES

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EvalConfig) if f.default is not dataclasses.MISSING}


class _DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: X)`` once: not when the help already names the default, nor for None or flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or isinstance(action.default, bool):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="redi-eval",
                                description="Sample, grade and report pass@1 on the paper's five math benchmarks.",
                                formatter_class=_DefaultsOnce)
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--out", required=True, help="output directory (created; reruns resume)")
    p.add_argument("--benchmarks", default=",".join(PAPER_BENCHMARKS),
                   help="comma-separated: math500, aime24, amc (83 problems, the paper's), amc23, minerva, "
                        "olympiadbench, or paths to .jsonl files")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems of each benchmark")
    g = p.add_argument_group("sampling")
    g.add_argument("--n", type=int, default=_DEFAULTS["n"], help="samples per problem")
    g.add_argument("--temperature", type=float, default=_DEFAULTS["temperature"], help="sampling temperature")
    g.add_argument("--top-p", type=float, default=_DEFAULTS["top_p"], help="nucleus sampling")
    g.add_argument("--top-k", type=int, default=_DEFAULTS["top_k"], help="<= 0 disables top-k")
    g.add_argument("--max-new-tokens", type=int, default=_DEFAULTS["max_new_tokens"], help="per sample")
    g.add_argument("--seed", type=int, default=_DEFAULTS["seed"], help="sampling seed")
    g = p.add_argument_group("prompt")
    g.add_argument("--template", choices=TEMPLATES, default=_DEFAULTS["template"],
                   help="paper: problem under the Qwen2.5-Math system prompt; rllm: 'Solve the following math "
                        "problem efficiently and clearly ...'")
    g.add_argument("--chat-format", choices=CHAT_FORMATS, default=_DEFAULTS["chat_format"],
                   help="qwen: render the Qwen chat format (as in training); tokenizer: the model's chat template")
    g.add_argument("--chat-template", choices=sorted(CHAT_TEMPLATES), default=_DEFAULTS["chat_template"],
                   help="with --chat-format qwen: the student family's training template (docs/data.md)")
    g.add_argument("--system-prompt", default=None, help="override the system prompt ('' for none)")
    g.add_argument("--no-force-think", dest="force_think", action="store_false",
                   help="do not start the assistant turn with <think>\\n")
    g = p.add_argument_group("grading")
    g.add_argument("--grader", choices=GRADERS, default=_DEFAULTS["grader"])
    g.add_argument("--no-require-think", dest="require_think", action="store_false",
                   help="grade responses without </think> on their whole text instead of counting them wrong")
    g.add_argument("--grade-workers", type=int, default=None, help="grading processes (default: all CPUs)")
    g.add_argument("--grade-timeout", type=float, default=_DEFAULTS["grade_timeout"], help="seconds per answer")
    g = p.add_argument_group("backend")
    g.add_argument("--backend", choices=BACKENDS, default=_DEFAULTS["backend"],
                   help="auto = vllm if installed and a GPU is visible, else hf")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument("--dtype", choices=DTYPES, default=_DEFAULTS["dtype"])
    g.add_argument("--batch-size", type=int, default=_DEFAULTS["batch_size"], help="HF backend batch size")
    g.add_argument("--tp", dest="tensor_parallel_size", type=int, default=1, help="vLLM tensor parallel size")
    g.add_argument("--dp", dest="data_parallel_size", type=int, default=1,
                   help="data parallel engines (one process per --tp GPUs, problems sharded)")
    g.add_argument("--gpu-memory-utilization", type=float, default=_DEFAULTS["gpu_memory_utilization"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--enforce-eager", action="store_true",
                   help="vLLM without torch.compile / CUDA graphs: starts faster (CPU runs, tests)")
    g.add_argument("--chunk-size", type=int, default=None,
                   help="samples between checkpoints to samples.jsonl (default 2048 vLLM, 4 x batch HF)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    fields = vars(args).copy()
    fields["benchmarks"] = [b for b in fields["benchmarks"].split(",") if b.strip()]
    return EvalConfig(**fields)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        from redi_megatron.eval.runner import run_eval

        report = run_eval(cfg)
    except UserError as exc:  # bad input, or the vLLM backend without vllm installed
        parser.exit(2, f"redi-eval: error: {exc}\n")
    from redi_megatron.eval.report import render_markdown

    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
