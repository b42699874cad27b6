"""Outputs that cannot be written, or would overlap an input, are refused in one line before any work
(issue 13: ``--out`` not writable or under a regular file gave a traceback after loading the weights;
every tool refuses an output that is, contains or sits inside an input)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from redi_megatron.errors import UserError
from redi_megatron.outputs import check_output


def test_check_output_refuses_a_path_under_a_file_and_an_existing_file(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    with pytest.raises(UserError, match=r"notes.txt is a file, not a directory"):
        check_output(afile / "sub" / "out", [], overwrite=True)
    with pytest.raises(UserError, match=r"exists and is not a directory"):
        check_output(afile, [], overwrite=True)
    with pytest.raises(UserError, match=r"overlaps the input"):
        check_output(tmp_path, [tmp_path / "data" / "raw.jsonl"], overwrite=True)  # contains an input
    assert check_output(tmp_path / "new" / "out", [tmp_path / "data"], overwrite=False) == tmp_path / "new" / "out"
    assert afile.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_output_refuses_an_unwritable_parent(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(UserError, match=r"is not writable"):
            check_output(locked / "out", [], overwrite=False)
    finally:
        locked.chmod(0o700)


def _tiny_hf(path: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    Qwen2ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def test_hf_to_megatron_out_under_a_file_is_one_line_before_any_weight(tmp_path, capsys):
    from redi_megatron.convert.hf_to_megatron import main

    hf = _tiny_hf(tmp_path / "hf")
    (tmp_path / "file").write_text("x")
    capsys.readouterr()  # transformers' save progress bar
    assert main(["--hf", str(hf), "--out", str(tmp_path / "file" / "ckpt"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a file, not a directory" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "hf"]


@pytest.mark.parametrize("where", ["inside", "parent", "same"])
def test_eval_refuses_an_out_overlapping_its_model(tmp_path, capsys, where):
    from redi_megatron.eval.cli import main

    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    out = {"inside": model / "eval", "parent": tmp_path / "models", "same": model}[where]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:
        main(["--model", str(model), "--benchmarks", "aime24", "--out", str(out), "--backend", "hf"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "overlaps the input" in err and err.count("\n") == 0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_eval_out_under_a_file_is_one_line(tmp_path, capsys):
    from redi_megatron.eval.cli import main

    model = tmp_path / "m"
    model.mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(model), "--benchmarks", "aime24", "--out", str(tmp_path / "file" / "eval"),
              "--backend", "hf"])
    assert e.value.code == 2 and "is a file, not a directory" in capsys.readouterr().err
