"""Model and parallelism schema (dataclasses) and their translation to Megatron's TransformerConfig."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, get_args

from redi_megatron.errors import UserError
from redi_megatron.typed import ranged

if TYPE_CHECKING:  # torch is imported where a TransformerConfig is built: reading a config stays fast
    import torch

Family = Literal["qwen2", "qwen3", "llama"]
RopeType = Literal["default", "llama3"]
ROPE_TYPES = get_args(RopeType)
FAMILIES = get_args(Family)
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise"}  # train.fp8 -> Megatron's fp8_recipe


@dataclass
class ModelConfig:
    """Architecture of a decoder-only model (Qwen2, Qwen3 dense or Llama 2/3 family). Defaults: a tiny CPU test
    model."""

    family: Family = "qwen2"
    num_layers: int = ranged(2, ">=1")
    hidden_size: int = ranged(64, ">=1")
    ffn_hidden_size: int = ranged(128, ">=1")
    num_attention_heads: int = ranged(4, ">=1")
    num_query_groups: int = ranged(2, ">=1")
    kv_channels: Optional[int] = ranged(None, ">=1")        # head dim; None = hidden_size // num_attention_heads
    vocab_size: int = ranged(256, ">=1")                    # the tokenizer/HF embedding rows, before TP padding
    make_vocab_size_divisible_by: int = ranged(128, ">=1")
    max_position_embeddings: int = ranged(4096, ">=1")
    rope_theta: float = ranged(10000.0, ">0")
    norm_eps: float = ranged(1e-6, ">0")
    add_qkv_bias: bool = True                # Qwen2: True, Qwen3 and Llama: False
    qk_layernorm: bool = False               # per-head RMSNorm on queries and keys before RoPE (Qwen3)
    rope_type: RopeType = "default"          # "llama3": Llama 3.1/3.2 frequency-dependent scaling
    rope_scaling_factor: float = ranged(8.0, ">=1")         # llama3 only
    rope_low_freq_factor: float = ranged(1.0, ">0")         # llama3 only
    rope_high_freq_factor: float = ranged(4.0, ">0")        # llama3 only: > rope_low_freq_factor (validate)
    rope_original_max_position_embeddings: int = ranged(8192, ">=1")  # llama3 only
    tie_word_embeddings: bool = True
    init_method_std: float = ranged(0.02, ">0")

    def validate(self, tp: int = 1) -> None:
        if self.family not in FAMILIES:
            raise UserError(f"model.family must be one of {FAMILIES}, got {self.family!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise UserError(f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of model.num_query_groups ({self.num_query_groups})")
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            if getattr(self, name) % tp:
                raise UserError(f"parallel.tp={tp} does not divide model.{name}={getattr(self, name)}")
        self._validate_rope()
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise UserError("model.hidden_size must be divisible by model.num_attention_heads "
                             "(or set model.kv_channels)")

    def _validate_rope(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise UserError(f"model.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if self.rope_scaling_factor < 1:
            raise UserError(f"model.rope_scaling_factor must be >= 1, got {self.rope_scaling_factor}")
        if not self.rope_low_freq_factor > 0:
            raise UserError(f"model.rope_low_freq_factor must be > 0, got {self.rope_low_freq_factor}")
        if not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise UserError(f"model.rope_high_freq_factor ({self.rope_high_freq_factor}) must be > "
                             f"model.rope_low_freq_factor ({self.rope_low_freq_factor})")
        if self.rope_original_max_position_embeddings < 1:
            raise UserError("model.rope_original_max_position_embeddings must be >= 1, got "
                             f"{self.rope_original_max_position_embeddings}")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Embedding rows after padding: a multiple of ``make_vocab_size_divisible_by`` that TP divides.

        Padding does not depend on TP when TP divides the rounded size (true for Qwen2.5's 151,936
        up to TP=128), so checkpoints reshard across TP without changing shapes.
        """
        multiple = self.make_vocab_size_divisible_by
        padded = -(-self.vocab_size // multiple) * multiple
        if padded % tp:
            padded = -(-self.vocab_size // (multiple * tp)) * multiple * tp
        return padded


@dataclass
class ParallelConfig:
    tp: int = ranged(1, ">=1")
    pp: int = ranged(1, ">=1")
    cp: int = ranged(1, ">=1")
    vpp: Optional[int] = ranged(None, ">=1")                # virtual pipeline stages per rank
    sequence_parallel: bool = False
    batch_p2p_comm: bool = True              # forced off where gloo would mis-order messages
    # torch.distributed collective timeout (gloo and NCCL). No rank waits for tokenization inside a
    # collective (they poll the file system), so this only bounds real hangs.
    timeout_s: float = ranged(600.0, ">0")

    def validate(self, world_size: int, model: ModelConfig) -> None:
        if world_size % (self.tp * self.pp * self.cp):
            raise UserError(f"world size {world_size} is not divisible by parallel.tp*pp*cp = "
                             f"{self.tp}*{self.pp}*{self.cp}")
        model.validate(self.tp)
        layers_per_rank = model.num_layers / self.pp / (self.vpp or 1)
        if layers_per_rank != int(layers_per_rank):
            raise UserError(f"model.num_layers={model.num_layers} is not divisible by parallel.pp"
                             f"{'*vpp' if self.vpp else ''}={self.pp * (self.vpp or 1)}")
        if self.sequence_parallel and self.tp == 1:
            raise UserError("parallel.sequence_parallel needs parallel.tp > 1")

    def seq_multiple(self, fp8: bool = False) -> int:
        """Every packed sequence (and so every row) is padded to a multiple of this.

        CP cuts each sequence into ``2*CP`` equal chunks and SP scatters the row over TP: ``2*CP*TP_sp``.
        Under FP8 every GEMM's token count must be a multiple of 16 (Transformer Engine), and a rank's
        GEMMs see its share of the row: ``T/CP`` tokens, ``T/(CP*TP)`` before SP's all-gather. So each
        sequence is padded to ``lcm(2*CP*TP_sp, 16*CP*TP_sp)`` (CP 2: 32, CP 4: 64), not
        ``lcm(2*CP*TP_sp, 16)``, which leaves a CP-2 rank only a multiple of 8.
        """
        split = self.cp * (self.tp if self.sequence_parallel else 1)
        base = (2 * self.cp if self.cp > 1 else 1) * (self.tp if self.sequence_parallel else 1)
        return math.lcm(base, 16 * split) if fp8 else base


@dataclass
class FP8Options:
    """FP8 scaling settings (``train.fp8_options``), as Megatron-Bridge's recipes set them.

    Delayed scaling (``train.fp8: delayed``) scales by the max amax over a history of
    ``amax_history_len`` steps (Bridge: 1024, "max"; Megatron's own defaults are 1, "most_recent").
    Current (per-tensor) scaling (``train.fp8: current``) keeps the first and last
    ``bf16_edge_layers`` transformer layers in bf16 (Bridge: 1; 0 = every layer in FP8); Megatron
    refuses bf16 edge layers with delayed scaling, so they apply to current scaling only.
    """

    amax_history_len: int = ranged(1024, ">=1")
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    bf16_edge_layers: int = ranged(1, ">=0")

    def validate(self, num_layers: int, pp: int) -> None:
        if self.amax_history_len < 1:
            raise UserError(f"train.fp8_options.amax_history_len must be >= 1, got {self.amax_history_len}")
        per_stage = num_layers // pp
        if not 0 <= self.bf16_edge_layers <= per_stage:
            raise UserError(f"train.fp8_options.bf16_edge_layers must be in [0, {per_stage}] (layers per "
                             f"pipeline stage), got {self.bf16_edge_layers}")


def fp8_kwargs(fp8: Optional[str], options: Optional[FP8Options] = None) -> dict:
    """``TransformerConfig`` FP8 fields for ``train.fp8`` (None: no FP8)."""
    if not fp8:
        return {"fp8": None, "fp8_recipe": None}
    o = options or FP8Options()
    # train.fp8 names the scaling recipe; the FP8 *format* is hybrid (E4M3 forward, E5M2 backward).
    kw: dict = {"fp8": "hybrid", "fp8_recipe": FP8_RECIPES[fp8], "fp8_margin": 0}
    if fp8 == "delayed":
        kw.update(fp8_amax_history_len=o.amax_history_len, fp8_amax_compute_algo=o.amax_compute_algo)
    elif o.bf16_edge_layers:
        kw.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=o.bf16_edge_layers,
                  num_layers_at_end_in_bf16=o.bf16_edge_layers)
    return kw


def grad_accum_fusion_available() -> bool:
    """Megatron's own linear layers (the output layer, even under TE) need apex's CUDA extension for
    gradient-accumulation fusion; NGC containers ship it."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except Exception:
        return False
    return True


def fusion_kwargs(on_gpu: bool, use_te: bool, grad_accum_ext: Optional[bool] = None) -> dict:
    """Kernel fusions: Megatron's jit fusions on any GPU; RoPE fusion (a TE kernel) and fused weight-gradient
    accumulation into ``main_grad`` (TE's layers, apex's extension for Megatron's) under TE only. All off on
    the CPU, where they do not exist. ``grad_accum_ext`` None: probe for apex's extension."""
    if grad_accum_ext is None:
        grad_accum_ext = use_te and grad_accum_fusion_available()
    return {"bias_activation_fusion": on_gpu, "masked_softmax_fusion": on_gpu, "bias_dropout_fusion": on_gpu,
            "apply_rope_fusion": on_gpu and use_te,
            "gradient_accumulation_fusion": on_gpu and use_te and grad_accum_ext}


def transformer_config(model: ModelConfig, parallel: ParallelConfig, *, dtype: Optional["torch.dtype"] = None,
                       on_gpu: bool = False, recompute: Optional[str] = None, fp8: Optional[str] = None,
                       use_te: bool = False, fp8_options: Optional[FP8Options] = None):
    """Megatron ``TransformerConfig`` for the model under the given layout and precision."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(**transformer_config_kwargs(model, parallel, dtype=dtype, on_gpu=on_gpu,
                                                         recompute=recompute, fp8=fp8, use_te=use_te,
                                                         fp8_options=fp8_options))


def transformer_config_kwargs(model: ModelConfig, parallel: ParallelConfig, *, dtype: Optional["torch.dtype"] = None,
                              on_gpu: bool = False, recompute: Optional[str] = None, fp8: Optional[str] = None,
                              use_te: bool = False, fp8_options: Optional[FP8Options] = None,
                              grad_accum_ext: Optional[bool] = None) -> dict:
    """The keyword arguments of :func:`transformer_config` (testable without TE or a GPU)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype

    batch_p2p = parallel.batch_p2p_comm
    if not on_gpu and parallel.vpp and parallel.pp == 2:
        # gloo matches messages per peer FIFO; with PP=2 the previous and next stage are one peer,
        # so batched isend/irecv swap activations and gradients silently. Non-batched is exact.
        batch_p2p = False
    return dict(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size, num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups, kv_channels=model.head_dim,
        normalization="RMSNorm", layernorm_epsilon=model.norm_eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp, context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel, batch_p2p_comm=batch_p2p,
        # Packed microbatches may differ in length; the shape exchange this needs deadlocks in the
        # interleaved (VPP) schedule on gloo, so VPP runs use one row length per step instead.
        variable_seq_lengths=parallel.vpp is None,
        moe_token_dispatcher_type="alltoall",  # dense model; "allgather" (default) rejects the line above
        calculate_per_token_loss=True,       # see redi_megatron.parallel.loss_scaling
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu, perform_initialization=True,
        persist_layer_norm=False,
        recompute_granularity=recompute, recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        **fusion_kwargs(on_gpu, use_te, grad_accum_ext), **fp8_kwargs(fp8, fp8_options),
    )
