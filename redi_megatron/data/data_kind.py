"""Which kind of curated data a training path holds, read cheaply before anything is tokenized: preference
pairs (``chosen``/``rejected``, for REDI, DPO, SimPO) or positives (``completion`` or ``messages``, for SFT).

Only the column names are read: the first row of a JSONL file, or the features recorded in an HF dataset
directory's ``dataset_info.json`` (``save_to_disk``; no ``datasets`` import). Standard library only.
"""
from __future__ import annotations

import json
import os
from typing import Optional

PAIRS = "pairs"
POSITIVES = "positives"


def _first_row_columns(path: str) -> Optional[list[str]]:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    return None  # the tokenizer names the bad line
                return list(row) if isinstance(row, dict) else None
    return None


def _hf_columns(path: str) -> Optional[list[str]]:
    """Features of an HF dataset on disk: the dataset itself, or a DatasetDict's ``train`` (or only) split."""
    candidates = [path]
    splits_file = os.path.join(path, "dataset_dict.json")
    if os.path.isfile(splits_file):
        try:
            with open(splits_file, encoding="utf-8") as f:
                splits = json.load(f).get("splits") or []
        except (OSError, ValueError, AttributeError):
            return None
        candidates = [os.path.join(path, s) for s in (["train"] if "train" in splits else splits[:1])]
    for d in candidates:
        try:
            with open(os.path.join(d, "dataset_info.json"), encoding="utf-8") as f:
                features = json.load(f).get("features")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(features, dict):
            return list(features)
    return None


def data_kind(path: str) -> tuple[Optional[str], str]:
    """(``"pairs"``, ``"positives"`` or None when it cannot tell, what it was read from)."""
    if os.path.isfile(path):
        columns, where = _first_row_columns(path), f"{path} row 0"
    elif os.path.isdir(path):
        columns, where = _hf_columns(path), f"{path} (dataset_info.json)"
    else:
        return None, path
    if not columns:
        return None, where
    if "chosen" in columns or "rejected" in columns:
        return PAIRS, where
    if "completion" in columns or "messages" in columns:
        return POSITIVES, where
    return None, where
