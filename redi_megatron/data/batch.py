"""The batch contract between the data pipeline, the trainer and the losses.

A :class:`Microbatch` holds ``B`` rows of ``S`` tokens with ``N`` sequences packed into them (several
sequences may share a row; the model derives block-diagonal causal attention from ``seq_ids``). Each
sequence starts at an offset that is a multiple of ``pad_to_multiple_of`` and occupies a multiple of it
(the tail is padding with ``seq_id == -1``), so THD/context-parallel kernels can split every sequence.
A :class:`StepBatch` is what one optimizer step consumes on one data-parallel rank.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional, Sequence

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
    """One Megatron microbatch: ``B`` rows of ``S`` tokens, ``N`` sequences, ``P`` pairs.

    tokens [B, S] long: input ids, ``pad_id`` on padding.
    labels [B, S] long: ``labels[b, t]`` = next token of the same sequence (the target predicted at t); 0 where none.
    loss_mask [B, S] float: 1.0 where ``labels[b, t]`` is a completion token (end-of-turn and EOS included).
    position_ids [B, S] long: position inside its own sequence, 0-based (0 on padding).
    seq_ids [B, S] long: local sequence index 0..N-1; -1 on padding.
    roles [N] long: ROLE_*.
    pair_ids [N] long: local pair index 0..P-1 (chosen and rejected share it); -1 for SFT sequences.
    num_loss_tokens [N] long: completion token count of each whole sequence (= sum of its loss_mask).
    sample_ids [N] long: row index in the tokenized dataset (provenance).
    ref_logps [N] float or None: reference summed log-probs (DPO), when the dataset has them.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    seq_ids: torch.Tensor
    roles: torch.Tensor
    pair_ids: torch.Tensor
    num_loss_tokens: torch.Tensor
    sample_ids: torch.Tensor
    ref_logps: Optional[torch.Tensor] = None

    def to(self, device) -> "Microbatch":
        """A copy with every tensor on ``device``."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return Microbatch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})

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

    def _starts(self) -> torch.Tensor:
        assert self.tokens.shape[0] == 1, "THD view needs B == 1"
        first = torch.full((self.num_sequences,), -1, dtype=torch.long)
        ids = self.seq_ids[0]
        pos = torch.arange(ids.shape[0])
        starts = (self.position_ids[0] == 0) & (ids >= 0)
        first[ids[starts]] = pos[starts]
        return first

    def cu_seqlens(self) -> torch.Tensor:
        """THD boundaries ``[N+1]`` int32 (valid when B == 1): offsets of the sequences in the row, each
        including its alignment padding, the last one extended to ``S``. Index the token tensor with these;
        pad positions sit after their sequence's real tokens, so causal attention of real tokens is exact.
        """
        starts = self._starts()
        if self.num_sequences == 0:
            return torch.zeros(1, dtype=torch.int32)
        end = torch.tensor([self.tokens.shape[1]])
        return torch.cat([starts, end]).to(torch.int32)

    def cu_seqlens_unpadded(self) -> torch.Tensor:
        """Cumulative real lengths ``[N+1]`` int32 (TE's ``cu_seqlens_q`` next to :meth:`cu_seqlens` as
        ``cu_seqlens_q_padded``)."""
        lens = self.seq_lengths().to(torch.int32)
        return torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lens, 0).to(torch.int32)])


@dataclass
class StepBatch:
    """What one optimizer step consumes on one data-parallel rank."""

    microbatches: List[Microbatch]
    global_num_loss_tokens: int  # over ALL DP ranks of this step (SFT normalizer)
    global_num_pairs: int  # over ALL DP ranks of this step (pair-loss normalizer)
    global_num_sequences: int


def build_microbatch(
    rows: Sequence[Sequence[SequenceSpec]],
    row_len: int,
    pad_id: int,
    pad_to_multiple_of: int = 1,
    with_ref_logps: Optional[bool] = None,
) -> Microbatch:
    """Lay ``rows`` (``B`` lists of sequences, in order) into a ``[B, row_len]`` microbatch.

    Sequences are numbered in row-major order; pairs are numbered by first appearance of their sample.
    ``with_ref_logps``: whether ``ref_logps`` is a tensor (None = whether the sequences carry them; an
    empty microbatch of a dataset with reference log-probs gets an empty tensor when True).
    ValueError when a row does not fit in ``row_len``.
    """
    assert row_len % pad_to_multiple_of == 0, "row_len must be a multiple of pad_to_multiple_of"
    B = len(rows)
    tokens = np.full((B, row_len), pad_id, dtype=np.int64)
    labels = np.zeros((B, row_len), dtype=np.int64)
    loss_mask = np.zeros((B, row_len), dtype=np.float32)
    position_ids = np.zeros((B, row_len), dtype=np.int64)
    seq_ids = np.full((B, row_len), -1, dtype=np.int64)
    roles, pair_ids, n_loss, sample_ids, refs = [], [], [], [], []
    pair_index: dict = {}
    for b, row in enumerate(rows):
        offset = 0
        for seq in row:
            L, P = seq.length, seq.num_prompt_tokens
            assert 1 <= P < L, f"sample {seq.sample_id}: needs >= 1 prompt and >= 1 completion token"
            if offset + L > row_len:
                raise ValueError(f"sample {seq.sample_id}: row {b} overflows {row_len} tokens")
            n = len(roles)
            tokens[b, offset:offset + L] = seq.input_ids
            labels[b, offset:offset + L - 1] = seq.input_ids[1:]
            loss_mask[b, offset + P - 1:offset + L - 1] = 1.0
            position_ids[b, offset:offset + L] = np.arange(L)
            seq_ids[b, offset:offset + L] = n
            roles.append(seq.role)
            if seq.role == ROLE_SFT:
                pair_ids.append(-1)
            else:
                pair_ids.append(pair_index.setdefault(seq.sample_id, len(pair_index)))
            n_loss.append(seq.num_loss_tokens)
            sample_ids.append(seq.sample_id)
            refs.append(seq.ref_logp)
            offset += padded_length(L, pad_to_multiple_of)
    has_ref = [r is not None for r in refs]
    assert all(has_ref) or not any(has_ref), "either every sequence has a ref_logp or none"
    if with_ref_logps is None:
        with_ref_logps = bool(refs) and all(has_ref)
    assert not refs or with_ref_logps == all(has_ref), "with_ref_logps disagrees with the sequences"
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return Microbatch(
        tokens=torch.from_numpy(tokens),
        labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(loss_mask),
        position_ids=torch.from_numpy(position_ids),
        seq_ids=torch.from_numpy(seq_ids),
        roles=as_long(roles),
        pair_ids=as_long(pair_ids),
        num_loss_tokens=as_long(n_loss),
        sample_ids=as_long(sample_ids),
        ref_logps=torch.tensor(refs, dtype=torch.float32) if with_ref_logps else None,
    )
