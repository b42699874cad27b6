"""Vocab-parallel log-probs and the full loss_func (per-sequence reductions) against unsharded references.

Single device: ``vocab_parallel_logprobs`` against ``log_softmax`` + gather (fp32, bf16, layouts, chunking,
in-place backward, bad input) and ``make_loss_func`` against the plain references of
tests/loss_references.py. Multi-rank (forked gloo ranks): TP4, and TP2 x CP2 x DP2, every loss, packed
and padded rows, fp32 and bf16 logits; each rank's logits are an exact slice of the reference logits, so
values must agree to 1e-5 and gradients to 1e-5 (fp32) or one bf16 rounding step.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from redi_megatron.losses import get_loss
from redi_megatron.parallel.context import thd_partition_index
from redi_megatron.parallel.logprobs import vocab_parallel_logprobs
from redi_megatron.parallel.loss_scaling import make_loss_func, reduce_step_metrics
from redi_megatron.parallel.reductions import seq_ids_from_cu_seqlens, sequence_sums
from redi_megatron.parallel.state import ParallelGroups
from redi_megatron.testing.distributed import run_distributed

from loss_references import VOCAB, close, isclose, make_logits, make_microbatch, ref_global

BF16, FP32 = torch.bfloat16, torch.float32
CASES = [  # (loss, hyper-parameters, logits dtype, layout)
    ("sft", {}, FP32, "packed"),
    ("sft", {}, BF16, "padded"),
    ("redi", {"alpha": 0.8, "neg_weighting_gamma": 0.5}, FP32, "packed"),
    ("redi", {}, BF16, "padded"),
    ("dpo", {"beta": 0.1}, FP32, "padded"),
    ("simpo", {}, BF16, "packed"),
]
MB_PER_DP = 2


def _reference(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.float(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_logprobs_match_log_softmax(dtype, inplace, chunk):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 3, 97, generator=g) * 4).to(dtype)      # Megatron's [S, B, V] layout
    t = torch.randint(0, 97, (5, 3), generator=g)
    w = torch.randn(5, 3, generator=g)
    ref_leaf = x.clone().requires_grad_()
    ref = _reference(ref_leaf, t)
    (ref * w).sum().backward()
    leaf = x.clone().requires_grad_()
    out = vocab_parallel_logprobs(leaf * 1, t, chunk_size=chunk, inplace_backward=inplace)
    (out * w).sum().backward()
    assert out.dtype == FP32 and out.shape == (5, 3)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert leaf.grad.dtype == dtype
    assert close(leaf.grad, ref_leaf.grad, dtype)


def test_inplace_backward_fails_loudly_when_logits_are_needed_elsewhere():
    x = torch.randn(4, 10, requires_grad=True)
    out = vocab_parallel_logprobs(torch.tanh(x), torch.randint(0, 10, (4,)), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()   # tanh saved its output for backward; the in-place gradient must not corrupt it


def test_logprobs_non_contiguous_input_and_no_grad():
    x = torch.randn(4, 6, 33)
    t = torch.randint(0, 33, (6, 4))
    xt = x.transpose(0, 1).requires_grad_(False)
    with torch.no_grad():
        out = vocab_parallel_logprobs(xt, t, chunk_size=5)
    assert torch.allclose(out, _reference(xt, t), atol=1e-6)


def test_logprobs_bad_input_is_a_clear_error():
    x = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match="outside the vocabulary \\[0, 10\\)"):
        vocab_parallel_logprobs(x, torch.tensor([[0, 1, 10], [0, 0, 0]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab_parallel_logprobs(x, torch.tensor([[0, -1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="leading shape"):
        vocab_parallel_logprobs(x, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        vocab_parallel_logprobs(x, torch.zeros(2, 3))


def test_sequence_sums_padded_and_packed():
    vals = torch.arange(12, dtype=torch.float32).reshape(2, 6).requires_grad_()
    seq_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 2, -1, -1]])
    sums = sequence_sums(vals, seq_ids, 3)
    assert sums.tolist() == [1.0, 9.0, 6 + 7 + 8 + 9]
    sums.sum().backward()
    assert vals.grad.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    ids = seq_ids_from_cu_seqlens(torch.tensor([0, 2, 5]), 7)
    assert ids.tolist() == [0, 0, 1, 1, 1, -1, -1]
    with pytest.raises(ValueError, match="cu_seqlens"):
        seq_ids_from_cu_seqlens(torch.tensor([0, 4, 2]), 7)


def _coords(g: ParallelGroups) -> tuple[int, int, int, int, int, int]:
    return (g.rank(g.tp), g.size(g.tp), g.rank(g.cp), g.size(g.cp), g.rank(g.dp), g.size(g.dp))


def _shard(full: torch.Tensor, coords, mb) -> torch.Tensor:
    """This rank's part of ``[1, T, ...]`` reference data: its vocabulary slice and its chunks of every
    packed sequence (the THD context-parallel partition)."""
    tp_r, tp_n, cp_r, cp_n = coords[:4]
    if full.dim() == 3:
        v = full.shape[-1] // tp_n
        full = full[..., tp_r * v:(tp_r + 1) * v]
    return full.index_select(1, thd_partition_index(mb.cu_seqlens_padded, full.shape[1], cp_n, cp_r))


def _global_batch(case_idx: int, dp_size: int):
    name, _, dtype, layout = CASES[case_idx]
    kind = "sft" if name == "sft" else "pairs"
    seeds = [1000 * case_idx + i for i in range(MB_PER_DP * dp_size)]
    mbs = [make_microbatch(s, kind, layout, with_ref=(name == "dpo")) for s in seeds]
    return mbs, [make_logits(s, mb, dtype) for s, mb in zip(seeds, mbs)]


def _run_cases(g: ParallelGroups) -> dict:
    """One rank's forward/backward of every case; returns its logits gradients and logged metrics."""
    coords = _coords(g)
    dp_r, dp_n = coords[4], coords[5]
    results = []
    for i, (name, hp, _, _) in enumerate(CASES):
        spec = get_loss(name)
        mbs, logits = _global_batch(i, dp_n)
        mine = range(dp_r * MB_PER_DP, (dp_r + 1) * MB_PER_DP)
        leaves, total, norm, metrics = [], 0.0, torch.zeros((), dtype=torch.int32), []
        for j in mine:
            leaf = _shard(logits[j], coords, mbs[j]).clone().requires_grad_()
            loss_func = make_loss_func(spec, spec.make_hparams(hp), mbs[j], g, chunk_size=5)
            loss_sum, n, m = loss_func(leaf * 1)   # a non-leaf, as Megatron's logits are
            leaves.append(leaf)
            total, norm = total + loss_sum, norm + n
            metrics.append(m)
        # What Megatron does with calculate_per_token_loss (pinned in tests/test_loss_scaling.py).
        if g.size(g.dp_cp) > 1:
            dist.all_reduce(norm, group=g.dp_cp)
        (total / norm).backward()
        results.append({"grads": [x.grad for x in leaves], "metrics": reduce_step_metrics(metrics, g)})
    return {"coords": coords, "cases": results}


