"""The demo's results table: pass@1 of each model with standard errors, and paired differences.

Two standard errors are reported. ``SE`` is over problems: the standard deviation of the per-problem
accuracies (mean over the samples of a problem, ddof 1) divided by sqrt(problems); it covers both the
choice of problems and sampling noise, and is the one the claims below use. ``SEM (rllm)`` is the
number ``redi-eval`` reports (spread over the n sample indices only, as rllm computes it). Differences
between two models are paired by problem (both models answer the same problems), which removes the
problem-to-problem variance they share.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

LABELS = {"base": "base (random init)", "sft": "SFT (stage 1, positives)",
          "redi": "REDI (stage 2, pairs)", "control": "alpha=0 control (stage 2, pairs)",
          "token_sft": "token-level SFT (stage 2, chosen traces)"}
COMPARISONS = (("sft", "base"), ("redi", "sft"), ("control", "sft"), ("token_sft", "sft"), ("redi", "control"),
               ("redi", "token_sft"))


def verdicts(eval_dir: str, problems_path: str, n: int) -> np.ndarray:
    """``[problems, n]`` 0/1 verdicts of one redi-eval output directory (ValueError if a sample is missing)."""
    from redi_megatron.eval.benchmarks import load_benchmark
    from redi_megatron.eval.report import verdict_matrix
    from redi_megatron.eval.samples import SampleStore

    store = SampleStore(os.path.join(eval_dir, "samples.jsonl"))
    matrix, _ = verdict_matrix(load_benchmark(problems_path), store, n)
    return matrix


def pass1_se(v: np.ndarray) -> tuple[float, float]:
    """(pass@1, SE over problems). v: ``[problems, n]`` of 0/1."""
    per_problem = v.mean(axis=1)
    se = float(per_problem.std(ddof=1) / math.sqrt(len(per_problem))) if len(per_problem) > 1 else float("nan")
    return float(per_problem.mean()), se


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean of a - b, its SE) with both ``[problems, n]`` on the same problems in the same order."""
    assert a.shape[0] == b.shape[0], (a.shape, b.shape)
    d = a.mean(axis=1) - b.mean(axis=1)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


def verdict_text(diff: float, se: float) -> str:
    if not math.isfinite(se) or se == 0:
        return "identical" if diff == 0 else "no spread to judge"
    z = diff / se
    if abs(z) >= 2:
        return f"{'above' if z > 0 else 'below'}, beyond 2 SE (z = {z:+.1f})"
    return f"within 2 SE (z = {z:+.1f}): not distinguishable at this scale"


