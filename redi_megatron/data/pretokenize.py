"""The one way a tokenized cache entry is built: sharded, parallel, resumable, published atomically.

``pretokenize`` reads the curated rows once, in order, cuts them into shards of ``shard_rows`` rows and
tokenizes the shards over a spawn pool (or in-process with one worker). Each shard is written by its
worker as ``shards/s<rows>-<index>.npz`` (tmp + rename), so a build killed at any point continues where
it stopped: the rerun skips every finished shard (their rows are still read, not tokenized). The shards
are then streamed, in order, into the memmap format the trainer reads (``tokens.bin``, ``offsets.npy``,
``ref_logps.npy``, ``meta.json`` with the counts) and the building directory ``.building-<key>`` is
renamed into place. The output is byte-identical whatever ``num_proc`` or ``shard_rows``.

The building directory's name is deterministic (``.building-<key>``) and guarded by an flock
(``redi_megatron.locks``): a second builder of the same entry (two runs started together on one curated
directory) waits for the first and takes over, resuming, if the first dies; a killed builder leaves no
lock behind, only its finished shards.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np

from redi_megatron.errors import UserError
from redi_megatron.locks import exclusive

from .templates import TemplateConfig, encode_completions, encode_prompts

SHARD_ROWS = 2000
PROGRESS_EVERY_S = 5.0
DELAY_ENV = "REDI_TEST_TOKENIZE_DELAY_S"  # test hook: the builder sleeps this long before building


# ------------------------------------------------------------------------------------------- worker
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Any, template: TemplateConfig) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tokenizer=tokenizer, template=template)


def _tokenize_shard(task: tuple[str, int, str, list[list[str]], list]) -> tuple[int, int]:
    """Tokenize one shard's rows ([problem, completion(s)...]) and write it atomically to ``out``.
    Returns (rows, tokens)."""
    from .tokenized import _SEGMENTS

    kind, k, out, rows, refs = task
    tok, cfg = _WORKER["tokenizer"], _WORKER["template"]
    segments: list[list[int]] = []
    for start in range(0, len(rows), 1000):  # bounded batches: the fast tokenizer's memory stays small
        part = rows[start:start + 1000]
        prompts = encode_prompts(tok, [r[0] for r in part], cfg)
        comps = encode_completions(tok, [c for r in part for c in r[1:]], cfg)
        for i in range(len(part)):
            segments.append(prompts[i])
            segments.extend(comps[i * (k - 1):(i + 1) * (k - 1)])
    assert len(segments) == len(rows) * _SEGMENTS[kind]
    lengths = np.fromiter((len(s) for s in segments), dtype=np.int64, count=len(segments))
    tokens = np.fromiter((t for s in segments for t in s), dtype=np.int32, count=int(lengths.sum()))
    has_ref = np.array([r is not None for r in refs], dtype=bool)
    ref = np.array([r if r is not None else (0.0, 0.0) for r in refs], dtype=np.float64).reshape(-1, 2)
    tmp = f"{out}.tmp-{os.getpid()}.npz"
    np.savez(tmp, tokens=tokens, lengths=lengths, has_ref=has_ref, ref=ref)
    os.replace(tmp, out)
    return len(rows), int(tokens.shape[0])


# ------------------------------------------------------------------------------------------ helpers
def count_rows(path: str) -> Optional[int]:
    """Rows of an HF dataset directory or non-blank lines of a JSONL file (for the ETA); None if unknown."""
    from .tokenized import _is_hf_dir

    try:
        if _is_hf_dir(path):
            import datasets

            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            return len(ds)
        n = 0
        with open(path, "rb") as f:
            for line in f:
                n += bool(line.strip())
        return n
    except Exception:  # only for the ETA: the real read reports errors with row numbers
        return None


class _Progress:
    """One stdout line at most every ``PROGRESS_EVERY_S``: rows done, rows/s, ETA."""

    def __init__(self, what: str, total: Optional[int], enabled: bool) -> None:
        self.what, self.total, self.enabled = what, total, enabled
        self.start = self.last = time.monotonic()
        self.done = self.skipped = self.tokens = 0

    def update(self, rows: int, tokens: int, skipped: bool = False, final: bool = False) -> None:
        self.done += rows
        self.tokens += tokens
        self.skipped += rows if skipped else 0
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < PROGRESS_EVERY_S):
            return
        self.last = now
        rate = (self.done - self.skipped) / max(now - self.start, 1e-9)
        eta = ""
        if self.total and rate > 0 and not final:
            eta = f", ETA {(self.total - self.done) / rate:.0f} s"
        of = f"/{self.total}" if self.total else ""
        skip = f" ({self.skipped} from finished shards)" if self.skipped else ""
        print(f"tokenize {self.what}: {self.done}{of} rows{skip}, {rate:.0f} rows/s{eta}"
              + (f", done in {now - self.start:.1f} s" if final else ""), flush=True)


def _shard_tasks(kind: str, path: str, shard_dir: str, shard_rows: int,
                 skipped: list[int]) -> Iterator[tuple[str, int, str, list[list[str]], list]]:
    """Tasks for the shards not yet written; a finished shard's rows are read but not extracted (its row
    count goes to ``skipped``, for the progress line)."""
    from .tokenized import _SEGMENTS, _extract, iter_rows

    k = _SEGMENTS[kind]
    texts: list[list[str]] = []
    refs: list = []
    cur, done, skip_rows = -1, False, 0

    def name(i: int) -> str:
        return os.path.join(shard_dir, f"s{shard_rows}-{i:06d}.npz")

    for i, row in iter_rows(path):
        if i // shard_rows != cur:
            if done:
                skipped.append(skip_rows)
            elif texts:
                yield kind, k, name(cur), texts, refs
            cur = i // shard_rows
            done, texts, refs, skip_rows = os.path.exists(name(cur)), [], [], 0
        if done:
            skip_rows += 1
            continue
        t, ref = _extract(kind, row, f"{path} row {i}")
        texts.append(t)
        refs.append(ref)
    if done:
        skipped.append(skip_rows)
    elif texts:
        yield kind, k, name(cur), texts, refs


def _run_shards(tasks: Iterator, tokenizer: Any, template: TemplateConfig, num_proc: int,
                prog: _Progress, skipped: list[int]) -> None:
    """Tokenize every task; at most 2 * num_proc shards in flight (the rows' text is never all in memory)."""
    def drain_skipped() -> None:
        while skipped:
            prog.update(skipped.pop(), 0, skipped=True)

    if num_proc <= 1:
        _init_worker(tokenizer, template)
        for task in tasks:
            drain_skipped()
            prog.update(*_tokenize_shard(task))
        drain_skipped()
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(num_proc, initializer=_init_worker, initargs=(tokenizer, template)) as pool:
        pending: deque = deque()
        for task in tasks:
            drain_skipped()
            pending.append(pool.apply_async(_tokenize_shard, (task,)))
            while len(pending) >= 2 * num_proc:
                prog.update(*pending.popleft().get())
        while pending:
            prog.update(*pending.popleft().get())
        drain_skipped()


def _concatenate(kind: str, path: str, building: str, shard_dir: str, shard_rows: int) -> dict[str, Any]:
    """Stream the shards, in order, into tokens.bin / offsets.npy / ref_logps.npy. Returns the counts."""
    from .tokenized import _SEGMENTS, REF_COLUMNS

    k = _SEGMENTS[kind]
    names = sorted(n for n in os.listdir(shard_dir) if n.startswith(f"s{shard_rows}-") and n.endswith(".npz"))
    offsets = [np.zeros(1, dtype=np.int64)]
    refs, have = [], []
    total = 0
    with open(os.path.join(building, "tokens.bin"), "wb") as f:
        for n in names:
            with np.load(os.path.join(shard_dir, n), allow_pickle=False) as z:
                z["tokens"].tofile(f)
                offsets.append(total + np.cumsum(z["lengths"]))
                total += int(z["lengths"].sum())
                refs.append(z["ref"])
                have.append(z["has_ref"])
    offsets_a = np.concatenate(offsets)
    have_a = np.concatenate(have) if have else np.zeros(0, dtype=bool)
    if have_a.size == 0:
        raise UserError(f"{path}: no rows")
    if have_a.any() and not have_a.all():
        raise UserError(f"{path}: row {int(np.argmin(have_a))} lacks {REF_COLUMNS} that other rows have")
    np.save(os.path.join(building, "offsets.npy"), offsets_a)
    if have_a.all():
        np.save(os.path.join(building, "ref_logps.npy"), np.concatenate(refs))
    seg = np.diff(offsets_a).reshape(-1, k)
    return {"rows": int(seg.shape[0]), "tokens": total, "max_prompt_tokens": int(seg[:, 0].max()),
            "max_completion_tokens": int(seg[:, 1:].max())}


# ------------------------------------------------------------------------------------------- public
def cache_entry(kind: str, path: str, tokenizer: Any, template: TemplateConfig, cache_dir: str,
                write_memo: bool = True) -> str:
    """The directory ``<cache_dir>/<kind>-<key>`` holding (or to hold) this data set's tokens (the key:
    ``tokenized.cache_key``)."""
    from .tokenized import cache_key

    return os.path.join(cache_dir, f"{kind}-{cache_key(kind, path, tokenizer, template, cache_dir, write_memo)}")


def pretokenize(kind: str, path: str, tokenizer: Any, template: TemplateConfig, cache_dir: str,
                num_proc: int = 0, progress: bool = True, shard_rows: int = SHARD_ROWS) -> "TokenizedDataset":  # noqa: F821
    """Build (or reuse) the cache entry of ``path`` under ``cache_dir`` and open it (memory-mapped).

    ``kind``: ``"sft"`` or ``"pair"``. ``tokenizer``: a fast HF tokenizer or its directory.
    ``num_proc``: worker processes, 0 = what the cores and memory allow (``resources.worker_count``).
    Resumable: a rerun after a kill skips the finished shards.
    A second builder of the same entry waits for the first one (polling, no timeout) and takes over,
    resuming its shards, if the first one dies.
    """
    from .resources import TOKENIZE_WORKER_BYTES, worker_count
    from .templates import check_tokenizer, load_tokenizer
    from .tokenized import FORMAT_VERSION, _load, tokenizer_fingerprint

    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    check_tokenizer(tokenizer, template)
    final = cache_entry(kind, path, tokenizer, template, cache_dir)
    key = os.path.basename(final).split("-", 1)[1]
    building = os.path.join(cache_dir, f".building-{key}")
    announced = False
    while not os.path.exists(os.path.join(final, "meta.json")):
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(exclusive(os.path.join(cache_dir, f".building-{key}.lock"),
                                              f"tokenized cache {final}"))
            except UserError as held:  # another run builds it: wait; take over (resume) if it dies
                if progress and not announced:
                    print(f"tokenize {kind}: {held}; waiting for it", flush=True)
                    announced = True
                time.sleep(1.0)
                continue
            if not os.path.exists(os.path.join(final, "meta.json")):
                delay = float(os.environ.get(DELAY_ENV, "0") or 0)
                if delay > 0:
                    print(f"{DELAY_ENV}: sleeping {delay:g} s before tokenizing (test hook)", flush=True)
                    time.sleep(delay)
                _build_entry(kind, path, tokenizer, template, building, final,
                             worker_count(num_proc, TOKENIZE_WORKER_BYTES), progress, shard_rows,
                             {"tokenizer": tokenizer_fingerprint(tokenizer), "template": template.name,
                              "version": FORMAT_VERSION})
    return _load(kind, final, path, in_memory=False)


def _build_entry(kind: str, path: str, tokenizer: Any, template: TemplateConfig, building: str, final: str,
                 num_proc: int, progress: bool, shard_rows: int, meta: dict[str, Any]) -> None:
    shard_dir = os.path.join(building, "shards")
    if not os.path.exists(os.path.join(building, "meta.json")):  # else: killed between meta and rename
        os.makedirs(shard_dir, exist_ok=True)
        total = count_rows(path)
        if total is not None:  # a pool cannot help with fewer shards than workers (tiny sets: no spawn)
            num_proc = max(1, min(num_proc, -(-total // shard_rows)))
        prog = _Progress(kind, total, progress)
        if progress:
            print(f"tokenize {kind}: {path} -> {final} ({num_proc} worker(s), {shard_rows} rows a shard)",
                  flush=True)
        skipped: list[int] = []
        tasks = _shard_tasks(kind, path, shard_dir, shard_rows, skipped)
        _run_shards(tasks, tokenizer, template, num_proc, prog, skipped)
        counts = _concatenate(kind, path, building, shard_dir, shard_rows)
        prog.update(0, 0, final=True)
        tmp = os.path.join(building, "meta.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"kind": kind, "source": os.path.abspath(path), **meta, **counts}, f, indent=1)
        os.replace(tmp, os.path.join(building, "meta.json"))
    shutil.rmtree(shard_dir, ignore_errors=True)
    try:
        os.rename(building, final)
    except OSError:  # another process published the same entry first (e.g. a different cache root lock)
        if not os.path.exists(os.path.join(final, "meta.json")):
            raise
        shutil.rmtree(building, ignore_errors=True)
    with contextlib.suppress(OSError):
        sys.stdout.flush()