def _check(rank_results: list[dict]) -> None:
    for res in rank_results:
        coords = res["coords"]
        dp_r, dp_n = coords[4], coords[5]
        for i, (name, hp, dtype, _) in enumerate(CASES):
            spec = get_loss(name)
            mbs, logits = _global_batch(i, dp_n)
            ref = ref_global(name, spec.make_hparams(hp), logits, mbs)
            got = res["cases"][i]
            where = f"case {CASES[i]}, rank coords (tp, TP, cp, CP, dp, DP) = {coords}"
            assert isclose(got["metrics"]["loss"], ref["loss"]), where
            for key in ("accuracy", "margin"):
                if key in ref["metrics"]:
                    assert isclose(got["metrics"][key], ref["metrics"][key]), (where, key)
            for k, j in enumerate(range(dp_r * MB_PER_DP, (dp_r + 1) * MB_PER_DP)):
                assert got["grads"][k].dtype == dtype
                assert close(got["grads"][k], _shard(ref["grads"][j], coords, mbs[j]), dtype), where


def test_loss_func_single_rank_matches_reference():
    _check([_run_cases(ParallelGroups(None, None, None, None, None))])


def test_loss_func_tp4_matches_reference():
    _check(run_distributed(lambda: _run_cases(_groups()), world_size=4, tp=4))


