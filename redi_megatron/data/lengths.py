"""Token-length limits: what curation records, and the check training runs before tokenizing anything.

``redi-curate`` stores each sample's token counts (``prompt_tokens``, ``completion_tokens`` or
``chosen_tokens``/``rejected_tokens``) and writes :func:`length_record` into ``curation_report.json``: the
limits it applied, to which outputs, how it counted, and the tokenizer and template it counted with. When
those match the run's, :func:`stored_lengths` reads only the count columns (HF dataset: those columns; JSONL:
one pass with a regular expression, no JSON parsing), so a run over the limits is refused (or told what it
will drop) in seconds instead of after tokenizing everything. Otherwise the trainer falls back to the
tokenized lengths, which stay the authority for what is dropped.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from redi_megatron.errors import UserError

from .template_record import find_report

RECORD_KEY = "token_counts"
COLUMNS = {"sft": ("prompt_tokens", "completion_tokens"), "pair": ("prompt_tokens", "chosen_tokens", "rejected_tokens")}
_COUNT = re.compile(rb'"(prompt_tokens|completion_tokens|chosen_tokens|rejected_tokens)"\s*:\s*(\d+)')


@dataclass
class Lengths:
    """Per-sample token counts: ``prompt`` int64 ``[n]``, ``completion`` int64 ``[n, k]`` (k = 1 SFT, 2 pair)."""

    prompt: np.ndarray
    completion: np.ndarray
    origin: str  # where the counts come from, for messages


def length_record(cfg: Any, template: Any, tokenizer: Any) -> dict[str, Any]:
    """What ``redi-curate`` writes under ``token_counts`` in ``curation_report.json``."""
    from .tokenized import tokenizer_fingerprint

    scope = {"both": ["positives", "pairs"], "pairs": ["pairs"], "none": []}[cfg.length_filter]
    return {"max_prompt_tokens": cfg.max_prompt_tokens, "max_completion_tokens": cfg.max_completion_tokens,
            "length_filter_applied_to": [o for o in scope if o in cfg.outputs], "measure": cfg.length_measure,
            "template": asdict(template), "tokenizer_sha256": tokenizer_fingerprint(tokenizer)}


def _record(path: str) -> tuple[Optional[dict[str, Any]], str]:
    report = find_report(path)
    if report is None:
        return None, "no curation_report.json"
    try:
        with open(report, encoding="utf-8") as f:
            rec = json.load(f).get(RECORD_KEY)
    except (OSError, ValueError, AttributeError):
        return None, f"{report} is unreadable"
    if not isinstance(rec, dict):
        return None, f"{report} records no token counts (curated by an older redi-curate)"
    return rec, report


def _columns_hf(path: str, cols: tuple[str, ...]) -> Optional[list[np.ndarray]]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if any(c not in ds.column_names for c in cols):
        return None
    table = ds.select_columns(list(cols)).with_format("numpy")
    return [np.asarray(table[c], dtype=np.int64) for c in cols]


def _columns_jsonl(path: str, cols: tuple[str, ...]) -> Optional[list[np.ndarray]]:
    wanted = [c.encode() for c in cols]
    out: list[list[int]] = [[] for _ in cols]
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():  # iter_rows skips blank lines: keep the row numbering the same
                continue
            found = {k: int(v) for k, v in _COUNT.findall(line)}
            if any(c not in found for c in wanted):
                return None
            for j, c in enumerate(wanted):
                out[j].append(found[c])
    return [np.asarray(v, dtype=np.int64) for v in out]


def stored_lengths(path: str, kind: str, template: Any, tokenizer: Any) -> tuple[Optional[Lengths], str]:
    """(the stored counts, their origin) when curation counted exactly what training will tokenize, else
    (None, why not). ``kind``: ``"sft"`` or ``"pair"``."""
    from .tokenized import _is_hf_dir, tokenizer_fingerprint

    rec, where = _record(path)
    if rec is None:
        return None, where
    if rec.get("measure") != "exact":
        return None, f"{where}: counted with the {rec.get('measure')!r} measure, not the trained tokens"
    if rec.get("template") != json.loads(json.dumps(asdict(template))):
        return None, f"{where}: counted in another chat template"
    if rec.get("tokenizer_sha256") != tokenizer_fingerprint(tokenizer):
        return None, f"{where}: counted with another tokenizer"
    cols = COLUMNS[kind]
    if _is_hf_dir(path):
        values = _columns_hf(path, cols)
    elif os.path.isfile(path):
        values = _columns_jsonl(path, cols)
    else:
        return None, f"{path}: not an HF dataset or a JSONL file"
    if values is None:
        return None, f"{path}: lacks the {'/'.join(cols)} columns"
    return Lengths(values[0], np.stack(values[1:], axis=1), f"counts stored by redi-curate ({where})"), where


def tokenized_lengths(dataset: Any) -> Lengths:
    """The lengths of a tokenized dataset (``TokenizedDataset`` or anything with the sampler's protocol)."""
    total = np.asarray(dataset.seq_lengths(), dtype=np.int64)
    completion = np.asarray(dataset.loss_token_counts(), dtype=np.int64)
    return Lengths((total - completion)[:, 0], completion, "tokenized lengths")


def same_lengths(a: Lengths, b: Lengths) -> bool:
    return (a.prompt.shape == b.prompt.shape and a.completion.shape == b.completion.shape
            and bool((a.prompt == b.prompt).all()) and bool((a.completion == b.completion).all()))


def overlong(lengths: Lengths, max_prompt: int, max_completion: int) -> dict[str, np.ndarray]:
    """Sample ids whose prompt (``"prompt"``) or any completion (``"completion"``) exceeds its limit."""
    return {"prompt": np.nonzero(lengths.prompt > max_prompt)[0],
            "completion": np.nonzero((lengths.completion > max_completion).any(axis=1))[0]}


def describe(lengths: Lengths, bad: dict[str, np.ndarray], limits: dict[str, int]) -> str:
    """One clause per violated limit: count, limit, the first sample ids and their token counts."""
    parts = []
    for what, ids in bad.items():
        if ids.size:
            values = lengths.prompt if what == "prompt" else lengths.completion.max(axis=1)
            parts.append(f"{ids.size} sample(s) have a {what} longer than data.max_{what}_tokens={limits[what]}, "
                         f"e.g. sample ids {ids[:10].tolist()} ({what} tokens {values[ids[:10]].tolist()})")
    return "; ".join(parts)


def select_within_limits(path: str, lengths: Lengths, max_prompt: int, max_completion: int,
                         policy: str) -> tuple[Optional[np.ndarray], str]:
    """Apply ``data.overlong``. ``"error"``: UserError naming ``path``, the count and sample ids when any
    sample is over a limit. ``"drop"``: (the sample ids to keep, a report line), or (None, "") when none is
    over. A drop that leaves nothing is an error."""
    bad = overlong(lengths, max_prompt, max_completion)
    over = np.union1d(bad["prompt"], bad["completion"])
    if over.size == 0:
        return None, ""
    n = int(lengths.prompt.shape[0])
    what = describe(lengths, bad, {"prompt": max_prompt, "completion": max_completion})
    if policy != "drop":
        raise UserError(f"{path}: {what} (from the {lengths.origin}); curate with these limits, raise them, "
                        f"or set data.overlong=drop to train without those samples")
    if over.size == n:
        raise UserError(f"{path}: data.overlong=drop would drop all {n} samples ({what})")
    keep = np.setdiff1d(np.arange(n, dtype=np.int64), over)
    return keep, (f"data.overlong=drop: dropping {over.size} of {n} sample(s) of {path} ({what}); "
                  f"training on {keep.size}")
