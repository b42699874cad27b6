"""examples/slurm as a user runs them: settings and headers checked without a cluster (DRY_RUN, the scripts'
own functions), then the scripts submitted for real on the CI cluster (marked `slurm`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.slurm_helpers import REPO, direct_torchrun, job_info, require_cluster, submit, wait_jobs

SLURM = REPO / "examples" / "slurm"


def _bash(script: str, env: dict[str, str], cwd: str | Path) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(["bash", "-c", script], env=full, cwd=cwd, capture_output=True, text=True, timeout=60)


def _dry_pipeline(env: dict[str, str]) -> list[str]:
    r = _bash(f"bash {SLURM}/pipeline.sh", {"DRY_RUN": "1", "HF_BASE": "/m", "EVAL_IMAGE": "/e.sqsh", **env}, REPO)
    assert r.returncode == 0, r.stderr
    return [ln.replace("\\ ", " ") for ln in r.stderr.splitlines() if ln.startswith("sbatch")]


def test_rope_override_can_be_switched_off():
    assert "--override rope_theta=300000" in _dry_pipeline({})[0]
    assert "--override" not in _dry_pipeline({"ROPE_OVERRIDE": ""})[0]
    assert "--override rope_theta=1" in _dry_pipeline({"ROPE_OVERRIDE": "rope_theta=1"})[0]


def test_training_stages_take_extra_overrides():
    cmds = _dry_pipeline({"SFT_OVERRIDES": "optimizer.lr=2e-6 train.max_steps=3", "REDI_OVERRIDES": "loss.alpha=1"})
    assert cmds[1].endswith("optimizer.lr=2e-6 train.max_steps=3") and cmds[2].endswith("loss.alpha=1")


def _headers(name: str) -> dict[str, str]:
    text = (SLURM / name).read_text()
    return dict(m.groups() for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))


def test_logs_open_before_the_script_runs_requeue_and_signal():
    for name in ("train.sbatch", "run.sbatch"):
        h = _headers(name)
        assert "/" not in h["output"], f"{name}: --output in a directory Slurm may not find: {h['output']}"
        assert h["open-mode"] == "append"
    h = _headers("train.sbatch")
    assert "requeue" in h and h["signal"] == "B:USR1@120"


def test_gitignore_lists_the_pipeline_outputs():
    ignored = set((REPO / ".gitignore").read_text().split())
    assert {"/runs/", "/checkpoints/", "/hf/", "/evals/", "slurm-*.out"} <= ignored


def test_master_addr_is_an_address(tmp_path):
    """The rendezvous address is the first node's IP address, not its name."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    (fake / "scontrol").chmod(0o755)
    r = _bash(f"source {SLURM}/common.sh; first_node_addr",
              {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost"}, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "127.0.0.1", (r.stdout, r.stderr)


# ----------------------------------------------------------------------------- on the CI cluster

def _overrides(data: dict, run: Path) -> list[str]:
    return [f"data.train_path={data['positives']}", f"data.tokenizer={data['tokenizer']}", "train.max_steps=3",
            "train.epochs=1", f"checkpoint.save_dir={run}", "checkpoint.save_interval=0", "logging.tensorboard=false",
            "data.max_prompt_tokens=200", "data.max_completion_tokens=400", "data.micro_batch_tokens=640"]


def _losses(run: Path) -> list[tuple[int, float]]:
    from redi_megatron.training.logging import read_metrics

    return [(r["step"], r["loss"]) for r in read_metrics(str(run))]


def _train_job(tmp_path: Path, data: dict, extra_env: dict[str, str], sbatch_args: list[str]) -> tuple[int, str]:
    env = require_cluster()
    env.update({"REPO_DIR": str(REPO), "CONTAINER_DIR": str(REPO), "IMAGE": "redi-ci.sqsh", "OMP_NUM_THREADS": "1",
                **extra_env})
    job = submit(SLURM / "train.sbatch", str(REPO / "examples/configs/tiny_cpu_sft.yaml"),
                 *_overrides(data, tmp_path / "run"),
                 sbatch_args=["--time=5", *sbatch_args], env=env, cwd=tmp_path)
    states = wait_jobs([job], timeout=180)
    log = (tmp_path / f"slurm-redi-train-{job}.out").read_text()
    assert states[job] == "COMPLETED", log[-3000:]
    return job, log


@pytest.mark.slurm
def test_train_sbatch_two_nodes_gpus_from_allocation(tmp_path, tiny_train_data):
    """2 nodes x 1 GPU through the pyxis flags: the log is in the submit dir, GPUS_PER_NODE follows
    --gpus-per-node (not 8), the rendezvous is an address, no --node-rank warning."""
    job, log = _train_job(tmp_path, tiny_train_data, {}, ["--nodes=2", "--gpus-per-node=1"])
    assert "2 node(s) x 1 GPU(s), rendezvous 127.0.0.1:" in log, log[-3000:]
    assert "node_rank" not in log and "node-rank" not in log
    assert job_info(job)["ExitCode"] == "0:0"
    # the same config under a direct torchrun (2 workers on this machine): the same per-step losses
    direct_torchrun(REPO / "examples/configs/tiny_cpu_sft.yaml", _overrides(tiny_train_data, tmp_path / "direct"),
                    port=29500 + os.getpid() % 1000, timeout=180)
    slurm, direct = _losses(tmp_path / "run"), _losses(tmp_path / "direct")
    assert len(slurm) == 3 and slurm == direct


@pytest.mark.slurm
def test_pipeline_failed_stage_cancels_its_dependants(tmp_path):
    """pipeline.sh as a user runs it, from the SFT stage with a base checkpoint that does not exist: the SFT job
    fails and every job after it is cancelled (not left pending forever)."""
    env = require_cluster()
    env.update({"REPO_DIR": str(REPO), "CONTAINER_DIR": str(REPO), "IMAGE": "redi-ci.sqsh", "START_AT": "sft",
                "STOP_AT": "export", "SFT_CONFIG": "examples/configs/tiny_cpu_sft.yaml",
                "REDI_CONFIG": "examples/configs/tiny_cpu_redi.yaml", "NAME": "ci", "NODES": "2",
                "BASE_CKPT": str(tmp_path / "no_such_checkpoint"), "SFT_RUN": str(tmp_path / "sft"),
                "REDI_RUN": str(tmp_path / "redi"), "HF_OUT": str(tmp_path / "hf"), "SBATCH_GPUS_PER_NODE": "1"})
    r = subprocess.run(["bash", str(SLURM / "pipeline.sh")], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    squeue = subprocess.run(["scontrol", "show", "job", "-o"], env=env, capture_output=True, text=True, timeout=30)
    ids = [int(m) for m in re.findall(r"JobId=(\d+) JobName=redi-(?:sft|redi|export-sft|export) ", squeue.stdout)]
    ids = sorted(ids)[-4:]
    states = wait_jobs(ids, timeout=120)
    assert [states[j] for j in ids] == ["FAILED", "CANCELLED", "CANCELLED", "CANCELLED"], states


@pytest.mark.slurm
@pytest.mark.parametrize("mode", ["pyxis", "none"])
def test_run_sbatch_container_modes(tmp_path, mode):
    """run.sbatch with the pyxis flags (the look-alike plugin) and without a container (CONTAINER=none): the
    command runs in the repository with common.sh's helpers, and its log lands in the submit directory."""
    env = require_cluster()
    env.update({"REPO_DIR": str(REPO), "CONTAINER_DIR": str(REPO), "IMAGE": "redi-ci.sqsh", "CONTAINER": mode})
    job = submit(SLURM / "run.sbatch", 'echo "pwd=$PWD image=${FAKE_PYXIS_IMAGE:-none} $(type -t latest_ckpt)"',
                 sbatch_args=["--gpus-per-node=0"], env=env, cwd=tmp_path)
    assert wait_jobs([job], timeout=60) == {job: "COMPLETED"}
    log = (tmp_path / f"slurm-redi-run-{job}.out").read_text()
    image = "redi-ci.sqsh" if mode == "pyxis" else "none"
    assert f"pwd={REPO} image={image} function" in log, log


def _tiny_hf_base(path: Path, tokenizer_dir: str) -> None:
    """A tiny random Qwen2 in HF format with the tests' tiny tokenizer: what `HF_BASE` names."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    Qwen2ForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))


@pytest.mark.slurm
def test_pipeline_whole_chain_on_two_nodes(tmp_path, tiny_train_data):
    """pipeline.sh from `convert` to `eval` on the tiny recipes, training on 2 nodes x 1 worker: six jobs, each
    started only after what it depends on ended (afterok), every one COMPLETED, and each stage's output where the
    next one reads it. The evaluation runs with the HF backend on CPU (vLLM has its own CI, .ci/vllm)."""
    env = require_cluster()
    _tiny_hf_base(tmp_path / "hf_base", tiny_train_data["tokenizer"])
    data = (f"data.tokenizer={tiny_train_data['tokenizer']} train.max_steps=2 logging.tensorboard=false "
            "data.max_prompt_tokens=200 data.max_completion_tokens=400")
    env.update({"REPO_DIR": str(REPO), "CONTAINER_DIR": str(REPO), "IMAGE": "redi-ci.sqsh", "OMP_NUM_THREADS": "1",
                "HF_BASE": str(tmp_path / "hf_base"), "SFT_CONFIG": "examples/configs/tiny_cpu_sft.yaml",
                "REDI_CONFIG": "examples/configs/tiny_cpu_redi.yaml", "NAME": "ci", "NODES": "2",
                "BASE_CKPT": str(tmp_path / "base"), "SFT_RUN": str(tmp_path / "sft"),
                "REDI_RUN": str(tmp_path / "redi"), "HF_OUT": str(tmp_path / "hf"), "EVAL_OUT": str(tmp_path / "evals"),
                "SFT_OVERRIDES": f"data.train_path={tiny_train_data['positives']} data.micro_batch_tokens=640 {data}",
                "REDI_OVERRIDES": f"data.train_path={tiny_train_data['pairs']} {data}",
                "EVAL_IMAGE": "redi-ci-eval.sqsh", "SBATCH_GPUS_PER_NODE": "1",
                "EVAL_ARGS": "--backend hf --benchmarks math500 --limit 1 --n 1 --max-new-tokens 4 --grade-workers 1 "
                             "--no-progress"})
    r = subprocess.run(["bash", str(SLURM / "pipeline.sh")], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out = subprocess.run(["scontrol", "show", "job", "-o"], env=env, capture_output=True, text=True, timeout=30).stdout
    ids = {m.group(2): int(m.group(1)) for m in re.finditer(r"JobId=(\d+) JobName=redi-([\w-]+) .*", out)
           if f" WorkDir={tmp_path} " in m.group(0)}
    assert sorted(ids) == sorted(["convert", "sft", "redi", "export-sft", "export", "eval"]), out
    states = wait_jobs(ids.values(), timeout=420)
    logs = {n: (tmp_path / f"slurm-redi-{n}-{j}.out").read_text() for n, j in ids.items()}
    assert set(states.values()) == {"COMPLETED"}, {n: (states[j], logs[n][-2000:]) for n, j in ids.items()}
    info = {n: job_info(j) for n, j in ids.items()}
    after = {"sft": ["convert"], "redi": ["sft"], "export-sft": ["sft"], "export": ["redi"],
             "eval": ["export", "export-sft"]}
    for job, deps in after.items():  # afterok: started no earlier than each dependency ended
        for dep in deps:
            assert info[job]["StartTime"] >= info[dep]["EndTime"], (job, dep, info[job], info[dep])
    assert "2 node(s) x 1 GPU(s)" in logs["sft"] and "2 node(s) x 1 GPU(s)" in logs["redi"]
    redi_meta = json.loads((tmp_path / "redi/checkpoints/step_0000002/redi_meta.json").read_text())
    assert redi_meta["run_config"]["checkpoint"]["init_from"] == str(tmp_path / "sft/checkpoints/step_0000002")
    for model in ("sft", "redi"):
        assert (tmp_path / "hf" / model / "config.json").is_file()
        report = json.loads((tmp_path / "evals" / model / "report.json").read_text())
        assert list(report["benchmarks"]) == ["math500"], report
