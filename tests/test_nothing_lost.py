"""Issue 24, data loss: an export's --overwrite keeps the user's files, a symlinked --output is refused
leaving nothing behind, a second concurrent curate into the same --output is refused, and atomically
written files get the mode the umask gives (not mkstemp's 0600)."""
from __future__ import annotations

import os
import stat

import pytest

from redi_megatron.errors import UserError
from redi_megatron.locks import exclusive, lock_path_for
from redi_megatron.outputs import publish, staging_dir, write_atomic


def _ours(name: str) -> bool:
    # the predicate redi-megatron-to-hf uses; imported lazily (the module imports torch)
    from redi_megatron.convert.megatron_to_hf import _exported
    return _exported(name)


def test_export_overwrite_keeps_the_users_files(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "config.json", "tokenizer.json"):
        (out / name).write_text("old export")
    (out / "README.md").write_text("my model card")
    (out / "eval_results").mkdir()
    (out / "eval_results" / "aime.json").write_text("{}")
    tmp = staging_dir(out)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (tmp / name).write_text("new export")
    publish(tmp, out, ours=_ours)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "eval_results",
                                                      "model.safetensors", "tokenizer.json"]
    assert (out / "README.md").read_text() == "my model card"
    assert (out / "eval_results" / "aime.json").read_text() == "{}"
    assert (out / "config.json").read_text() == "new export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging or set-aside left


def test_curate_into_a_symlink_is_refused_leaving_nothing(tmp_path, capsys):
    from redi_megatron.data.curate import main
    from redi_megatron.data.synthetic import raw_rows, write_jsonl
    from redi_megatron.data.templates import qwen_tokenizer_dir

    rows, cats = raw_rows(seed=0)
    path = write_jsonl([r for r, c in zip(rows, cats) if c == "pair"][:4], str(tmp_path / "raw.jsonl"))
    users = tmp_path / "users_dir"
    users.mkdir()
    (users / "mine.txt").write_text("keep")
    link = tmp_path / "curlink"
    link.symlink_to(users)
    args = ["--input", path, "--tokenizer", qwen_tokenizer_dir(), "--num-proc", "1", "--format", "jsonl",
            "--no-progress", "--output", str(link), "--overwrite"]
    for _ in range(2):  # the rerun gets the same one line
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "is a symbolic link" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curlink", "raw.jsonl", "users_dir"]
    assert [p.name for p in users.iterdir()] == ["mine.txt"]


def test_second_curate_into_the_same_output_is_refused(tmp_path):
    from redi_megatron.data.curate import CurationConfig, curate
    from redi_megatron.data.synthetic import raw_rows, write_jsonl

    rows, _ = raw_rows(seed=0)
    path = write_jsonl(rows[:4], str(tmp_path / "raw.jsonl"))
    out = tmp_path / "curated"
    cfg = CurationConfig(input=path, output=str(out), tokenizer="unused", num_proc=1)
    with exclusive(lock_path_for(out), "first curate"):  # the first run, still writing
        with pytest.raises(UserError, match=r"curated is in use by another process"):
            curate(cfg, tokenizer=object())
    assert not out.exists()


def test_write_atomic_respects_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = write_atomic(tmp_path / "config.yaml", "a: 1\n")
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
        os.umask(0o077)
        p = write_atomic(tmp_path / "private.yaml", "a: 1\n")
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    finally:
        os.umask(old)
