"""report.json and report.md from the graded samples."""
from __future__ import annotations

import collections
import datetime
import json
import os
from collections.abc import Sequence

import numpy as np

from redi_megatron.errors import UserError
from redi_megatron.eval.benchmarks import Problem
from redi_megatron.eval.metrics import summarize, summarize_average
from redi_megatron.eval.samples import SampleStore


def verdict_matrix(problems: Sequence[Problem], store: SampleStore, n: int) -> tuple[np.ndarray, list[dict]]:
    """[num_problems, n] 0/1 verdicts and the records used; ValueError if a sample is missing."""
    verdicts = np.zeros((len(problems), n), dtype=np.float64)
    records = []
    for i, p in enumerate(problems):
        for j in range(n):
            record = store.get((p.benchmark, p.id, j))
            if record is None:
                raise UserError(f"{store.path}: no sample {j} of {p.benchmark} problem {p.id}; rerun to generate it")
            verdicts[i, j] = float(bool(record["correct"]))
            records.append(record)
    return verdicts, records


def benchmark_report(problems: Sequence[Problem], store: SampleStore, n: int) -> tuple[dict, np.ndarray]:
    verdicts, records = verdict_matrix(problems, store, n)
    summary = summarize(verdicts)
    statuses = collections.Counter(str(r.get("grade_status", "ok")).split(":")[0] for r in records)
    tokens = [r["num_tokens"] for r in records if isinstance(r.get("num_tokens"), int)]
    summary.update(
        truncated=float(np.mean([r.get("finish_reason") == "length" for r in records])),
        no_answer=float(np.mean([r.get("extracted_answer") is None for r in records])),
        mean_tokens=float(np.mean(tokens)) if tokens else None,
        grade_status=dict(statuses),
    )
    return summary, verdicts


def build_report(problems: dict[str, list[Problem]], store: SampleStore, run_config: dict) -> dict:
    n = run_config["n"]
    benches, matrices = {}, {}
    for name, probs in problems.items():
        benches[name], matrices[name] = benchmark_report(probs, store, n)
    return {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": run_config["model"],
        "grader": run_config["grader"],
        "config": run_config,
        "benchmarks": benches,
        "average": summarize_average(matrices),
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def render_markdown(report: dict) -> str:
    cfg = report["config"]
    ks = sorted({int(k) for b in report["benchmarks"].values() for k in b["pass@k"]} - {1})
    header = ["Benchmark", "Problems", "pass@1 (%) ± SEM"] + [f"pass@{k} (%)" for k in ks] + \
             ["Truncated (%)", "No answer (%)", "Mean tokens"]
    lines = [
        f"# Evaluation of `{report['model']}`",
        "",
        f"n = {cfg['n']} samples per problem, temperature {cfg['temperature']}, top-p {cfg['top_p']}, "
        f"max {cfg['max_new_tokens']} new tokens, template `{cfg['template']}` ({cfg['chat_format']} format), "
        f"grader `{report['grader']}`, seed {cfg['seed']}. SEM = std over the n per-sample benchmark "
        "scores / sqrt(n) (rllm).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for name, b in report["benchmarks"].items():
        cells = [name, str(b["num_problems"]), f"{_pct(b['pass@1'])} ± {_pct(b['sem'])}"]
        cells += [_pct(b["pass@k"][str(k)]) if str(k) in b["pass@k"] else "" for k in ks]
        tokens = "" if b["mean_tokens"] is None else f"{b['mean_tokens']:.0f}"
        cells += [_pct(b["truncated"]), _pct(b["no_answer"]), tokens]
        lines.append("| " + " | ".join(cells) + " |")
    avg = report["average"]
    lines.append("| **Average** | | " + f"**{_pct(avg['pass@1'])} ± {_pct(avg['sem'])}**" +
                 " |" * (len(header) - 3) + " |")
    odd = {name: {s: c for s, c in b["grade_status"].items() if s not in ("ok", "no_answer")}
           for name, b in report["benchmarks"].items()}
    odd = {k: v for k, v in odd.items() if v}
    if odd:
        lines += ["", f"Grading problems (counted wrong): {json.dumps(odd)}"]
    return "\n".join(lines) + "\n"


def write_reports(report: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(render_markdown(report))
