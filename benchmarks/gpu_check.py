"""One-GPU check of the packed (THD) training path: parity with the CPU fp32 path, then throughput.

    python benchmarks/gpu_check.py [--out DIR] [--tokens 16384] [--steps 5]

Needs one CUDA GPU, torch, megatron-core 0.16 (a pure-Python wheel that can travel with the tree) and
this repository on ``PYTHONPATH``; no network, no tokenizer (sequences are synthetic token ids).
Transformer Engine's layer spec is used when TE imports, else Megatron's local spec with
``THDCoreAttention`` (one ``scaled_dot_product_attention`` per packed sequence: flash kernels).

1. Parity. A subprocess with CUDA hidden runs a tiny Qwen2-shaped model (head dim 64) on the CPU path
   (gloo, ``compat.cpu``) in fp32: SFT and REDI forward/backward through the trainer's schedule on
   packed THD rows. The same weights then run on CUDA in fp32 (TF32 off) and in bf16; the losses and
   gradients are compared (fp32: 1e-4 relative; bf16: 2e-2 on the loss, 5e-2 relative gradient norm).
2. Throughput. A Qwen2.5-1.5B-shaped model (28 x 1536, 12/2 heads, FFN 8960, vocab 151,936, tied) in
   bf16, one packed row of ``--tokens`` tokens per optimizer step (SFT: sequences of ``--seq-len``;
   REDI: pairs of them), Megatron's AdamW: median step time, tokens/s, MFU against ``--peak-tflops``,
   peak memory.

Prints a table and writes ``gpu_check.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=2,
            vocab_size=1000, max_position_embeddings=4096)
QWEN15 = dict(num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12, num_query_groups=2,
              vocab_size=151936, max_position_embeddings=32768, rope_theta=300000.0, norm_eps=1e-6,
              add_qkv_bias=True)


def _sequences(loss: str, count: int, length: int, vocab: int, seed: int) -> list:
    """``count`` sequences (SFT) or ``count // 2`` pairs of about ``length`` tokens, 256-token prompts."""
    from redi_megatron.data.batch import ROLE_CHOSEN, ROLE_REJECTED, ROLE_SFT, SequenceSpec

    rng = np.random.default_rng(seed)
    roles = [ROLE_SFT] * count if loss == "sft" else [ROLE_CHOSEN, ROLE_REJECTED] * (count // 2)
    out = []
    for i, role in enumerate(roles):
        n = int(rng.integers(length * 3 // 4, length + 1))
        out.append(SequenceSpec(rng.integers(0, vocab, n), min(256, n // 4), role,
                                i if loss == "sft" else i // 2))
    return out


def _components(model_kw: dict, dtype: str, loss: str, init_seed: int | None):
    """Model (DDP), optimizer and loss for one rank, the way ``training.components`` builds them."""
    from redi_megatron.config.schema import RunConfig
    from redi_megatron.losses import get_loss
    from redi_megatron.models.config import ModelConfig
    from redi_megatron.models.init import init_by_name
    from redi_megatron.parallel.state import groups
    from redi_megatron.training.components import build_model_and_optimizer

    cfg = RunConfig()
    cfg.train.dtype = dtype
    cfg.optimizer.lr, cfg.optimizer.warmup_ratio, cfg.optimizer.decay = 1e-6, 0.0, "constant"
    model_cfg = ModelConfig(**model_kw)
    chunks, optimizer, scheduler, use_te = build_model_and_optimizer(cfg, model_cfg, steps=100)
    if init_seed is not None:
        init_by_name(chunks, model_cfg, init_seed, 0, 1)
        optimizer.reload_model_params()
    spec = get_loss(loss)
    return SimpleNamespace(chunks=chunks, optimizer=optimizer, scheduler=scheduler, groups=groups(),
                           model_cfg=model_cfg, loss_spec=spec, use_te=use_te,
                           loss_hparams=spec.make_hparams({"alpha": 0.8} if loss == "redi" else {}))


def _parity_batch(loss: str):
    from redi_megatron.data.batch import build_microbatch

    seqs = _sequences(loss, 6, 700, TINY["vocab_size"], seed=1 if loss == "sft" else 2)
    return [build_microbatch(seqs[:3], 2304, pad_id=0, pad_to_multiple_of=8),
            build_microbatch(seqs[3:], 2304, pad_id=0, pad_to_multiple_of=8)]


def _parity_run(dtype: str) -> dict:
    """Loss and full gradients of one forward/backward per loss (this process's device)."""
    from redi_megatron.data.batch import StepBatch
    from redi_megatron.models.param_names import local_name
    from redi_megatron.parallel.loss_scaling import reduce_step_metrics
    from redi_megatron.testing.params import gather_stage_tensors
    from redi_megatron.training.step import forward_backward

    out = {}
    for loss in ("sft", "redi"):
        c = _components(TINY, dtype, loss, init_seed=7)
        batch = StepBatch(_parity_batch(loss), 0, 0, 0)
        metrics = reduce_step_metrics(forward_backward(c, batch), c.groups)
        grads = gather_stage_tensors(c.chunks, c.groups.tp, select=lambda p: p.main_grad)
        # keyed by local-spec names: the CPU reference runs the local spec, this process maybe TE's
        out[loss] = {"loss": metrics["loss"], "grads": {local_name(k): v.float().cpu() for k, v in grads.items()}}
    return out


def _compare(ref: dict, got: dict) -> dict:
    rows = {}
    for loss in ("sft", "redi"):
        r, g = ref[loss], got[loss]
        rel = max(float((g["grads"][k] - v).norm() / v.norm().clamp_min(1e-30)) for k, v in r["grads"].items())
        rows[loss] = {"loss_ref": r["loss"], "loss": g["loss"], "loss_abs_diff": abs(g["loss"] - r["loss"]),
                      "worst_grad_rel_norm_diff": rel}
    return rows


def _throughput(a, loss: str) -> dict:
    from redi_megatron.data.batch import StepBatch, build_microbatch
    from redi_megatron.training.step import train_step

    c = _components(QWEN15, "bf16", loss, init_seed=None)
    per_row = a.tokens // a.seq_len
    times, tokens = [], 0
    torch.cuda.reset_peak_memory_stats()
    for step in range(a.warmup + a.steps):
        seqs = _sequences(loss, per_row, a.seq_len, QWEN15["vocab_size"], seed=100 + step)
        mb = build_microbatch(seqs, a.tokens, pad_id=0, pad_to_multiple_of=8)
        torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = train_step(c, StepBatch([mb], int(mb.loss_mask.sum()), per_row // 2, per_row))
        torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.perf_counter() - start)
            tokens += int((mb.seq_ids >= 0).sum())
    lengths = [s.length for s in _sequences(loss, per_row, a.seq_len, QWEN15["vocab_size"], seed=100)]
    flops = _flops_per_token(QWEN15, sum(x * x for x in lengths) / sum(lengths))
    tps = tokens / sum(times)
    return {"step_s": statistics.median(times), "tokens_per_s": tps, "mfu": tps * flops / (a.peak_tflops * 1e12),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "loss": metrics["loss"],
            "use_te": c.use_te}


def _flops_per_token(m: dict, mean_len: float) -> float:
    """6 x (linear parameters + output layer) + causal attention (6 * layers * hidden * L per token)."""
    h, f, layers = m["hidden_size"], m["ffn_hidden_size"], m["num_layers"]
    head = h // m["num_attention_heads"]
    attn = h * (m["num_attention_heads"] + 2 * m["num_query_groups"]) * head + m["num_attention_heads"] * head * h
    linear = layers * (attn + 3 * h * f) + m["vocab_size"] * h
    return 6 * linear + 6 * layers * h * mean_len


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=".")
    p.add_argument("--tokens", type=int, default=16384, help="packed row length of one step")
    p.add_argument("--seq-len", type=int, default=4096, help="longest sequence of the throughput rows")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--cpu-reference", metavar="FILE", help=argparse.SUPPRESS)  # internal: the CPU subprocess
    a = p.parse_args(argv)
    from redi_megatron.parallel.state import destroy_parallel, init_parallel

    if a.cpu_reference:
        init_parallel()
        torch.save(_parity_run("fp32"), a.cpu_reference)
        destroy_parallel()
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    ref_file = os.path.join(a.out, "cpu_reference.pt")
    t0 = time.perf_counter()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--cpu-reference", ref_file], check=True, env=env)
    ref = torch.load(ref_file)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cpu_ref_s": time.perf_counter() - t0}
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    init_parallel()
    report["parity_fp32"] = _compare(ref, _parity_run("fp32"))
    report["parity_bf16"] = _compare(ref, _parity_run("bf16"))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    for loss in ("sft", "redi"):
        try:
            report[f"throughput_{loss}"] = _throughput(a, loss)
        except torch.OutOfMemoryError as err:
            report[f"throughput_{loss}"] = {"error": f"out of memory: {err}"[:300]}
        torch.cuda.empty_cache()
    destroy_parallel()
    report["total_s"] = time.perf_counter() - t0
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    _print(report, a)
    ok = all(r["loss_abs_diff"] < 1e-4 * max(1, abs(r["loss_ref"])) and r["worst_grad_rel_norm_diff"] < 1e-3
             for r in report["parity_fp32"].values())
    ok &= all(r["loss_abs_diff"] < 2e-2 * max(1, abs(r["loss_ref"])) and r["worst_grad_rel_norm_diff"] < 5e-2
              for r in report["parity_bf16"].values())
    print("PARITY", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def _print(r: dict, a) -> None:
    print(f"device {r['device']}, torch {r['torch']}")
    print(f"{'parity':<12}{'loss':<6}{'CPU fp32 loss':>15}{'GPU loss':>15}{'|diff|':>11}{'worst grad rel':>16}")
    for mode in ("parity_fp32", "parity_bf16"):
        for loss, x in r[mode].items():
            print(f"{mode[7:]:<12}{loss:<6}{x['loss_ref']:>15.6f}{x['loss']:>15.6f}{x['loss_abs_diff']:>11.2e}"
                  f"{x['worst_grad_rel_norm_diff']:>16.2e}")
    print(f"throughput: Qwen2.5-1.5B shape, bf16, {a.tokens}-token packed row per step, sequences <= {a.seq_len}")
    for loss in ("sft", "redi"):
        x = r[f"throughput_{loss}"]
        if "error" in x:
            print(f"  {loss}: {x['error']}")
            continue
        print(f"  {loss:<5} step {x['step_s'] * 1e3:8.1f} ms  {x['tokens_per_s']:9.0f} tokens/s"
              f"  MFU {100 * x['mfu']:5.1f}%  peak {x['peak_mem_gib']:6.1f} GiB  TE {x['use_te']}")
    print(f"total {r['total_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
