"""Hugging Face side of the conversion: config.json <-> ModelConfig, streaming safetensors I/O."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from checkpoint_tools.mappings import (CONFIG_FIELDS, OVERRIDABLE, Family, family_for_architecture,
                                       family_for_config)
from redi_megatron.models.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


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
    """``["rope_theta=300000", ...]`` -> typed ModelConfig values; only shape-neutral fields."""
    # ModelConfig's annotations are strings (postponed evaluation); the overridable ones are scalars.
    scalars = {"int": int, "float": float, int: int, float: float}
    types = {f.name: scalars[f.type] for f in dataclasses.fields(ModelConfig) if f.name in OVERRIDABLE}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise ValueError(f"--override {item!r}: expected FIELD=VALUE")
        if key not in OVERRIDABLE:
            raise ValueError(f"--override {key}: not an overridable field (allowed: {', '.join(OVERRIDABLE)}; "
                             f"others would change tensor shapes)")
        kind = types[key]
        try:
            out[key] = kind(float(value)) if kind is int and float(value).is_integer() else kind(value)
        except ValueError as e:
            raise ValueError(f"--override {key}={value!r}: not a valid {kind.__name__}") from e
    return out


def read_hf_config(hf_dir: str | Path, overrides: Optional[dict[str, Any]] = None
                   ) -> tuple[Family, ModelConfig, dict[str, Any]]:
    """Family, ModelConfig (with overrides applied) and the raw config.json of an HF model directory."""
    from transformers import AutoConfig

    path = Path(hf_dir) / "config.json"
    raw = _load_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    family = family_for_architecture(raw.get("architectures"), raw.get("model_type"), str(path))
    hf_cfg = AutoConfig.from_pretrained(str(hf_dir))
    rope = _rope(hf_cfg)
    for key, wanted in family.requires:
        value = rope.get(key) if key == "rope_type" else getattr(hf_cfg, key, wanted)
        if value != wanted:
            raise ValueError(f"{path}: {key}={value!r} is not supported for {family.name} "
                             f"(the Megatron model needs {key}={wanted!r})")
    values: dict[str, Any] = {field: getattr(hf_cfg, key) for field, key in CONFIG_FIELDS}
    if values["num_query_groups"] is None:
        values["num_query_groups"] = values["num_attention_heads"]
    head_dim = getattr(hf_cfg, "head_dim", None)
    if head_dim and head_dim * values["num_attention_heads"] != values["hidden_size"]:
        values["kv_channels"] = head_dim
    values.update(family=family.name, add_qkv_bias=family.add_qkv_bias, rope_theta=float(rope["rope_theta"]))
    values.update(overrides or {})
    return family, ModelConfig(**values), raw


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
    if isinstance(out.get("rope_parameters"), dict):
        out["rope_parameters"] = {**out["rope_parameters"], "rope_theta": cfg.rope_theta}
    else:
        out["rope_parameters"] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    name = str(dtype).removeprefix("torch.")
    out.update(dtype=name, torch_dtype=name)
    return out


# ---------------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------------

class SafetensorsReader:
    """Tensors of an HF directory (one file or an index of shards), read lazily, slice by slice."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = _load_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{self.dir} has no *.safetensors files (PyTorch .bin checkpoints are "
                                 f"not supported: re-save with save_pretrained(safe_serialization=True))")
            weight_map = None
        self._handles = {}
        self.file_of: dict[str, str] = {}
        for name in files:
            if not (self.dir / name).is_file():
                raise ValueError(f"{index}: refers to missing shard {name}")
            handle = safe_open(str(self.dir / name), framework="pt")
            self._handles[name] = handle
            for key in handle.keys():
                if key in self.file_of:
                    raise ValueError(f"tensor {key!r} appears in both {self.file_of[key]} and {name}")
                self.file_of[key] = name
        if weight_map is not None:
            missing = [k for k, f in weight_map.items() if self.file_of.get(k) != f]
            if missing:
                raise ValueError(f"{index}: tensor {missing[0]!r} is not in {weight_map[missing[0]]}")

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

    def where(self, name: str) -> str:
        return str(self.dir / self.file_of[name])

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None
             ) -> torch.Tensor:
        """The tensor, or rows/columns ``[start, stop)`` of it along ``dim`` (only those are read)."""
        handle = self._handles[self.file_of[name]]
        if dim is None:
            return handle.get_tensor(name)
        index = (slice(None),) * dim + (slice(start, stop),)
        return handle.get_slice(name)[index]


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
        raise ValueError(f"--max-shard-size {text!r}: expected a size like 5GB or 500MB") from e


class ShardedSafetensorsWriter:
    """Writes tensors as they come into HF-style shards of at most ``max_shard_bytes`` each.

    Only the current shard's tensors are held; names and index follow ``save_pretrained``
    (``model.safetensors`` alone, or ``model-0000i-of-0000N.safetensors`` + index).
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int):
        self.dir = Path(out_dir)
        self.max = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        assert name not in self.pending, name
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp_name = f"shard-{len(self.files):05d}.tmp"
        save_file(self.pending, str(self.dir / tmp_name), metadata={"format": "pt"})
        self.files.append((tmp_name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Finish writing; returns the file names."""
        if self.pending or not self.files:
            self._flush()
        n = len(self.files)
        if n == 1:
            (self.dir / self.files[0][0]).rename(self.dir / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, names = {}, []
        for i, (tmp_name, keys) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.dir / tmp_name).rename(self.dir / final)
            weight_map.update({k: final for k in keys})
            names.append(final)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names + [INDEX_FILE]
