"""Training metrics sinks: console progress, JSONL file, TensorBoard, Weights & Biases.

One :class:`MetricsLogger` per run, fed once per optimizer step with the step's (already reduced,
global-batch) metrics. Every sink is written on every step except the console, which prints every
``logging.log_interval`` steps (and the last one):

* console: ``step 12/500 | loss 0.4312 | lr 1.00e-06 | grad 0.531 | logp c -0.321 r -0.876 |
  12.3k tok/s | 0.52 s/step | ETA 1:02:03`` as plain lines (log files, Slurm) or a tqdm bar when the
  stream is a terminal; chosen/rejected per-token log-probs appear when the loss reports them;
  tokens/s and s/step are medians over the recent steps, so one step that also waited for a
  checkpoint save does not distort them;
* ``<run_dir>/metrics.jsonl``: one JSON object per step (``step``, ``time``, ``step_time``, ``tokens``,
  ``tokens_per_s`` and every metric). On resume from step N, records after N (written by the
  interrupted run past its last checkpoint) are dropped first, so the file reads as one clean run;
* TensorBoard (``<run_dir>/tensorboard``, lazy import, events after the resume step purged);
* W&B when ``logging.wandb_project`` is set (lazy import; the run id is kept in ``<run_dir>`` so a
  resumed job continues the same W&B run).

Only the rank that owns the reduced metrics should pass ``enabled=True``; elsewhere every call is a
no-op, so the trainer needs no rank checks around logging.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Optional, TextIO

from redi_megatron.config.schema import LoggingConfig
from redi_megatron.errors import UserError
from redi_megatron.outputs import write_atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
CONSOLE_MODES = ("auto", "lines", "bar", "off")
_RECENT = 20  # steps the ETA is estimated from


def _scalar(v: Any) -> Any:
    """Tensor / numpy scalar -> Python number; other values unchanged."""
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        return v.item()
    return v


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _fmt_rate(x: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def _read_records(path: str) -> tuple[list[dict], int]:
    """Records of a metrics JSONL file and how many unfinished final lines were skipped (0 or 1).

    Only the final line may be cut short (a crash mid-write); a malformed line anywhere else is a
    ValueError naming the file and line.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records, skipped = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "step" not in rec:
                raise ValueError("not an object with a 'step'")
        except ValueError as e:
            if i == len(lines) - 1:  # no newline after it: the write did not finish
                skipped = 1
                break
            raise UserError(f"{path}: line {i + 1} is not a metrics record ({e}): {line[:120]!r}") from None
        records.append(rec)
    return records, skipped


