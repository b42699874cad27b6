"""A rank killed with -9 leaves no helper process behind (issue 13: the checkpoint writer's spawned
Manager and multiprocessing's resource tracker kept running for minutes, holding the log open)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

SCRIPT = r"""
import os, sys, tempfile, time
from redi_megatron.models.builder import build_gpt_model
from redi_megatron.models.checkpoint import save_model_checkpoint
from redi_megatron.models.config import ModelConfig, ParallelConfig
from redi_megatron.parallel.state import init_parallel

if __name__ == "__main__":
    init_parallel()
    cfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                      num_query_groups=1, vocab_size=64)
    save_model_checkpoint([build_gpt_model(cfg, ParallelConfig())], cfg, os.path.join(sys.argv[1], "ckpt"))
    print("saved", flush=True)
    time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux-only")
def test_helpers_die_with_a_killed_rank(tmp_path):
    script = tmp_path / "save_and_wait.py"
    script.write_text(SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=root, env=env)
    try:
        assert proc.stdout.readline().strip() == "saved"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the writer's helper process was expected to exist while the rank runs"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.time() + 15
        alive = children
        while alive and time.time() < deadline:
            alive = [c for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
            time.sleep(0.2)
        assert not alive, f"still running after the rank was killed: {[c.cmdline()[:3] for c in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
