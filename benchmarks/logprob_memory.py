"""Peak extra memory and time of per-token log-probs, forward + backward, at Qwen2.5 vocabulary size.

Compares, for fp32 and bf16 logits ``[S, V]``:
- ``ours``: ``redi_megatron.parallel.vocab_parallel_logprobs`` (chunked, softmax recomputed in backward);
- ``ours_inplace``: the same with ``inplace_backward=True`` (gradient written into the logits buffer,
  what ``make_loss_func`` uses by default);
- ``naive``: ``log_softmax(logits.float()).gather(...)``;
- ``megatron``: megatron-core's ``tensor_parallel.vocab_parallel_cross_entropy`` (negated), TP=1.

Each (implementation, dtype) runs in a fresh subprocess. Peak extra memory = peak during forward +
backward minus the memory held before it (the logits and targets). On CUDA it is read from the caching
allocator; on CPU from the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``), which also counts allocator slack, so small differences mean little there.
Values and gradients of every implementation are checked against ``naive`` (or ``ours`` when ``naive`` is
not run). Usage::

    python benchmarks/logprob_memory.py                       # S=8192, V=151936, all implementations
    python benchmarks/logprob_memory.py --seq-len 2048 --impls ours,ours_inplace,megatron
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

IMPLS = ("ours", "ours_inplace", "naive", "megatron")
DTYPES = ("fp32", "bf16")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _Meter:
    """Peak extra bytes since ``start()``: CUDA allocator stats, or the CPU resident set high-water mark."""

    def __init__(self, device):
        self.device = device

    def start(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = _rss_kib("VmRSS") * 1024

    def peak_extra(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _rss_kib("VmHWM") * 1024 - self.base


def _make_inputs(seq: int, vocab: int, dtype, device, seed: int = 0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.empty(seq, vocab, dtype=dtype, device=device)
    for start in range(0, seq, 256):  # in blocks: no full-size fp32 temporary for bf16
        block = torch.randn(min(256, seq - start), vocab, generator=g) * 3
        logits[start:start + block.shape[0]] = block.to(dtype)
    targets = torch.randint(0, vocab, (seq,), generator=g).to(device)
    weights = torch.randn(seq, generator=g).to(device)
    return logits, targets, weights


def _impl(name: str, chunk_size: int):
    import torch

    from redi_megatron.parallel.logprobs import vocab_parallel_logprobs

    if name in ("ours", "ours_inplace"):
        return lambda x, t: vocab_parallel_logprobs(x, t, chunk_size=chunk_size or None,
                                                    inplace_backward=name == "ours_inplace", validate=False)
    if name == "naive":
        return lambda x, t: torch.log_softmax(x.float(), -1).gather(-1, t[:, None]).squeeze(-1)
    from megatron.core import tensor_parallel

    # Megatron wants [S, B, V/TP] and [S, B]; it returns the cross entropy, i.e. -logp.
    return lambda x, t: -tensor_parallel.vocab_parallel_cross_entropy(x[:, None], t[:, None]).squeeze(1)


def _worker(args) -> None:
    import torch

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.impl == "megatron":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        from redi_megatron.parallel.state import init_parallel

        init_parallel(rank=0, world_size=1)
    fn = _impl(args.impl, args.chunk_size)
    small = _make_inputs(64, args.vocab, dtype, device, seed=1)  # warm-up: kernels, thread pools
    x = small[0].requires_grad_()
    torch.autograd.grad(fn(x, small[1]), x, small[2])
    del small, x
    meter, times, cpu_times, peak, sample = _Meter(device), [], [], None, None
    for rep in range(args.repeats):
        logits, targets, w = _make_inputs(args.seq_len, args.vocab, dtype, device)  # in-place impls consume it
        logits.requires_grad_()
        meter.start()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(logits, targets)
        (grad,) = torch.autograd.grad(out, logits, w)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        if rep == 0:
            peak = meter.peak_extra()
            rows = torch.arange(0, args.seq_len, max(1, args.seq_len // 16), device=device)
            sample = {"logps": out.detach().float().cpu(), "grad_rows": grad[rows].float().cpu()}
        del out, grad, logits, targets, w
    torch.save({"peak": peak, "time": min(times), "cpu": min(cpu_times), **sample}, args.result)


def _run_worker(impl: str, dtype: str, args, path: str, port: int) -> dict:
    import torch

    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--impl", impl, "--dtype", dtype,
           "--seq-len", str(args.seq_len), "--vocab", str(args.vocab), "--chunk-size", str(args.chunk_size),
           "--repeats", str(args.repeats), "--device", args.device, "--threads", str(args.threads),
           "--result", path, "--port", str(port)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    subprocess.run(cmd, check=True, env=env)
    return torch.load(path)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--chunk-size", type=int, default=0, help="tokens per chunk (0 = the library default)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=29533, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    impls = [i for i in args.impls.split(",") if i]
    bad = sorted(set(impls) - set(IMPLS)) + sorted(set(args.dtypes.split(",")) - set(DTYPES))
    if bad:
        raise SystemExit(f"unknown implementation(s)/dtype(s) {bad}; choose from {IMPLS} and {DTYPES}")
    import tempfile

    from tqdm import tqdm

    from redi_megatron.parallel.logprobs import default_chunk_size

    chunk = args.chunk_size or default_chunk_size(args.vocab)
    print(f"device={args.device} S={args.seq_len} V={args.vocab} chunk={chunk} "
          f"threads={args.threads or 'default'} repeats={args.repeats} (time = best of repeats)")
    runs = [(d, i) for d in args.dtypes.split(",") for i in impls]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (dtype, impl) in enumerate(tqdm(runs, desc="runs", file=sys.stderr)):
            results[dtype, impl] = _run_worker(impl, dtype, args, os.path.join(tmp, f"{k}.pt"), 29533 + k)
    _report(results, args, impls)


def _report(results: dict, args, impls: list[str]) -> None:
    gib = 1024 ** 3
    # On a shared CPU, process CPU time is robust to other jobs where wall time is not.
    key, clock = ("time", "wall") if args.device.startswith("cuda") else ("cpu", "cpu")
    for dtype in args.dtypes.split(","):
        logits_gib = args.seq_len * args.vocab * (4 if dtype == "fp32" else 2) / gib
        print(f"\n{dtype} logits ({logits_gib:.2f} GiB)")
        print(f"{'impl':<14}{'peak extra GiB':>15}{'x logits':>10}{'wall s':>8}{'cpu s':>8}"
              f"{'mem / megatron':>16}{clock + ' / megatron':>17}{'max |dlogp|':>13}{'max |dgrad|':>13}")
        ref_name = "naive" if "naive" in impls else impls[0]
        ref, meg = results[dtype, ref_name], results.get((dtype, "megatron"))
        for impl in impls:
            r = results[dtype, impl]
            dlogp = (r["logps"] - ref["logps"]).abs().max().item()
            dgrad = (r["grad_rows"] - ref["grad_rows"]).abs().max().item()
            mem_ratio = f"{r['peak'] / meg['peak']:.3f}" if meg and meg["peak"] > 0 else "-"
            time_ratio = f"{r[key] / meg[key]:.2f}" if meg else "-"
            print(f"{impl:<14}{r['peak'] / gib:>15.3f}{r['peak'] / gib / logits_gib:>10.2f}{r['time']:>8.2f}"
                  f"{r['cpu']:>8.2f}"
                  f"{mem_ratio:>16}{time_ratio:>17}{dlogp:>13.2e}{dgrad:>13.2e}")
        print(f"(value/gradient differences against {ref_name}; time ratio on {clock} time)")


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