def test_loss_func_tp2_cp2_dp2_matches_reference():
    results = run_distributed(lambda: _run_cases(_groups()), world_size=8, tp=2, cp=2)
    assert sorted(r["coords"][::2] for r in results) == sorted(
        (t, c, d) for t in range(2) for c in range(2) for d in range(2))
    _check(results)


def _groups() -> ParallelGroups:
    from redi_megatron.parallel.state import groups
    return groups()


def _single() -> ParallelGroups:
    return ParallelGroups(None, None, None, None, None)


def test_redi_pair_split_over_microbatches_equals_together():
    """REDI is separable per sequence: a pair whose sides sit in two microbatches gives the same step."""
    from redi_megatron.data.batch import ROLE_CHOSEN, ROLE_REJECTED, SequenceSpec, build_microbatch

    g = torch.Generator().manual_seed(5)
    seqs = [SequenceSpec(torch.randint(1, VOCAB, (n,), generator=g).numpy(), 2, role, sample)
            for n, role, sample in ((9, ROLE_CHOSEN, 0), (12, ROLE_REJECTED, 0), (7, ROLE_CHOSEN, 1),
                                    (14, ROLE_REJECTED, 1))]
    seq_logits = [torch.randn(s.length, VOCAB, generator=g) for s in seqs]
    spec = get_loss("redi")
    hp = spec.make_hparams({"alpha": 0.7, "neg_weighting_gamma": 0.4})

    def step(layout: list[list[list[int]]]):
        """Loss and per-sequence logits gradients; each sequence carries the same logits in any layout."""
        total, norm, leaves, where = 0.0, 0, [], []
        for rows in layout:
            mb = build_microbatch([seqs[i] for row in rows for i in row], 64, pad_id=0)
            logits = torch.zeros(*mb.labels.shape, VOCAB)
            order = [i for row in rows for i in row]
            for n, i in enumerate(order):
                logits[mb.seq_ids == n] = seq_logits[i]
            leaf = logits.requires_grad_()
            loss_sum, count, _ = make_loss_func(spec, hp, mb, _single())(leaf * 1)
            total, norm = total + loss_sum, norm + int(count)
            leaves.append(leaf)
            where.append((mb, order))
        (total / norm).backward()
        grads = {}
        for leaf, (mb, order) in zip(leaves, where):
            for n, i in enumerate(order):
                grads[i] = leaf.grad[mb.seq_ids == n]
        return float(total.detach()) / norm, norm, grads

    loss_a, norm_a, grads_a = step([[[0, 1], [2, 3]]])
    loss_b, norm_b, grads_b = step([[[0], [2, 3]], [[1]]])
    assert norm_a == norm_b == 2
    assert isclose(loss_a, loss_b)
    for i in range(4):
        assert torch.allclose(grads_a[i], grads_b[i], atol=1e-7), i
    with pytest.raises(ValueError, match="same microbatch"):   # DPO/SimPO refuse such a layout
        simpo = get_loss("simpo")
        make_loss_func(simpo, simpo.make_hparams({}), build_microbatch([seqs[1]], 32, pad_id=0), _single())


def test_make_loss_func_rejects_bad_microbatches():
    import dataclasses

    redi, dpo, sft = get_loss("redi"), get_loss("dpo"), get_loss("sft")
    mb = make_microbatch(9, "pairs", "packed")
    with pytest.raises(ValueError, match="num_loss_tokens disagrees"):
        make_loss_func(redi, redi.make_hparams({}), dataclasses.replace(mb, num_loss_tokens=mb.num_loss_tokens + 1),
                       _single())
    with pytest.raises(ValueError, match="empty completion"):
        empty = dataclasses.replace(mb, loss_mask=mb.loss_mask * (mb.seq_ids != 0),
                                    num_loss_tokens=mb.num_loss_tokens * (torch.arange(4) != 0))
        make_loss_func(redi, redi.make_hparams({}), empty, _single())
    with pytest.raises(ValueError, match="ref_logps"):
        make_loss_func(dpo, dpo.make_hparams({}), mb, _single())
    with pytest.raises(ValueError, match="accepts roles"):
        make_loss_func(sft, sft.make_hparams({}), mb, _single())
    with pytest.raises(ValueError, match="same microbatch"):
        lonely = dataclasses.replace(make_microbatch(9, "pairs", "packed", with_ref=True),
                                     pair_ids=torch.tensor([0, 0, 1, 2]))
        make_loss_func(dpo, dpo.make_hparams({}), lonely, _single())
    with pytest.raises(ValueError, match="hparams must be a RediConfig"):
        make_loss_func(redi, dpo.make_hparams({}), mb, _single())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        make_loss_func(redi, redi.make_hparams({}), mb, _single(), vocab_size=8)
    loss_func = make_loss_func(redi, redi.make_hparams({}), mb, _single())
    with pytest.raises(ValueError, match="do not match this CP rank's labels"):
        loss_func(torch.zeros(1, 63, VOCAB))


