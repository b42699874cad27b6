"""Hugging Face side of the conversion: config.json <-> ModelConfig, streaming safetensors I/O."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from redi_megatron.convert.mappings import (
    CONFIG_FIELDS,
    LLAMA3_ROPE_FIELDS,
    OVERRIDABLE,
    Family,
    family_for_architecture,
    family_for_config,
)
from redi_megatron.errors import UserError
from redi_megatron.models.checkpoint import read_json
from redi_megatron.models.config import ModelConfig
from redi_megatron.typed import Checker, hints

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# ---------------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# ---------------------------------------------------------------------------------------------------

def _rope(hf_cfg: Any) -> dict[str, Any]:
    # transformers 5 keeps RoPE settings in rope_parameters; 4.x in rope_theta + rope_scaling.
    params = dict(getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["rope_theta=300000", ...]`` -> typed ModelConfig values; only shape-neutral fields.

    Values are read as YAML scalars and typed by ``redi_megatron.typed`` against ModelConfig, as a
    config file's would be (``300000`` widens to a float; ``1e6`` is a float; ``32768.0`` is not an int)."""
    import yaml

    checker = Checker()
    fields = hints(ModelConfig)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise UserError(f"--override {item!r}: expected FIELD=VALUE")
        if key not in OVERRIDABLE:
            raise UserError(f"--override {key}: not an overridable field (allowed: "
                             f"{', '.join(OVERRIDABLE)}; others would change tensor shapes)")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, str):  # YAML 1.1 reads 1e6 as a string; a number was meant
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key] = checker.check(parsed, fields[key], key, f"--override {item!r}")
    return out


def read_hf_config(hf_dir: str | Path, overrides: Optional[dict[str, Any]] = None
                   ) -> tuple[Family, ModelConfig, dict[str, Any]]:
    """Family, ModelConfig (with overrides applied) and the raw config.json of an HF model directory."""
    from transformers import AutoConfig

    path = Path(hf_dir) / "config.json"
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    family = family_for_architecture(raw.get("architectures"), raw.get("model_type"), str(path))
    hf_cfg = AutoConfig.from_pretrained(str(hf_dir))
    rope = _rope(hf_cfg)
    for key, wanted in family.requires:
        value = getattr(hf_cfg, key, wanted)
        if value != wanted:
            raise UserError(f"{path}: {key}={value!r} is not supported for {family.name} "
                             f"(the Megatron model needs {key}={wanted!r})")
    if rope["rope_type"] not in family.rope_types:
        raise UserError(f"{path}: rope_type={rope['rope_type']!r} is not supported for {family.name} "
                         f"(supported: {', '.join(family.rope_types)})")
    values: dict[str, Any] = {field: getattr(hf_cfg, key) for field, key in CONFIG_FIELDS}
    if values["num_query_groups"] is None:
        values["num_query_groups"] = values["num_attention_heads"]
    head_dim = getattr(hf_cfg, "head_dim", None)
    if head_dim and head_dim * values["num_attention_heads"] != values["hidden_size"]:
        values["kv_channels"] = head_dim
    values.update(family=family.name, add_qkv_bias=family.add_qkv_bias, qk_layernorm=family.qk_layernorm,
                  rope_theta=float(rope["rope_theta"]), rope_type=rope["rope_type"])
    if rope["rope_type"] == "llama3":
        missing = [key for _, key in LLAMA3_ROPE_FIELDS if key not in rope]
        if missing:
            raise UserError(f"{path}: rope_scaling of type 'llama3' lacks {', '.join(missing)}")
        values.update({field: rope[key] for field, key in LLAMA3_ROPE_FIELDS})
        values["rope_scaling_factor"] = float(values["rope_scaling_factor"])
        values["rope_low_freq_factor"] = float(values["rope_low_freq_factor"])
        values["rope_high_freq_factor"] = float(values["rope_high_freq_factor"])
    values.update(overrides or {})
    return family, ModelConfig(**values), raw


