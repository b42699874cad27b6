"""Counting, length filtering and output writing for ``redi-curate``."""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from redi_megatron.errors import UserError

from .curate_worker import ChunkResult, reason_kind

MAX_LISTED_ROWS = 100_000  # rows listed individually in the JSON report per category

POSITIVE_FEATURES = {
    "problem": "string", "completion": "string", "answer": "string", "source": "string", "uuid": "string",
    "original_index": "int64", "shuffle_rank": "int64", "source_file": "string", "source_row": "int64",
    "num_generations": "int32", "gen_idx": "int32", "prompt_tokens": "int32", "completion_tokens": "int32",
}
PAIR_FEATURES = {
    "problem": "string", "chosen": "string", "rejected": "string", "answer": "string", "source": "string",
    "uuid": "string", "original_index": "int64", "shuffle_rank": "int64", "source_file": "string",
    "source_row": "int64", "num_generations": "int32", "chosen_gen_idx": "int32", "rejected_gen_idx": "int32",
    "prompt_tokens": "int32", "chosen_tokens": "int32", "rejected_tokens": "int32",
}
FEATURES = {"positives": POSITIVE_FEATURES, "pairs": PAIR_FEATURES}


def percentiles(values: Sequence[int]) -> dict[str, float]:
    """min/p50/p90/p95/p99/p99.9/max/mean of a list of token counts ({} when empty)."""
    if len(values) == 0:
        return {}
    a = np.asarray(values, dtype=np.float64)
    qs = np.percentile(a, [0, 50, 90, 95, 99, 99.9, 100])
    names = ["min", "p50", "p90", "p95", "p99", "p99.9", "max"]
    out = {k: float(v) for k, v in zip(names, qs)}
    out["mean"] = float(a.mean())
    return out


class _OutputStats:
    def __init__(self) -> None:
        self.candidates = 0
        self.removed: Counter = Counter()
        self.removed_rows: dict[str, list[int]] = {}
        self.would_exceed = 0  # over the limits but kept (length filter not applied to this output)
        self.lengths_all: dict[str, list[int]] = {}
        self.lengths_kept: dict[str, list[int]] = {}
        self.order: list[tuple] = []  # (shuffle_rank, byte offset in the temp file)

    def drop(self, rule: str, index: int) -> bool:
        self.removed[rule] += 1
        rows = self.removed_rows.setdefault(rule, [])
        if len(rows) < MAX_LISTED_ROWS:
            rows.append(index)
        return False


