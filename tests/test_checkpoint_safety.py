"""Loading a checkpoint runs none of the code a crafted one carries (issue 13, "Security"): torch's
pickled ``.metadata`` is read with an unpickler that knows only its own classes, and non-tensor items
(``_extra_state``, any ``ShardedObject``) load as ``weights_only``; a trusted source skips both.

Each crafted file would create a marker file when unpickled; the tests check it is refused in one
``UserError`` naming the file and that the marker does not exist, and (for the crafted file to prove
anything) that the same file does run its code when the source is declared trusted.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from redi_megatron.testing.distributed import run_distributed


class _Payload:
    """Unpickling this creates ``marker`` (``builtins.open`` in write mode): a stand-in for any code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tiny_model():
    from redi_megatron.models.builder import build_gpt_model
    from redi_megatron.models.config import ModelConfig, ParallelConfig

    cfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, num_query_groups=1,
                      vocab_size=64)
    return cfg, build_gpt_model(cfg, ParallelConfig())


def _crafted_metadata(root: str) -> dict:
    from redi_megatron.errors import UserError
    from redi_megatron.models.checkpoint import load_model_checkpoint, save_model_checkpoint
    from redi_megatron.models.manifest import write_manifest

    cfg, model = _tiny_model()
    ckpt = Path(root) / "ckpt"
    save_model_checkpoint([model], cfg, ckpt)
    load_model_checkpoint([model], ckpt)  # a checkpoint we wrote loads under the restrictions
    marker = Path(root) / "metadata_ran"
    (ckpt / "model" / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    write_manifest(ckpt)  # whoever crafts a checkpoint can write its manifest too
    found = {}
    try:
        load_model_checkpoint([model], ckpt)
    except UserError as e:
        found["error"] = str(e)
    found["ran_when_refused"] = marker.exists()
    try:
        load_model_checkpoint([model], ckpt, trust_unverified=True)
    except Exception:  # noqa: BLE001 - the payload is no Metadata; what matters is that it ran
        pass
    found["ran_when_trusted"] = marker.exists()
    return found


def test_crafted_metadata_is_refused_before_it_runs(tmp_path):
    found = run_distributed(_crafted_metadata, 1, args=(str(tmp_path),))[0]
    assert "model/.metadata: refused to unpickle it" in found["error"]
    assert "it refers to io.open" in found["error"] and "--trust-unverified" in found["error"]
    assert "\n" not in found["error"]
    assert not found["ran_when_refused"]
    assert found["ran_when_trusted"], "the crafted file must be a real payload for this test to mean anything"


def _crafted_object(root: str) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from redi_megatron.errors import UserError
    from redi_megatron.models.checkpoint import load_extra_sharded, load_model_checkpoint, save_model_checkpoint

    cfg, model = _tiny_model()
    marker = Path(root) / "object_ran"
    extra = {"state": {"obj": ShardedObject("state.obj", _Payload(str(marker)), (1,), (0,)),
                       "plain": ShardedObject("state.plain", {"step": 3, "names": ["a"]}, (1,), (0,)),
                       "w": ShardedTensor.from_rank_offsets("state.w", torch.arange(4.0))}}
    ckpt = Path(root) / "ckpt"
    save_model_checkpoint([model], cfg, ckpt, extra_sharded=extra)
    marker.unlink(missing_ok=True)  # saving pickles the payload; only loading must not run it
    load_model_checkpoint([model], ckpt)

    def request(*keys):
        out = {"w": ShardedTensor.from_rank_offsets("state.w", torch.zeros(4))}
        out.update({k: ShardedObject(f"state.{k}", None, (1,), (0,)) for k in keys})
        return out

    found = {"plain": load_extra_sharded(ckpt, "state", request("plain"))}  # plain data loads as before
    try:
        load_extra_sharded(ckpt, "state", request("obj"))
    except UserError as e:
        found["error"] = str(e)
    found["ran_when_refused"] = marker.exists()
    load_extra_sharded(ckpt, "state", request("obj"), trust_unverified=True)
    found["ran_when_trusted"] = marker.exists()
    return found


def test_crafted_sharded_object_is_refused_before_it_runs(tmp_path):
    found = run_distributed(_crafted_object, 1, args=(str(tmp_path),))[0]
    assert found["plain"]["plain"] == {"step": 3, "names": ["a"]}
    assert torch.equal(found["plain"]["w"], torch.arange(4.0))
    assert "ckpt/state: holds a pickled object that is not plain data, refused" in found["error"]
    assert not found["ran_when_refused"]
    assert found["ran_when_trusted"], "the crafted object must be a real payload for this test to mean anything"


def test_weights_only_loads_restores_the_environment(monkeypatch):
    import io
    import os

    from redi_megatron.models.safe_load import weights_only_loads

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    buf = io.BytesIO()
    torch.save({"a": slice(1, 2)}, buf)  # slice is no weights_only type
    with weights_only_loads():
        buf.seek(0)
        with pytest.raises(pickle.UnpicklingError):
            torch.load(buf, weights_only=False)
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == "1"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    buf.seek(0)
    assert torch.load(buf, weights_only=False) == {"a": slice(1, 2)}


class _Getattr:
    """Pickled as the call ``builtins.getattr(*args)`` (by :class:`_Py3112Pickler`)."""

    def __init__(self, *args):
        self.args = args


class _Py3112Pickler(pickle.Pickler):
    """Pickles Enum members as Debian bookworm's Python 3.11.2 does: ``builtins.getattr(cls, name)``
    (a global reference to getattr, the class, the name, REDUCE); a :class:`_Getattr` as its crafted call."""

    def reducer_override(self, obj):
        import enum

        if isinstance(obj, enum.Enum):
            return getattr, (type(obj), obj._name_)
        if isinstance(obj, _Getattr):
            return getattr, obj.args
        return NotImplemented


def _metadata_as_3112(tmp_path: Path, crafted: _Getattr | None = None):
    """A real dcp ``.metadata`` rewritten as Python 3.11.2 writes it, holding ``crafted`` if given."""
    import io
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ...": one process is the point
        dcp.save({"w": torch.arange(6.0).view(2, 3)}, checkpoint_id=str(tmp_path), no_dist=True)
    path = tmp_path / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    metadata.storage_meta = crafted  # plain dcp names a pathlib path here; Megatron's checkpoints do not
    buf = io.BytesIO()
    _Py3112Pickler(buf, protocol=4).dump(metadata)  # torch's dcp pickles .metadata with protocol 4 (default)
    path.write_bytes(buf.getvalue())
    return metadata, buf.getvalue()


def test_metadata_with_enums_pickled_by_python_3_11_2_loads(tmp_path):
    """The image check's failure: REDI refused the SFT checkpoint that Debian's Python 3.11.2 wrote."""
    import io
    import pickletools

    from redi_megatron.models.safe_load import _MetadataUnpickler, check_metadata_pickles

    metadata, data = _metadata_as_3112(tmp_path)
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data) if op.name != "MEMOIZE"]
    at = ops.index(("SHORT_BINUNICODE", "getattr"))  # the byte pattern 3.11.2 writes
    assert ops[at - 1] == ("SHORT_BINUNICODE", "builtins") and ops[at + 1][0] == "STACK_GLOBAL"
    assert b"_MEM_FORMAT_ENCODING" in data
    check_metadata_pickles(tmp_path)  # no UserError

    loaded = _MetadataUnpickler(io.BytesIO(data)).load()
    assert loaded == metadata
    props = loaded.state_dict_metadata["w"].properties
    assert props.memory_format == torch.contiguous_format and props.dtype == torch.float32


