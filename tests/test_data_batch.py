"""Microbatch layout and the packing sampler, checked against plain per-sequence references."""
import math

import numpy as np
import pytest
import torch

from redi_megatron.data.batch import (
    ROLE_CHOSEN,
    ROLE_REJECTED,
    ROLE_SFT,
    SequenceSpec,
    build_microbatch,
    padded_length,
)
from redi_megatron.data.sampler import PackedStepSampler, PackingConfig

PAD = 99


class FakeDataset:
    """Random token ids with given (prompt, completion...) lengths; implements PackableDataset."""

    def __init__(self, kind, n, seed=0, max_len=60, ref=False):
        rng = np.random.default_rng(seed)
        self.kind, self.has_ref_logps = kind, ref
        k = 1 if kind == "sft" else 2
        self.prompt = rng.integers(1, 12, n)
        self.comp = rng.integers(1, max_len, (n, k))
        self.ids = [[rng.integers(0, 90, int(self.prompt[i] + self.comp[i, j])) for j in range(k)] for i in range(n)]
        for i in range(n):  # a pair shares its prompt
            for j in range(1, k):
                self.ids[i][j][: self.prompt[i]] = self.ids[i][0][: self.prompt[i]]

    def __len__(self):
        return len(self.ids)

    def seq_lengths(self):
        return self.prompt[:, None] + self.comp

    def loss_token_counts(self):
        return self.comp.copy()

    def sequences(self, i):
        roles = [ROLE_SFT] if self.kind == "sft" else [ROLE_CHOSEN, ROLE_REJECTED]
        return [SequenceSpec(self.ids[i][j], int(self.prompt[i]), r, i, -float(i + j) if self.has_ref_logps else None)
                for j, r in enumerate(roles)]


def _reference_check(mb, dataset):
    """Every sequence of ``mb`` against its unpacked source: tokens, labels, mask, positions."""
    m_seqs = mb.num_sequences
    assert mb.seq_lengths().tolist() == [
        len(dataset.sequences(int(s))[0 if r != ROLE_REJECTED else 1].input_ids)
        for s, r in zip(mb.sample_ids.tolist(), mb.roles.tolist())]
    for n in range(m_seqs):
        b, t = torch.nonzero(mb.seq_ids == n, as_tuple=True)
        assert b.unique().numel() == 1  # a sequence never spans rows
        seq = dataset.sequences(int(mb.sample_ids[n]))[0 if mb.roles[n] != ROLE_REJECTED else 1]
        ids = torch.as_tensor(seq.input_ids)
        assert torch.equal(mb.tokens[b, t], ids) and torch.equal(mb.position_ids[b, t], torch.arange(len(ids)))
        assert torch.equal(mb.labels[b, t][:-1], ids[1:]) and mb.labels[b, t][-1] == 0
        mask = torch.zeros(len(ids))
        mask[seq.num_prompt_tokens - 1:-1] = 1
        assert torch.equal(mb.loss_mask[b, t], mask) and mb.num_loss_tokens[n] == seq.num_loss_tokens
    pad = mb.seq_ids < 0
    assert (mb.tokens[pad] == PAD).all() and (mb.loss_mask[pad] == 0).all() and (mb.labels[pad] == 0).all()


