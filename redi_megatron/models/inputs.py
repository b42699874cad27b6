"""Turn a data-contract ``Microbatch`` into the model's forward arguments on this rank."""
from __future__ import annotations

from typing import Any, Optional

import torch

from redi_megatron.models.cpu_attention import packed_attention_mask
from redi_megatron.parallel.context import split_for_cp
from redi_megatron.parallel.state import ParallelGroups


def model_inputs(mb: Any, groups: ParallelGroups, use_te: bool) -> dict[str, Any]:
    """``input_ids``/``position_ids`` ``[B, S//CP]`` plus the packing information for attention.

    CPU (local spec): a block-diagonal ``attention_mask [B, 1, S, S]`` over the global row (the CPU core
    attention slices its query rows under CP). Transformer Engine: rows holding several sequences go
    as THD with ``cu_seqlens`` (one row per microbatch; context parallelism with packed rows would need
    TE's per-sequence split, which this version refuses rather than get wrong).
    """
    out: dict[str, Any] = {
        "input_ids": split_for_cp(mb.tokens, groups.cp),
        "position_ids": split_for_cp(mb.position_ids, groups.cp),
        "attention_mask": None,
    }
    if not use_te:
        out["attention_mask"] = packed_attention_mask(mb.seq_ids)
        return out
    if _sequences_per_row(mb.seq_ids) > 1:
        out["packed_seq_params"] = _thd_params(mb, groups)
    return out


def _sequences_per_row(seq_ids: torch.Tensor) -> int:
    return max(int(torch.unique(row[row >= 0]).numel()) for row in seq_ids)


def _thd_params(mb: Any, groups: ParallelGroups) -> Optional[Any]:
    from megatron.core.packed_seq_params import PackedSeqParams

    if ParallelGroups.size(groups.cp) > 1:
        raise ValueError("packed rows with context parallelism on Transformer Engine are not supported "
                         "yet: set data.micro_batch_rows so each row holds one sequence, or parallel.cp=1")
    if mb.tokens.shape[0] != 1:
        raise ValueError("THD packing needs data.micro_batch_rows=1")
    padded = mb.cu_seqlens().to(mb.tokens.device)
    real = mb.cu_seqlens_unpadded().to(mb.tokens.device)
    max_len = int((padded[1:] - padded[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=real, cu_seqlens_kv=real,
                           cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)
