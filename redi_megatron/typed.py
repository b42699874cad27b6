"""The one typed path from plain data (YAML, JSON, CLI values) to a dataclass, for every config in the
project: the run config (``config.loader``), each loss's hyper-parameters (``LossSpec.make_hparams``),
``model_config.json`` of checkpoints and the converters' ``--override`` values.

Values are checked against the dataclass annotations (``Optional``, ``bool``, ``int``, ``float``, ``str``,
``dict``, ``list``, ``tuple``, ``Literal``, nested dataclasses): an ``int`` is accepted for a ``float``
and nothing else is converted, so ``true`` is not 1.0, ``'0.8'`` is not 0.8 and ``null`` is not a
number. Unknown keys are errors. Every error is a ``ValueError`` naming the source and the dotted key.
Standard library only, so every layer may use it.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Optional, TypeVar, Union

from redi_megatron.errors import UserError

T = TypeVar("T")
UnknownKey = Callable[[Any, type, str, str], ValueError]


@functools.lru_cache(maxsize=None)
def hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of dataclass ``cls`` (postponed annotations evaluated)."""
    return typing.get_type_hints(cls)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


def type_error(value: Any, tp: Any, where: str, source: str, extra: str = "") -> ValueError:
    return UserError(f"{source}: '{where}' must be {type_name(tp)}, got {value!r} "
                      f"({type(value).__name__}){extra}")


def unknown_key(key: Any, cls: type, prefix: str, source: str) -> ValueError:
    """The default unknown-key error: the nearest valid names and the whole list."""
    names = field_names(cls)
    close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(prefix + c) for c in close)}?" if close else ""
    return UserError(f"{source}: unknown key '{prefix}{key}'{hint} Valid keys: {', '.join(names)}")


# Allowed ranges of numeric fields, declared once per field with :func:`ranged` and checked here by the one
# builder. Every range also requires a finite value (NaN and inf never pass).
RANGES: dict[str, Callable[[float], bool]] = {
    "finite": lambda v: True,
    ">0": lambda v: v > 0,
    ">=0": lambda v: v >= 0,
    ">=1": lambda v: v >= 1,
    "[0,1]": lambda v: 0 <= v <= 1,
    "[0,1)": lambda v: 0 <= v < 1,
    "(0,1]": lambda v: 0 < v <= 1,
}


def ranged(default: Any, allowed: str, **kwargs: Any) -> Any:
    """A dataclass field with its allowed range (a key of :data:`RANGES`), e.g.
    ``lr: float = ranged(5e-5, ">0")``. ``kwargs`` go to ``dataclasses.field``."""
    if allowed not in RANGES:
        raise AssertionError(f"unknown range {allowed!r}; one of {list(RANGES)}")
    return dataclasses.field(default=default, metadata={"range": allowed}, **kwargs)