@pytest.mark.parametrize("target,refused", [
    (("torch.distributed.checkpoint.metadata", "Metadata", "__init__"), "no allowed Enum class"),
    (("torch", "Size", "__new__"), "no allowed Enum class"),
    (("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING", "__class__"), "which is no member"),
    (("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING", "_member_map_"), "which is no member"),
    (("torch.distributed.checkpoint.planner", "LoadItemType", "__call__"), "which is no member"),
    (("torch.distributed.checkpoint.planner", "LoadItemType", 1), "which is no member"),
])
def test_getattr_on_anything_but_an_enum_member_is_refused(tmp_path, target, refused):
    import importlib

    from redi_megatron.errors import UserError
    from redi_megatron.models.safe_load import check_metadata_pickles

    module, cls, name = target
    _metadata_as_3112(tmp_path, _Getattr(getattr(importlib.import_module(module), cls), name))
    with pytest.raises(UserError, match=r"\.metadata: refused to unpickle it \(it calls builtins\.getattr") as e:
        check_metadata_pickles(tmp_path)
    assert refused in str(e.value) and "\n" not in str(e.value)


def test_getattr_reaches_no_class_outside_the_allow_list(tmp_path):
    """An Enum class the unpickler may not name stays refused even inside the getattr call."""
    import enum

    from redi_megatron.errors import UserError
    from redi_megatron.models.safe_load import check_metadata_pickles

    _metadata_as_3112(tmp_path, _Getattr(enum.Enum, "__init_subclass__"))
    with pytest.raises(UserError, match=r"it refers to enum\.Enum"):
        check_metadata_pickles(tmp_path)


def test_enum_member_checks_the_class_itself():
    """Defence in depth: find_class already refuses a class off the list, and the getattr stand-in checks again."""
    import enum

    from redi_megatron.models.safe_load import _enum_member

    class Local(enum.Enum):
        A = 1

    with pytest.raises(pickle.UnpicklingError, match="no allowed Enum class"):
        _enum_member(Local, "A")
    from torch.distributed.checkpoint.planner import LoadItemType

    assert _enum_member(LoadItemType, "TENSOR") is LoadItemType.TENSOR
