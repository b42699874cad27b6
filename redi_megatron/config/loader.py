"""YAML recipes + ``key=value`` overrides -> :class:`~redi_megatron.config.schema.RunConfig`.

The dataclasses in ``schema.py`` are the schema; this module only fills them:

* a recipe is a YAML mapping whose sections mirror the dataclasses (``model:``, ``optimizer:`` ...);
  keys left out keep the dataclass defaults;
* ``defaults: [base.yaml, ...]`` (NeMo-launcher style) includes other recipes first, paths relative to
  the including file (``.yaml`` may be omitted); the including file's own keys win. Sections merge key
  by key, but a free ``dict`` field (``loss.params``) is replaced as a whole, so a recipe that changes
  the loss never inherits the previous loss's hyper-parameters;
* overrides ``section.key=value`` use dotted keys (``optimizer.lr=1e-6``, ``loss.params.alpha=0.8``);
  the value is parsed as a YAML scalar (``null``, ``true``, ``1e-6``, ``[1, 2]``, ``{a: 1}``) and a
  dotted key inside a free dict sets that one entry;
* every value is type-checked against its field (``Optional``, ``bool``, ``int``, ``float``, ``str``,
  ``dict``, ``list``, ``Literal``, nested dataclasses); ints are accepted for floats, nothing else is
  converted. Unknown keys anywhere, duplicate keys and wrong types are ``ValueError`` naming the key,
  the file (or the override) and the closest valid names.

``1e-6`` is a float here (YAML 1.2), not the string PyYAML's YAML 1.1 rules would give.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from redi_megatron.config.schema import RunConfig
from redi_megatron.errors import UserError
from redi_megatron.outputs import write_atomic
from redi_megatron.typed import Checker, build, check_range, field_names, field_range, hints, type_name

DEFAULTS_KEY = "defaults"

_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z_][A-Za-z0-9_\-]*)*$")


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that reads ``1e-6`` as a float and refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):  # noqa: D102 - PyYAML hook
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # PyYAML's own check reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 needs a dot in a float ("1.0e-6"); every config writer writes "1e-6".
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise UserError(f"{source}: invalid YAML: {e}") from None


# ----------------------------------------------------------------------------- type checking
# (the rules live in redi_megatron.typed; this module adds the run config's unknown-key hints)

@functools.lru_cache(maxsize=None)
def _all_paths(cls: type = RunConfig, prefix: str = "") -> tuple[str, ...]:
    """Every dotted field path of the schema (sections and leaves)."""
    out: list[str] = []
    for name, tp in hints(cls).items():
        path = prefix + name
        out.append(path)
        if dataclasses.is_dataclass(tp):
            out.extend(_all_paths(tp, path + "."))
    return tuple(out)


# Keys of earlier versions, with what replaces them (a plain "unknown key" would leave the user guessing).
REMOVED_KEYS = {
    "data.micro_batch_rows": "a microbatch is now one packed (THD) row: remove data.micro_batch_rows and "
                             "set data.micro_batch_tokens to the whole budget (old rows x tokens)",
}


def _unknown_key(key: Any, cls: type, prefix: str, source: str) -> ValueError:
    names = field_names(cls)
    where = f"'{prefix}{key}'"
    if f"{prefix}{key}" in REMOVED_KEYS:
        return UserError(f"{source}: {where} was removed: {REMOVED_KEYS[f'{prefix}{key}']}")
    close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.6)
    # The key may exist in another section ("lr" at top level -> "optimizer.lr").
    leaf = str(key).lower()
    elsewhere = [p for p in _all_paths() if p.rsplit(".", 1)[-1].lower() == leaf and p != prefix + str(key)]
    suggestions = [prefix + c for c in close] + [p for p in elsewhere if p not in (prefix + c for c in close)]
    section = f"'{prefix[:-1]}'" if prefix else "the top level"
    msg = f"{source}: unknown key {where}"
    if suggestions:
        msg += f"; did you mean {', '.join(repr(h) for h in suggestions)}?"
    return UserError(f"{msg} Valid keys in {section}: {', '.join(names)}")


_checker = Checker(lambda key, cls, prefix, source: _unknown_key(key, cls, prefix, source))
_check = _checker.check


# ----------------------------------------------------------------------------- trees

def _merge(base: dict, top: dict, cls: type) -> dict:
    """``top`` over ``base`` (both checked partial trees of ``cls``): sections merge, values replace."""
    fields = hints(cls)
    out = dict(base)
    for key, value in top.items():
        if dataclasses.is_dataclass(fields[key]) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, fields[key])
        else:
            out[key] = value
    return out


def _resolve_include(entry: Any, including: str) -> str:
    if not isinstance(entry, str) or not entry.strip():
        raise UserError(f"{including}: '{DEFAULTS_KEY}' entries must be file paths, got {entry!r}")
    path = os.path.expanduser(entry)
    if not os.path.isabs(path):
        path = os.path.join(os.path.dirname(os.path.abspath(including)), path)
    if not os.path.exists(path) and not path.endswith((".yaml", ".yml")) and os.path.exists(path + ".yaml"):
        path += ".yaml"
    if not os.path.isfile(path):
        raise UserError(f"{including}: '{DEFAULTS_KEY}' entry {entry!r} not found (looked for {path})")
    return os.path.abspath(path)


def _load_tree(path: str, stack: tuple[str, ...] = ()) -> dict:
    """The checked partial tree of one recipe with its ``defaults`` merged underneath."""
    path = os.path.abspath(path)
    if path in stack:
        chain = " -> ".join(stack + (path,))
        raise UserError(f"{stack[-1]}: '{DEFAULTS_KEY}' include cycle: {chain}")
    if not os.path.isfile(path):
        where = f"{stack[-1]}: " if stack else ""
        raise UserError(f"{where}config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = _parse_yaml(f.read(), path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    includes = data.pop(DEFAULTS_KEY, [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        raise UserError(f"{path}: '{DEFAULTS_KEY}' must be a file path or a list of them, got {includes!r}")
    tree: dict = {}
    for entry in includes:
        tree = _merge(tree, _load_tree(_resolve_include(entry, path), stack + (path,)), RunConfig)
    return _merge(tree, _checker.section(data, RunConfig, "", path), RunConfig)


# ----------------------------------------------------------------------------- overrides

def parse_override(text: str) -> tuple[str, Any]:
    """``"optimizer.lr=1e-6"`` -> ``("optimizer.lr", 1e-6)``; the value is parsed as YAML (an empty value
    is ``null``; a value YAML cannot parse, such as ``@x``, stays the raw string)."""
    if "=" not in text:
        raise UserError(f"override {text!r}: expected key=value (e.g. optimizer.lr=1e-6)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not _OVERRIDE_KEY.match(key):
        raise UserError(f"override {text!r}: {key!r} is not a dotted key such as optimizer.lr")
    if key == DEFAULTS_KEY or key.startswith(DEFAULTS_KEY + "."):
        raise UserError(f"override {text!r}: '{DEFAULTS_KEY}' can only be used inside a recipe file")
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_path(tree: dict, key: str, value: Any, source: str) -> None:
    """Set dotted ``key`` in the full tree of a RunConfig, checking the value against its field."""
    parts = key.split(".")
    cls: Any = RunConfig
    node = tree
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i]) + ("." if i else "")
        fields = hints(cls)
        if part not in fields:
            raise _unknown_key(part, cls, prefix, source)
        tp = fields[part]
        last = i == len(parts) - 1
        if last:
            checked = _check(value, tp, key, source)
            check_range(checked, field_range(cls, part), key, source)
            # A whole section given as a mapping updates that section's keys, like a recipe does.
            node[part] = _merge(node[part], checked, tp) if dataclasses.is_dataclass(tp) else checked
            return
        if dataclasses.is_dataclass(tp):
            cls, node = tp, node[part]
            continue
        if tp is dict or typing.get_origin(tp) is dict:
            # Free dict: the rest of the key addresses entries inside it.
            _, val_tp = typing.get_args(tp) or (Any, Any)
            inner = node[part]
            for sub in parts[i + 1:-1]:
                if not isinstance(inner.get(sub, {}), dict):
                    raise UserError(f"{source}: '{key}': {sub!r} inside '{prefix}{part}' is not a mapping")
                inner = inner.setdefault(sub, {})
            inner[parts[-1]] = _check(value, val_tp if len(parts) == i + 2 else Any, key, source)
            return
        raise UserError(f"{source}: '{prefix}{part}' is a value ({type_name(tp)}), it has no key {parts[i + 1]!r}")


# ----------------------------------------------------------------------------- public API

def to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict of every field of ``cfg`` (a deep copy)."""
    return dataclasses.asdict(cfg)


