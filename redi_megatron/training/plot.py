"""``redi-plot``: PNG training curves from a run's ``metrics.jsonl``.

    redi-plot runs/qwen2.5-math-1.5b_redi --out plots/
    redi-plot runs/redi runs/dpo --labels REDI,DPO --smooth 10 --out plots/compare

One PNG per panel that has data (loss, learning rate, gradient/update norm, chosen/rejected per-token
log-probs, margins, preference accuracy, throughput) plus ``overview.png`` with all of them. Several
runs are overlaid for comparison. Non-finite values (a NaN loss) are left as gaps and counted in the
panel title, never hidden. Uses matplotlib's Agg canvas (no display, no global pyplot state).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from redi_megatron.errors import UserError
from redi_megatron.training.logging import METRICS_FILE, read_metrics


@dataclass(frozen=True)
class Panel:
    name: str                               # output file stem
    title: str
    series: tuple[tuple[str, str], ...]     # (metric key, legend label)
    ylabel: str = ""
    smooth: bool = True                     # the schedule is exact: smoothing would only shift it


PANELS = (
    Panel("loss", "Training loss", (("loss", "loss"),)),
    Panel("lr", "Learning rate", (("lr", "lr"),), smooth=False),
    Panel("grad_norm", "Gradient / update norm", (("grad_norm", "grad norm"), ("update_norm", "update norm"))),
    Panel("logps", "Mean per-token log-prob", (("chosen_logps_norm", "chosen"), ("rejected_logps_norm", "rejected")),
          "nats / token"),
    Panel("margins", "Margins", (("margin", "log-prob margin / token (chosen - rejected)"),
                                 ("reward_margin", "implicit reward margin"))),
    Panel("accuracy", "Preference accuracy", (("accuracy", "chosen > rejected (per token)"),
                                              ("reward_accuracy", "implicit reward accuracy"))),
    Panel("throughput", "Throughput", (("tokens_per_s", "tokens/s"),), "tokens / s"),
)


@dataclass
class Run:
    label: str
    records: list[dict]


def series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps [K], values [K])`` of the records that carry ``key`` (values as float, NaN kept)."""
    pts = [(r["step"], float(r[key])) for r in records if key in r and r[key] is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pts)
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` points, NaN points left out (``[K] -> [K]``; NaN stays NaN)."""
    if window <= 1 or values.size == 0:
        return values
    finite = np.isfinite(values)
    csum = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    ccnt = np.concatenate([[0], np.cumsum(finite)])
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(idx - window, 0)
    count = ccnt[idx] - ccnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (csum[idx] - csum[lo]) / count
    return np.where(finite, out, np.nan)


def _draw(ax, panel: Panel, runs: Sequence[Run], smooth: int) -> int:
    """Draw ``panel`` on ``ax``; returns how many lines were drawn."""
    drawn, non_finite, positive = 0, 0, []
    smooth = smooth if panel.smooth else 1
    for run in runs:
        for key, label in panel.series:
            x, y = series(run.records, key)
            if x.size == 0:
                continue
            name = label if len(runs) == 1 else f"{run.label}: {label}"
            non_finite += int((~np.isfinite(y)).sum())
            if smooth > 1:
                raw = ax.plot(x, y, alpha=0.25, linewidth=0.8)[0]
                ax.plot(x, moving_average(y, smooth), color=raw.get_color(), linewidth=1.5, label=name)
            else:
                ax.plot(x, y, linewidth=1.2, label=name)
            positive.append(y[np.isfinite(y)])
            drawn += 1
    if not drawn:
        return 0
    vals = np.concatenate(positive) if positive else np.zeros(0)
    if vals.size and vals.min() > 0 and vals.max() / vals.min() > 100 and panel.name in ("grad_norm", "loss"):
        ax.set_yscale("log")
    title = panel.title + (f" ({non_finite} non-finite value(s) not drawn)" if non_finite else "")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    if panel.ylabel:
        ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if drawn > 1 or len(runs) > 1:
        ax.legend(fontsize=8)
    return drawn


def build_figure(panel: Panel, runs: Sequence[Run], smooth: int = 1):
    """A matplotlib ``Figure`` of one panel, or None when no run has any of its metrics."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.9, bottom=0.13)
    return fig if _draw(fig.add_subplot(1, 1, 1), panel, runs, smooth) else None


def plot_runs(runs: Sequence[Run], out_dir: str, smooth: int = 1) -> list[str]:
    """Write ``<panel>.png`` for every panel with data and ``overview.png``; returns the paths written."""
    from matplotlib.figure import Figure

    os.makedirs(out_dir, exist_ok=True)
    written, present = [], []
    for panel in PANELS:
        fig = build_figure(panel, runs, smooth)
        if fig is None:
            continue
        path = os.path.join(out_dir, f"{panel.name}.png")
        fig.savefig(path)
        written.append(path)
        present.append(panel)
    if not present:
        keys = sorted({k for r in runs for rec in r.records for k in rec})
        raise UserError(f"none of the plotted metrics is in the records (found: {', '.join(keys)})")
    cols = 2 if len(present) > 1 else 1
    rows = math.ceil(len(present) / cols)
    fig = Figure(figsize=(7 * cols, 3.6 * rows), dpi=100)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.95, bottom=0.07, hspace=0.45, wspace=0.2)
    for i, panel in enumerate(present):
        _draw(fig.add_subplot(rows, cols, i + 1), panel, runs, smooth)
    path = os.path.join(out_dir, "overview.png")
    fig.savefig(path)
    written.append(path)
    return written


def _label(path: str) -> str:
    path = os.path.abspath(path)
    if os.path.basename(path) == METRICS_FILE:
        path = os.path.dirname(path)
    return os.path.basename(path.rstrip(os.sep)) or path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="redi-plot", description="PNG training curves from metrics.jsonl files.")
    p.add_argument("paths", nargs="+", help="run directories (with metrics.jsonl) or metrics.jsonl files")
    p.add_argument("--out", default=None, help="output directory (default: <first run>/plots)")
    p.add_argument("--labels", default=None, help="comma-separated legend labels, one per run")
    p.add_argument("--smooth", type=int, default=1, help="trailing moving-average window in steps (1 = raw)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.smooth < 1:
            raise UserError(f"--smooth must be >= 1, got {args.smooth}")
        labels = args.labels.split(",") if args.labels else [_label(p) for p in args.paths]
        if len(labels) != len(args.paths):
            raise UserError(f"--labels has {len(labels)} names for {len(args.paths)} runs")
        runs = []
        for path, label in zip(args.paths, labels):
            records = read_metrics(path)
            if not records:
                raise UserError(f"{path}: the metrics file has no records yet")
            runs.append(Run(label, records))
        first = args.paths[0]
        out = args.out or os.path.join(first if os.path.isdir(first) else os.path.dirname(first) or ".", "plots")
        written = plot_runs(runs, out, smooth=args.smooth)
    except UserError as e:
        print(f"redi-plot: error: {e}", file=sys.stderr)
        return 2
    steps = ", ".join(f"{r.label}: steps {r.records[0]['step']}-{r.records[-1]['step']}" for r in runs)
    print(f"redi-plot: wrote {len(written)} PNG file(s) to {out} ({steps})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
