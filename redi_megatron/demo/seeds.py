"""Several seeds of the demo, and what they agree on: ``redi-demo --out DIR --seeds 0 1 2``.

Each seed is a complete ``redi-demo`` run (the same tools, the same settings) in ``DIR/seed-<k>``, so a
seed that finished is skipped when the command is rerun and one that was interrupted resumes. Then
``DIR/seeds.md`` and ``DIR/seeds.json`` give, over the seeds, the mean and standard deviation (ddof 1) of
each model's pass@1 and of each paired difference, with every seed's own value beside them, and the
same for the premise and the per-path accuracies.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from redi_megatron.demo.results import LABELS
from redi_megatron.errors import UserError


def seed_dir(out: str, seed: int) -> str:
    return os.path.join(out, f"seed-{seed}")


def _stat(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    return {"mean": float(v.mean()) if len(v) else float("nan"),
            "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"), "values": [float(x) for x in values]}


def aggregate(out: str, seeds: Sequence[int]) -> dict[str, Any]:
    """Mean/SD over ``seeds`` of what each ``DIR/seed-<k>/results.json`` reports."""
    runs = []
    for k in seeds:
        path = os.path.join(seed_dir(out, k), "results.json")
        if not os.path.exists(path):
            raise UserError(f"{path} is missing: seed {k} has not finished")
        with open(path, encoding="utf-8") as f:
            runs.append(json.load(f))
    models = list(runs[0]["models"])
    agg: dict[str, Any] = {"seeds": list(seeds), "teacher": runs[0]["config"].get("teacher", "slips"),
                           "models": {}, "differences": {}, "paths": {}, "premise": {}}
    for name in models:
        agg["models"][name] = _stat([r["models"][name]["pass@1"] for r in runs])
    for key in runs[0]["differences"]:
        agg["differences"][key] = _stat([r["differences"][key]["diff"] for r in runs])
        agg["differences"][key]["se_per_seed"] = [r["differences"][key]["se"] for r in runs]
    for name in runs[0].get("paths", {}):
        agg["paths"][name] = {k: _stat([r["paths"][name][k] for r in runs])
                              for k in ("shortcut_rate", "shortcut_accuracy", "working_accuracy")}
    for name in runs[0].get("premise", {}):
        agg["premise"][name] = {k: _stat([r["premise"][name][k] for r in runs])
                                for k in ("sampleable", "p_rejected_mean", "p_rejected_median", "over_5pct")}
    return agg


def _cell(s: dict[str, Any], scale: float = 100.0) -> str:
    if not math.isfinite(s["mean"]):
        return "n/a"
    each = ", ".join("n/a" if not math.isfinite(x) else f"{scale * x:.1f}" for x in s["values"])
    sd = "" if not math.isfinite(s["sd"]) else f" +/- {scale * s['sd']:.1f}"
    return f"{scale * s['mean']:.1f}{sd} ({each})"


def render(agg: dict[str, Any]) -> str:
    seeds = ", ".join(str(s) for s in agg["seeds"])
    lines = [f"# redi-demo over seeds {seeds} ({agg['teacher']} teacher)", "",
             "Mean +/- SD over seeds (ddof 1), each seed's value in brackets, in points.", "",
             "| model | pass@1 |", "|---|---|"]
    lines += [f"| {LABELS.get(n, n)} | {_cell(s)} |" for n, s in agg["models"].items()]
    lines += ["", "| paired difference | mean +/- SD over seeds (per seed) | SE within each seed |", "|---|---|---|"]
    for key, s in agg["differences"].items():
        se = ", ".join(f"{100 * x:.1f}" for x in s["se_per_seed"])
        lines.append(f"| {key.replace('-', ' - ')} | {_cell(s)} | {se} |")
    if agg["paths"]:
        lines += ["", "| model | shortcut rate | shortcut accuracy | working-path accuracy |", "|---|---|---|---|"]
        lines += [f"| {LABELS.get(n, n)} | {_cell(p['shortcut_rate'])} | {_cell(p['shortcut_accuracy'])} | "
                  f"{_cell(p['working_accuracy'])} |" for n, p in agg["paths"].items()]
    if agg["premise"]:
        lines += ["", "Premise (each pair's first diverging rejected token): share sampleable at the evaluation's "
                  "temperature and top-p, its mean probability, share above 5%.", "",
                  "| model | sampleable | p(rejected) mean | > 5% |", "|---|---|---|---|"]
        lines += [f"| {LABELS.get(n, n)} | {_cell(p['sampleable'])} | {_cell(p['p_rejected_mean'])} | "
                  f"{_cell(p['over_5pct'])} |" for n, p in agg["premise"].items()]
    return "\n".join(lines) + "\n"


def write_seeds(out: str, seeds: Sequence[int]) -> str:
    """Write ``seeds.json`` and ``seeds.md`` into ``out``; returns the Markdown."""
    from redi_megatron.outputs import write_atomic

    agg = aggregate(out, seeds)
    text = render(agg)
    write_atomic(os.path.join(out, "seeds.json"), json.dumps(agg, indent=2))
    write_atomic(os.path.join(out, "seeds.md"), text)
    return text
