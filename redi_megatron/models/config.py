"""Model and parallelism schema (dataclasses) and their translation to Megatron's TransformerConfig."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, get_args

from redi_megatron.errors import UserError
from redi_megatron.typed import ranged

if TYPE_CHECKING:  # torch is imported where a TransformerConfig is built: reading a config stays fast
    import torch

Family = Literal["qwen2", "llama"]
FAMILIES = get_args(Family)
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise"}  # train.fp8 -> Megatron's fp8_recipe


@dataclass
class ModelConfig:
    """Architecture of a decoder-only model (Qwen2 or Llama family). Defaults: a tiny CPU test model."""

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
    add_qkv_bias: bool = True                # Qwen2: True, Llama: False
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
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise UserError("model.hidden_size must be divisible by model.num_attention_heads "
                             "(or set model.kv_channels)")

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

    def seq_multiple(self) -> int:
        """Every row length must be a multiple of this (CP load-balancing, SP scatter)."""
        return (2 * self.cp if self.cp > 1 else 1) * (self.tp if self.sequence_parallel else 1)


def transformer_config(model: ModelConfig, parallel: ParallelConfig, *, dtype: Optional["torch.dtype"] = None,
                       on_gpu: bool = False, recompute: Optional[str] = None, fp8: Optional[str] = None):
    """Megatron ``TransformerConfig`` for the model under the given layout and precision."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.float32 if dtype is None else dtype

    batch_p2p = parallel.batch_p2p_comm
    if not on_gpu and parallel.vpp and parallel.pp == 2:
        # gloo matches messages per peer FIFO; with PP=2 the previous and next stage are one peer,
        # so batched isend/irecv swap activations and gradients silently. Non-batched is exact.
        batch_p2p = False
    return TransformerConfig(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size, num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups, kv_channels=model.head_dim,
        normalization="RMSNorm", layernorm_epsilon=model.norm_eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=model.add_qkv_bias,
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
        bias_activation_fusion=on_gpu, masked_softmax_fusion=on_gpu, bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        recompute_granularity=recompute, recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        # train.fp8 names the scaling recipe; the FP8 *format* is hybrid (E4M3 forward, E5M2 backward).
        fp8="hybrid" if fp8 else None, fp8_recipe=FP8_RECIPES[fp8] if fp8 else None,
    )
