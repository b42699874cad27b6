"""Per-GPU memory estimate of a recipe: weights, gradients, optimizer states, activations under full
recompute, and the fused log-prob head. Computed from the config, not measured; prints one table.

Assumptions (the trainer's defaults): bf16 weights (2 B/param), fp32 main gradients (4 B/param,
``grad_reduce_in_fp32``), Megatron's distributed optimizer (fp32 master copy + Adam m and v = 12 B/param,
sharded over DP), ``train.recompute: full`` (uniform, 1 layer: each layer's bf16 input is kept, one layer
is recomputed at a time), flash/THD attention (no S x S scores), the fused log-prob head (one fp32
[chunk, V/TP] workspace forward and one backward, ``parallel/fused_logprobs.py``). Under 1F1B the first
stage holds ``pp`` microbatches of layer inputs. A fixed 3 GiB covers the CUDA context and allocator slack.

    python benchmarks/memory_estimate.py examples/configs/qwen3-1.7b_redi.yaml --gpus 8
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from redi_megatron.config import load_config  # noqa: E402
from redi_megatron.parallel.fused_logprobs import CHUNK_ELEMENTS  # noqa: E402

GIB = 1 << 30
OVERHEAD = 3 * GIB


def param_count(m) -> tuple[int, int]:
    """(total parameters, parameters of one transformer layer)."""
    q, kv = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    layer = m.hidden_size * (q + 2 * kv) + q * m.hidden_size + 3 * m.hidden_size * m.ffn_hidden_size
    layer += 2 * m.hidden_size + (q + 2 * kv if m.add_qkv_bias else 0) + (2 * m.head_dim if m.qk_layernorm else 0)
    vocab = m.padded_vocab_size() * m.hidden_size
    return m.num_layers * layer + vocab * (1 if m.tie_word_embeddings else 2) + m.hidden_size, layer


def estimate(cfg, gpus: int) -> dict[str, float]:
    m, p, tokens = cfg.model, cfg.parallel, cfg.data.micro_batch_tokens
    dp = gpus // (p.tp * p.pp * p.cp)
    total, layer = param_count(m)
    vocab = m.padded_vocab_size(p.tp) * m.hidden_size
    # First stage: its layers + the embedding (+ the output layer when PP=1 and untied).
    local = (m.num_layers // p.pp * layer + vocab * (1 if (p.pp > 1 or m.tie_word_embeddings) else 2)) / p.tp
    t = tokens // p.cp                       # tokens of one row on this rank
    sp = p.tp if p.sequence_parallel else 1
    h, f = m.hidden_size, m.ffn_hidden_size
    q, kv = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    kept = (m.num_layers // p.pp) * t * h * 2 / sp * min(p.pp, cfg.data.global_batch_size)
    # One layer recomputed, bf16: LN outs, residuals, proj/fc2 outs (h-wide, SP-split) and qkv, core attention
    # out, fc1 (gate+up), SwiGLU out (TP-split); backward holds gradients of the same size.
    working = 2 * 2 * t * (6 * h / sp + (q + 2 * kv + q + 3 * f) / p.tp)
    head = 2 * CHUNK_ELEMENTS * 4 + t * h * (2 + 4)  # two fp32 workspaces + final hidden states and their grad
    out = {
        "params (total, B)": total / 1e9,
        "weights bf16": 2 * local / GIB,
        "main grads fp32": 4 * local / GIB,
        "optimizer fp32 (/DP)": 12 * local / dp / GIB,
        "activations kept (recompute full)": kept / GIB,
        "one layer recomputed (fwd+bwd)": working / GIB,
        "log-prob head (fused)": head / GIB,
        "context + slack": OVERHEAD / GIB,
    }
    out["total per GPU (GiB)"] = sum(v for k, v in out.items() if k != "params (total, B)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-gib", type=float, default=80 * 1e9 / GIB, help="memory per GPU (80 GB = 74.5 GiB)")
    args = ap.parse_args(argv)
    for path in args.configs:
        cfg = load_config(path)
        p = cfg.parallel
        print(f"{path}: {args.gpus} GPUs, tp={p.tp} pp={p.pp} cp={p.cp} sp={p.sequence_parallel}, "
              f"row {cfg.data.micro_batch_tokens} tokens")
        est = estimate(cfg, args.gpus)
        for k, v in est.items():
            print(f"  {k:38s} {v:8.2f}")
        print(f"  {'fraction of one GPU':38s} {est['total per GPU (GiB)'] / args.gpu_gib:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
