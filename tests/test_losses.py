"""The pure losses against formulas written out here: values, gradients, limits, metrics and bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from redi_megatron.losses import (
    DPOConfig,
    RediConfig,
    SimPOConfig,
    available_losses,
    dpo_loss,
    get_loss,
    redi_loss,
    redi_sequence_terms,
    registry,
    sft_loss,
    simpo_loss,
)


def _toy_model(seed: int = 0):
    """Linear "LM": logits = h @ W^T over a 2-pair batch; returns W and a function W -> summed logps."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(4, 6, 8, generator=g)                      # 4 sequences (c0, r0, c1, r1), 6 tokens
    targets = torch.randint(0, 11, (4, 6), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]],
                        dtype=torch.float32)
    W = torch.randn(11, 8, generator=g).requires_grad_()

    def seq_logps(weight):
        tok = F.log_softmax(h @ weight.T, -1).gather(-1, targets[..., None]).squeeze(-1)
        return (tok * mask).sum(-1), tok, mask
    return W, seq_logps, mask.sum(-1)


def _grad(loss: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, W, retain_graph=True)[0]


def test_redi_values_match_formula():
    c, r = torch.tensor([-12.0, -30.0]), torch.tensor([-40.0, -9.0])
    lc, lr = torch.tensor([4.0, 10.0]), torch.tensor([8.0, 3.0])
    losses, m = redi_loss(c, r, lc, lr, alpha=0.8, chosen_coef=1.0)
    expect = [12 / 4 + 0.8 * -40 / 8, 30 / 10 + 0.8 * -9 / 3]
    assert torch.allclose(losses, torch.tensor(expect))
    assert torch.allclose(m["chosen_logps_norm"], torch.tensor([-3.0, -3.0]))
    assert torch.allclose(m["rejected_logps_norm"], torch.tensor([-5.0, -3.0]))
    assert torch.allclose(m["margin"], torch.tensor([2.0, 0.0]))
    assert m["accuracy"].tolist() == [1.0, 0.0]          # a tie is not "chosen preferred"
    assert m["chosen_len"].tolist() == [4.0, 10.0] and m["rejected_len"].tolist() == [8.0, 3.0]
    assert torch.equal(m["chosen_logps"], c) and torch.equal(m["rejected_logps"], r)
    assert all(not v.requires_grad for v in m.values())


def test_redi_gradient_is_weighted_difference_of_logp_gradients():
    W, seq_logps, lengths = _toy_model()
    logps, _, _ = seq_logps(W)
    alpha = 0.8
    losses, _ = redi_loss(logps[0::2], logps[1::2], lengths[0::2], lengths[1::2], alpha=alpha)
    got = _grad(losses.mean(), W)
    # -grad L = mean over pairs of grad logp_w/|y_w| - alpha * grad logp_l/|y_l|
    expect = torch.zeros_like(W)
    for p in range(2):
        gw = _grad(seq_logps(W)[0][2 * p], W)
        gl = _grad(seq_logps(W)[0][2 * p + 1], W)
        expect += (gw / lengths[2 * p] - alpha * gl / lengths[2 * p + 1]) / 2
    assert torch.allclose(-got, expect, atol=1e-6)


def test_redi_alpha_zero_is_sft_on_chosen():
    W, seq_logps, lengths = _toy_model(1)
    logps, tok, mask = seq_logps(W)
    losses, _ = redi_loss(logps[0::2], logps[1::2], lengths[0::2], lengths[1::2], alpha=0.0)
    # SFT on the positives, each sequence's mean token NLL, averaged over sequences.
    sft = torch.stack([sft_loss(tok[i], mask[i])[0].sum() / mask[i].sum() for i in (0, 2)]).mean()
    assert torch.allclose(losses.mean(), sft)
    assert torch.allclose(_grad(losses.mean(), W), _grad(sft, W), atol=1e-7)