def from_dict(data: Mapping, source: str = "<dict>") -> RunConfig:
    """RunConfig from a (possibly partial) nested dict, with the same checks as a recipe file.

    ``source`` names the origin in error messages (e.g. the checkpoint's saved config path).
    """
    if not isinstance(data, Mapping):
        raise UserError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    return build(RunConfig, _checker.section(data, RunConfig, "", source))


def apply_overrides(cfg: RunConfig, overrides: Iterable[str]) -> RunConfig:
    """A new RunConfig: ``cfg`` with ``key=value`` overrides applied in order."""
    tree = to_dict(cfg)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value, f"override {text!r}")
    return build(RunConfig, tree)


def load_config(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Recipe at ``path`` (with its ``defaults`` includes) + ``key=value`` overrides -> RunConfig."""
    return apply_overrides(build(RunConfig, _load_tree(path)), overrides)


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively (safe YAML has no tuple type; the loader converts back)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_yaml(cfg: RunConfig) -> str:
    """The fully resolved config as YAML text (every field, defaults included)."""
    return yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False, default_flow_style=False, allow_unicode=True)


def save_resolved(cfg: RunConfig, path: str) -> str:
    """Write the resolved config to ``path`` atomically (loadable by :func:`load_config`); returns path."""
    text = ("# Resolved redi-megatron run config: every field, after includes and overrides.\n"
            "# Reload with redi_megatron.config.load_config(this_file).\n" + dump_yaml(cfg))
    return write_atomic(path, text)


__all__ = ["load_config", "apply_overrides", "parse_override", "from_dict", "to_dict", "dump_yaml",
           "save_resolved", "DEFAULTS_KEY"]