class Report:
    """Accumulates per-rule counts and lengths; applies the length filter."""

    def __init__(self, cfg: Any, schema: str, rule: str, files: Sequence[str], num_rows: int) -> None:
        self.cfg, self.schema, self.rule, self.files, self.num_rows = cfg, schema, rule, list(files), num_rows
        self.status: Counter = Counter()
        self.source_excluded: Counter = Counter()
        self.bad_kinds: Counter = Counter()
        self.bad_rows: list[dict[str, Any]] = []
        self.no_correct = self.no_incorrect = self.null_labels = self.incomplete = 0
        self.out = {name: _OutputStats() for name in cfg.outputs}

    def add_chunk(self, res: ChunkResult) -> None:
        self.status.update(res.status_counts)
        self.source_excluded.update(res.source_excluded)
        for b in res.bad_rows:
            self.bad_kinds[reason_kind(b["reason"])] += 1
            if len(self.bad_rows) < MAX_LISTED_ROWS:
                self.bad_rows.append(b)
        self.no_correct += res.no_correct
        self.no_incorrect += res.no_incorrect
        self.null_labels += res.null_labels
        self.incomplete += res.incomplete_generations

    def _length_filter_applies(self, name: str) -> bool:
        scope = self.cfg.length_filter
        return scope == "both" or (scope == "pairs" and name == "pairs")

    def keep(self, name: str, rec: dict[str, Any]) -> bool:
        """Apply the control-token and length rules to one record (in that order)."""
        st = self.out[name]
        st.candidates += 1
        if rec.pop("control_token"):
            return st.drop("control_token_in_text", rec["original_index"])
        keys = ["completion_tokens"] if name == "positives" else ["chosen_tokens", "rejected_tokens"]
        for k in ["prompt_tokens"] + keys:
            st.lengths_all.setdefault(k, []).append(rec[k])
        too_long_prompt = self.cfg.max_prompt_tokens is not None and rec["prompt_tokens"] > self.cfg.max_prompt_tokens
        too_long_comp = self.cfg.max_completion_tokens is not None and any(
            rec[k] > self.cfg.max_completion_tokens for k in keys
        )
        if self._length_filter_applies(name):
            if too_long_prompt:
                return st.drop("prompt_too_long", rec["original_index"])
            if too_long_comp:
                return st.drop("completion_too_long", rec["original_index"])
        elif too_long_prompt or too_long_comp:
            st.would_exceed += 1
        for k in ["prompt_tokens"] + keys:
            st.lengths_kept.setdefault(k, []).append(rec[k])
        return True

    def remember(self, name: str, rank: int, offset: int) -> None:
        self.out[name].order.append((rank, offset))

    def kept(self, name: str) -> int:
        return len(self.out[name].order)

    def check_not_empty(self, outputs: Sequence[str]) -> None:
        empty = [name for name in outputs if self.kept(name) == 0]
        if empty:
            self.print_summary()
            raise UserError(f"curation produced no {' and no '.join(empty)} from {self.cfg.input}; "
                            "see the counts above")

    def to_dict(self) -> dict[str, Any]:
        rows_ok = self.status.get("ok", 0)
        outputs = {}
        for name, st in self.out.items():
            outputs[name] = {
                "candidates": st.candidates,
                "removed": dict(st.removed),
                "removed_rows": st.removed_rows,
                "kept": self.kept(name),
                "over_length_limits_but_kept": st.would_exceed,
                "length_filter_applied": self._length_filter_applies(name),
                "token_lengths_before_length_filter": {k: percentiles(v) for k, v in st.lengths_all.items()},
                "token_lengths_kept": {k: percentiles(v) for k, v in st.lengths_kept.items()},
            }
        cfg = asdict(self.cfg)
        return {
            "config": cfg,
            "input_files": self.files,
            "schema": self.schema,
            "correctness_rule": self.rule,
            "rows_read": self.num_rows,
            "removed_by_rule": {
                "bad_row": self.status.get("bad", 0),
                "problem_not_valid": self.status.get("problem_not_valid", 0),
                "source_excluded": self.status.get("source_excluded", 0),
            },
            "source_excluded_by_source": dict(self.source_excluded),
            "rows_passing_row_filters": rows_ok,
            "rows_without_correct_generation": self.no_correct,
            "rows_with_correct_but_no_incorrect": self.no_incorrect,
            "null_labels_treated_as_false": self.null_labels,
            "incomplete_generations_skipped": self.incomplete,
            "bad_rows_by_reason": dict(self.bad_kinds),
            "bad_rows": self.bad_rows,
            "bad_rows_listed": len(self.bad_rows),
            "outputs": outputs,
        }

    def print_summary(self) -> None:
        d = self.to_dict()
        lines = [f"redi-curate: {d['rows_read']} rows, schema {d['schema']}, correctness {d['correctness_rule']}"]
        for rule, n in d["removed_by_rule"].items():
            lines.append(f"  removed {rule:<20} {n:>9}")
        for kind, n in sorted(d["bad_rows_by_reason"].items(), key=lambda kv: -kv[1])[:10]:
            lines.append(f"    bad: {kind:<40} {n:>7}")
        lines.append(f"  rows passing row filters  {d['rows_passing_row_filters']:>9}")
        lines.append(f"  no correct generation     {d['rows_without_correct_generation']:>9}")
        lines.append(f"  correct but no incorrect  {d['rows_with_correct_but_no_incorrect']:>9}")
        for name, o in d["outputs"].items():
            removed = ", ".join(f"{k} {v}" for k, v in o["removed"].items()) or "none"
            lines.append(f"  {name}: {o['candidates']} candidates, removed: {removed}; kept {o['kept']}")
            for k, p in o["token_lengths_kept"].items():
                if p:
                    lines.append(f"    {k:<18} p50 {p['p50']:.0f}  p99 {p['p99']:.0f}  max {p['max']:.0f}")
        print("\n".join(lines), flush=True)


def _sorted_records(path: str, offsets_file: str) -> Iterator[dict[str, Any]]:
    offsets = np.load(offsets_file)
    with open(path, "rb") as f:
        for off in offsets:
            f.seek(int(off))
            yield json.loads(f.readline())


def write_outputs(cfg: Any, report: Report, tmp: str) -> None:
    """Write each output in shuffle order, as an HF dataset on disk or as JSONL."""
    from tqdm import tqdm

    for name in cfg.outputs:
        order = sorted(report.out[name].order)
        offsets_file = os.path.join(tmp, f"{name}.offsets.npy")
        np.save(offsets_file, np.asarray([o for _, o in order], dtype=np.int64))
        src = os.path.join(tmp, f"{name}.jsonl")
        if cfg.output_format == "jsonl":
            records = tqdm(_sorted_records(src, offsets_file), total=len(order), desc=f"write {name}",
                           disable=not cfg.progress, mininterval=2.0)
            with open(os.path.join(cfg.output, f"{name}.jsonl"), "w", encoding="utf-8") as f:
                for rec in records:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            continue
        import datasets

        features = datasets.Features({k: datasets.Value(v) for k, v in FEATURES[name].items()})
        if not cfg.progress:  # --no-progress covers the datasets library's own bars too
            datasets.disable_progress_bars()
        ds = datasets.Dataset.from_generator(
            _sorted_records, gen_kwargs={"path": src, "offsets_file": offsets_file}, features=features,
            cache_dir=os.path.join(tmp, "hf_cache"),
        )
        assert len(ds) == len(order)
        ds.save_to_disk(os.path.join(cfg.output, name))