def test_redi_negative_weighting_follows_authors_not_detached():
    c = torch.tensor([-6.0], requires_grad=True)
    r = torch.tensor([-2.0], requires_grad=True)
    lc, lr, alpha, gamma = torch.tensor([3.0]), torch.tensor([4.0]), 0.8, 1.5
    losses, m = redi_loss(c, r, lc, lr, alpha=alpha, neg_weighting_gamma=gamma)
    n = -2.0 / 4
    assert math.isclose(losses.item(), 6 / 3 + alpha * math.exp(gamma * n) * n, rel_tol=1e-6)
    assert math.isclose(m["neg_weight"].item(), math.exp(gamma * n), rel_tol=1e-6)
    losses.sum().backward()
    # d/dlogp_l [alpha * n * exp(gamma n)], n = logp_l/|y_l|: the weight's derivative is included.
    assert math.isclose(r.grad.item(), alpha * math.exp(gamma * n) * (1 + gamma * n) / 4, rel_tol=1e-6)
    assert math.isclose(c.grad.item(), -1 / 3, rel_tol=1e-6)


def test_redi_sequence_terms_sum_to_pair_losses():
    logps, lengths = torch.tensor([-5.0, -9.0, -2.0, -7.0]), torch.tensor([5.0, 3.0, 2.0, 7.0])
    is_chosen = torch.tensor([True, False, True, False])
    kw = dict(alpha=0.6, chosen_coef=1.3, neg_weighting_gamma=0.7)
    terms, w = redi_sequence_terms(logps, lengths, is_chosen, **kw)
    pair, _ = redi_loss(logps[0::2], logps[1::2], lengths[0::2], lengths[1::2], **kw)
    assert torch.allclose(terms[0::2] + terms[1::2], pair)
    assert w[0] == 1 and w[2] == 1


def test_dpo_values_and_small_beta_limit():
    c = torch.tensor([-10.0, -4.0], requires_grad=True)
    r = torch.tensor([-12.0, -3.0], requires_grad=True)
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.5, -2.0])
    lens = torch.tensor([5.0, 2.0])
    losses, m = dpo_loss(c, r, rc, rr, lens, lens, beta=0.1)
    delta = torch.tensor([(-10 + 11) - (-12 + 11.5), (-4 + 5) - (-3 + 2)])
    assert torch.allclose(losses, -F.logsigmoid(0.1 * delta))
    assert torch.allclose(m["reward_chosen"], 0.1 * torch.tensor([1.0, 1.0]))
    assert torch.allclose(m["reward_margin"], 0.1 * delta)
    assert m["reward_accuracy"].tolist() == [1.0, 1.0]
    # beta -> 0: grad/beta -> -1/2 grad(logp_w - logp_l), i.e. symmetric REDI without length normalisation.
    beta = 1e-6
    losses, _ = dpo_loss(c, r, rc, rr, lens, lens, beta=beta)
    gc, gr = torch.autograd.grad(losses.sum(), (c, r))
    sym, _ = redi_loss(c, r, torch.ones(2), torch.ones(2), alpha=1.0)
    sc, sr = torch.autograd.grad(sym.sum(), (c, r))
    assert torch.allclose(gc / beta, 0.5 * sc, atol=1e-5) and torch.allclose(gr / beta, 0.5 * sr, atol=1e-5)


