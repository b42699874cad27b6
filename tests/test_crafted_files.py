"""Issue 24, crafted and torn files: an object-array .npy (which would unpickle, i.e. run code) in the
tokenized cache or a DPO run directory, and a truncated tokens.bin, are refused in one line naming the
file (UserError, rc 2), and no code runs."""
from __future__ import annotations

import os
import types

import numpy as np
import pytest

from redi_megatron.data.tokenized import _load, load_npy
from redi_megatron.errors import UserError


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (os.environ["REDI_TEST_MARKER"],))


def _crafted(path, tmp_path, monkeypatch) -> str:
    marker = str(tmp_path / "code_ran")
    monkeypatch.setenv("REDI_TEST_MARKER", marker)
    np.save(path, np.array([_Payload(), 1], dtype=object), allow_pickle=True)
    return marker


def _cache(tmp_path, n_tokens: int):
    d = tmp_path / "cache"
    d.mkdir()
    np.save(d / "offsets.npy", np.array([0, 4, 8], dtype=np.int64))
    np.arange(n_tokens, dtype=np.int32).tofile(d / "tokens.bin")
    return d


def test_object_offsets_in_the_cache_is_refused_naming_it(tmp_path, monkeypatch):
    d = _cache(tmp_path, 8)
    marker = _crafted(d / "offsets.npy", tmp_path, monkeypatch)
    with pytest.raises(UserError, match=r"offsets.npy: not a plain numeric .npy array") as e:
        _load("sft", str(d), "src", in_memory=True)
    assert "\n" not in str(e.value) and not os.path.exists(marker)


def test_truncated_tokens_bin_is_refused_naming_it(tmp_path):
    d = _cache(tmp_path, 5)
    with pytest.raises(UserError, match=r"tokens.bin: 5 tokens, offsets.npy expects 8 \(truncated\?\)"):
        _load("sft", str(d), "src", in_memory=True)
    (tmp_path / "ok").mkdir()
    assert len(_load("sft", str(_cache(tmp_path / "ok", 8)), "src", in_memory=True).offsets) == 3  # a whole one loads


def test_object_reference_logps_in_a_run_dir_is_refused_naming_it(tmp_path, monkeypatch):
    from redi_megatron.training.reference import REFERENCE_FILE, reference_logps

    marker = _crafted(tmp_path / REFERENCE_FILE, tmp_path, monkeypatch)
    c = types.SimpleNamespace(cfg=types.SimpleNamespace(checkpoint=types.SimpleNamespace(save_dir=str(tmp_path))),
                              dataset=[0, 1])
    with pytest.raises(UserError, match=r"reference_logps.npy: not a plain numeric .npy array"):
        reference_logps(c, sampler=None)
    assert not os.path.exists(marker)


def test_a_torn_npy_is_one_line(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, np.zeros(100))
    p.write_bytes(p.read_bytes()[:90])
    with pytest.raises(UserError, match=r"x.npy: not a plain numeric .npy array"):
        load_npy(str(p), "rebuild it")
