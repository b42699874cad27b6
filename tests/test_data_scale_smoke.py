"""CI smoke run of ``benchmarks/data_scale.py`` at a tiny N: every stage runs for real (curation, the cache
build, the sampler, a 2-rank torchrun of the shipped SFT recipe to its first step) and the figures come out.
The figures themselves are recorded in docs/data.md from larger runs; nothing here is timed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_data_scale_benchmark_reaches_the_first_step(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "data_scale.py"), "--rows", "200",
                        "--num-proc", "1", "--tokenizer", "tiny", "--no-cold", "--work", str(tmp_path / "work"),
                        "--keep", "--out", str(out)], env=env, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["rows"] == 200 and res["tokenizer"] == "tiny"
    assert 0 < res["curate"]["positives"] == res["sampler"]["samples"]
    assert res["tokenize"]["tokens"] == res["sampler"]["tokens"] > 0  # stored counts == the cache's tokens
    warm = res["train_warm"]
    assert 0 < warm["first_step_s"] <= warm["wall_s"]
    assert {"rank0", "rank1"} <= set(warm["peak_rss_mb"]) and all(v > 0 for v in warm["peak_rss_mb"].values())
    # the warm run opened the ready cache (data.cache_dir): it built none beside the data or in its run
    work = tmp_path / "work"
    assert (work / "cache").is_dir() and not (work / "curated" / "tokenized").exists()
    assert not (work / "run_warm" / "cache").exists()
    assert len(json.loads((tmp_path / "work" / "run_warm" / "metrics.jsonl").read_text().splitlines()[0])) > 0
    assert set(res["extrapolated_to_516k_rows_s"]) == {"generate", "curate", "tokenize"}
    assert "extrapolated to 516499 rows" in r.stdout