def test_dpo_reference_gets_no_gradient():
    c, r = torch.tensor([-3.0], requires_grad=True), torch.tensor([-4.0], requires_grad=True)
    rc, rr = torch.tensor([-3.5], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    losses, _ = dpo_loss(c, r, rc, rr, torch.ones(1), torch.ones(1), beta=0.5)
    losses.sum().backward()
    assert rc.grad is None and rr.grad is None and c.grad is not None


def test_simpo_values_and_gradient():
    c = torch.tensor([-8.0, -6.0], requires_grad=True)
    r = torch.tensor([-9.0, -2.0], requires_grad=True)
    lc, lr = torch.tensor([4.0, 3.0]), torch.tensor([3.0, 2.0])
    losses, m = simpo_loss(c, r, lc, lr, beta=2.0, gamma=1.0)
    z = 2.0 * (c.detach() / lc - r.detach() / lr) - 1.0
    assert torch.allclose(losses, -F.logsigmoid(z))
    losses.sum().backward()
    # d/dlogp_w = -sigmoid(-z) * beta / |y_w|
    assert torch.allclose(c.grad, -torch.sigmoid(-z) * 2.0 / lc)
    assert torch.allclose(r.grad, torch.sigmoid(-z) * 2.0 / lr)
    assert m["accuracy"].tolist() == [1.0, 0.0]


def test_sft_loss_is_masked_nll():
    tok = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -4.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    nll, m = sft_loss(tok, mask)
    assert torch.equal(nll, torch.tensor([[0.0, 2.0, 3.0], [0.5, 0.25, 0.0]]))
    assert m["num_tokens"].item() == 4 and m["nll_sum"].item() == 5.75


@pytest.mark.parametrize("fn", ["redi", "simpo", "dpo"])
def test_bad_pair_input_is_a_clear_error(fn):
    ok, short = torch.tensor([-1.0, -2.0]), torch.tensor([-1.0])
    lens, zero = torch.tensor([2.0, 3.0]), torch.tensor([2.0, 0.0])
    call = {
        "redi": lambda c, r, lc, lr: redi_loss(c, r, lc, lr),
        "simpo": lambda c, r, lc, lr: simpo_loss(c, r, lc, lr),
        "dpo": lambda c, r, lc, lr: dpo_loss(c, r, ok, ok, lc, lr),
    }[fn]
    with pytest.raises(ValueError, match="length < 1"):
        call(ok, ok, lens, zero)
    with pytest.raises(ValueError, match="mismatched shapes"):
        call(ok, short, lens, lens)
    with pytest.raises(ValueError, match="1-D"):
        call(ok[None], ok[None], lens[None], lens[None])


def test_sft_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        sft_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_hyper_parameters_are_validated():
    with pytest.raises(ValueError, match="alpha"):
        RediConfig(alpha=1.5)
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        SimPOConfig(beta=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        redi_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1), alpha=-0.1)


def test_registry_specs_and_hparams_from_dict():
    assert available_losses() == ["dpo", "redi", "sft", "simpo"]
    redi, sft, dpo, simpo = (get_loss(n) for n in ("redi", "sft", "dpo", "simpo"))
    assert (redi.normalizer, redi.needs_pairs_together, redi.needs_reference) == ("pairs", False, False)
    assert (sft.normalizer, sft.needs_pairs_together) == ("tokens", False)
    assert (dpo.needs_pairs_together, dpo.needs_reference) == (True, True)
    assert (simpo.needs_pairs_together, simpo.needs_reference) == (True, False)
    assert redi.make_hparams({"alpha": 1.0}) == RediConfig(alpha=1.0, chosen_coef=1.0, neg_weighting_gamma=0.0)
    assert simpo.make_hparams(None) == SimPOConfig(beta=2.0, gamma=1.0)
    with pytest.raises(ValueError, match="unknown key 'loss.params.alhpa'; did you mean 'loss.params.alpha'"):
        redi.make_hparams({"alhpa": 0.5})
    # typed like the rest of the config: a bool, a string, null or a list is not a float
    for bad in (True, "0.8", None, [0.8]):
        with pytest.raises(ValueError, match="'loss.params.alpha' must be float"):
            redi.make_hparams({"alpha": bad})
    assert redi.make_hparams({"alpha": 1}).alpha == 1.0  # an int is a float
    with pytest.raises(ValueError, match="Known losses: dpo, redi, sft, simpo"):
        get_loss("orpo")


