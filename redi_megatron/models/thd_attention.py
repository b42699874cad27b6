"""Core attention over packed (THD) rows for the local (no Transformer Engine) spec, CPU or CUDA.

Megatron's local ``DotProductAttention`` refuses packed sequences and context parallelism (both
TE-only). This module consumes exactly what TE's attention consumes, ``PackedSeqParams(qkv_format="thd")``
with ``cu_seqlens_q`` / ``cu_seqlens_q_padded``, so CPU tests run the layout the GPU runs:

- causal attention inside each packed sequence, one ``scaled_dot_product_attention`` call per sequence
  (flash / memory-efficient kernels on CUDA; no ``[T, T]`` mask is ever built);
- context parallelism: every sequence is split into ``2*CP`` chunks (``parallel.context``); K/V are
  all-gathered over the CP group and put back in row order, and each rank's two query chunks attend
  causally to their sequence. Exact, but full attention per rank, not TE's ring: fine for CPU tests
  and small CP, not a substitute for TE's CP at scale.

Pad tokens (after each sequence's real tokens) come after every real token of their sequence, so
causality alone keeps them out of the real tokens' attention; their own outputs carry no loss.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from redi_megatron.parallel.context import all_gather_cp, thd_partition_index


class THDCoreAttention(MegatronModule):
    """Drop-in for ``DotProductAttention``: ``q [t, np, hn], k/v [t, ng, hn] -> [t, np*hn]``.

    ``t`` is this CP rank's share of the packed row (``T // CP``); heads are per TP partition. Megatron
    squeezes the batch dimension before core attention in THD mode and restores it after.
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
        if pg_collection is None:
            raise ValueError("THDCoreAttention needs Megatron's pg_collection (its context-parallel group)")
        self.cp_group = pg_collection.cp  # passed in by Megatron's SelfAttention, not read from globals

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: Optional[PackedSeqParams] = None):
        assert attention_bias is None and attention_mask is None, "attention is causal within each sequence"
        if packed_seq_params is None:
            return self._unpacked(query, key, value)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"THDCoreAttention: qkv_format {packed_seq_params.qkv_format!r} is not 'thd'")
        cu = packed_seq_params.cu_seqlens_q_padded  # None when the row has no padding
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        group = self.cp_group
        cp_size = group.size() if group is not None else 1
        key, value = all_gather_cp(key, group, cu), all_gather_cp(value, group, cu)
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = self._attend(query, key, value, cu, cp_size, group, dropout)
        else:
            out = self._attend(query, key, value, cu, cp_size, group, 0.0)
        return out.reshape(out.shape[0], -1)

    def _unpacked(self, query, key, value) -> torch.Tensor:
        """Rows of one sequence each (``[s, b, h, d]``, no context parallelism): the checkpoint tools'
        and evaluation's plain calls ``model(input_ids, position_ids, None)``."""
        if self.config.context_parallel_size > 1:
            raise ValueError("context parallelism needs packed (THD) inputs: pass packed_seq_params")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        ctx = self._sdpa(q, k, v, None, True, self.dropout_p if self.training else 0.0)
        return ctx.permute(2, 0, 1, 3).reshape(ctx.shape[2], ctx.shape[0], -1)

    def _attend(self, query, key, value, cu: torch.Tensor, cp_size: int, group, dropout: float) -> torch.Tensor:
        """Per-sequence causal attention. ``query [t, np, hn]`` local; ``key/value [T, ng, hn]`` whole row."""
        bounds = cu.tolist()  # one host sync per layer call; Megatron's THD RoPE does the same
        q_pos = None
        if cp_size > 1:
            q_pos = thd_partition_index(cu, key.shape[0], cp_size, group.rank())
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            lo, hi = start // cp_size, end // cp_size  # this sequence's slice of the local query
            q = query[lo:hi].transpose(0, 1)[None]                 # [1, np, lq, hn]
            k = key[start:end].transpose(0, 1)[None]               # [1, ng, L, hn]
            v = value[start:end].transpose(0, 1)[None]
            if q_pos is None:
                mask, causal = None, True
            else:  # two chunks of the sequence: mask by position inside the sequence
                pos = q_pos[lo:hi] - start
                mask, causal = pos[:, None] >= torch.arange(end - start, device=pos.device)[None, :], False
            ctx = self._sdpa(q, k, v, mask, causal, dropout)
            outs.append(ctx[0].transpose(0, 1))                    # [lq, np, hn]
        return torch.cat(outs, dim=0)

    def _sdpa(self, q, k, v, mask: Optional[torch.Tensor], causal: bool, dropout: float) -> torch.Tensor:
        """``[b, h, l, d]`` attention with grouped K/V heads. On CUDA the K/V heads are repeated so the
        flash kernel applies (cheap next to attention); on the CPU ``enable_gqa`` avoids the copy."""
        gqa = self.heads != self.groups
        if gqa and q.is_cuda:
            k, v = (t.repeat_interleave(self.heads // self.groups, dim=1) for t in (k, v))
            gqa = False
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.scale, enable_gqa=gqa)
