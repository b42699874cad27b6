"""Tokenized training datasets built from the curated outputs, cached on disk.

``build_sft_dataset`` reads positives (``problem`` + ``completion``, or the authors' ``messages`` =
[user, assistant]); ``build_pair_dataset`` reads pairs (``problem`` + ``chosen`` + ``rejected`` as strings,
or the authors' DPO rows whose ``chosen``/``rejected`` are [user, assistant] message lists), plus optional
``chosen_ref_logp``/``rejected_ref_logp`` columns. Input: an HF dataset saved with ``save_to_disk``
(a ``DatasetDict`` uses its ``train`` split) or a JSONL file.

Token ids live in one flat int32 array, memory-mapped from the cache, with ``offsets`` marking the
segments of each sample: SFT = (prompt, completion), pair = (prompt, chosen, rejected). The cache key
hashes the input files' content (memoized by path, size and mtime), the tokenizer (its full serialized
form), the template and the format version, so any change rebuilds and a copy of the data reuses it.
Entries are built by ``pretokenize`` (sharded, parallel, resumable). Build on one rank in multi-rank
jobs; the others wait by polling (``wait=True``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, Optional, Union

import numpy as np

from redi_megatron.errors import UserError

from .batch import ROLE_CHOSEN, ROLE_REJECTED, ROLE_SFT, SequenceSpec
from .templates import TemplateConfig, check_tokenizer, load_tokenizer

FORMAT_VERSION = 1
KIND_SFT, KIND_PAIR = "sft", "pair"
_SEGMENTS = {KIND_SFT: 2, KIND_PAIR: 3}
REF_COLUMNS = ("chosen_ref_logp", "rejected_ref_logp")
ROWS_PER_TASK = 1000


def default_cache_dir() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "redi_megatron", "tokenized")
    return os.environ.get("REDI_DATA_CACHE", default)


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            return True
    except OSError:
        return False


def shared_cache_dir(cache_dir: str, train_path: str, fallback: str, announce: bool = True) -> str:
    """The tokenized cache root a run uses: ``cache_dir`` when set; else ``$REDI_DATA_CACHE``; else
    ``tokenized/`` beside the curated data (``dirname(train_path)``: positives and pairs curated together
    share it, so stage 2 and the other losses reuse what stage 1 or ``redi-tokenize`` built); else, when
    that directory is not writable, ``fallback`` (one printed line says so when ``announce``)."""
    if cache_dir:
        return cache_dir
    if os.environ.get("REDI_DATA_CACHE"):
        return os.environ["REDI_DATA_CACHE"]
    beside = os.path.join(os.path.dirname(os.path.abspath(train_path.rstrip("/"))), "tokenized")
    if _writable_dir(beside):
        return beside
    if announce:
        print(f"tokenized cache: {beside} is not writable; using {fallback} (set data.cache_dir to share one)",
              flush=True)
    return fallback


class TokenizedDataset:
    """Samples of prompt/completion token ids. ``kind`` is ``"sft"`` or ``"pair"``."""

    def __init__(self, kind: str, tokens: np.ndarray, offsets: np.ndarray, ref_logps: Optional[np.ndarray],
                 source: str, cache_path: Optional[str] = None) -> None:
        k = _SEGMENTS[kind]
        assert (offsets.shape[0] - 1) % k == 0, "offsets do not split into whole samples"
        self.kind, self.tokens, self.offsets = kind, tokens, offsets
        self.source, self.cache_path = source, cache_path
        self._k = k
        seg = np.diff(offsets).reshape(-1, k)
        self._prompt_len = seg[:, 0]
        self._completion_len = seg[:, 1:]
        self._rows: Optional[np.ndarray] = None  # stored row of each sample after select(); None = identity
        self.ref_logps = ref_logps

    def select(self, indices: Any) -> "TokenizedDataset":
        """A view of the samples ``indices`` (int ``[m]``, unique, in the order given), renumbered 0..m-1.

        The cache on disk is untouched (it holds every sample); the view shares its memory map. Sample ids
        in batches are positions in the view, exactly as if the data had been filtered before tokenizing;
        ``source_rows()`` maps them back to rows of the stored data."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"select: indices outside [0, {len(self)})")
        if np.unique(idx).size != idx.size:
            raise ValueError("select: repeated indices")
        view = copy.copy(self)
        view._rows = self.source_rows()[idx]
        view._prompt_len, view._completion_len = self._prompt_len[idx], self._completion_len[idx]
        view._ref_logps = None if self._ref_logps is None else self._ref_logps[idx]
        return view

    def source_rows(self) -> np.ndarray:
        """Row of the stored (tokenized) data of each sample, int64 ``[n]``."""
        return np.arange(len(self), dtype=np.int64) if self._rows is None else self._rows.copy()

    def __len__(self) -> int:
        return int(self._prompt_len.shape[0])

    @property
    def ref_logps(self) -> Optional[np.ndarray]:
        """Reference summed log-probs ``[n, 2]`` float64 (chosen, rejected), or None."""
        return self._ref_logps

    @ref_logps.setter
    def ref_logps(self, values: Optional[np.ndarray]) -> None:
        # Assigned after a reference pass too: check it, since a wrong shape would silently misalign pairs.
        if values is not None:
            values = np.asarray(values, dtype=np.float64)
            if self.kind != KIND_PAIR or values.shape != (len(self), 2):
                raise UserError(f"ref_logps must be [{len(self)}, 2] for a pair dataset, got {values.shape} "
                                 f"for a {self.kind} dataset")
            if not np.isfinite(values).all():
                first = int(np.argwhere(~np.isfinite(values))[0][0])
                raise UserError(f"ref_logps has non-finite values, e.g. sample {first}")
        self._ref_logps = values

    @property
    def has_ref_logps(self) -> bool:
        return self.ref_logps is not None

    def seq_lengths(self) -> np.ndarray:
        """Total length (prompt + completion) of each sequence, int64 ``[n, 1]`` (SFT) or ``[n, 2]`` (pair)."""
        return self._prompt_len[:, None] + self._completion_len

    def loss_token_counts(self) -> np.ndarray:
        """Completion length of each sequence, int64 ``[n, 1]`` or ``[n, 2]``."""
        return self._completion_len.copy()

    def _segment(self, i: int, j: int) -> np.ndarray:
        s = (i if self._rows is None else int(self._rows[i])) * self._k + j
        return np.asarray(self.tokens[self.offsets[s]:self.offsets[s + 1]], dtype=np.int64)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        out: dict[str, Any] = {"sample_id": i, "prompt_ids": self._segment(i, 0)}
        if self.kind == KIND_SFT:
            out["completion_ids"] = self._segment(i, 1)
        else:
            out["chosen_ids"], out["rejected_ids"] = self._segment(i, 1), self._segment(i, 2)
            if self.ref_logps is not None:
                out["chosen_ref_logp"], out["rejected_ref_logp"] = map(float, self.ref_logps[i])
        return out

    def sequences(self, i: int) -> list[SequenceSpec]:
        """The sequences of sample ``i`` (SFT: one; pair: chosen then rejected)."""
        prompt = self._segment(i, 0)
        P = int(prompt.shape[0])
        if self.kind == KIND_SFT:
            return [SequenceSpec(np.concatenate([prompt, self._segment(i, 1)]), P, ROLE_SFT, i)]
        refs = (None, None) if self.ref_logps is None else tuple(float(x) for x in self.ref_logps[i])
        return [
            SequenceSpec(np.concatenate([prompt, self._segment(i, 1)]), P, ROLE_CHOSEN, i, refs[0]),
            SequenceSpec(np.concatenate([prompt, self._segment(i, 2)]), P, ROLE_REJECTED, i, refs[1]),
        ]


