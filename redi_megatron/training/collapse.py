"""Collapse monitor: watch the per-step metrics for the failure signature the REDI paper reports.

With a symmetric objective (REDI alpha = 1, or DPO at a high learning rate) training can enter a
regime where the log-probs of the *chosen* and the *rejected* traces both fall sharply: the model
lowers the likelihood of everything, accuracy collapses. Pushing down only the rejected traces is the
objective working, so only a simultaneous drop counts. A spiking update (or gradient) norm is the
other early sign. Signals, each compared with the last ``window`` steps (the current step excluded):

* ``logp_collapse``: the mean per-token chosen log-prob AND the mean per-token rejected log-prob are
  both more than ``logp_drop`` nats/token below their median over the window;
* ``norm_spike``: the update norm (``update_norm``, else ``grad_norm``) exceeds ``update_norm_spike``
  times its median over the window;
* ``non_finite``: the loss, norm or log-probs are NaN/inf (no history needed).

The monitor only reports (:class:`CollapseVerdict`); the trainer acts on ``verdict.action``: ``"warn"``
logs the message, ``"stop"`` saves a checkpoint and ends the run. ``state_dict`` keeps the windows so a
resumed run judges the next steps exactly as an uninterrupted one would.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from redi_megatron.config.schema import CollapseConfig
from redi_megatron.errors import UserError

CHOSEN_KEY = "chosen_logps_norm"      # mean per-token log-prob of the chosen traces (losses.common)
REJECTED_KEY = "rejected_logps_norm"  # same for the rejected traces
NORM_KEYS = ("update_norm", "grad_norm")
LOSS_KEY = "loss"
CONFIG_ACTIONS = ("off", "warn", "stop")


@dataclass(frozen=True)
class CollapseVerdict:
    """What the monitor concluded for one step.

    action: ``"none"``, ``"warn"`` or ``"stop"`` (``logging.collapse.action`` when a signal fired).
    message: human-readable reason ("" when nothing fired).
    signals: names of the signals that fired (``logp_collapse``, ``norm_spike``, ``non_finite``).
    """

    action: str = "none"
    message: str = ""
    signals: tuple[str, ...] = ()

    @property
    def triggered(self) -> bool:
        return bool(self.signals)


def validate_collapse_config(cfg: CollapseConfig) -> None:
    """ValueError naming the ``logging.collapse`` field that is out of range."""
    if cfg.action not in CONFIG_ACTIONS:
        raise UserError(f"logging.collapse.action must be one of {CONFIG_ACTIONS}, got {cfg.action!r}")
    if cfg.window < 2:
        raise UserError(f"logging.collapse.window must be >= 2 steps, got {cfg.window}")
    if not (math.isfinite(cfg.logp_drop) and cfg.logp_drop > 0):
        raise UserError(f"logging.collapse.logp_drop must be > 0 nats/token, got {cfg.logp_drop}")
    if not (math.isfinite(cfg.update_norm_spike) and cfg.update_norm_spike > 1):
        raise UserError(f"logging.collapse.update_norm_spike must be > 1 (a multiple of the median), "
                         f"got {cfg.update_norm_spike}")


def _value(metrics: Mapping[str, Any], key: str) -> Optional[float]:
    v = metrics.get(key)
    if v is None:
        return None
    if hasattr(v, "item"):  # a 0-d tensor or numpy scalar
        v = v.item()
    return float(v)


class CollapseMonitor:
    """Stateful detector fed one step of metrics at a time (see the module docstring).

    ``min_history``: steps of history a windowed signal needs before it may fire
    (default ``max(2, window // 2)``), so the first noisy steps of a run raise nothing.
    """

    def __init__(self, cfg: CollapseConfig, *, chosen_key: str = CHOSEN_KEY, rejected_key: str = REJECTED_KEY,
                 norm_keys: Sequence[str] = NORM_KEYS, min_history: Optional[int] = None) -> None:
        validate_collapse_config(cfg)
        self.cfg = cfg
        self.chosen_key, self.rejected_key, self.norm_keys = chosen_key, rejected_key, tuple(norm_keys)
        self.min_history = max(2, cfg.window // 2) if min_history is None else min_history
        assert 1 <= self.min_history <= cfg.window, "min_history must be within the window"
        self._hist: dict[str, deque] = {k: deque(maxlen=cfg.window) for k in ("chosen", "rejected", "norm")}
        self.last_step: Optional[int] = None

    # ------------------------------------------------------------------ signals
    def _median(self, name: str) -> Optional[float]:
        h = self._hist[name]
        return statistics.median(h) if len(h) >= self.min_history else None

    def _norm(self, metrics: Mapping[str, Any]) -> tuple[Optional[str], Optional[float]]:
        for key in self.norm_keys:
            v = _value(metrics, key)
            if v is not None:
                return key, v
        return None, None

    def update(self, step: int, metrics: Mapping[str, Any]) -> CollapseVerdict:
        """Judge step ``step`` (metrics of the whole global batch, e.g. the logged values)."""
        if self.cfg.action == "off":
            return CollapseVerdict()
        chosen, rejected = _value(metrics, self.chosen_key), _value(metrics, self.rejected_key)
        norm_key, norm = self._norm(metrics)
        loss = _value(metrics, LOSS_KEY)
        signals, reasons = [], []

        bad = [k for k, v in ((LOSS_KEY, loss), (norm_key, norm), (self.chosen_key, chosen),
                              (self.rejected_key, rejected)) if v is not None and not math.isfinite(v)]
        if bad:
            signals.append("non_finite")
            reasons.append(f"non-finite {', '.join(bad)}")

        ref_c, ref_r = self._median("chosen"), self._median("rejected")
        if None not in (chosen, rejected, ref_c, ref_r) and math.isfinite(chosen) and math.isfinite(rejected):
            drop_c, drop_r = ref_c - chosen, ref_r - rejected
            if drop_c > self.cfg.logp_drop and drop_r > self.cfg.logp_drop:
                signals.append("logp_collapse")
                reasons.append(
                    f"chosen AND rejected log-probs/token both fell: chosen {ref_c:.3f} -> {chosen:.3f} "
                    f"(-{drop_c:.3f}), rejected {ref_r:.3f} -> {rejected:.3f} (-{drop_r:.3f}); threshold "
                    f"{self.cfg.logp_drop} vs the median of the last {len(self._hist['chosen'])} steps")

        ref_n = self._median("norm")
        if norm is not None and ref_n is not None and ref_n > 0 and math.isfinite(norm):
            if norm > self.cfg.update_norm_spike * ref_n:
                signals.append("norm_spike")
                reasons.append(f"{norm_key} {norm:.4g} is {norm / ref_n:.1f}x its median {ref_n:.4g} over the "
                               f"last {len(self._hist['norm'])} steps (threshold {self.cfg.update_norm_spike}x)")

        for name, v in (("chosen", chosen), ("rejected", rejected), ("norm", norm)):
            if v is not None and math.isfinite(v):
                self._hist[name].append(v)
        self.last_step = step
        if not signals:
            return CollapseVerdict()
        message = (f"collapse monitor at step {step}: " + "; ".join(reasons)
                   + f". Action: {self.cfg.action} (logging.collapse.action=off|warn|stop).")
        return CollapseVerdict(action=self.cfg.action, message=message, signals=tuple(signals))

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Plain-Python state (JSON/pickle friendly) for the run checkpoint."""
        return {"window": self.cfg.window, "last_step": self.last_step,
                "history": {k: list(v) for k, v in self._hist.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; a different window keeps the newest values that fit."""
        for k, values in state["history"].items():
            if k not in self._hist:
                raise ValueError(f"collapse monitor state has an unknown history {k!r}")
            self._hist[k] = deque((float(v) for v in values), maxlen=self.cfg.window)
        self.last_step = state.get("last_step")