def summarize(out: str, names: Sequence[str], n: int, premise: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """pass@1 rows, paired differences, accuracy by path, and ``premise`` (by model) as given."""
    from redi_megatron.demo.analysis import path_accuracy

    problems = os.path.join(out, "teacher", "eval.jsonl")
    mats = {name: verdicts(os.path.join(out, "eval", name), problems, n) for name in names}
    rows = {}
    for name, v in mats.items():
        p, se = pass1_se(v)
        with open(os.path.join(out, "eval", name, "report.json"), encoding="utf-8") as f:
            bench = json.load(f)["benchmarks"]["eval"]
        rows[name] = {"pass@1": p, "se": se, "sem_rllm": bench["sem"], "problems": int(v.shape[0]), "n": n,
                      "no_answer": bench["no_answer"], "truncated": bench["truncated"],
                      "mean_tokens": bench["mean_tokens"]}
    diffs = {}
    for a, b in COMPARISONS:
        if a in mats and b in mats:
            d, se = paired_difference(mats[a], mats[b])
            diffs[f"{a}-{b}"] = {"diff": d, "se": se, "verdict": verdict_text(d, se)}
    paths = {name: path_accuracy(os.path.join(out, "eval", name, "samples.jsonl")) for name in names}
    return {"models": rows, "differences": diffs, "paths": paths, "premise": premise or {}}


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def render(summary: dict[str, Any], cfg: Any, stage_seconds: dict[str, float]) -> str:
    e = cfg.eval
    lines = [
        "# redi-demo results", "",
        f"{'Quick' if cfg.quick else 'Full'} demo, {cfg.teacher} teacher, seed {cfg.seed}: {e.num_problems} held-out "
        f"{cfg.task.min_digits}-{cfg.task.max_digits} digit additions, {e.samples_per_problem} samples each "
        f"(temperature {e.temperature}, top-p {e.top_p}), graded by redi-eval's rllm grader.", "",
        "| model | pass@1 (%) | SE (%) | SEM rllm (%) | no answer (%) | truncated (%) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in summary["models"].items():
        lines.append(f"| {LABELS.get(name, name)} | {_pct(r['pass@1'])} | {_pct(r['se'])} | {_pct(r['sem_rllm'])} "
                     f"| {_pct(r['no_answer'])} | {_pct(r['truncated'])} |")
    lines += ["", "Paired differences (same problems), in points:", ""]
    for key, d in summary["differences"].items():
        a, b = key.split("-")
        lines.append(f"- {a} - {b}: {100 * d['diff']:+.1f} +/- {100 * d['se']:.1f} ({d['verdict']})")
    lines += ["", "SE: over problems (std of per-problem accuracy / sqrt(problems)); SEM rllm: over the "
              "sample indices only, as redi-eval reports it."]
    lines += _render_paths(summary.get("paths", {})) + _render_premise(summary.get("premise", {}), e)
    if stage_seconds:
        total = sum(stage_seconds.values())
        lines += ["", f"Stage times (s, this run and earlier runs of this directory; total {total:.0f} s): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in stage_seconds.items())]
    return "\n".join(lines) + "\n"


def _render_paths(paths: dict[str, Any]) -> list[str]:
    lines = ["", "By path (samples that open with `Mental math:` take the shortcut; the rest work column by "
             "column):", "", "| model | shortcut rate (%) | shortcut accuracy (%) | working-path accuracy (%) |",
             "|---|---|---|---|"]
    for name, p in paths.items():
        lines.append(f"| {LABELS.get(name, name)} | {_pct(p['shortcut_rate'])} | {_pct(p['shortcut_accuracy'])} "
                     f"| {_pct(p['working_accuracy'])} |")
    return lines


def _render_premise(premise: dict[str, Any], e: Any) -> list[str]:
    if not premise:
        return []
    first = next(iter(premise.values()))
    lines = ["", f"The premise: each pair's first diverging rejected token ({first['pairs']} pairs whose sides "
             f"differ), under each model. *Sampleable*: inside the nucleus at temperature {e.temperature}, "
             f"top-p {e.top_p}, so the model can produce it; REDI's push-down of tokens it cannot sample "
             "only spills over to other tokens.", "",
             "| model | sampleable (%) | p(rejected) mean (%) | median (%) | > 5% (%) | p(chosen) mean (%) |",
             "|---|---|---|---|---|---|"]
    for name, m in premise.items():
        lines.append(f"| {LABELS.get(name, name)} | {_pct(m['sampleable'])} | {_pct(m['p_rejected_mean'])} "
                     f"| {100 * m['p_rejected_median']:.3g} | {_pct(m['over_5pct'])} | {_pct(m['p_chosen_mean'])} |")
    if "pair_paths" in first:
        lines += ["", "Pairs by path (chosen>rejected): "
                  + ", ".join(f"{k} {v}" for k, v in first["pair_paths"].items())]
    return lines


PLOTS_NOTE = ("Training curves (loss, log-probs, gradient norm per step): `plots/sft/*.png` (stage 1, SFT) and "
              "`plots/stage2/*.png` (REDI, the alpha = 0 control, token-level SFT), beside this file.\n")


def write_results(out: str, cfg: Any, names: list[str], pairs_path: Optional[str] = None) -> str:
    """Write ``results.json`` and ``results.md`` into ``out``; returns the Markdown. With ``pairs_path`` (the
    curated pairs) and the premise stage's ``premise.json``, the premise under every trained model too."""
    from redi_megatron.demo.analysis import premise_by_model
    from redi_megatron.demo.runner import load_state

    premise = None
    measured = os.path.join(out, "premise.json")  # absent in a partial run
    if pairs_path is not None and os.path.exists(measured):
        with open(measured, encoding="utf-8") as f:
            premise = {"sft": json.load(f)}  # measured before stage 2, by the premise stage
        stage2 = {name: os.path.join(out, "models", name) for name in names if name not in ("base", "sft")}
        premise.update(premise_by_model(stage2, os.path.join(out, "tokenizer"), pairs_path, cfg.eval.temperature,
                                        cfg.eval.top_p))
    summary = summarize(out, names, cfg.eval.samples_per_problem, premise)
    seconds = {k: v.get("seconds", 0.0) for k, v in load_state(out).get("stages", {}).items()}
    text = render(summary, cfg, seconds).rstrip("\n") + "\n\n" + PLOTS_NOTE
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(dict(summary, config=cfg.to_dict(), stage_seconds=seconds), f, indent=2)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text
