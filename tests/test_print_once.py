"""Issue 24: under torchrun every rank runs redi-train; what a user reads (a start-up warning, an error
every rank hits, the final "done") is printed once, by rank 0. Real torchrun, 2 gloo ranks."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(data: dict, save_dir: Path, *extra: str, train_path: str = "") -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
           "-m", "redi_megatron.training.cli", "--config", str(ROOT / "examples/configs/tiny_cpu_sft.yaml"),
           f"data.train_path={train_path or data['positives']}", f"data.tokenizer={data['tokenizer']}",
           f"checkpoint.save_dir={save_dir}", "data.max_prompt_tokens=200", "data.max_completion_tokens=312",
           *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return r.stdout + r.stderr


def test_an_error_every_rank_hits_is_printed_once(tiny_train_data, tmp_path):
    log = _torchrun(tiny_train_data, tmp_path / "run", "loss.name=redi")  # positives to REDI: every rank
    assert log.count("redi-train: error") == 1 and "holds positives" in log, log[-3000:]


def test_a_lock_refusal_broadcast_from_rank0_is_printed_once(tiny_train_data, tmp_path):
    from redi_megatron.locks import exclusive, lock_path_for

    save = tmp_path / "run"
    with exclusive(lock_path_for(os.path.abspath(save)), "run directory (held by the test)"):
        log = _torchrun(tiny_train_data, save, "train.max_steps=1")
    assert log.count("is in use by another process") == 1 and log.count("redi-train: error") == 1, log[-3000:]


def test_a_warning_and_done_are_printed_once(tiny_train_data, tmp_path):
    data = tmp_path / "data.jsonl"  # no curation_report.json beside it: a start-up warning on every rank
    shutil.copy(tiny_train_data["positives"], data)
    log = _torchrun(tiny_train_data, tmp_path / "run", "train.max_steps=2", "checkpoint.save_interval=0",
                    train_path=str(data))
    assert log.count("warning: no curation_report.json") == 1, log[-3000:]
    assert log.count("redi-train: done, 2/2 steps") == 1, log[-3000:]
