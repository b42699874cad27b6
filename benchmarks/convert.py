"""Time and peak host memory of HF -> Megatron and Megatron -> HF conversion for a random model.

    python benchmarks/convert.py                       # Qwen2.5-0.5B shapes, bf16 (~1 GB of weights)
    python benchmarks/convert.py --preset tiny         # seconds, for a smoke run

Each direction runs in a fresh process (the CLI's own ``main``) that reports its peak RSS; the
"weights" column is the size of the safetensors, and "extra" = (peak - RSS after imports) / weights,
i.e. how many copies of the weights the conversion holds at its peak (1.0 = exactly one). The export
is checked bit-exact against the input.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = {  # family, layers, hidden, ffn, heads, kv heads, vocab, tied
    "0.5b": dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(num_hidden_layers=28, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True),
}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(direction: str, args: list[str]) -> None:
    """Runs in the measured process: import everything, note the RSS, convert, report the peak."""
    import megatron.core.models.gpt  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from redi_megatron.convert import hf_to_megatron, megatron_to_hf

    base = _rss_mb()
    main = hf_to_megatron.main if direction == "import" else megatron_to_hf.main
    t0 = time.perf_counter()
    rc = main(args + ["--no-progress"])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"rc": rc, "seconds": seconds, "base_mb": base, "peak_mb": peak}
    print("RESULT " + json.dumps(result), flush=True)


def _measure(direction: str, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, __file__, "--_child", direction, "--", *args], env=env,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{direction} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _make_hf(path: Path, shape: dict, dtype: str) -> int:
    """config.json + random safetensors (written tensor by tensor's worth of memory). Returns bytes."""
    import torch
    from safetensors.torch import save_file

    from redi_megatron.convert.hf_io import read_hf_config
    from redi_megatron.convert.mappings import expected_hf_tensors

    path.mkdir(parents=True)
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "torch_dtype": dtype, "use_sliding_window": False, **shape}
    (path / "config.json").write_text(json.dumps(config))
    family, cfg, _ = read_hf_config(path)
    g = torch.Generator().manual_seed(0)
    tensors = {n: (0.02 * torch.randn(s, generator=g)).to(getattr(torch, dtype))
               for n, s in expected_hf_tensors(family, cfg).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    with safe_open(str(a / "model.safetensors"), "pt") as fa:
        files = sorted(b.glob("*.safetensors"))
        seen = set()
        for f in files:
            with safe_open(str(f), "pt") as fb:
                for k in fb.keys():
                    seen.add(k)
                    if not torch.equal(fa.get_tensor(k), fb.get_tensor(k)):
                        return False
        return seen == set(fa.keys())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="0.5b")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--workdir", default=None, help="where to write the models (default: a temp dir)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        _child(args._child, args.rest)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="redi_convert_bench_"))
    try:
        hf, mcore, back = work / "hf", work / "mcore", work / "hf_back"
        weights = _make_hf(hf, PRESETS[args.preset], args.dtype)
        rows = [("hf->megatron", _measure("import", ["--hf", str(hf), "--out", str(mcore)])),
                ("megatron->hf", _measure("export", ["--megatron", str(mcore), "--out", str(back)]))]
        exact = _same_tensors(hf, back)
        print(f"preset {args.preset}, {args.dtype}: weights {weights / 2**20:.0f} MiB "
              f"({weights / (2 if args.dtype == 'bfloat16' else 4) / 1e6:.0f} M params); "
              f"export bit-exact: {exact}")
        print(f"{'direction':<14}{'seconds':>9}{'RSS after imports':>19}{'peak RSS':>10}"
              f"{'extra/weights':>15}")
        for name, r in rows:
            extra = (r["peak_mb"] - r["base_mb"]) * 2**20 / weights
            print(f"{name:<14}{r['seconds']:>9.1f}{r['base_mb']:>15.0f} MiB{r['peak_mb']:>6.0f} MiB"
                  f"{extra:>15.2f}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
