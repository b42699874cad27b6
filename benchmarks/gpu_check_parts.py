"""The measuring parts of ``benchmarks/gpu_check.py`` (read that file's docstring first).

Every part builds what it needs through the project's own code (``load_config`` on the recipes,
``build_model_and_optimizer``, ``train_step`` / ``forward_only``, the fused and unfused log-prob heads),
returns a JSON-able dict, and drops everything it built before it returns, so the caller's
``gc.collect()`` + ``torch.cuda.empty_cache()`` gives the next part an empty device.
"""
from __future__ import annotations

import ctypes
import gc
import os
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"sft": "examples/configs/qwen2.5-math-1.5b_sft.yaml",
           "redi": "examples/configs/qwen2.5-math-1.5b_redi.yaml"}
# --tiny: the recipes with a 2-layer, 256-wide model (head dim 64) and short rows (same 4:5 ratio of
# SFT to REDI row length as the recipes' 32,768 : 40,960).
TINY_MODEL = ["model.num_layers=2", "model.hidden_size=256", "model.ffn_hidden_size=512",
              "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=1000",
              "model.max_position_embeddings=4096"]
TINY_ROWS = {"sft": 512, "redi": 640}
GIB = 2 ** 30
KEEP_ALIVE: Optional[list] = None  # the "keep-model" negative control: components() parks what it built here


# ----------------------------------------------------------------------------- device helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mem_now(device: torch.device) -> float:
    """Bytes in use: the caching allocator's live tensors on CUDA; on the CPU the process's resident set
    after ``malloc_trim`` (glibc hands freed heap pages back first, so the figure follows live memory)."""
    if device.type == "cuda":
        return float(torch.cuda.memory_allocated())
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: plain RSS
        pass
    with open("/proc/self/statm") as f:
        return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))


