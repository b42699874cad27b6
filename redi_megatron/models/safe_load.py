"""Loading a checkpoint unpickles as little as possible (checkpoints are code: docs/checkpoints.md).

A Megatron ``dist_checkpointing`` tree holds two kinds of pickles:

- ``.metadata``, which torch's distributed-checkpoint reader ``pickle.load``s: before it does,
  :func:`check_metadata_pickles` reads the file with an unpickler that only knows the classes such a
  file needs (torch's checkpoint metadata classes, ``torch.Size``, dtypes, the layout helper), so a
  file naming anything else (``os.system``, ``builtins.eval``, ...) is refused before any code of it
  can run. One call is allowed: ``builtins.getattr(EnumClass, "NAME")``, which some Pythons (Debian
  bookworm's 3.11.2) write for every Enum member; the unpickler gets :func:`_enum_member` instead of
  ``getattr``, which returns only a member of an allowed Enum class, looked up by its string name;
- non-tensor items (``ShardedObject``: the layers' ``_extra_state``), which torch's load planner
  ``torch.load``s with ``weights_only=False``: :func:`weights_only_loads` makes every ``torch.load``
  inside it use ``weights_only=True`` (torch's own ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), so only tensors
  and plain data come back.

Both are skipped for a source the user declares trusted (``checkpoint.trust_unverified`` /
``--trust-unverified``). What stays code: Transformer Engine unpickles its FP8 ``_extra_state`` itself.
"""
from __future__ import annotations

import enum
import importlib
import io
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from redi_megatron.errors import UserError

# Modules whose own classes (dataclasses and enums describing tensors and files) a .metadata may name.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_EXACT = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
          ("builtins", "set"), ("builtins", "frozenset")}
_FORCE, _FORCE_NO = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def _allowed(module: str, name: str) -> bool:
    if (module, name) in _EXACT:
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), torch.dtype)
    if module in _DCP_MODULES:
        obj = getattr(importlib.import_module(module), name, None)
        return isinstance(obj, type) and obj.__module__ == module  # defined there, not imported into it
    return False


def _enum_member(cls: object, name: object) -> enum.Enum:
    """What the unpickler calls for ``builtins.getattr``: ``cls[name]`` when ``cls`` is an allowed Enum class
    and ``name`` the string name of one of its members; anything else (another class, an attribute that is
    no member, a non-string name) is refused, so no other attribute of anything can be fetched."""
    if not (isinstance(cls, type) and issubclass(cls, enum.Enum) and _allowed(cls.__module__, cls.__qualname__)):
        raise pickle.UnpicklingError(f"it calls builtins.getattr on {cls!r}, which is no allowed Enum class")
    if type(name) is not str or name not in cls.__members__:
        raise pickle.UnpicklingError(f"it calls builtins.getattr({cls.__qualname__}, {name!r}), which is no member")
    return cls.__members__[name]


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("builtins", "getattr"):  # Enum members as Python 3.11.2 pickles them
            return _enum_member
        if not _allowed(module, name):
            raise pickle.UnpicklingError(f"it refers to {module}.{name}")
        return super().find_class(module, name)


def check_metadata_pickles(tree: str | Path) -> None:
    """UserError naming the file when ``tree/.metadata`` (torch's distributed-checkpoint metadata)
    refers to anything but the classes such a file holds; nothing it names is called otherwise."""
    path = Path(tree) / ".metadata"
    if not path.is_file():
        raise UserError(f"{Path(tree)} is not a dist_checkpointing directory (no .metadata)")
    try:
        _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
        raise UserError(f"{path}: refused to unpickle it ({e}); a checkpoint's metadata never needs that. "
                        "Checkpoints are code: if you trust this one's source, pass "
                        "checkpoint.trust_unverified=true (redi-train) or --trust-unverified (converters)") from None


@contextmanager
def weights_only_loads(enabled: bool = True) -> Iterator[None]:
    """Within the block, every ``torch.load`` (also those passing ``weights_only=False``) loads with
    ``weights_only=True``: tensors and plain containers only, no arbitrary objects."""
    if not enabled:
        yield
        return
    saved = {key: os.environ.pop(key, None) for key in (_FORCE, _FORCE_NO)}
    os.environ[_FORCE] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def unpickling_refused(err: BaseException) -> bool:
    """Whether ``err`` (possibly torch's CheckpointException wrapping each rank's error) comes from a
    ``weights_only`` load refusing an object."""
    seen: list[BaseException] = [err]
    while seen:
        e = seen.pop()
        if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e):
            return True
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            seen.extend(v for v in failures.values() if isinstance(v, BaseException))
        for nxt in (e.__cause__, e.__context__):
            if nxt is not None:
                seen.append(nxt)
    return False