def test_build_microbatch_matches_reference_and_logps():
    ds = FakeDataset("pair", 4, seed=1, ref=True)
    seqs = ds.sequences(0) + ds.sequences(2) + ds.sequences(1)
    mb = build_microbatch(seqs, row_len=512, pad_id=PAD, pad_to_multiple_of=4)
    assert mb.tokens.shape == (1, 512) and mb.roles.tolist() == [1, 2, 1, 2, 1, 2]
    assert mb.pair_ids.tolist() == [0, 0, 1, 1, 2, 2] and mb.sample_ids.tolist() == [0, 0, 2, 2, 1, 1]
    assert mb.ref_logps.tolist() == [-0.0, -1.0, -2.0, -3.0, -1.0, -2.0]
    _reference_check(mb, ds)
    # per-sequence summed log-probs from packed logits equal those of each sequence run alone
    torch.manual_seed(0)
    logits = torch.randn(1, 512, 100)
    logp = torch.log_softmax(logits, -1).gather(-1, mb.labels[..., None])[..., 0] * mb.loss_mask
    packed = torch.zeros(mb.num_sequences).index_add_(0, mb.seq_ids[mb.seq_ids >= 0], logp[mb.seq_ids >= 0])
    for n in range(mb.num_sequences):
        b, t = torch.nonzero(mb.seq_ids == n, as_tuple=True)
        seq = ds.sequences(int(mb.sample_ids[n]))[int(mb.roles[n]) - 1]
        alone = torch.log_softmax(logits[b, t], -1)[:-1].gather(-1, torch.as_tensor(seq.input_ids[1:])[:, None])[:, 0]
        assert torch.allclose(packed[n], alone[seq.num_prompt_tokens - 1:].sum())


def test_thd_views():
    ds = FakeDataset("sft", 3, seed=2)
    mb = build_microbatch(ds.sequences(0) + ds.sequences(1) + ds.sequences(2), row_len=192, pad_id=PAD,
                          pad_to_multiple_of=8)
    lens = [len(ds.sequences(i)[0].input_ids) for i in range(3)]
    starts = [0, padded_length(lens[0], 8), padded_length(lens[0], 8) + padded_length(lens[1], 8)]
    assert mb.cu_seqlens_padded.tolist() == starts + [192]  # the last segment takes the row's tail
    assert mb.cu_seqlens.tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert mb.cu_seqlens.dtype == mb.cu_seqlens_padded.dtype == torch.int32
    assert mb.max_seqlen == max(192 - starts[2], *(b - a for a, b in zip(starts, starts[1:])))
    moved = mb.to("cpu")
    assert moved is not mb and torch.equal(moved.tokens, mb.tokens) and moved.ref_logps is None


@pytest.mark.parametrize("kind,shape,multiple", [("pair", "trim", 1), ("pair", "static", 1), ("sft", "step", 3)])
def test_step_plan_invariants(kind, shape, multiple):
    ds = FakeDataset(kind, 103, seed=3)
    cfg = PackingConfig(global_batch_size=16, micro_batch_tokens=160, pad_to_multiple_of=4, row_shape=shape,
                        microbatch_multiple=multiple, seed=7)
    dp = 3
    samplers = [PackedStepSampler(ds, cfg, dp_rank=r, dp_size=dp, pad_id=PAD) for r in range(dp)]
    assert samplers[0].steps_per_epoch == math.ceil(103 / 16)
    seen = []
    for step in range(samplers[0].steps_per_epoch):
        batches = [s.build(s.plan(0, step)) for s in samplers]
        counts = {len(b.microbatches) for b in batches}
        assert len(counts) == 1 and counts.pop() % multiple == 0  # equalized across DP ranks
        if shape != "trim":  # one shape for the whole step
            assert len({mb.tokens.shape for b in batches for mb in b.microbatches}) == 1
        step_samples, loss_tokens, pairs = [], 0, 0
        for b in batches:
            assert b.global_num_loss_tokens == batches[0].global_num_loss_tokens
            for mb in b.microbatches:
                _reference_check(mb, ds)
                S = mb.tokens.shape[1]
                assert S % 4 == 0 and S <= 160 and mb.tokens.shape[0] == 1 and (shape != "static" or S == 160)
                seg = mb.cu_seqlens_padded
                assert seg[-1] == S and bool(((seg[1:] - seg[:-1]) % 4 == 0).all())  # CP can cut every one
                starts = (mb.position_ids == 0) & (mb.seq_ids >= 0)
                assert (torch.nonzero(starts)[:, 1] % 4 == 0).all()  # every sequence starts aligned
                if kind == "pair":  # chosen and rejected of each pair side by side in this microbatch
                    for p in range(mb.num_pairs):
                        idx = torch.nonzero(mb.pair_ids == p)[:, 0]
                        assert sorted(mb.roles[idx].tolist()) == [1, 2] and mb.sample_ids[idx].unique().numel() == 1
                step_samples += mb.sample_ids.unique().tolist()
                loss_tokens += int(mb.num_loss_tokens.sum())
                pairs += mb.num_pairs
        expected = samplers[0].plan(0, step).sample_ids.tolist()
        assert sorted(step_samples) == sorted(expected)
        assert loss_tokens == batches[0].global_num_loss_tokens
        assert batches[0].global_num_pairs == (len(expected) if kind == "pair" else 0) == pairs
        assert batches[0].global_num_sequences == len(expected) * (2 if kind == "pair" else 1)
        seen += expected
    assert sorted(seen) == list(range(103))  # one epoch = every sample exactly once
    assert samplers[0].plan(1, 0).sample_ids.tolist() != samplers[0].plan(0, 0).sample_ids.tolist()


