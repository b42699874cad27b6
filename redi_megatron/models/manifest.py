"""Checkpoint manifests: every file's size and CRC-32, written last, verified before anything is loaded.

A checkpoint directory is only trusted when its ``manifest.json`` matches the files on disk, so a
truncated or corrupted shard is reported by name before torch's loaders (which unpickle metadata)
touch it, and resume can fall back to the previous checkpoint. This protects against damage, not
against malice: a manifest is no signature, and loading a checkpoint runs code from it (pickle), so
load only checkpoints you trust (docs/checkpoints.md).
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

from redi_megatron.errors import UserError
from redi_megatron.outputs import MARKER

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 8 << 20


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            crc = zlib.crc32(block, crc)
    return crc


def write_manifest(ckpt_dir: str | Path) -> Path:
    """Record every file under ``ckpt_dir`` (relative path -> size, CRC-32); call when all are written."""
    root = Path(ckpt_dir)
    files = {}
    skip = {MANIFEST_FILE, MARKER}  # the staging marker is gone once the directory is published
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in skip):
        files[path.relative_to(root).as_posix()] = {"size": path.stat().st_size, "crc32": _crc32(path)}
    out = root / MANIFEST_FILE
    tmp = root / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps({"version": MANIFEST_VERSION, "files": files}, indent=1) + "\n")
    os.replace(tmp, out)
    return out


def verify_manifest(ckpt_dir: str | Path, trust_unverified: bool = False) -> None:
    """UserError naming the first missing, truncated or corrupted file of ``ckpt_dir``; a checkpoint
    without a manifest (an older version, or not ours) is refused unless ``trust_unverified``."""
    root = Path(ckpt_dir)
    path = root / MANIFEST_FILE
    if not path.is_file():
        if trust_unverified:
            return
        raise UserError(f"{root}: no {MANIFEST_FILE}, so its files cannot be verified (incomplete, or written "
                        "by an older version); if you trust its source, pass checkpoint.trust_unverified=true "
                        "(redi-train) or --trust-unverified (converters)")
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a valid manifest ({e})") from None
    for rel, want in files.items():
        f = root / rel
        if not f.is_file():
            raise UserError(f"{root}: {rel} is missing")
        size = f.stat().st_size
        if size != want["size"]:
            raise UserError(f"{root}: {rel} has {size} bytes, the manifest says {want['size']} (truncated or "
                            "overwritten)")
        if _crc32(f) != want["crc32"]:
            raise UserError(f"{root}: {rel} is corrupted (CRC-32 differs from the manifest)")