def _rope_for_export(cfg: ModelConfig, source: Any) -> dict[str, Any]:
    """transformers 5's ``rope_parameters``; 4.x reads the same keys (less ``rope_theta``) as ``rope_scaling``."""
    out = dict(source) if isinstance(source, dict) else {}
    for _, key in LLAMA3_ROPE_FIELDS:
        out.pop(key, None)
    out.pop("type", None)
    out.update(rope_theta=cfg.rope_theta, rope_type=cfg.rope_type)
    if cfg.rope_type == "llama3":
        out.update({key: getattr(cfg, field) for field, key in LLAMA3_ROPE_FIELDS})
    return out


def hf_dtype(raw: dict[str, Any]) -> Optional[str]:
    """The dtype config.json declares (``dtype`` in transformers 5, ``torch_dtype`` before), if any."""
    value = raw.get("dtype") or raw.get("torch_dtype")
    return value if isinstance(value, str) else None


def hf_config_for_export(cfg: ModelConfig, dtype: torch.dtype, source: Optional[dict[str, Any]]
                         ) -> dict[str, Any]:
    """config.json for an exported model: the source config with every converted field refreshed.

    Written readable by transformers 4.x (vLLM) and 5.x: ``rope_theta`` and ``torch_dtype`` at top
    level as well as 5.x's ``rope_parameters`` and ``dtype``.
    """
    from transformers import AutoConfig

    family = family_for_config(cfg)
    if source is None:
        source = AutoConfig.for_model(family.model_type, num_hidden_layers=cfg.num_layers).to_dict()
    out = {k: v for k, v in source.items() if k not in ("_name_or_path", "transformers_version")}
    out.update({key: getattr(cfg, field) for field, key in CONFIG_FIELDS})
    out.update(architectures=[family.architectures[0]], model_type=family.model_type,
               rope_theta=cfg.rope_theta, hidden_act="silu")
    if cfg.kv_channels is not None or "head_dim" in out:
        out["head_dim"] = cfg.head_dim
    out["rope_parameters"] = _rope_for_export(cfg, out.get("rope_parameters"))
    out["rope_scaling"] = {k: v for k, v in out["rope_parameters"].items() if k != "rope_theta"} \
        if cfg.rope_type != "default" else None
    name = str(dtype).removeprefix("torch.")
    out.update(dtype=name, torch_dtype=name)
    return out


# ---------------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
              "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int                          # absolute byte offset in the file


def _pread_into(fd: int, buf: torch.Tensor, offset: int) -> None:
    view, done = memoryview(buf.numpy()).cast("B"), 0
    while done < len(view):  # Linux returns at most ~2 GiB per call
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise UserError(f"unexpected end of file at byte {offset + done}")
        done += n