def test_resume_reproduces_batches_and_checks_identity():
    ds = FakeDataset("pair", 40, seed=4)
    cfg = PackingConfig(global_batch_size=8, micro_batch_tokens=200, pad_to_multiple_of=2)
    a = PackedStepSampler(ds, cfg, pad_id=PAD)
    for _ in range(7):  # crosses the epoch boundary (5 steps per epoch)
        a.next_step()
    state = a.state_dict()
    assert (state["epoch"], state["step"]) == (1, 2)
    ahead = [a.next_step() for _ in range(3)]
    b = PackedStepSampler(ds, cfg, pad_id=PAD)
    b.load_state_dict(state)
    for x, y in zip(ahead, [b.next_step() for _ in range(3)]):
        assert len(x.microbatches) == len(y.microbatches)
        for mx, my in zip(x.microbatches, y.microbatches):
            assert torch.equal(mx.tokens, my.tokens) and torch.equal(mx.sample_ids, my.sample_ids)
    # a different DP layout keeps each step's samples
    c = PackedStepSampler(ds, cfg, dp_rank=1, dp_size=2, pad_id=PAD)
    c.load_state_dict(state)
    assert c.plan(1, 2).sample_ids.tolist() == PackedStepSampler(ds, cfg).plan(1, 2).sample_ids.tolist()
    with pytest.raises(ValueError, match="global_batch_size"):
        PackedStepSampler(ds, PackingConfig(global_batch_size=4, micro_batch_tokens=200)).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        PackedStepSampler(FakeDataset("pair", 41, seed=4), cfg).load_state_dict(state)


def test_oversize_sample_is_an_error():
    ds = FakeDataset("pair", 20, seed=5, max_len=60)
    longest = int(np.argmax(ds.seq_lengths().sum(axis=1)))
    with pytest.raises(ValueError, match=f"sample ids .*{longest}"):
        PackedStepSampler(ds, PackingConfig(global_batch_size=4, micro_batch_tokens=int(ds.seq_lengths().max()) + 1))
    with pytest.raises(ValueError, match="multiple of pad_to_multiple_of"):
        PackedStepSampler(ds, PackingConfig(global_batch_size=4, micro_batch_tokens=130, pad_to_multiple_of=4))


def test_empty_microbatches_and_efficiency():
    ds = FakeDataset("sft", 10, seed=6, ref=False)
    cfg = PackingConfig(global_batch_size=2, micro_batch_tokens=64, pad_to_multiple_of=4)
    s = PackedStepSampler(ds, cfg, dp_rank=3, dp_size=4, pad_id=PAD)
    plan = s.plan(0, 0)
    batch = s.build(plan)
    mbs = batch.microbatches
    assert len(mbs) == max(len(r) for r in plan.ranks) and mbs[-1].num_sequences == 0
    assert mbs[-1].tokens.shape == (1, 4) and (mbs[-1].seq_ids == -1).all()
    # attention still gets one (all-padding) segment
    assert mbs[-1].cu_seqlens_padded.tolist() == mbs[-1].cu_seqlens.tolist() == [0, 4]
    eff = s.efficiency(plan)
    assert 0 < eff["efficiency"] <= 1 and eff["real_tokens"] == int(ds.seq_lengths()[plan.sample_ids].sum())
