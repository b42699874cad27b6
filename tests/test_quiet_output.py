"""Issue 24: the demo is quiet by default (one progress line per stage, the tools' output in the stage log), and
the warnings every CPU run printed are fixed where they arise, not filtered by the tests: Megatron's fp32 shard
``.grad`` reads through compat/cpu.py, CUDA_DEVICE_MAX_CONNECTIONS on a CPU, torch 2.13's renamed collectives,
and the checkpoint loader's deprecations. Real runs: a TP=2 torchrun training that saves, then one that starts from
(loads) its checkpoint, must print no warning at all."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_is_quiet_by_default_and_logs_everything(tmp_path, capsys):
    from redi_megatron.demo import runner
    from redi_megatron.demo.cli import build_parser

    args = build_parser().parse_args(["--out", str(tmp_path)])
    assert not args.verbose and runner.Context(out=str(tmp_path), cfg=None).echo is False
    noisy = "import warnings\nfor i in range(500): print(f'step {i}/500', flush=True)\nwarnings.warn('loud')"

    def run(ctx):
        ctx.command([sys.executable, "-c", noisy])

    stage = runner.Stage("noisy", "a tool that prints a line per step", run, lambda ctx: [])
    ctx = runner.Context(out=str(tmp_path), cfg=None)
    runner.run_stages([stage], ctx, {}, progress=print)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[1/1] noisy: a tool that prints a line per step" and out[-1].startswith("    noisy done in")
    assert len(out) <= 3, out  # the header, at most one heartbeat, the done line
    log = (tmp_path / "logs" / "noisy.log").read_text()
    assert "step 499/500" in log and "UserWarning: loud" in log


def _train(data: dict, save: Path, *extra: str) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
           "-m", "redi_megatron.training.cli", "--config", str(ROOT / "examples/configs/tiny_cpu_sft.yaml"),
           f"data.train_path={data['positives']}", f"data.tokenizer={data['tokenizer']}", f"checkpoint.save_dir={save}",
           "data.max_prompt_tokens=200", "data.max_completion_tokens=312", "parallel.tp=2", "train.max_steps=1",
           *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_DEVICE_MAX_CONNECTIONS", "PYTHONWARNINGS")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_a_tp2_cpu_run_that_saves_and_resumes_prints_no_warning(tiny_train_data, tmp_path):
    for save, extra in ((tmp_path / "a", ()), (tmp_path / "b", (f"checkpoint.init_from={tmp_path / 'a'}",))):
        r = _train(tiny_train_data, save, *extra)  # the second run loads the first one's checkpoint
        log = r.stdout + r.stderr
        assert r.returncode == 0 and "redi-train: done, 1/1 steps" in log, log[-3000:]
        assert "Warning" not in log and "warnings.warn" not in log, log[-3000:]
