"""Issue 24, what a newcomer trips on: a loss typo is one line with a suggestion before Megatron starts;
``redi-train --help`` points at keys, ranges, recipes and docs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_loss_typo_is_one_line_with_a_suggestion_before_megatron():
    r = _run("import sys; from redi_megatron.training.cli import main; "
             "rc = main(['--config', 'examples/configs/tiny_cpu_redi.yaml', 'loss.name=redy']); "
             "print('megatron' if 'megatron.core' in sys.modules else 'no-megatron'); sys.exit(rc)")
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert "\n" not in err and "did you mean 'loss.name=redi'" in err, err
    assert r.stdout.strip() == "no-megatron"


def test_train_help_points_at_keys_ranges_recipes_and_docs():
    r = _run("from redi_megatron.training.cli import main; main(['--help'])")
    out = " ".join(r.stdout.split())
    for needle in ("docs/training.md", "Allowed ranges", "examples/configs", "optimizer.*", "loss.params"):
        assert needle in out, needle