class _SafetensorsFile:
    """One .safetensors file read with ``pread`` (not mmap: the pages then do not count as this
    process's memory, and only the requested bytes are read)."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        self.fd = os.open(path, os.O_RDONLY)
        head = os.pread(self.fd, 8, 0)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise UserError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(os.pread(self.fd, n, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: unreadable safetensors header: {e}") from e
        self.entries: dict[str, _Entry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape = _ST_DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(f"{path}: bad header entry for tensor {name!r}: {info!r}") from e
            nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
            if end - begin != nbytes or 8 + n + end > size:
                raise UserError(f"{path}: tensor {name!r} has {end - begin} bytes at [{begin}, {end}), "
                                 f"its shape {list(shape)} needs {nbytes} (truncated or corrupt file?)")
            self.entries[name] = _Entry(dtype, shape, 8 + n + begin)

    def read(self, name: str, dim: Optional[int], start: int, stop: Optional[int]) -> torch.Tensor:
        e = self.entries[name]
        if dim not in (None, 0):
            return self.read(name, None, 0, None).narrow(dim, start, (stop or e.shape[dim]) - start).clone()
        rows = e.shape[0] if e.shape else 1
        start, stop = (0, rows) if dim is None else (start, rows if stop is None else stop)
        assert 0 <= start <= stop <= rows, (name, start, stop, e.shape)
        itemsize = torch.tensor([], dtype=e.dtype).element_size()
        row_bytes = math.prod(e.shape[1:]) * itemsize
        buf = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        _pread_into(self.fd, buf, e.offset + start * row_bytes)
        shape = e.shape if dim is None else (stop - start, *e.shape[1:])
        return buf.view(e.dtype).reshape(shape)

    def close(self) -> None:
        os.close(self.fd)


class SafetensorsReader:
    """Tensors of an HF directory (one file or an index of shards), read lazily, slice by slice."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise UserError(f"{self.dir} has no *.safetensors files (PyTorch .bin checkpoints are "
                                 f"not supported: re-save with save_pretrained(safe_serialization=True))")
            weight_map = None
        self._files: dict[str, _SafetensorsFile] = {}
        self.file_of: dict[str, str] = {}
        for name in files:
            if not (self.dir / name).is_file():
                raise UserError(f"{index}: refers to missing shard {name}")
            self._files[name] = _SafetensorsFile(self.dir / name)
            for key in self._files[name].entries:
                if key in self.file_of:
                    raise UserError(f"tensor {key!r} appears in both {self.file_of[key]} and {name}")
                self.file_of[key] = name
        if weight_map is not None:
            wrong = [k for k, f in weight_map.items() if self.file_of.get(k) != f]
            if wrong:
                raise UserError(f"{index}: tensor {wrong[0]!r} is not in {weight_map[wrong[0]]}")

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self.file_of[name]].entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._files[self.file_of[name]].entries[name].dtype

    def where(self, name: str) -> str:
        return str(self.dir / self.file_of[name])

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None
             ) -> torch.Tensor:
        """The tensor, or rows ``[start, stop)`` along ``dim`` (dim 0 reads only those bytes)."""
        return self._files[self.file_of[name]].read(name, dim, start, stop)

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def parse_size(text: str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"123"`` -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            t, mult = t[: -len(unit)], factor
            break
    else:
        mult = 1
    try:
        return int(float(t) * mult)
    except ValueError as e:
        raise UserError(f"--max-shard-size {text!r}: expected a size like 5GB or 500MB") from e


class StreamingSafetensorsWriter:
    """Writes HF-style safetensors shards tensor by tensor, holding none of them.

    The full list of (name, shape, dtype) is known up front (from the mapping table), so each shard's
    header is written first and every tensor's bytes go straight to disk when it arrives. Names follow
    ``save_pretrained``: ``model.safetensors`` alone, or ``model-0000i-of-0000N.safetensors`` + index.
    """

    def __init__(self, out_dir: str | Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int):
        self.dir = Path(out_dir)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        n = len(shards)
        self.file_names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                        for i in range(n)]
        self.shards = shards
        self.queue = [(i, name, shape, dtype)
                      for i, shard in enumerate(shards) for name, shape, dtype, _ in shard]
        self.position = 0
        self.handle = None
        self.total = sum(nbytes for shard in shards for *_, nbytes in shard)

    def _open(self, i: int) -> None:
        if self.handle is not None:
            self.handle.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in self.shards[i]:
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.handle = open(self.dir / self.file_names[i], "wb")
        self.handle.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must come in plan order with the planned shape and dtype."""
        assert self.position < len(self.queue), f"tensor {name!r} is not in the plan"
        shard, want, shape, dtype = self.queue[self.position]
        assert (name, tuple(tensor.shape), tensor.dtype) == (want, shape, dtype), \
            (name, tuple(tensor.shape), tensor.dtype, want, shape, dtype)
        if self.position == 0 or self.queue[self.position - 1][0] != shard:
            self._open(shard)
        if tensor.numel():
            self.handle.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.position += 1

    def abort(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def close(self) -> list[str]:
        """Finish; returns the files written. Every planned tensor must have been written."""
        assert self.position == len(self.queue), f"only {self.position} of {len(self.queue)} tensors written"
        if self.handle is not None:
            self.handle.close()
        if len(self.file_names) == 1:
            return list(self.file_names)
        weight_map = {name: self.file_names[i] for i, name, _, _ in self.queue}
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return self.file_names + [INDEX_FILE]
