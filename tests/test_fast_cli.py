"""Issue 24: the converters parse their arguments before importing torch or Megatron (``--help`` and argument
errors in a fraction of a second, where importing torch takes 2-9 s), by every way they start: console script
entry point, ``checkpoint_tools/`` wrapper, ``python -m``; and ``redi-train`` refuses a ``loss.name`` typo
without importing torch. Checked by what was imported (``-X importtime``), not by timing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("hf_to_megatron", "megatron_to_hf", "verify_parity")


def _imported(*argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime argv``; the process and every module it imported."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    mods = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    return r, mods


def _heavy(mods: set[str]) -> set[str]:
    return {m for m in mods if m.split(".")[0] in ("torch", "megatron", "transformers", "numpy")}


@pytest.mark.parametrize("tool", TOOLS)
def test_converter_help_and_argument_errors_import_no_torch(tool):
    starts = [("-c", f"import sys; from redi_megatron.convert.cli import {tool}; sys.exit({tool}(sys.argv[1:]))"),
              (str(ROOT / "checkpoint_tools" / f"{tool}.py"),),
              ("-m", f"redi_megatron.convert.{tool}")]
    for start in starts:
        r, mods = _imported(*start, "--help")
        assert r.returncode == 0 and "usage: redi-" in r.stdout, (start, r.stderr[-2000:])
        assert not _heavy(mods), (start, sorted(_heavy(mods))[:5])
        r, mods = _imported(*start)  # no arguments: the required ones are missing
        assert r.returncode == 2 and "the following arguments are required" in r.stderr, (start, r.stderr[-500:])
        assert not _heavy(mods), (start, sorted(_heavy(mods))[:5])


def test_console_scripts_start_at_the_light_parsers():
    setup = (ROOT / "setup.py").read_text()
    for tool in TOOLS:
        assert f"redi-{tool.replace('_', '-')}=redi_megatron.convert.cli:{tool}" in setup


def test_a_loss_typo_is_refused_without_importing_torch():
    code = ("import sys; from redi_megatron.training.cli import main; "
            "sys.exit(main(['--config', 'examples/configs/tiny_cpu_redi.yaml', 'loss.name=redy']))")
    r, mods = _imported("-c", code)
    err = r.stderr.split("\n")
    err = [line for line in err if not line.startswith("import time:") and line.strip()]
    assert r.returncode == 2 and err == ["redi-train: error: 'loss.name': unknown loss 'redy'; did you mean "
                                         "'loss.name=redi'? Known losses: dpo, redi, sft, simpo"], err
    assert not _heavy(mods), sorted(_heavy(mods))[:5]


def test_the_builtin_loss_list_is_the_registry():
    from redi_megatron.config.schema import BUILTIN_LOSSES
    from redi_megatron.errors import UserError
    from redi_megatron.losses.registry import available_losses, get_loss

    assert list(BUILTIN_LOSSES) == sorted(BUILTIN_LOSSES) == available_losses()
    with pytest.raises(UserError) as e:  # the same message as the registry's
        get_loss("redy")
    assert str(e.value) == ("'loss.name': unknown loss 'redy'; did you mean 'loss.name=redi'? Known losses: "
                            + ", ".join(available_losses()))
