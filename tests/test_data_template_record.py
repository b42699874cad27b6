"""Curated data records its chat template; training refuses a run configured with another one."""
import json
import typing

import pytest

from redi_megatron.config.schema import DataConfig
from redi_megatron.data.template_record import check_data_template, data_template
from redi_megatron.data.templates import TEMPLATES
from redi_megatron.errors import UserError


def test_curate_records_the_template(tiny_train_data):
    with open(tiny_train_data["root"] / "curated" / "curation_report.json") as f:
        assert json.load(f)["chat_template"] == "qwen2.5-math"
    assert data_template(tiny_train_data["pairs"])[0] == "qwen2.5-math"


def test_training_refuses_a_template_mismatch_in_one_line(tiny_train_data, tmp_path):
    from redi_megatron.config.loader import from_dict
    from redi_megatron.training.components import validate

    tree = {"data": {"train_path": tiny_train_data["pairs"], "tokenizer": tiny_train_data["tokenizer"],
                     "chat_template": "llama3"},
            "loss": {"name": "redi"}, "checkpoint": {"save_dir": str(tmp_path / "run")}}
    with pytest.raises(UserError) as e:
        validate(from_dict(tree), world_size=1)
    msg = str(e.value)
    assert "\n" not in msg and "'qwen2.5-math'" in msg and "'llama3'" in msg


def _curated(tmp_path, record):
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    (tmp_path / "curation_report.json").write_text(json.dumps(record))
    return str(tmp_path / "pairs.jsonl")


def test_old_curated_data_without_a_record_is_assumed_default(tmp_path, capsys):
    path = _curated(tmp_path, {"rows": 1})
    check_data_template(path, "qwen2.5-math")
    assert "assuming 'qwen2.5-math'" in capsys.readouterr().err
    with pytest.raises(UserError, match="curated with chat template 'qwen2.5-math'.*'r1-distill'"):
        check_data_template(path, "r1-distill")


def test_data_not_from_curate_is_accepted_with_a_warning(tmp_path, capsys):
    (tmp_path / "own.jsonl").write_text("{}\n")
    check_data_template(str(tmp_path / "own.jsonl"), "qwen3")
    assert "cannot be checked" in capsys.readouterr().err


def test_recorded_template_is_used(tmp_path):
    path = _curated(tmp_path, {"chat_template": "qwen3"})
    check_data_template(path, "qwen3")
    with pytest.raises(UserError, match="'qwen3'.*'qwen2.5-math'"):
        check_data_template(path, "qwen2.5-math")


def test_config_choices_equal_the_template_names():
    choices = typing.get_args(typing.get_type_hints(DataConfig)["chat_template"])
    assert sorted(choices) == sorted(TEMPLATES) and DataConfig().chat_template == "qwen2.5-math"
