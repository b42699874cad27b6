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
