"""Turn a data-contract ``Microbatch`` into the model's forward arguments on this rank (THD layout)."""
from __future__ import annotations

from typing import Any

from megatron.core.packed_seq_params import PackedSeqParams

from redi_megatron.parallel.context import split_for_cp
from redi_megatron.parallel.state import ParallelGroups


def packed_seq_params(mb: Any) -> PackedSeqParams:
    """Megatron's THD description of ``mb``'s packed row: global boundaries, which TE and the local
    ``THDCoreAttention`` cut per CP rank themselves. ``cp_group`` stays None: both attentions hold the
    CP group they were built with (a group here would make TE re-register it on every call, Megatron's
    dynamic-CP path). The padded boundaries go only with a row that has padding, as Megatron-Bridge
    does: given them, TE picks a slower THD kernel even when they equal the real ones."""
    padded = mb.cu_seqlens_padded if getattr(mb, "has_padding", True) else None
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=mb.cu_seqlens, cu_seqlens_kv=mb.cu_seqlens,
                           cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                           max_seqlen_q=mb.max_seqlen, max_seqlen_kv=mb.max_seqlen)


def model_inputs(mb: Any, groups: ParallelGroups) -> dict[str, Any]:
    """``input_ids``/``position_ids`` ``[1, T//CP]`` (this CP rank's chunks of every sequence) and the
    ``packed_seq_params``; no attention mask (attention is causal inside each packed sequence)."""
    return {
        "input_ids": split_for_cp(mb.tokens, groups.cp, mb.cu_seqlens_padded),
        "position_ids": split_for_cp(mb.position_ids, groups.cp, mb.cu_seqlens_padded),
        "attention_mask": None,
        "packed_seq_params": packed_seq_params(mb),
    }
