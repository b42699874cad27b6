"""Issue 24: a run's inputs are checked against each other before any process group, model or tokenized
cache exists, each failure one line naming the keys (rc 2): a tokenizer larger than the model's vocabulary,
and data of the wrong kind for the loss."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _train(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    """``redi-train`` in a fresh interpreter; prints whether Megatron was imported (it must not be)."""
    code = ("import sys; from redi_megatron.training.cli import main; rc = main(sys.argv[1:]); "
            "print('megatron' if 'megatron.core' in sys.modules else 'no-megatron'); sys.exit(rc)")
    args = ["--config", "examples/configs/tiny_cpu_sft.yaml", f"checkpoint.save_dir={tmp_path / 'run'}",
            *overrides]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _refused(r: subprocess.CompletedProcess, tmp_path) -> str:
    err = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in err, err
    assert r.stdout.strip() == "no-megatron" and not (tmp_path / "run").exists()  # before any work
    return err


def test_a_tokenizer_larger_than_the_model_vocab_is_refused_at_start_up(tiny_train_data, tmp_path):
    r = _train(tmp_path, f"data.train_path={tiny_train_data['positives']}",
               f"data.tokenizer={tiny_train_data['tokenizer']}", "model.vocab_size=256")
    err = _refused(r, tmp_path)
    assert "has 300 token ids" in err and "model.vocab_size" in err and "has 256" in err, err
    assert "data.tokenizer" in err and tiny_train_data["tokenizer"] in err, err


def test_a_tokenizer_that_fits_passes(tiny_train_data):
    from redi_megatron.config.schema import RunConfig
    from redi_megatron.errors import UserError
    from redi_megatron.models.config import ModelConfig
    from redi_megatron.training.preflight import check_tokenizer_fits

    cfg = RunConfig()
    check_tokenizer_fits(cfg, ModelConfig(vocab_size=300), tiny_train_data["tokenizer"])  # every id has a row
    with pytest.raises(UserError, match="has 300 token ids .* has 299"):
        check_tokenizer_fits(cfg, ModelConfig(vocab_size=299), tiny_train_data["tokenizer"])


@pytest.mark.parametrize("loss,data,holds", [("sft", "pairs", "preference pairs"), ("redi", "positives", "positives")])
def test_the_wrong_kind_of_data_for_the_loss_is_refused_before_tokenizing(tiny_train_data, tmp_path, loss, data,
                                                                          holds):
    r = _train(tmp_path, f"data.train_path={tiny_train_data[data]}", f"data.tokenizer={tiny_train_data['tokenizer']}",
               f"loss.name={loss}")
    err = _refused(r, tmp_path)
    assert f"data.train_path={tiny_train_data[data]!r} holds {holds}" in err and f"loss.name={loss!r}" in err, err
    assert "row 0" in err, err


def test_data_kind_reads_columns_of_jsonl_and_hf_dirs(tiny_train_data, tmp_path):
    import json

    from redi_megatron.data.data_kind import data_kind

    assert data_kind(tiny_train_data["pairs"])[0] == "pairs"
    assert data_kind(tiny_train_data["positives"])[0] == "positives"
    hf = tmp_path / "dd"
    (hf / "train").mkdir(parents=True)
    (hf / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    (hf / "train" / "dataset_info.json").write_text(json.dumps({"features": {"problem": {}, "chosen": {}}}))
    assert data_kind(str(hf)) == ("pairs", f"{hf} (dataset_info.json)")
    (hf / "train" / "dataset_info.json").write_text(json.dumps({"features": {"messages": {}}}))
    assert data_kind(str(hf))[0] == "positives"
    (tmp_path / "odd.jsonl").write_text('{"text": "x"}\n')
    assert data_kind(str(tmp_path / "odd.jsonl"))[0] is None  # unknown columns: left to the tokenizer


def test_the_right_kind_passes_for_every_pair_loss(tiny_train_data):
    from redi_megatron.config.loader import apply_overrides
    from redi_megatron.config.schema import RunConfig
    from redi_megatron.errors import UserError
    from redi_megatron.training.preflight import check_data_kind

    for loss in ("redi", "dpo", "simpo"):
        pairs = f"data.train_path={tiny_train_data['pairs']}"
        check_data_kind(apply_overrides(RunConfig(), [f"loss.name={loss}", pairs]))
        with pytest.raises(UserError, match="holds positives"):
            check_data_kind(apply_overrides(RunConfig(), [f"loss.name={loss}",
                                                          f"data.train_path={tiny_train_data['positives']}"]))
    check_data_kind(apply_overrides(RunConfig(), [f"data.train_path={tiny_train_data['positives']}"]))  # sft
