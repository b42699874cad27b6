"""The batch contract between the data pipeline, the trainer and the losses: one packed (THD) layout.

A :class:`Microbatch` is one row of ``T`` tokens (``B = 1``) holding ``N`` sequences back to back, the
layout Transformer Engine and Megatron call THD. Each sequence starts at an offset that is a multiple of
``pad_to_multiple_of`` and occupies a multiple of it (the tail is padding with ``seq_id == -1``), so
context parallelism can cut every sequence into ``2*CP`` equal chunks (``parallel.context``). The
attention boundaries travel with the batch: ``cu_seqlens`` (real lengths) and ``cu_seqlens_padded``
(offsets in the row; the last segment runs to ``T``), exactly what Megatron's ``PackedSeqParams`` takes.
The CPU core attention consumes the same boundaries, so CPU tests run the layout the GPU runs.
A :class:`StepBatch` is what one optimizer step consumes on one data-parallel rank.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch

ROLE_SFT, ROLE_CHOSEN, ROLE_REJECTED = 0, 1, 2
ROLE_NAMES = {ROLE_SFT: "sft", ROLE_CHOSEN: "chosen", ROLE_REJECTED: "rejected"}


def padded_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``."""
    return -(-length // multiple) * multiple


@dataclass
class SequenceSpec:
    """One sequence to pack: ``input_ids = prompt ids + completion ids`` (int array ``[L]``)."""

    input_ids: np.ndarray
    num_prompt_tokens: int
    role: int
    sample_id: int
    ref_logp: Optional[float] = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return self.length - self.num_prompt_tokens


@dataclass
class Microbatch:
    """One Megatron microbatch: one packed row of ``T`` tokens, ``N`` sequences, ``P`` pairs.

    tokens [1, T] long: input ids, ``pad_id`` on padding.
    labels [1, T] long: ``labels[0, t]`` = next token of the same sequence (the target predicted at t); 0 where none.
    loss_mask [1, T] float: 1.0 where ``labels[0, t]`` is a completion token (end-of-turn and EOS included).
    position_ids [1, T] long: position inside its own sequence, 0-based (0 on padding).
    seq_ids [1, T] long: local sequence index 0..N-1; -1 on padding.
    cu_seqlens [M+1] int32: cumulative real lengths of the attention segments (TE's ``cu_seqlens_q``).
    cu_seqlens_padded [M+1] int32: segment offsets in the row, ending at ``T`` (``cu_seqlens_q_padded``).
        The segments are the ``N`` sequences; an empty microbatch (``N = 0``) has one all-padding segment.
    max_seqlen: longest padded segment (``max_seqlen_q``; sizes the RoPE table).
    roles [N] long: ROLE_*.
    pair_ids [N] long: local pair index 0..P-1 (chosen and rejected share it); -1 for SFT sequences.
    num_loss_tokens [N] long: completion token count of each whole sequence (= sum of its loss_mask).
    sample_ids [N] long: row index in the tokenized dataset (provenance).
    ref_logps [N] float or None: reference summed log-probs (DPO), when the dataset has them.
    has_padding: whether any token of the row is padding (``cu_seqlens != cu_seqlens_padded``); without
        padding the model gets no padded boundaries (TE then keeps its faster THD kernel).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    seq_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_padded: torch.Tensor
    max_seqlen: int
    roles: torch.Tensor
    pair_ids: torch.Tensor
    num_loss_tokens: torch.Tensor
    sample_ids: torch.Tensor
    ref_logps: Optional[torch.Tensor] = None
    has_padding: bool = True

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Microbatch":
        """A copy with every tensor on ``device``. To CUDA with ``non_blocking``, host tensors are pinned
        first so the copies overlap with compute."""
        device = torch.device(device)
        pin = non_blocking and device.type == "cuda"

        def move(v):
            if not isinstance(v, torch.Tensor) or v.device == device:
                return v
            if pin and v.device.type == "cpu":
                v = v.pin_memory()
            return v.to(device, non_blocking=non_blocking)

        return Microbatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    @property
    def num_sequences(self) -> int:
        return int(self.roles.shape[0])

    @property
    def num_pairs(self) -> int:
        return int(self.pair_ids.max().item()) + 1 if self.pair_ids.numel() and self.pair_ids.max() >= 0 else 0

    def seq_lengths(self) -> torch.Tensor:
        """Real (unpadded) length of each sequence, ``[N]`` long."""
        valid = self.seq_ids[self.seq_ids >= 0]
        return torch.bincount(valid, minlength=self.num_sequences)


@dataclass
class StepBatch:
    """What one optimizer step consumes on one data-parallel rank."""

    microbatches: list[Microbatch]
    global_num_loss_tokens: int  # over ALL DP ranks of this step (SFT normalizer)
    global_num_pairs: int  # over ALL DP ranks of this step (pair-loss normalizer)
    global_num_sequences: int


def build_microbatch(
    sequences: Sequence[SequenceSpec],
    row_len: int,
    pad_id: int,
    pad_to_multiple_of: int = 1,
    with_ref_logps: Optional[bool] = None,
) -> Microbatch:
    """Lay ``sequences`` (in order) into one packed row of ``row_len`` tokens.

    Pairs are numbered by first appearance of their sample. ``with_ref_logps``: whether ``ref_logps`` is
    a tensor (None = whether the sequences carry them; an empty microbatch of a dataset with reference
    log-probs gets an empty tensor when True). ValueError when the sequences do not fit in ``row_len``.
    """
    assert row_len % pad_to_multiple_of == 0, "row_len must be a multiple of pad_to_multiple_of"
    tokens = np.full(row_len, pad_id, dtype=np.int64)
    labels = np.zeros(row_len, dtype=np.int64)
    loss_mask = np.zeros(row_len, dtype=np.float32)
    position_ids = np.zeros(row_len, dtype=np.int64)
    seq_ids = np.full(row_len, -1, dtype=np.int64)
    roles, pair_ids, n_loss, sample_ids, refs, offsets, lengths = [], [], [], [], [], [], []
    pair_index: dict = {}
    offset = 0
    for n, seq in enumerate(sequences):
        L, P = seq.length, seq.num_prompt_tokens
        assert 1 <= P < L, f"sample {seq.sample_id}: needs >= 1 prompt and >= 1 completion token"
        if offset + L > row_len:
            raise ValueError(f"sample {seq.sample_id}: the row overflows {row_len} tokens")
        tokens[offset:offset + L] = seq.input_ids
        labels[offset:offset + L - 1] = seq.input_ids[1:]
        loss_mask[offset + P - 1:offset + L - 1] = 1.0
        position_ids[offset:offset + L] = np.arange(L)
        seq_ids[offset:offset + L] = n
        roles.append(seq.role)
        pair_ids.append(-1 if seq.role == ROLE_SFT else pair_index.setdefault(seq.sample_id, len(pair_index)))
        n_loss.append(seq.num_loss_tokens)
        sample_ids.append(seq.sample_id)
        refs.append(seq.ref_logp)
        offsets.append(offset)
        lengths.append(L)
        offset += padded_length(L, pad_to_multiple_of)
    has_ref = [r is not None for r in refs]
    assert all(has_ref) or not any(has_ref), "either every sequence has a ref_logp or none"
    if with_ref_logps is None:
        with_ref_logps = bool(refs) and all(has_ref)
    assert not refs or with_ref_logps == all(has_ref), "with_ref_logps disagrees with the sequences"
    cu_real, cu_padded = _thd_boundaries(offsets, lengths, row_len)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    row = lambda a: torch.from_numpy(a)[None]  # noqa: E731
    return Microbatch(
        tokens=row(tokens), labels=row(labels), loss_mask=row(loss_mask), position_ids=row(position_ids),
        seq_ids=row(seq_ids), cu_seqlens=cu_real, cu_seqlens_padded=cu_padded,
        max_seqlen=int((cu_padded[1:] - cu_padded[:-1]).max()),
        roles=as_long(roles), pair_ids=as_long(pair_ids), num_loss_tokens=as_long(n_loss),
        sample_ids=as_long(sample_ids),
        ref_logps=torch.tensor(refs, dtype=torch.float32) if with_ref_logps else None,
        has_padding=not torch.equal(cu_real, cu_padded),
    )


def _thd_boundaries(offsets: list[int], lengths: list[int], row_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_seqlens, cu_seqlens_padded) ``[M+1]`` int32 for sequences at ``offsets``; the last segment takes
    the row's tail padding, and an empty row is one all-padding segment (attention needs a segment)."""
    if not offsets:
        offsets, lengths = [0], [row_len]
    padded = offsets + [row_len]
    real = np.concatenate([[0], np.cumsum(lengths)])
    return torch.tensor(real, dtype=torch.int32), torch.tensor(padded, dtype=torch.int32)
