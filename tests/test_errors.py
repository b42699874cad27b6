"""User errors are one line and exit 2; anything else (a bug) keeps its traceback."""
from __future__ import annotations

import pytest

from redi_megatron.errors import MissingDependency, UserError


def test_user_error_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys, tmp_path):
    from redi_megatron.training import cli, trainer

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\n")

    def user(cfg):
        raise UserError("data.train_path: 'x' does not exist")

    monkeypatch.setattr(trainer, "train", user)
    assert cli.main(["--config", str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == "redi-train: error: data.train_path: 'x' does not exist"

    def bug(cfg):
        raise ValueError("sampler invariant broken")  # a plain ValueError is a bug, not the user's input

    monkeypatch.setattr(trainer, "train", bug)
    with pytest.raises(ValueError, match="sampler invariant broken"):
        cli.main(["--config", str(recipe)])


def test_config_and_converter_errors_are_user_errors(tmp_path):
    from redi_megatron.config.loader import load_config
    from redi_megatron.convert.hf_io import parse_overrides
    from redi_megatron.losses import get_loss

    with pytest.raises(UserError):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError):
        get_loss("redi").make_hparams({"alpha": True})
    with pytest.raises(UserError):
        get_loss("redi").make_hparams({"alpha": 2.0})  # the range check of the loss's own dataclass
    with pytest.raises(UserError):
        parse_overrides(["rope_theta=abc"])
    assert issubclass(MissingDependency, ImportError) and issubclass(MissingDependency, UserError)


def test_a_config_typo_imports_neither_torch_nor_megatron(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from redi_megatron.training.cli import main; "
            "rc = main(['--config', 'examples/configs/tiny_cpu_sft.yaml', 'optimizer.lrr=1']); "
            "print(rc, 'torch' in sys.modules, 'megatron' in sys.modules)")
    root = __import__("os").path.dirname(__import__("os").path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["2", "False", "False"], (out.stdout, out.stderr)
    assert "did you mean 'optimizer.lr'" in out.stderr
