"""``samples.jsonl``: one graded sample per line, appended as generation proceeds.

Each line holds ``benchmark, problem_id, sample_index, gold, response, extracted_answer, correct,
grader, require_think, grade_status, num_tokens, finish_reason, seed``. The file is the source of
truth: a rerun into the same directory skips every (benchmark, problem_id, sample_index) already
there, and the reports are computed from it.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from typing import Optional

from redi_megatron.errors import UserError
from redi_megatron.eval.backends import SampleKey
from redi_megatron.outputs import write_atomic

REQUIRED_FIELDS = ("benchmark", "problem_id", "sample_index", "response", "correct", "grader")


def record_key(record: dict) -> SampleKey:
    return (str(record["benchmark"]), str(record["problem_id"]), int(record["sample_index"]))


def read_jsonl_records(path: str, repair_tail: bool = False) -> list[dict]:
    """Records of a samples file. A torn last line (the writer was killed mid-write) is dropped with
    a warning, and cut from the file when ``repair_tail``; any other bad line is a ValueError."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records, good_bytes = [], 0
    for line_no, raw in enumerate(lines, 1):
        if not raw.strip():
            good_bytes += len(raw) + 1
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or any(k not in record for k in REQUIRED_FIELDS):
                raise UserError(f"missing one of {REQUIRED_FIELDS}")
            record_key(record)
        except ValueError as exc:  # JSONDecodeError is a ValueError
            is_last = all(not rest.strip() for rest in lines[line_no:])
            if not is_last:
                raise UserError(f"{path} line {line_no}: bad sample record ({exc})") from None
            warnings.warn(f"{path} line {line_no}: dropping a torn last line ({len(raw)} bytes) "
                          "left by an interrupted run; that sample will be regenerated")
            if repair_tail:
                with open(path, "r+b") as f:
                    f.truncate(good_bytes)
            break
        records.append(record)
        good_bytes += len(raw) + 1
    return records


class SampleStore:
    """The samples of one output directory, keyed by (benchmark, problem id, sample index)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.records: dict[SampleKey, dict] = {}
        for record in read_jsonl_records(path, repair_tail=True):
            key = record_key(record)
            if key in self.records:
                raise UserError(f"{path}: sample {key} appears twice")
            self.records[key] = record

    def __contains__(self, key: SampleKey) -> bool:
        return key in self.records

    def get(self, key: SampleKey) -> Optional[dict]:
        return self.records.get(key)

    def append(self, records: Iterable[dict]) -> None:
        """Add new samples and make them durable before returning."""
        records = list(records)
        for record in records:
            key = record_key(record)
            if key in self.records:
                raise UserError(f"sample {key} is already in {self.path}")
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for record in records:
            self.records[record_key(record)] = record

    def rewrite(self) -> None:
        """Replace the file with the current records (after regrading), atomically."""
        write_atomic(self.path, (json.dumps(r, ensure_ascii=False) + "\n" for r in self.records.values()))