def field_range(cls: type, name: str) -> Optional[str]:
    """The declared range of field ``name`` of dataclass ``cls`` (None when it has none)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("range")
    return None


def check_range(value: Any, allowed: Optional[str], where: str, source: str) -> None:
    """One line naming the key and its range when a number is NaN, inf or outside ``allowed``."""
    if allowed is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not (math.isfinite(value) and RANGES[allowed](value)):
        finite = "a finite number" if allowed == "finite" else f"a finite number {allowed}"
        raise UserError(f"{source}: '{where}' must be {finite}, got {value!r}")


def check_field_ranges(obj: Any, prefix: str, source: str) -> None:
    """Every field of dataclass instance ``obj`` (nested ones too) within its declared range: for configs
    built in Python rather than through :class:`Checker` (the demo's presets, ``EvalConfig``)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_field_ranges(value, f"{prefix}{f.name}.", source)
        else:
            check_range(value, f.metadata.get("range"), prefix + f.name, source)


def _is_scalar(tp: Any) -> bool:
    return tp in (bool, int, float, str) or typing.get_origin(tp) is Literal


class Checker:
    """Checks values against annotations; ``on_unknown`` makes the unknown-key errors (the run config's
    loader adds suggestions from other sections and notes on removed keys)."""

    def __init__(self, on_unknown: UnknownKey = unknown_key) -> None:
        self.on_unknown = on_unknown

    def check(self, value: Any, tp: Any, where: str, source: str) -> Any:
        """``value`` checked against the annotation ``tp``; returns the value to store (ints widened to
        float, dataclass sections as checked dicts)."""
        origin = typing.get_origin(tp)
        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise UserError(f"{source}: '{where}' is a section and must be a mapping of its keys "
                                 f"({', '.join(field_names(tp))}), got {value!r}")
            return self.section(value, tp, where + ".", source)
        if origin in (Union, types.UnionType):
            return self._union(value, tp, where, source)
        if origin is Literal:
            if value not in typing.get_args(tp):
                raise UserError(f"{source}: '{where}' must be one of {list(typing.get_args(tp))}, got {value!r}")
            return value
        if tp in (bool, int, float, str):
            return _scalar(value, tp, where, source)
        if tp is dict or origin is dict:
            if not isinstance(value, Mapping):
                raise type_error(value, "a mapping", where, source)
            key_tp, val_tp = typing.get_args(tp) or (Any, Any)
            return {self.check(k, key_tp, f"{where} key", source): self.check(v, val_tp, f"{where}.{k}", source)
                    for k, v in value.items()}
        if tp in (list, tuple) or origin in (list, tuple):
            return self._sequence(value, tp, where, source)
        raise AssertionError(f"field '{where}' has an annotation the checker does not handle: {tp!r}")

    def section(self, data: Mapping, cls: type, prefix: str, source: str) -> dict:
        """A (possibly partial) mapping for dataclass ``cls``, every key known and every value checked."""
        fields = hints(cls)
        out = {}
        for key, value in data.items():
            if not isinstance(key, str) or key not in fields:
                raise self.on_unknown(key, cls, prefix, source)
            out[key] = self.check(value, fields[key], prefix + key, source)
            check_range(out[key], field_range(cls, key), prefix + key, source)
        return out

    def _union(self, value: Any, tp: Any, where: str, source: str) -> Any:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise type_error(value, tp, where, source)
        options = [a for a in args if a is not type(None)]
        for arg in options:
            try:
                return self.check(value, arg, where, source)
            except ValueError:
                if len(options) == 1 and not _is_scalar(arg):
                    raise  # the nested error names the exact key
        raise type_error(value, tp, where, source)

    def _sequence(self, value: Any, tp: Any, where: str, source: str) -> Any:
        if not isinstance(value, (list, tuple)):
            raise type_error(value, "a list", where, source)
        is_tuple = tp is tuple or typing.get_origin(tp) is tuple
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        if is_tuple and len(args) > 1:  # fixed-length tuple[X, Y]
            if len(args) != len(value):
                raise UserError(f"{source}: '{where}' must have {len(args)} items, got {value!r}")
            return tuple(self.check(v, a, f"{where}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        items = [self.check(v, args[0], f"{where}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if is_tuple else items


def _scalar(value: Any, tp: type, where: str, source: str) -> Any:
    # bool is an int subclass in Python; YAML true/false must not pass as 1/0 (or the reverse).
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}[tp]
    if not ok:
        hint = {bool: " (use true or false)", str: " (quote it to make it a string)"}.get(tp, "")
        raise type_error(value, tp, where, source, hint)
    return float(value) if tp is float else value


def build(cls: type[T], data: Mapping) -> T:
    """Dataclass ``cls`` from a *checked* tree; missing keys keep their defaults."""
    fields = hints(cls)
    kwargs = {}
    for key, value in data.items():
        tp = fields[key]
        kwargs[key] = build(tp, value) if dataclasses.is_dataclass(tp) else _copy(value)
    return cls(**kwargs)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def from_mapping(cls: type[T], data: Any, source: str, prefix: str = "") -> T:
    """``cls`` from plain ``data`` (a mapping; may be partial): checked, then built. The dataclass's own
    ``__post_init__`` then validates ranges. ``prefix`` is prepended to keys in messages."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise UserError(f"{source}: '{prefix.rstrip('.') or 'value'}' must be a mapping, got {data!r}")
    return build(cls, Checker().section(data, cls, prefix, source))