def test_registering_a_new_loss_and_duplicate_names():
    from dataclasses import dataclass

    @dataclass
    class NoHP:
        pass

    spec = registry.LossSpec(name="_test_zero", normalizer="tokens", needs_pairs_together=False,
                             needs_reference=False, config_cls=NoHP,
                             compute=lambda inputs, hp: (inputs.token_logps.sum() * 0, {}))
    try:
        registry.register_loss(spec)
        assert get_loss("_test_zero") is spec
        with pytest.raises(ValueError, match="already registered"):
            registry.register_loss(registry.LossSpec(**{**spec.__dict__}))
    finally:
        registry._REGISTRY.pop("_test_zero", None)
    with pytest.raises(ValueError, match="normalizer"):
        registry.LossSpec(name="x", normalizer="sequences", needs_pairs_together=False, needs_reference=False,
                          config_cls=NoHP, compute=lambda i, h: None)


def test_roles_are_defined_once():
    from redi_megatron.data import batch

    assert (registry.ROLE_SFT, registry.ROLE_CHOSEN, registry.ROLE_REJECTED) == (
        batch.ROLE_SFT, batch.ROLE_CHOSEN, batch.ROLE_REJECTED)


def test_a_mixed_objective_gets_sequence_logps_with_a_token_normaliser():
    """``needs_sequence_logps`` is its own field: a per-token loss can add a per-sequence term."""
    from dataclasses import dataclass

    from redi_megatron.parallel.loss_scaling import make_loss_func
    from redi_megatron.parallel.state import ParallelGroups

    from loss_references import make_logits, make_microbatch, ref_sequence_logps, ref_token_logps

    @dataclass
    class Mixed:
        weight: float = 0.5

    def compute(inputs, hp):  # token NLL + weight * (mean per-sequence NLL per token) of each sequence
        assert inputs.seq_logps is not None
        return -inputs.token_logps.sum() - hp.weight * (inputs.seq_logps / inputs.seq_lengths).sum(), {}

    spec = registry.LossSpec(name="_test_mixed", normalizer="tokens", needs_pairs_together=False,
                             needs_reference=False, needs_sequence_logps=True, config_cls=Mixed,
                             compute=compute, roles=(registry.ROLE_SFT,))
    mb = make_microbatch(3, "sft", "packed")
    logits = make_logits(3, mb, torch.float32)
    loss, norm, _ = make_loss_func(spec, Mixed(), mb, ParallelGroups(None, None, None, None, None))(logits)
    tok = ref_token_logps(logits, mb.labels) * mb.loss_mask
    seq = torch.stack(ref_sequence_logps(tok, mb))
    assert int(norm) == int(mb.loss_mask.sum())  # still a per-token normaliser
    torch.testing.assert_close(loss, -tok.sum() - 0.5 * (seq / mb.num_loss_tokens).sum())
    with pytest.raises(ValueError, match="needs_sequence_logps"):
        registry.LossSpec(name="x", normalizer="pairs", needs_pairs_together=True, needs_reference=True,
                          config_cls=Mixed, compute=compute)


@pytest.mark.parametrize("name", ["dpo", "simpo"])
def test_sft_anchor_adds_the_chosen_length_normalised_nll(name):
    from redi_megatron.parallel.loss_scaling import make_loss_func
    from redi_megatron.parallel.state import ParallelGroups

    from loss_references import make_logits, make_microbatch, ref_pairs, ref_sequence_logps, ref_token_logps

    spec = get_loss(name)
    mb = make_microbatch(4, "pairs", "packed", with_ref=name == "dpo")
    logits = make_logits(4, mb, torch.float32)
    single = ParallelGroups(None, None, None, None, None)
    plain, n, _ = make_loss_func(spec, spec.make_hparams({}), mb, single)(logits)
    anchored, _, metrics = make_loss_func(spec, spec.make_hparams({"sft_weight": 0.3}), mb, single)(logits)
    seq = ref_sequence_logps(ref_token_logps(logits, mb.labels) * mb.loss_mask, mb)
    nll = sum(-seq[c] / mb.num_loss_tokens[c] for c, _ in ref_pairs(mb))
    torch.testing.assert_close(anchored, plain + 0.3 * nll)
    assert int(n) == 2 and torch.isclose(metrics["sft_nll"][0], nll)
    with pytest.raises(ValueError, match="sft_weight"):
        spec.make_hparams({"sft_weight": -1.0})