def read_metrics(path: str) -> list[dict]:
    """Records of a run directory's ``metrics.jsonl`` (or of that file), one per step, sorted by step.

    A step logged twice (a resume without truncation) keeps its last record; a half-written final line
    of a live run is ignored.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(path):
        raise UserError(f"no metrics file at {path}")
    records, _ = _read_records(path)
    by_step = {}
    for rec in records:
        by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _truncate_jsonl(path: str, keep_through: int) -> int:
    """Rewrite ``path`` keeping records with ``step <= keep_through``; returns how many were dropped."""
    records, skipped = _read_records(path)
    keep = [r for r in records if r["step"] <= keep_through]
    dropped = len(records) - len(keep) + skipped
    if dropped or not _ends_with_newline(path):
        write_atomic(path, (json.dumps(r) + "\n" for r in keep))
    return dropped


class MetricsLogger:
    """Per-step metrics to console, JSONL, TensorBoard and W&B (see the module docstring).

    cfg: the run's ``logging`` section. run_dir: where the files go (the checkpoint ``save_dir``).
    total_steps: optimizer steps of the whole run (for progress and ETA).
    start_step: steps already done (0 for a fresh run, the checkpoint's step on resume).
    config: the resolved run config as a dict (W&B stores it with the run).
    console: ``auto`` (a tqdm bar on a terminal, plain lines otherwise), ``lines``, ``bar`` or ``off``.
    """

    def __init__(self, cfg: LoggingConfig, run_dir: str, *, total_steps: int, start_step: int = 0,
                 run_name: str = "", config: Optional[Mapping[str, Any]] = None, enabled: bool = True,
                 console: str = "auto", stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if console not in CONSOLE_MODES:
            raise ValueError(f"console must be one of {CONSOLE_MODES}, got {console!r}")
        if cfg.log_interval < 1:
            raise UserError(f"logging.log_interval must be >= 1, got {cfg.log_interval}")
        assert 0 <= start_step <= total_steps, f"start_step {start_step} outside [0, {total_steps}]"
        self.cfg, self.run_dir, self.enabled = cfg, run_dir, enabled
        self.total_steps, self.start_step, self.run_name = total_steps, start_step, run_name
        self.stream = stream if stream is not None else sys.stdout
        self._clock = clock
        self._last_time = clock()
        self._recent: deque = deque(maxlen=_RECENT)
        self._logged = 0
        self._interval_rates: list[float] = []
        self._jsonl = self._tb = self._wandb = self._bar = None
        self.console = "off"
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if console == "auto":
            console = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.console = console
        if cfg.jsonl:
            self._open_jsonl()
        if cfg.tensorboard:
            self._open_tensorboard()
        if cfg.wandb_project:
            self._open_wandb(config)
        if console == "bar":
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, file=self.stream, dynamic_ncols=True,
                             desc=run_name or None, unit="step")

    # ------------------------------------------------------------------ sinks
    @property
    def jsonl_path(self) -> str:
        return os.path.join(self.run_dir, METRICS_FILE)

    def _open_jsonl(self) -> None:
        if os.path.exists(self.jsonl_path):
            dropped = _truncate_jsonl(self.jsonl_path, self.start_step)
            if dropped:
                self.message(f"{self.jsonl_path}: dropped {dropped} record(s) after step {self.start_step} "
                             f"(written past the checkpoint this run resumes from)")
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")

    def _open_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UserError("logging.tensorboard is true but TensorBoard is not installed "
                             f"({e}); pip install tensorboard, or set logging.tensorboard=false") from None
        purge = self.start_step + 1 if self.start_step else None
        self._tb = SummaryWriter(log_dir=os.path.join(self.run_dir, TENSORBOARD_DIR), purge_step=purge,
                                 flush_secs=30)

    def _open_wandb(self, config: Optional[Mapping[str, Any]]) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError(f"logging.wandb_project={self.cfg.wandb_project!r} but the wandb package is not "
                             "installed; pip install wandb, or unset logging.wandb_project") from None
        id_file = os.path.join(self.run_dir, WANDB_ID_FILE)
        if os.path.exists(id_file):
            with open(id_file, encoding="utf-8") as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            with open(id_file, "w", encoding="utf-8") as f:
                f.write(run_id + "\n")
        self._wandb = wandb.init(project=self.cfg.wandb_project, name=self.run_name or None, id=run_id,
                                 resume="allow", dir=self.run_dir, config=dict(config or {}))

    # ------------------------------------------------------------------ logging
    def reset_timer(self) -> None:
        """Start timing the next step now (call after a long setup such as a reference pass)."""
        self._last_time = self._clock()

    def log_step(self, step: int, metrics: Mapping[str, Any], *, tokens: Optional[int] = None,
                 step_time: Optional[float] = None) -> Optional[dict]:
        """Record optimizer step ``step`` (1-based, ``start_step < step <= total_steps``).

        metrics: name -> number (floats, ints, 0-d tensors); ``loss``, ``lr``, ``grad_norm`` and the
        loss's own metrics (``chosen_logps_norm``, ``rejected_logps_norm``, ``margin``, ...).
        tokens: tokens processed by the step over all ranks (for tokens/s).
        step_time: seconds the step took, when the caller timed it; by default the wall time since the
            previous call (which then includes a checkpoint save in between: call :meth:`reset_timer`
            after one). Returns the JSONL record.
        """
        if not self.enabled:
            return None
        now = self._clock()
        dt = now - self._last_time if step_time is None else float(step_time)
        self._last_time = now
        self._logged += 1
        if self._logged > 1:  # the first step of a (re)started run also compiles and warms up: not a rate
            self._recent.append(dt)
        record: dict[str, Any] = {"step": int(step), "time": round(time.time(), 3), "step_time": dt}
        if tokens is not None:
            record["tokens"] = int(tokens)
            record["tokens_per_s"] = tokens / dt if dt > 0 else float("nan")
            if self._logged > 1:
                self._interval_rates.append(record["tokens_per_s"])
        for k, v in metrics.items():
            v = _scalar(v)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ValueError(f"metric {k!r} must be a number, got {type(v).__name__} {v!r}")
            record[k] = v
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time"):
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in record.items() if k not in ("step", "time")}, step=step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(self._summary(step, record, with_step=False), refresh=False)
        elif self.console == "lines" and (step % self.cfg.log_interval == 0 or step == self.total_steps):
            self.stream.write(self._summary(step, record) + "\n")
            self.stream.flush()
        if step % self.cfg.log_interval == 0 or step == self.total_steps:
            self._interval_rates = []
        return record

    def _summary(self, step: int, rec: Mapping[str, Any], with_step: bool = True) -> str:
        parts = []
        if with_step:
            prefix = f"[{self.run_name}] " if self.run_name else ""
            parts.append(f"{prefix}step {step}/{self.total_steps}")
        if "loss" in rec:
            parts.append(f"loss {rec['loss']:.4f}")
        if "lr" in rec:
            parts.append(f"lr {rec['lr']:.2e}")
        norm_key = "grad_norm" if "grad_norm" in rec else ("update_norm" if "update_norm" in rec else None)
        if norm_key:
            parts.append(f"{'grad' if norm_key == 'grad_norm' else 'update'} {rec[norm_key]:.3f}")
        if "chosen_logps_norm" in rec and "rejected_logps_norm" in rec:
            parts.append(f"logp c {rec['chosen_logps_norm']:.3f} r {rec['rejected_logps_norm']:.3f}")
        rates = [r for r in self._interval_rates if math.isfinite(r)]
        if rates:  # median: one step that also waited for a checkpoint save does not skew it
            parts.append(f"{_fmt_rate(statistics.median(rates))} tok/s")
        if self._recent:
            per_step = statistics.median(self._recent)
            parts.append(f"{per_step:.2f} s/step")
            parts.append(f"ETA {_fmt_duration(per_step * (self.total_steps - step))}")
        else:
            parts.append(f"{rec['step_time']:.2f} s (first step, warm-up included; ETA from the next)")
        return " | ".join(parts)

    def message(self, text: str) -> None:
        """Print a line (a warning, a checkpoint notice) without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Flush and close every sink (idempotent)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
