"""The evaluation run's schema: one dataclass, filled by ``redi-eval`` or by Python callers."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from redi_megatron.data.templates import DEFAULT_TEMPLATE
from redi_megatron.errors import UserError
from redi_megatron.eval.backends import SamplingConfig
from redi_megatron.eval.benchmarks import PAPER_BENCHMARKS
from redi_megatron.eval.grading import DEFAULT_TIMEOUT_S, GRADERS
from redi_megatron.eval.prompts import PromptConfig
from redi_megatron.typed import check_field_ranges, ranged

BACKENDS = ("auto", "vllm", "hf")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# Fields that define what a sample *is*: a resumed run must use the same values.
PROTOCOL_FIELDS = ("model", "template", "chat_format", "chat_template", "system_prompt", "force_think",
                   "temperature", "top_p", "top_k", "max_new_tokens", "seed")


@dataclass
class EvalConfig:
    """Everything ``redi-eval`` needs. Defaults reproduce the paper's protocol.

    Attributes:
        model: HF model directory. out: output directory (samples.jsonl, report.json, report.md).
        benchmarks: names from :mod:`redi_megatron.eval.benchmarks` or ``.jsonl`` paths.
        limit: evaluate only the first ``limit`` problems of each benchmark (smoke tests).
        n: samples per problem. temperature, top_p, top_k (<= 0 = off), max_new_tokens, seed: sampling.
        template / chat_format / chat_template / system_prompt / force_think: see :mod:`redi_megatron.eval.prompts`.
        grader: "rllm" (the paper's numbers) or "math_verify". require_think: no ``</think>`` = wrong.
        grade_workers: grading processes (None = all CPUs). grade_timeout: seconds per answer.
        backend: "vllm", "hf", or "auto" (vLLM when importable and a GPU is visible).
        tokenizer: tokenizer directory if not the model's. dtype: weights/compute dtype.
        batch_size: sequences per HF ``generate`` call.
        tensor_parallel_size / data_parallel_size: vLLM TP inside one engine; DP = that many engine
            processes with the problems sharded between them (each gets ``tensor_parallel_size`` GPUs).
        gpu_memory_utilization / max_model_len: passed to vLLM. enforce_eager: vLLM without torch.compile
            or CUDA graphs (starts faster; for CPU runs and tests).
        chunk_size: samples generated between two appends to samples.jsonl (what an interruption
            can lose); default 2048 for vLLM, 4 * batch_size for HF.
        shard_index / num_shards: set internally on data-parallel worker processes.
    """

    model: str
    out: str
    benchmarks: list[str] = field(default_factory=lambda: list(PAPER_BENCHMARKS))
    limit: Optional[int] = ranged(None, ">=1")
    n: int = ranged(16, ">=1")
    temperature: float = ranged(0.6, ">=0")
    top_p: float = ranged(0.95, "(0,1]")
    top_k: int = ranged(-1, "finite")  # <= 0: off
    max_new_tokens: int = ranged(30720, ">=1")
    seed: int = ranged(0, ">=0")
    template: str = "paper"
    chat_format: str = "qwen"
    chat_template: str = DEFAULT_TEMPLATE
    system_prompt: Optional[str] = None
    force_think: bool = True
    grader: str = "rllm"
    require_think: bool = True
    grade_workers: Optional[int] = ranged(None, ">=1")
    grade_timeout: float = ranged(DEFAULT_TIMEOUT_S, ">0")
    backend: str = "auto"
    tokenizer: Optional[str] = None
    dtype: str = "auto"
    batch_size: int = ranged(8, ">=1")
    tensor_parallel_size: int = ranged(1, ">=1")
    data_parallel_size: int = ranged(1, ">=1")
    gpu_memory_utilization: float = ranged(0.85, "(0,1]")
    max_model_len: Optional[int] = ranged(None, ">=1")
    enforce_eager: bool = False
    chunk_size: Optional[int] = ranged(None, ">=1")
    progress: bool = True
    shard_index: Optional[int] = ranged(None, ">=0")
    num_shards: int = ranged(1, ">=1")

    def __post_init__(self) -> None:
        check_field_ranges(self, "", "EvalConfig")  # every declared range, NaN/inf never
        self.prompt_config()  # validates template and chat_format
        checks = [
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.temperature > 0 or self.n == 1, "temperature 0 (greedy) makes all n samples identical; use n=1"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.grader in GRADERS, f"grader must be one of {GRADERS}, got {self.grader!r}"),
            (self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.tensor_parallel_size >= 1, f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}"),
            (self.data_parallel_size >= 1, f"data_parallel_size must be >= 1, got {self.data_parallel_size}"),
            (self.grade_timeout > 0, f"grade_timeout must be > 0, got {self.grade_timeout}"),
            (self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}"),
            (self.chunk_size is None or self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}"),
            (bool(self.benchmarks), "no benchmarks given"),
            (self.shard_index is None or 0 <= self.shard_index < self.num_shards,
             f"shard_index {self.shard_index} outside [0, {self.num_shards})"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"EvalConfig: {message}")

    def prompt_config(self) -> PromptConfig:
        return PromptConfig(template=self.template, chat_format=self.chat_format,
                            system_prompt=self.system_prompt, force_think=self.force_think,
                            chat_template=self.chat_template)

    def sampling_config(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens)

    def protocol(self) -> dict:
        return {name: getattr(self, name) for name in PROTOCOL_FIELDS}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
