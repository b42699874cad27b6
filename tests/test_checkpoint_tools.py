"""checkpoint_tools/: the top-level entry points run the conversion tools from a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_checkpoint_tools_scripts_run_the_converters(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script finds the package itself
    for tool in ("hf_to_megatron", "megatron_to_hf", "verify_parity"):
        r = subprocess.run([sys.executable, str(REPO / "checkpoint_tools" / f"{tool}.py"), "--help"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage:" in r.stdout, r.stderr
    # a real run: bad input is refused in one line (exit 2) by the same code as the console script
    r = subprocess.run([sys.executable, str(REPO / "checkpoint_tools" / "megatron_to_hf.py"), "--megatron",
                        str(tmp_path / "missing"), "--out", str(tmp_path / "hf")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr, r.stderr
