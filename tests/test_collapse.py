"""Collapse monitor on synthetic metric streams: healthy runs stay quiet, the paper's signature fires."""
import math
import random

import pytest
import torch

from redi_megatron.config.schema import CollapseConfig
from redi_megatron.training.collapse import CollapseMonitor, CollapseVerdict, validate_collapse_config


def healthy_stream(steps=300, seed=0):
    """REDI as it should go: chosen log-probs creep up, rejected ones decline slowly, norms are noisy."""
    rng = random.Random(seed)
    for t in range(steps):
        yield t, {"loss": 0.5 - 0.0005 * t + rng.gauss(0, 0.02),
                  "chosen_logps_norm": -0.35 + 0.0003 * t + rng.gauss(0, 0.05),
                  "rejected_logps_norm": -0.60 - 0.003 * t + rng.gauss(0, 0.08),   # -1.5 by the end
                  "grad_norm": abs(1.0 + rng.gauss(0, 0.3))}


def collapsing_stream(start=150, steps=220, seed=1):
    """Healthy until ``start``, then chosen and rejected log-probs both plummet (the paper's failure)."""
    for t, m in healthy_stream(steps, seed):
        if t >= start:
            k = t - start + 1
            m = dict(m, chosen_logps_norm=m["chosen_logps_norm"] - 0.25 * k,
                     rejected_logps_norm=m["rejected_logps_norm"] - 0.3 * k, grad_norm=m["grad_norm"] * (1 + k))
        yield t, m


def run(monitor, stream):
    return [(t, monitor.update(t, m)) for t, m in stream]


def test_healthy_stream_is_quiet():
    out = run(CollapseMonitor(CollapseConfig(action="stop")), healthy_stream())
    assert all(v == CollapseVerdict() for _, v in out)


def test_rejected_only_decline_is_the_objective_not_a_collapse():
    m = CollapseMonitor(CollapseConfig(action="stop", window=10))
    stream = [(t, {"chosen_logps_norm": -0.3, "rejected_logps_norm": -0.5 - (2.0 if t >= 20 else 0.0),
                   "grad_norm": 1.0}) for t in range(40)]
    assert not any(v.triggered for _, v in run(m, stream))


@pytest.mark.parametrize("action", ["warn", "stop"])
def test_collapse_signature_fires_within_a_few_steps(action):
    out = run(CollapseMonitor(CollapseConfig(action=action)), collapsing_stream())
    fired = [(t, v) for t, v in out if v.triggered]
    assert fired, "the collapse was not detected"
    first_t, first = fired[0]
    assert 150 <= first_t <= 153 and all(not v.triggered for t, v in out if t < 150)
    assert first.action == action and "logp_collapse" in first.signals
    assert "chosen AND rejected" in first.message and f"step {first_t}" in first.message
    # while it keeps collapsing the monitor keeps reporting it
    assert all(v.triggered for t, v in out if t >= first_t + 1 and t < first_t + 10)


def test_logp_drop_threshold_is_per_token_vs_window_median():
    cfg = CollapseConfig(action="warn", window=4, logp_drop=0.5, update_norm_spike=5.0)
    m = CollapseMonitor(cfg)
    for t, (c, r) in enumerate([(-1.0, -2.0), (-0.2, -1.0), (-0.4, -1.2), (-0.3, -1.1)]):
        assert not m.update(t, {"chosen_logps_norm": c, "rejected_logps_norm": r}).triggered
    # medians of the window: chosen -0.35, rejected -1.15
    assert not m.update(4, {"chosen_logps_norm": -0.84, "rejected_logps_norm": -1.70}).triggered  # 0.49 < 0.5
    m2 = CollapseMonitor(cfg)
    for t, (c, r) in enumerate([(-1.0, -2.0), (-0.2, -1.0), (-0.4, -1.2), (-0.3, -1.1)]):
        m2.update(t, {"chosen_logps_norm": c, "rejected_logps_norm": r})
    v = m2.update(4, {"chosen_logps_norm": -0.86, "rejected_logps_norm": -1.70})  # 0.51 and 0.55 > 0.5
    assert v.signals == ("logp_collapse",)


def test_norm_spike_uses_update_norm_then_grad_norm():
    m = CollapseMonitor(CollapseConfig(action="warn", window=10, update_norm_spike=5.0))
    for t in range(10):
        assert not m.update(t, {"grad_norm": 1.0 + 0.1 * (t % 3), "loss": 1.0}).triggered
    v = m.update(10, {"grad_norm": 6.0, "loss": 1.0})
    assert v.signals == ("norm_spike",) and "grad_norm 6 is 5.5x its median 1.1" in v.message
    assert not m.update(11, {"grad_norm": 1.0}).triggered  # one spike, then back to normal
    m2 = CollapseMonitor(CollapseConfig(action="warn", window=10))
    for t in range(10):
        m2.update(t, {"update_norm": torch.tensor(0.01), "grad_norm": 50.0})
    v = m2.update(10, {"update_norm": torch.tensor(0.2), "grad_norm": 50.0})  # update norm preferred
    assert v.signals == ("norm_spike",) and "update_norm" in v.message


def test_non_finite_fires_without_history():
    m = CollapseMonitor(CollapseConfig(action="stop"))
    v = m.update(0, {"loss": float("nan"), "grad_norm": 1.0})
    assert v.action == "stop" and v.signals == ("non_finite",) and "non-finite loss" in v.message
    v = m.update(1, {"loss": 1.0, "grad_norm": math.inf})
    assert v.signals == ("non_finite",) and "grad_norm" in v.message


def test_needs_history_and_off_is_silent():
    m = CollapseMonitor(CollapseConfig(action="warn", window=20))  # min_history 10
    for t in range(9):
        m.update(t, {"grad_norm": 1.0})
    assert not m.update(9, {"grad_norm": 100.0}).triggered    # only 9 steps of history
    assert m.update(10, {"grad_norm": 100.0}).triggered
    off = CollapseMonitor(CollapseConfig(action="off"))
    assert not any(v.triggered for _, v in run(off, collapsing_stream()))
    assert not off.update(0, {"loss": float("nan")}).triggered


def test_state_dict_resume_gives_identical_verdicts():
    stream = list(collapsing_stream(start=60, steps=80))
    full = run(CollapseMonitor(CollapseConfig(action="warn")), stream)
    first = CollapseMonitor(CollapseConfig(action="warn"))
    run(first, stream[:55])
    state = first.state_dict()
    resumed = CollapseMonitor(CollapseConfig(action="warn"))
    resumed.load_state_dict(state)
    assert run(resumed, stream[55:]) == full[55:]
    assert state["last_step"] == 54


@pytest.mark.parametrize("field, value", [("action", "halt"), ("window", 1), ("logp_drop", 0.0),
                                          ("update_norm_spike", 1.0), ("logp_drop", float("nan"))])
def test_invalid_config(field, value):
    cfg = CollapseConfig(**{field: value})
    with pytest.raises(ValueError, match=f"logging.collapse.{field}"):
        validate_collapse_config(cfg)
    with pytest.raises(ValueError):
        CollapseMonitor(cfg)