def live_bytes(device: torch.device) -> float:
    """Bytes of tensors still alive: the caching allocator's count on CUDA; on the CPU (where RSS keeps
    freed pages) the storages of every tensor Python can reach (``gc``), which is exact for a model or
    optimizer that something still holds."""
    if device.type == "cuda":
        return float(torch.cuda.memory_allocated())
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # tensor subclasses without storage
            continue
    return float(total)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def mem_peak(device: torch.device) -> Optional[float]:
    """Peak bytes since :func:`reset_peak` (CUDA); None on the CPU (RSS has no resettable peak)."""
    return float(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None


def gib(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x / GIB, 4)


# ----------------------------------------------------------------------------- recipes and components
def recipe(loss: str, tiny: bool, extra: tuple[str, ...] = ()):
    """The recipe's ``RunConfig`` (examples/configs), random init (no checkpoint on this machine)."""
    from redi_megatron.config.loader import load_config

    overrides = list(extra)
    if tiny:
        overrides += TINY_MODEL + [f"data.micro_batch_tokens={TINY_ROWS[loss]}"]
    cfg = load_config(os.path.join(ROOT, RECIPES[loss]), overrides)
    cfg.checkpoint.init_from = None
    return cfg


def components(cfg, init_seed: Optional[int] = None) -> SimpleNamespace:
    """Model (DDP chunks), optimizer, scheduler and loss of one rank, built as ``training.components`` does."""
    from redi_megatron.losses import get_loss
    from redi_megatron.models.init import init_by_name
    from redi_megatron.parallel.state import groups
    from redi_megatron.training.components import build_model_and_optimizer

    chunks, optimizer, scheduler, use_te = build_model_and_optimizer(cfg, cfg.model, steps=100)
    if init_seed is not None:
        init_by_name(chunks, cfg.model, init_seed, 0, 1)
        optimizer.reload_model_params()
    spec = get_loss(cfg.loss.name)
    if KEEP_ALIVE is not None:
        KEEP_ALIVE.append((chunks, optimizer))
    return SimpleNamespace(cfg=cfg, chunks=chunks, optimizer=optimizer, scheduler=scheduler, groups=groups(),
                           model_cfg=cfg.model, loss_spec=spec, use_te=use_te,
                           loss_hparams=spec.make_hparams(cfg.loss.params))


def _spec(rng, length: int, role: int, sample_id: int, vocab: int):
    from redi_megatron.data.batch import SequenceSpec

    prompt = max(1, min(800, length // 4))  # the recipes allow prompts of up to 800 tokens
    return SequenceSpec(rng.integers(0, vocab, length), prompt, role, sample_id)


def fill_row(loss: str, row: int, seq_len: int, vocab: int, seed: int) -> list:
    """Sequences (SFT) or (chosen, rejected) pairs (REDI) of ``seq_len/4 .. seq_len`` tokens, packed until
    the ``row``-token row is full, as the sampler packs: the last one is cut to the space left."""
    from redi_megatron.data.batch import ROLE_CHOSEN, ROLE_REJECTED, ROLE_SFT

    rng = np.random.default_rng(seed)
    lo, out, used = max(8, seq_len // 4), [], 0
    while row - used >= (2 if loss == "redi" else 1) * lo:
        if loss == "sft":
            n = min(int(rng.integers(lo, seq_len + 1)), row - used)
            out.append(_spec(rng, n, ROLE_SFT, len(out), vocab))
            used += n
        else:
            a, b = (int(x) for x in rng.integers(lo, seq_len + 1, 2))
            scale = min(1.0, (row - used) / (a + b))
            a = max(lo // 2, int(a * scale))
            b = min(max(lo // 2, int(b * scale)), row - used - a)
            pair = len(out) // 2
            out += [_spec(rng, a, ROLE_CHOSEN, pair, vocab), _spec(rng, b, ROLE_REJECTED, pair, vocab)]
            used += a + b
    return out


def step_batch(seqs: list, row: int, multiple: int):
    from redi_megatron.data.batch import ROLE_CHOSEN, StepBatch, build_microbatch

    mb = build_microbatch(seqs, row, pad_id=0, pad_to_multiple_of=multiple)
    pairs = sum(s.role == ROLE_CHOSEN for s in seqs)
    return StepBatch([mb], int(mb.loss_mask.sum()), pairs, len(seqs))


def flops_per_token(m, mean_len: float) -> float:
    """Model FLOPs per trained token (no recompute): 6 x (linear parameters + output layer) + causal
    attention, ``6 * layers * heads * head_dim * mean_len`` with ``mean_len = sum(L^2) / sum(L)``."""
    h, f, layers, d = m.hidden_size, m.ffn_hidden_size, m.num_layers, m.head_dim
    attn = h * (m.num_attention_heads + 2 * m.num_query_groups) * d + m.num_attention_heads * d * h
    linear = layers * (attn + 3 * h * f) + m.vocab_size * h
    return 6 * linear + 6 * layers * m.num_attention_heads * d * mean_len


# ----------------------------------------------------------------------------- throughput at recipe shapes
def throughput(loss: str, a, device: torch.device, on_step: Callable[[dict], None]) -> dict:
    """``a.warmup + a.steps`` optimizer steps of the recipe (its model, row length, recompute, dtype,
    fused head, optimizer), one packed row per step, through ``training.step.train_step``.

    Per step: seconds, tokens/s, peak memory in the step and memory held after it. Summary: medians,
    model TFLOP/s, and the memory-flatness figure (growth of the memory held after each timed step).
    ``"memory-leak" in a.plant`` keeps a tensor alive per step (the negative control of that check).
    """
    from redi_megatron.training.components import sequence_multiple
    from redi_megatron.training.step import train_step

    cfg = recipe(loss, a.tiny)
    c = components(cfg)
    row, multiple, vocab = cfg.data.micro_batch_tokens, sequence_multiple(cfg), cfg.model.vocab_size
    seq_len = a.seq_len if a.seq_len else (160 if a.tiny else 8192)
    steps, leak, sq, lin = [], [], 0.0, 0.0
    # The timed steps replay the warmup steps' rows: every shape-keyed cache (Megatron's RoPE table per
    # max_seqlen, oneDNN's primitives on the CPU) is full before them, so memory that still grows is a leak.
    rows = [fill_row(loss, row, seq_len, vocab, seed=100 + i) for i in range(max(1, a.warmup))]
    for i in range(a.warmup + a.steps):
        seqs = rows[i % len(rows)]
        batch = step_batch(seqs, row, multiple)
        sync(device)
        reset_peak(device)
        start = time.perf_counter()
        metrics = train_step(c, batch)
        sync(device)
        seconds = time.perf_counter() - start
        if "memory-leak" in a.plant:
            leak.append(torch.ones(a.leak_mib * 2 ** 18, device=device))  # a.leak_mib MiB of fp32
        tokens = int((batch.microbatches[0].seq_ids >= 0).sum())
        rec = {"part": f"throughput_{loss}", "step": i, "warmup": i < a.warmup, "seconds": seconds,
               "tokens": tokens, "tokens_per_s": tokens / seconds, "peak_mem_gib": gib(mem_peak(device)),
               "mem_after_gib": gib(mem_now(device)), "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
               "update_skipped": bool(metrics["update_skipped"])}
        steps.append(rec)
        on_step(rec)
        if i >= a.warmup:
            lengths = [s.length for s in seqs]
            sq, lin = sq + sum(x * x for x in lengths), lin + sum(lengths)
    del c, leak
    timed = [s for s in steps if not s["warmup"]]
    total_tokens, total_s = sum(s["tokens"] for s in timed), sum(s["seconds"] for s in timed)
    tflops = total_tokens / total_s * flops_per_token(cfg.model, sq / lin) / 1e12
    held = [s["mem_after_gib"] for s in timed]
    peaks = [s["peak_mem_gib"] for s in timed if s["peak_mem_gib"] is not None]
    return {"row_tokens": row, "recompute": cfg.train.recompute, "dtype": cfg.train.dtype,
            "fused_logprobs": cfg.train.fused_logprobs, "seq_len_max": seq_len,
            "sequences_per_row": [len(r) for r in rows],
            "steps": steps, "median_step_s": statistics.median(s["seconds"] for s in timed),
            "tokens_per_s": total_tokens / total_s, "model_tflops": tflops,
            "peak_mem_gib": max(peaks) if peaks else None,
            "mem_growth_gib": held[-1] - held[0] if len(held) > 1 else None,
            "all_finite": all(np.isfinite(s["loss"]) and np.isfinite(s["grad_norm"]) for s in steps)}


# ----------------------------------------------------------------------------- matmul ceiling
def _time_matmul(m: int, k: int, n: int, device: torch.device, reps: int) -> float:
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return (time.perf_counter() - start) / reps


def matmul_ceiling(a, device: torch.device) -> dict:
    """TFLOP/s of plain bf16 matmuls of the model's own GEMM shapes at the SFT row length, weighted by how
    often a step runs each (per layer: QKV, attention out, FC1, FC2; once: the output layer), and of an
    8192^3 product (4096^3 on the CPU): what this card really does, the denominator of the measured MFU."""
    m = recipe("sft", a.tiny).model
    rows = recipe("sft", a.tiny).data.micro_batch_tokens
    h, d = m.hidden_size, m.head_dim
    shapes = {"qkv": (h, (m.num_attention_heads + 2 * m.num_query_groups) * d, m.num_layers),
              "attn_out": (m.num_attention_heads * d, h, m.num_layers),
              "fc1": (h, 2 * m.ffn_hidden_size, m.num_layers), "fc2": (m.ffn_hidden_size, h, m.num_layers),
              "output_layer": (h, m.padded_vocab_size(), 1)}
    reps = 3 if a.quick else 10
    out, flops, seconds = {}, 0.0, 0.0
    for name, (k, n, count) in shapes.items():
        t = _time_matmul(rows, k, n, device, reps)
        out[name] = {"m_k_n": [rows, k, n], "tflops": 2 * rows * k * n / t / 1e12}
        flops, seconds = flops + 2 * rows * k * n * count, seconds + t * count
    side = 8192 if device.type == "cuda" else 1024
    t = _time_matmul(side, side, side, device, reps)
    return {"gemms": out, "model_gemms_tflops": flops / seconds / 1e12,
            "square_side": side, "square_tflops": 2 * side ** 3 / t / 1e12}


# ----------------------------------------------------------------------------- fused head vs unfused
def _head_once(fused: bool, hidden, weight, targets, mask, vocab: int, device) -> tuple:
    from redi_megatron.parallel.fused_logprobs import fused_output_logprobs
    from redi_megatron.parallel.logprobs import vocab_parallel_logprobs

    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    sync(device)
    base = mem_now(device)
    reset_peak(device)
    start = time.perf_counter()
    if fused:
        logp = fused_output_logprobs(h, w, targets, mask, None, vocab_size=vocab)
    else:  # Megatron's output layer (logits [1, T, V]) + the chunked log-probs on them, as train.fused_logprobs=false
        logp = vocab_parallel_logprobs(h @ w.t(), targets, None, inplace_backward=True, vocab_size=vocab) * mask
    logp.sum().backward()
    sync(device)
    seconds = time.perf_counter() - start
    peak = mem_peak(device)
    return seconds, None if peak is None else peak - base, logp.detach(), h.grad, w.grad


def fused_head(a, device: torch.device) -> dict:
    """Forward + backward of the log-prob head at the SFT row (32,768 tokens, every one a loss token) x the
    padded vocabulary (151,936) in bf16: fused (``parallel.fused_logprobs``, the recipes' setting) against
    the output layer's logits + ``parallel.logprobs``. Time (median), peak memory above the inputs, and
    whether the two agree (log-probs, gradients of hidden states and weight)."""
    cfg = recipe("sft", a.tiny)
    m, tokens = cfg.model, cfg.data.micro_batch_tokens
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(1, tokens, m.hidden_size, device=device, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(m.padded_vocab_size(), m.hidden_size, device=device, generator=gen) * 0.02
              ).to(torch.bfloat16)
    targets = torch.randint(0, m.vocab_size, (1, tokens), device=device, generator=gen)
    mask = torch.ones(1, tokens, device=device)
    reps = 1 if a.quick else 3
    res = {}
    for fused in (True, False):  # one untimed run first; only the last run's outputs are kept
        times, peaks, last = [], [], None
        for _ in range(reps + 1):
            last = None
            seconds, peak, *last = _head_once(fused, hidden, weight, targets, mask, m.vocab_size, device)
            times.append(seconds)
            peaks.append(peak)
        res[fused] = last, statistics.median(times[1:]), None if peaks[0] is None else max(peaks)
    (lp_f, gh_f, gw_f), t_f, p_f = res[True]
    (lp_u, gh_u, gw_u), t_u, p_u = res[False]
    rel = lambda x, y: float((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30))  # noqa: E731
    return {"tokens": tokens, "vocab": m.vocab_size, "padded_vocab": m.padded_vocab_size(), "hidden": m.hidden_size,
            "fused_s": t_f, "unfused_s": t_u, "fused_over_unfused_time": t_f / t_u,
            "fused_peak_gib": gib(p_f), "unfused_peak_gib": gib(p_u),
            "logp_max_abs_diff": float((lp_f - lp_u).abs().max()),
            "grad_hidden_rel_diff": rel(gh_f, gh_u), "grad_weight_rel_diff": rel(gw_f, gw_u)}


# ----------------------------------------------------------------------------- helpers for the parity parts
def token_logps_func(mb, head, groups, vocab: int) -> Callable:
    """A forward-only ``loss_func`` that records the row's masked per-token log-probs ``[T]`` (fused head
    when the model returns hidden states, else chunked log-probs on the logits), as the losses get them."""
    from redi_megatron.parallel.fused_logprobs import fused_output_logprobs
    from redi_megatron.parallel.logprobs import vocab_parallel_logprobs

    def loss_func(output: torch.Tensor):
        labels, mask = mb.labels.to(output.device), mb.loss_mask.to(output.device)
        if head is not None:
            tok = fused_output_logprobs(output, head.weight, labels, mask, groups.tp,
                                        sequence_parallel=head.sequence_parallel, vocab_size=vocab)
        else:
            tok = vocab_parallel_logprobs(output, labels, groups.tp, vocab_size=vocab) * mask
        zero = torch.zeros((), device=output.device)
        return zero, torch.zeros((), dtype=torch.int32, device=output.device), {"token_logps": tok.detach()[0]}

    return loss_func


def row_logps(c, microbatches: list) -> list[torch.Tensor]:
    """Per-token log-probs ``[T]`` of each microbatch, one forward-only pass through ``training.step``."""
    from redi_megatron.training.step import forward_only

    vocab = c.model_cfg.vocab_size
    out = forward_only(c, microbatches, lambda mb, head: token_logps_func(mb, head, c.groups, vocab))
    return [o["token_logps"].float().cpu() for o in out]


def mutate(mb, how: Optional[str]):
    """The packed row as a broken packer/trainer would hand it to the model. ``attention-leak``: one
    attention segment over the whole row (sequences see the ones before them); ``rope-offset``: positions
    counted along the row instead of inside each sequence. None: unchanged."""
    from dataclasses import replace

    if how is None:
        return mb
    if how == "attention-leak":
        row = mb.tokens.shape[1]
        whole = torch.tensor([0, row], dtype=torch.int32)
        return replace(mb, cu_seqlens=whole, cu_seqlens_padded=whole, max_seqlen=row, has_padding=False)
    if how == "rope-offset":
        return replace(mb, position_ids=torch.arange(mb.tokens.shape[1])[None])
    raise ValueError(how)


def sequence_values(row_lp: torch.Tensor, mb) -> list[torch.Tensor]:
    """Each sequence's per-token log-probs at its loss tokens, in order, from a row's ``[T]`` log-probs."""
    return [row_lp[(mb.seq_ids[0] == i) & (mb.loss_mask[0] > 0)] for i in range(mb.num_sequences)]


def per_sequence_diffs(got: list[torch.Tensor], ref: list[torch.Tensor]) -> list[dict]:
    """Per sequence: RMS and max |diff| of its per-token log-probs (``got`` vs ``ref``) over its loss tokens,
    and the diff of its mean log-prob per token (what REDI's length-normalised loss sees)."""
    rows = []
    for i, (x, y) in enumerate(zip(got, ref)):
        d = x - y
        rows.append({"seq": i, "tokens": int(x.numel()), "rms": float(d.pow(2).mean().sqrt()),
                     "max_abs": float(d.abs().max()), "mean_logp_ref": float(y.mean()),
                     "mean_logp_diff": float(x.mean() - y.mean())})
    return rows


def any_value(x: Any) -> Any:
    """JSON-safe: floats that are not finite become strings."""
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: any_value(v) for k, v in x.items()}
    if isinstance(x, list):
        return [any_value(v) for v in x]
    return x
