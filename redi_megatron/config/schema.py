"""The run configuration schema. Dataclasses are the schema; YAML files and ``key=value`` overrides only
fill them (``redi_megatron.config.loader``). Every default lives here and only here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from redi_megatron.models.config import FP8Options, ModelConfig, ParallelConfig
from redi_megatron.typed import ranged


@dataclass
class DataConfig:
    train_path: str = ""                 # curated dataset from redi-curate (HF datasets dir or JSONL)
    tokenizer: str = ""                  # HF tokenizer directory; "" = the one inside checkpoint.init_from
    global_batch_size: int = ranged(128, ">=1")         # samples per optimizer step: sequences (SFT) or pairs
    micro_batch_tokens: int = ranged(32768, ">=1")      # token budget of one microbatch: one packed (THD) row
    max_prompt_tokens: int = ranged(800, ">=1")
    max_completion_tokens: int = ranged(19000, ">=1")
    # samples over max_prompt_tokens / max_completion_tokens: "error" refuses the run in one line (checked
    # from curation's stored counts before tokenizing when they match); "drop" trains without them and
    # prints how many (the tokenized cache still holds every sample)
    overlong: Literal["error", "drop"] = "error"
    seed: int = ranged(42, ">=0")                       # data order (shuffling, packing)
    num_proc: int = ranged(0, ">=0")                    # tokenization worker processes; 0 = cores/memory allow
    # tokenized cache root; "" = $REDI_DATA_CACHE, else tokenized/ beside the curated data (shared by
    # every stage on that data), else <checkpoint.save_dir>/cache/tokenized when that is not writable
    cache_dir: str = ""
    # the student family's chat template (data/templates.py TEMPLATES; a test keeps the two lists equal);
    # must equal the one the data was curated with (curation_report.json), else the run is refused
    chat_template: Literal["qwen2.5-math", "qwen3", "llama3", "r1-distill"] = "qwen2.5-math"


# The losses redi_megatron/losses registers (tests/test_newcomer.py keeps this equal to its registry): redi-train
# refuses a loss.name typo against it before torch is imported.
BUILTIN_LOSSES = ("dpo", "redi", "sft", "simpo")


@dataclass
class LossConfig:
    name: str = "sft"                    # a name in redi_megatron.losses.registry
    params: dict[str, Any] = field(default_factory=dict)  # checked against that loss's own dataclass


@dataclass
class OptimizerConfig:
    lr: float = ranged(5e-5, ">=0")
    min_lr: float = ranged(0.0, ">=0")
    weight_decay: float = ranged(0.0, ">=0")
    adam_beta1: float = ranged(0.9, "[0,1)")
    adam_beta2: float = ranged(0.999, "[0,1)")
    adam_eps: float = ranged(1e-8, ">0")
    clip_grad: float = ranged(1.0, ">=0")
    warmup_ratio: float = ranged(0.1, "[0,1]")
    decay: Literal["linear", "cosine", "constant"] = "linear"
    use_distributed_optimizer: bool = True


@dataclass
class TrainConfig:
    epochs: float = ranged(1.0, ">0")
    max_steps: Optional[int] = ranged(None, ">=1")      # stop earlier than the epochs would
    seed: int = ranged(1234, ">=0")                     # model init, dropout
    dtype: Literal["bf16", "fp32"] = "bf16"
    fp8: Optional[Literal["delayed", "current"]] = None  # needs Transformer Engine
    fp8_options: FP8Options = field(default_factory=FP8Options)  # amax history, bf16 edge layers
    recompute: Optional[Literal["selective", "full"]] = None
    # A step whose loss or gradient norm is NaN/inf is never applied and never saved. "stop": end the
    # run (exit status 4), keeping the last finite checkpoint; "skip": drop that step and go on (for
    # rare spikes, as Megatron's check_for_nan_in_loss_and_grad would), stopping after
    # max_skipped_steps of them in a row.
    # Log-probs straight from the final hidden states, chunked, only at loss positions: no [T, V/TP]
    # logits or logits gradient (parallel/fused_logprobs.py). false: Megatron's output layer + our
    # chunked log-probs on its logits (for comparison).
    fused_logprobs: bool = True
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = ranged(5, ">=1")
    # Signals that stop the run cleanly (training/preemption.py): finish the step, save it, write
    # save_dir/preempted.json, exit 75. SIGUSR1 is the early warning of `#SBATCH --signal=B:USR1@120`.
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])


@dataclass
class CheckpointConfig:
    init_from: Optional[str] = None      # model checkpoint (redi-hf-to-megatron output or a stage-1 run)
    save_dir: str = "runs/default"
    save_interval: int = ranged(0, ">=0")               # steps; 0 = only at the end
    keep_last: int = ranged(2, ">=0")
    resume: bool = True                  # continue from the newest checkpoint in save_dir if any
    # A damaged newest checkpoint (a file missing, truncated or corrupted against its manifest) is set
    # aside (renamed, never deleted) and the previous one resumed: "fallback"; or the run refuses: "refuse".
    on_corrupt: Literal["fallback", "refuse"] = "fallback"
    trust_unverified: bool = False       # the source is trusted: no manifest needed, no unpickling limits


@dataclass
class CollapseConfig:
    action: Literal["off", "warn", "stop"] = "warn"
    window: int = ranged(20, ">=1")                     # steps of history the signals compare against
    logp_drop: float = ranged(0.5, ">0")               # nats/token drop of BOTH chosen and rejected mean log-probs
    update_norm_spike: float = ranged(5.0, ">0")       # grad norm above this multiple of its running median


@dataclass
class LoggingConfig:
    log_interval: int = ranged(1, ">=1")
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    jsonl: bool = True
    collapse: CollapseConfig = field(default_factory=CollapseConfig)


@dataclass
class RunConfig:
    name: str = "redi"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
