"""benchmarks/gpu_check.py on the CPU with tiny shapes: the JSON it writes, its checks, and that they fail.

The GPU run itself cannot happen here (docs/gpu.md); these tests run the same script end to end on the
CPU path (``--device cpu --tiny``), so the parts, the checks and the report are what the GPU run uses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
PARTS = ("packed_vs_alone", "matmul_ceiling", "throughput_sft", "throughput_redi", "fused_head", "parity_vs_cpu")


def _run(out, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--tiny", "--quick", "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=240)
    path = out / "gpu_check.json"
    assert path.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(path.read_text())


def test_cpu_smoke_run_writes_the_report_and_passes(tmp_path):
    proc, r = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert r["ok"] is True and "GPU_CHECK PASS" in proc.stdout
    assert set(r) == {"meta", "parts", "checks", "ok"}
    assert set(r["parts"]) == set(PARTS)
    for key in ("device", "torch", "megatron_core", "python", "transformer_engine", "tf32_matmul_in_training",
                "datasheet_tflops", "total_s"):
        assert key in r["meta"]
    assert r["meta"]["tf32_matmul_in_training"] is False
    expected = {f"{p}_memory_released" for p in PARTS} | {
        "packed_equals_alone", "planted_attention_leak_detected", "fused_head_matches_unfused",
        "throughput_sft_finite", "throughput_sft_memory_flat", "throughput_redi_finite",
        "throughput_redi_memory_flat", "parity_fp32_sft", "parity_fp32_redi", "parity_bf16_sft",
        "parity_bf16_redi"}
    assert expected <= set(r["checks"]), sorted(r["checks"])
    assert all(c["ok"] for c in r["checks"].values()), r["checks"]
    # throughput: the recipes' settings (rows scaled down by --tiny), per-step records and the summary
    for loss, row in (("sft", 512), ("redi", 640)):
        t = r["parts"][f"throughput_{loss}"]
        assert (t["row_tokens"], t["recompute"], t["dtype"], t["fused_logprobs"]) == (row, "full", "bf16", True)
        assert len(t["steps"]) == 1 + 3 and [s["warmup"] for s in t["steps"]] == [True, False, False, False]
        for s in t["steps"]:
            assert {"seconds", "tokens", "tokens_per_s", "peak_mem_gib", "mem_after_gib", "loss"} <= set(s)
            assert s["tokens"] <= row and s["tokens_per_s"] > 0
        for key in ("median_step_s", "tokens_per_s", "model_tflops", "mfu_datasheet", "mfu_measured_ceiling",
                    "mem_growth_gib"):
            assert isinstance(t[key], float), key
    steps = [json.loads(x) for x in (tmp_path / "gpu_check_steps.jsonl").read_text().splitlines()]
    assert [s["part"] for s in steps] == ["throughput_sft"] * 4 + ["throughput_redi"] * 4
    pv = r["parts"]["packed_vs_alone"]
    assert pv["row_tokens"] == 512 and len(pv["packed"]["per_sequence"]) == 4
    assert pv["attention-leak"]["worst_rms"] > 10 * pv["packed"]["worst_rms"]
    assert r["parts"]["matmul_ceiling"]["model_gemms_tflops"] > 0
    assert r["parts"]["fused_head"]["tokens"] == 512


def test_planted_leaks_make_the_check_fail(tmp_path):
    """Negative controls: a packed row whose sequences attend to each other, memory kept alive every step,
    and a part's model kept alive into the next; the check must report each and exit 1 (the others pass)."""
    proc, r = _run(tmp_path, "--parts", "packed_vs_alone,throughput_sft", "--plant", "attention-leak",
                   "--plant", "memory-leak", "--leak-mib", "64", "--plant", "keep-model")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert r["ok"] is False and "GPU_CHECK FAIL" in proc.stdout
    failed = {k for k, c in r["checks"].items() if not c["ok"]}
    # keep-model: the packed part's model and optimizer stay alive into the next part (main's old REDI run)
    assert failed == {"packed_equals_alone", "throughput_sft_memory_flat", "throughput_sft_memory_released"}, \
        r["checks"]
    assert r["parts"]["throughput_sft"]["mem_growth_gib"] >= 0.1  # 64 MiB x 2 more timed steps


def test_needs_a_device(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
