"""Peak extra memory and time of the loss head: output layer + per-token log-probs, forward + backward.

Compares, on final hidden states ``[S, H]`` and an output weight ``[V, H]`` (Qwen2.5-1.5B: H 1536,
V 151,936):
- ``megatron``: Megatron's way: logits ``hidden @ W^T`` kept for backward, then
  ``tensor_parallel.vocab_parallel_cross_entropy`` (TP = 1), which keeps an fp32 softmax;
- ``ours_unfused``: the same logits, then ``parallel.logprobs.vocab_parallel_logprobs`` (chunked,
  in-place backward): what the trainer did before the fused head;
- ``fused``: ``parallel.fused_logprobs.fused_output_logprobs`` (no logits; chunked; loss positions only).
Every position carries a loss token (the fused head's best case, prompt positions, is not counted).
Peak extra memory = peak during forward + backward minus what was held before (hidden, weight):
the caching allocator's on CUDA, the process's peak RSS on CPU (``benchmarks/logprob_memory.py``'s
meter). Values and gradients are checked against ``megatron``. Each run is a fresh subprocess::

    python benchmarks/loss_head.py --seq-len 2048                 # CPU, fp32
    python benchmarks/loss_head.py --device cuda --dtype bf16 --seq-len 16384   # the issue's target

Besides each head's ratios to ``megatron`` it prints ``fused`` against ``ours_unfused`` (same math, logits
kept or not): peak extra memory and time ratios.

Target (issue 16), at S = 16k: fused peak extra memory <= 0.1x megatron's, time <= 1.15x.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
IMPLS = ("megatron", "ours_unfused", "fused")


def _loss_fn(name: str):
    import torch

    from redi_megatron.parallel.fused_logprobs import fused_output_logprobs
    from redi_megatron.parallel.logprobs import vocab_parallel_logprobs

    if name == "fused":
        return lambda h, w, t: fused_output_logprobs(h[None], w, t[None], torch.ones_like(t[None], dtype=torch.float32),
                                                     vocab_size=w.shape[0])[0]
    if name == "ours_unfused":
        return lambda h, w, t: vocab_parallel_logprobs(h @ w.t(), t, inplace_backward=True, validate=False)
    from megatron.core import tensor_parallel

    return lambda h, w, t: -tensor_parallel.vocab_parallel_cross_entropy((h @ w.t())[:, None], t[:, None])[:, 0]


def _worker(a) -> None:
    import torch

    sys.path.insert(0, HERE)
    from logprob_memory import _Meter

    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    if a.impl == "megatron":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a.port))
        from redi_megatron.parallel.state import init_parallel

        init_parallel(rank=0, world_size=1)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(a.seq_len, a.hidden, generator=g).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(a.vocab, a.hidden, generator=g) * 0.02).to(dtype).to(device).requires_grad_()
    targets = torch.randint(0, a.vocab, (a.seq_len,), generator=g).to(device)
    fn = _loss_fn(a.impl)
    fn(hidden[:8], weight, targets[:8]).sum().backward()  # warm-up
    hidden.grad = weight.grad = None
    meter, times, peak = _Meter(device), [], None
    for rep in range(a.repeats):  # the first includes one-time costs; the best time is reported
        hidden.grad = weight.grad = None
        meter.start()
        t0 = time.perf_counter()
        out = fn(hidden, weight, targets)
        out.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peak = meter.peak_extra() if peak is None else peak
    seconds = min(times)
    rows = torch.arange(0, a.seq_len, max(1, a.seq_len // 16), device=device)
    torch.save({"peak": peak, "time": seconds, "logps": out.detach().float().cpu(),
                "gh": hidden.grad[rows].float().cpu(), "gw": weight.grad[:64].float().cpu()}, a.result)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=29555, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a)
        return 0
    import torch

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in a.impls.split(","):
            path = os.path.join(tmp, f"{impl}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--result", path,
                   "--seq-len", str(a.seq_len), "--hidden", str(a.hidden), "--vocab", str(a.vocab),
                   "--dtype", a.dtype, "--device", a.device, "--repeats", str(a.repeats)]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(HERE),
                                                                             os.environ.get("PYTHONPATH")])))
            subprocess.run(cmd, check=True, env=env)
            results[impl] = torch.load(path)
    base = results.get("megatron")
    print(f"loss head fwd+bwd, S={a.seq_len} H={a.hidden} V={a.vocab} {a.dtype} on {a.device}")
    tol = dict(rtol=1e-3, atol=1e-3) if a.dtype == "fp32" else dict(rtol=3e-2, atol=3e-2)
    for impl, r in results.items():
        line = f"  {impl:<13} peak extra {r['peak'] / 2**30:7.2f} GiB   time {r['time']:7.2f} s"
        if base is not None and impl != "megatron":
            for key in ("logps", "gh", "gw"):
                torch.testing.assert_close(r[key], base[key], **tol)
            line += (f"   memory {r['peak'] / max(base['peak'], 1):.3f}x"
                     f"  time {r['time'] / base['time']:.3f}x of megatron")
        print(line)
    fused, unfused = results.get("fused"), results.get("ours_unfused")
    if fused is not None and unfused is not None:  # the same math with and without logits in memory
        print(f"  fused vs ours_unfused: peak extra memory {fused['peak'] / max(unfused['peak'], 1):.3f}x, "
              f"time {fused['time'] / unfused['time']:.3f}x")
    print("target (S = 16k): fused memory <= 0.1x and time <= 1.15x of megatron")
    return 0


if __name__ == "__main__":
    sys.exit(main())