# ----------------------------------------------------------------------------------------- reading
def _is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")
    )


def iter_rows(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row index, row) of an HF dataset on disk or a JSONL file."""
    if _is_hf_dir(path):
        import datasets

        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds and len(ds) != 1:
                raise UserError(f"{path}: DatasetDict without a 'train' split ({list(ds)})")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        i = 0
        for batch in ds.iter(batch_size=ROWS_PER_TASK):
            keys = list(batch)
            for j in range(len(batch[keys[0]])):
                yield i, {k: batch[k][j] for k in keys}
                i += 1
        return
    if not os.path.isfile(path):
        raise UserError(f"{path}: neither an HF dataset directory (save_to_disk) nor a JSONL file")
    with open(path, "rb") as f:
        i = 0
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}: line {line_no} is not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}: line {line_no} is not a JSON object")
            yield i, row
            i += 1


def _message_pair(value: Any, where: str, col: str) -> tuple[str, str]:
    """(user content, assistant content) of a [user, assistant] message list."""
    if (isinstance(value, list) and len(value) == 2 and all(isinstance(m, dict) for m in value)
            and value[0].get("role") == "user" and value[1].get("role") == "assistant"):
        return value[0].get("content"), value[1].get("content")
    raise UserError(f"{where}: {col} must be a string or a [user, assistant] message list")


def _text(value: Any, where: str, col: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {col} is missing, empty or not a string")
    return value


def _extract(kind: str, row: dict[str, Any], where: str) -> tuple[list[str], Optional[tuple[float, float]]]:
    """[problem, completion(s)...] and the optional reference log-probs of one row."""
    if kind == KIND_SFT:
        if "completion" in row or "problem" in row:
            return [_text(row.get("problem"), where, "problem"),
                    _text(row.get("completion"), where, "completion")], None
        user, reply = _message_pair(row.get("messages"), where, "messages")
        return [_text(user, where, "messages[0].content"), _text(reply, where, "messages[1].content")], None
    texts = []
    for col in ("chosen", "rejected"):
        v = row.get(col)
        if isinstance(v, list):
            user, v = _message_pair(v, where, col)
            problem = row.get("problem") if isinstance(row.get("problem"), str) else user
            if user != problem:
                raise UserError(f"{where}: {col} user turn differs from the problem")
        texts.append(_text(v, where, col))
    problem = row.get("problem", row.get("prompt"))
    if problem is None and isinstance(row.get("chosen"), list):
        problem = row["chosen"][0].get("content")
    texts.insert(0, _text(problem, where, "problem"))
    present = [c for c in REF_COLUMNS if row.get(c) is not None]
    if not present:
        return texts, None
    refs = []
    for c in REF_COLUMNS:
        v = row.get(c)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v):
            raise UserError(f"{where}: {c} must be a finite number when reference log-probs are given, got {v!r}")
        refs.append(float(v))
    return texts, (refs[0], refs[1])


# ------------------------------------------------------------------------------------ cache key
HASH_MEMO = ".content-hashes.json"


def _data_files(path: str) -> list[str]:
    path = os.path.abspath(path)
    return [path] if os.path.isfile(path) else sorted(
        os.path.join(r, n) for r, _, ns in os.walk(path) for n in ns if not n.startswith(".")
    )


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def content_hash(path: str, memo_dir: Optional[str] = None, write_memo: bool = True) -> str:
    """sha256 over the data files' content (and, for a directory, their relative names).

    Each file's hash is memoized by (absolute path, size, mtime_ns) in ``<memo_dir>/.content-hashes.json``,
    so a 1 GB file is read once, not at every start; an edited file (new size or mtime) is hashed again.
    A copy of the file elsewhere has the same content hash, so it finds the same cache entry.
    ``write_memo=False``: read the memo but never write it (ranks that only wait for the builder)."""
    memo_path = os.path.join(memo_dir, HASH_MEMO) if memo_dir else None
    memo: dict[str, Any] = {}
    if memo_path and os.path.exists(memo_path):
        try:
            with open(memo_path) as f:
                memo = json.load(f)
            memo = memo if isinstance(memo, dict) else {}
        except (OSError, ValueError):
            memo = {}  # a torn or foreign file: rebuilt below
    root = os.path.abspath(path)
    h = hashlib.sha256()
    changed = False
    for f in _data_files(path):
        st = os.stat(f)
        entry = memo.get(f)
        if not (isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
                and isinstance(entry.get("sha256"), str)):
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _file_sha256(f)}
            memo[f], changed = entry, True
        h.update(json.dumps([os.path.relpath(f, root) if f != root else "", entry["sha256"]]).encode())
    if changed and memo_path and write_memo:
        try:  # best effort: a read-only cache still works, it only hashes again next time
            os.makedirs(memo_dir, exist_ok=True)
            tmp = f"{memo_path}.tmp-{os.getpid()}"
            with open(tmp, "w") as fh:
                json.dump(memo, fh)
            os.replace(tmp, memo_path)
        except OSError:
            pass
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's serialized vocabulary, merges, added tokens and special-token map."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(kind: str, path: str, tokenizer: Any, template: TemplateConfig, memo_dir: Optional[str] = None,
              write_memo: bool = True) -> str:
    """Key of a cache entry: the data's content, the tokenizer, the template and the format version.
    Length limits are not in it: an entry holds every sample, with its lengths."""
    blob = json.dumps({
        "version": FORMAT_VERSION, "kind": kind, "content": content_hash(path, memo_dir, write_memo),
        "tokenizer": tokenizer_fingerprint(tokenizer), "template": asdict(template),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load_npy(path: str, remedy: str) -> np.ndarray:
    """A plain numeric ``.npy`` array; never unpickles (an object array is refused, no code runs).
    A crafted, torn or non-numeric file is a one-line UserError naming it, ending with ``remedy``."""
    try:
        values = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a plain numeric .npy array ({str(e).splitlines()[0]}); {remedy}") from None
    if not isinstance(values, np.ndarray) or values.dtype.kind not in "biuf":
        raise UserError(f"{path}: not a plain numeric .npy array (dtype {getattr(values, 'dtype', '?')}); {remedy}")
    return values


def _load(kind: str, d: str, source: str, in_memory: bool) -> TokenizedDataset:
    remedy = f"delete the cache directory {d} and rerun to rebuild it"
    offsets = load_npy(os.path.join(d, "offsets.npy"), remedy)
    tpath = os.path.join(d, "tokens.bin")
    if offsets[-1] == 0:
        tokens = np.zeros(0, dtype=np.int32)
    elif in_memory:
        tokens = np.fromfile(tpath, dtype=np.int32)
    else:
        tokens = np.memmap(tpath, dtype=np.int32, mode="r")
    if tokens.shape[0] != offsets[-1]:  # a torn write or a truncated copy
        raise UserError(f"{tpath}: {tokens.shape[0]} tokens, offsets.npy expects {int(offsets[-1])} (truncated?); "
                        f"{remedy}")
    rpath = os.path.join(d, "ref_logps.npy")
    refs = load_npy(rpath, remedy) if os.path.exists(rpath) else None
    return TokenizedDataset(kind, tokens, offsets, refs, source, None if in_memory else d)


def _wait_for(final: str, poll_s: float, progress: bool) -> None:
    """Wait, by polling the file system, until another process publishes ``final`` (its meta.json).

    Used by ranks that do not tokenize: a file poll has no timeout, unlike a collective (a barrier under
    a 600 s process-group timeout killed paper-scale runs). If the builder dies, the launcher ends us."""
    start = last = time.monotonic()
    while not os.path.exists(os.path.join(final, "meta.json")):
        now = time.monotonic()
        if progress and now - last >= 60:
            print(f"waiting for the tokenized cache {final} ({now - start:.0f} s)", flush=True)
            last = now
        time.sleep(poll_s)


def _build(kind: str, path: str, tokenizer: Any, template: Optional[TemplateConfig],
           cache_dir: Union[str, bool, None], num_proc: int, progress: bool,
           wait: bool = False, poll_s: float = 1.0) -> TokenizedDataset:
    from .pretokenize import cache_entry, pretokenize

    template = template or TemplateConfig()
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    check_tokenizer(tokenizer, template)
    if not os.path.exists(path):
        raise UserError(f"dataset path {path!r} does not exist")
    if cache_dir is False:
        with tempfile.TemporaryDirectory() as tmp:
            ds = pretokenize(kind, path, tokenizer, template, tmp, num_proc, progress)
            return _load(kind, ds.cache_path, path, in_memory=True)
    root = default_cache_dir() if cache_dir in (None, True) else str(cache_dir)
    if wait:
        final = cache_entry(kind, path, tokenizer, template, root, write_memo=False)
        _wait_for(final, poll_s, progress)
        return _load(kind, final, path, in_memory=False)
    return pretokenize(kind, path, tokenizer, template, root, num_proc, progress)


def build_sft_dataset(path: str, tokenizer: Any, template: Optional[TemplateConfig] = None,
                      cache_dir: Union[str, bool, None] = None, num_proc: int = 1,
                      progress: bool = True, wait: bool = False) -> TokenizedDataset:
    """Tokenize curated positives for the SFT stage.

    ``tokenizer``: a fast HF tokenizer or its directory. ``cache_dir``: None = ``$REDI_DATA_CACHE`` or
    ``~/.cache/redi_megatron/tokenized``; False = no cache (arrays held in memory). ``num_proc``: worker
    processes (0 = what the cores and memory allow); more than 1 spawns processes (call it under
    ``if __name__ == "__main__":`` then). The build is sharded and resumable (``pretokenize``).
    ValueError (naming the file and row) on a missing or empty field. ``wait=True``: do not tokenize;
    poll (no timeout) until another process publishes this cache entry, then open it.
    """
    return _build(KIND_SFT, path, tokenizer, template, cache_dir, num_proc, progress, wait=wait)


def build_pair_dataset(path: str, tokenizer: Any, template: Optional[TemplateConfig] = None,
                       cache_dir: Union[str, bool, None] = None, num_proc: int = 1,
                       progress: bool = True, wait: bool = False) -> TokenizedDataset:
    """Tokenize curated pairs for the REDI stage (chosen and rejected share the prompt).

    Optional ``chosen_ref_logp``/``rejected_ref_logp`` columns (DPO reference summed log-probs) are
    kept as ``ref_logps`` ``[n, 2]``; they must be present and finite in every row or in none.
    """
    return _build(KIND_PAIR, path, tokenizer, template, cache_dir, num_proc, progress, wait=wait)
