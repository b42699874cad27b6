"""Streaming readers for large raw inputs (parquet and JSON Lines, single files or directories).

Inputs are split into independent chunks (a parquet row group, or a range of JSONL lines) so that
worker processes can read and process them in parallel while every row keeps a stable global index:
files are taken in sorted path order (the order ``datasets.load_dataset`` uses for a directory), rows in
file order. Blank JSONL lines are not rows; a line that is not valid JSON is a row (reported as bad).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from redi_megatron.errors import UserError

PARQUET_EXT = (".parquet",)
JSONL_EXT = (".jsonl", ".json")


@dataclass(frozen=True)
class Chunk:
    """A contiguous block of rows of one file."""

    path: str
    kind: str  # "parquet" | "jsonl"
    first_index: int  # global index of the chunk's first row
    num_rows: int
    row_in_file: int  # index of the first row inside its file
    row_group: int = -1  # parquet
    byte_start: int = 0  # jsonl
    byte_end: int = 0  # jsonl


def list_input_files(path: str) -> list[str]:
    """Sorted parquet/JSONL files under ``path`` (a file or a directory, searched recursively)."""
    if os.path.isfile(path):
        if not path.endswith(PARQUET_EXT + JSONL_EXT):
            raise UserError(f"{path}: unsupported input file type (expected .parquet, .jsonl or .json)")
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"input {path!r} does not exist")
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(os.path.join(root, n) for n in names if n.endswith(PARQUET_EXT + JSONL_EXT))
    files.sort()
    if not files:
        raise UserError(f"{path}: no .parquet, .jsonl or .json files found")
    kinds = {f.endswith(PARQUET_EXT) for f in files}
    if len(kinds) > 1:
        raise UserError(f"{path}: mixes parquet and JSON files; point to one kind")
    return files


def _parquet_file(path: str):
    """``pyarrow.parquet.ParquetFile``, or a UserError naming ``path`` when it is not parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({e})") from None


def _parquet_chunks(path: str, first_index: int) -> list[Chunk]:
    meta = _parquet_file(path).metadata
    chunks, row = [], 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        chunks.append(Chunk(path, "parquet", first_index + row, n, row, row_group=g))
        row += n
    return chunks


def _jsonl_chunks(path: str, first_index: int, rows_per_chunk: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    start, offset, rows, row_in_file = 0, 0, 0, 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                rows += 1
            offset += len(line)
            if rows == rows_per_chunk:
                chunks.append(Chunk(path, "jsonl", first_index + row_in_file, rows, row_in_file, -1, start, offset))
                row_in_file += rows
                start, rows = offset, 0
    if rows:
        chunks.append(Chunk(path, "jsonl", first_index + row_in_file, rows, row_in_file, -1, start, offset))
    return chunks


def plan_chunks(files: Sequence[str], rows_per_chunk: int = 512) -> list[Chunk]:
    """Chunks covering every row of ``files`` in order."""
    chunks: list[Chunk] = []
    total = 0
    for path in files:
        new = _parquet_chunks(path, total) if path.endswith(PARQUET_EXT) else _jsonl_chunks(path, total, rows_per_chunk)
        chunks.extend(new)
        total += sum(c.num_rows for c in new)
    return chunks


def file_columns(path: str) -> list[str]:
    """Column names of a file (JSONL: keys of its first row that parses as an object)."""
    if path.endswith(PARQUET_EXT):
        return list(_parquet_file(path).schema_arrow.names)
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return list(obj.keys())
    raise UserError(f"{path}: no JSON object found to detect the schema from")


# A row as read: the parsed object, or an error string when the line is not valid JSON.
RawRow = tuple[Optional[dict[str, Any]], str]


def read_chunk(chunk: Chunk, columns: Sequence[str], batch_rows: int = 256) -> Iterator[list[RawRow]]:
    """Rows of one chunk in order, in lists of up to ``batch_rows``."""
    if chunk.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(chunk.path)
        cols = [c for c in columns if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[chunk.row_group], columns=cols):
            yield [(r, "") for r in batch.to_pylist()]
        return
    out: list[RawRow] = []
    with open(chunk.path, "rb") as f:
        f.seek(chunk.byte_start)
        data = f.read(chunk.byte_end - chunk.byte_start)
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            out.append((obj, "") if isinstance(obj, dict) else (None, "line is not a JSON object"))
        except ValueError as e:
            out.append((None, f"invalid JSON: {str(e)[:80]}"))
        if len(out) == batch_rows:
            yield out
            out = []
    if out:
        yield out
