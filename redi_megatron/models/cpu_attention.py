"""Core attention for the CPU (no Transformer Engine) path, with context parallelism and packing.

Megatron's local ``DotProductAttention`` refuses context parallelism and packed sequences (both are
TE-only). This module gives exact results for both on CPU: it all-gathers K/V over the CP group (full
attention, not TE's ring algorithm; fine at CPU scale), restores global order from Megatron's
load-balanced chunk layout, and masks causally by global position and, for packed rows, by sequence.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from redi_megatron.parallel.context import all_gather_cp, cp_local_positions


def packed_attention_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal mask for rows that pack several sequences: ``[B, S] -> [B, 1, S, S]`` bool.

    ``True`` means *masked out* (Megatron's convention). Causality is added by the attention itself.
    Padding (``seq_id == -1``) attends only to padding, so no row is fully masked (no NaN).
    """
    return (seq_ids[:, None, :, None] != seq_ids[:, None, None, :])


class CPUCoreAttention(MegatronModule):
    """Drop-in for ``DotProductAttention``: ``q [sq, b, np, hn], k/v [sq, b, ng, hn] -> [sq, b, np*hn]``.

    ``sq`` is this CP rank's share of the sequence (``S // CP``); heads are per TP partition.
    ``attention_mask`` may be ``None`` (plain causal) or ``[B|1, 1, S, S]`` over the *global* sequence.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp_group = parallel_state.get_context_parallel_group(check_initialized=False)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("THD packed_seq_params need Transformer Engine; the CPU path packs with "
                             "a padded layout and a block-diagonal attention_mask")
        assert attention_bias is None
        cp_size = self.cp_group.size() if self.cp_group is not None else 1
        key, value = all_gather_cp(key, self.cp_group), all_gather_cp(value, self.cp_group)
        seq_global = key.shape[0]
        q_pos = cp_local_positions(seq_global, self.cp_group.rank() if cp_size > 1 else 0, cp_size,
                                   query.device)
        masked = q_pos[:, None] < torch.arange(seq_global, device=query.device)[None, :]  # [sq, S]
        if attention_mask is not None:
            masked = masked[None, None] | attention_mask.index_select(2, q_pos)  # [b, 1, sq, S]
        # [s, b, h, d] -> [b, h, s, d]. torch's fused kernel handles GQA without copying K/V and
        # does not keep the [b, h, sq, S] probabilities for backward (it recomputes them).
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = self._sdpa(q, k, v, masked, dropout)
        else:
            context = self._sdpa(q, k, v, masked, 0.0)
        return context.permute(2, 0, 1, 3).reshape(context.shape[2], context.shape[0], -1)

    def _sdpa(self, q, k, v, masked, dropout: float) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=~masked, dropout_p=dropout, scale=self.scale,
            enable_gqa=self.heads != self.groups)