def test_sequence_logps_func_for_the_dpo_reference_pass():
    from redi_megatron.parallel.loss_scaling import make_sequence_logps_func

    from loss_references import ref_sequence_logps, ref_token_logps

    mb = make_microbatch(12, "pairs", "padded")
    logits = make_logits(12, mb, BF16)
    _, norm, out = make_sequence_logps_func(mb, _single())(logits)
    expect = ref_sequence_logps(ref_token_logps(logits, mb.labels) * mb.loss_mask, mb)
    assert int(norm) == 0 and torch.equal(out["sample_ids"], mb.sample_ids)
    assert torch.allclose(out["seq_logps"], torch.stack(expect), atol=1e-5)


@pytest.mark.parametrize("name", ["sft", "redi", "dpo", "simpo"])
def test_empty_microbatch_contributes_nothing(name):
    from redi_megatron.data.batch import build_microbatch

    spec = get_loss(name)
    mb = build_microbatch([], 32, pad_id=0, with_ref_logps=name == "dpo")
    leaf = torch.randn(1, 32, VOCAB, requires_grad=True)
    loss_sum, norm, metrics = make_loss_func(spec, spec.make_hparams({}), mb, _single())(leaf * 1)
    loss_sum.backward()
    assert float(loss_sum.detach()) == 0 and int(norm) == 0 and not leaf.grad.any()
    assert reduce_step_metrics([metrics], _single())[("num_tokens" if name == "sft" else "num_pairs")] == 0


def _padded_vocab_run(vocab_size, real_vocab):
    """TP-sharded logits with padding columns vs the unpadded single-device reference."""
    from redi_megatron.parallel import vocab_parallel_logprobs
    from redi_megatron.parallel.state import groups

    g = groups()
    tp, rank = g.size(g.tp), g.rank(g.tp)
    full = torch.randn(6, vocab_size, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, real_vocab, (6,), generator=torch.Generator().manual_seed(1))
    local = full.chunk(tp, dim=1)[rank].clone().requires_grad_(True)
    out = vocab_parallel_logprobs(local, targets, g.tp, vocab_size=real_vocab, chunk_size=4)
    out.sum().backward()
    return out.detach(), local.grad


@pytest.mark.parametrize("tp,real", [(2, 11), (4, 7)])  # TP4, real 7: rank 3 holds padding only
def test_padding_columns_are_left_out_of_the_softmax(tp, real):
    from redi_megatron.testing.distributed import run_distributed

    vocab = 16
    full = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, real, (6,), generator=torch.Generator().manual_seed(1))
    ref_in = full[:, :real].clone().requires_grad_(True)
    ref = torch.log_softmax(ref_in, dim=-1).gather(1, targets[:, None]).squeeze(1)
    ref.sum().backward()
    results = run_distributed(_padded_vocab_run, tp, tp=tp, args=(vocab, real))
    torch.testing.assert_close(results[0][0], ref, rtol=1e-6, atol=1e-6)
    grad = torch.cat([r[1] for r in results], dim=1)
    torch.testing.assert_close(grad[:, :real], ref_in.grad, rtol=1e-6, atol=1e-6)
    assert grad[:, real:].abs().max() == 0
    with pytest.raises(ValueError, match="vocab_size"):
        from redi_megatron.parallel import vocab_parallel_logprobs
        vocab_parallel_logprobs(full, targets, vocab_size=vocab + 1)
