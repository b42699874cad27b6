"""The shipped recipes on data of the paper's size: 75k positives and 60k pairs, 2 ranks, tiny model.

    python benchmarks/paper_scale.py --work /tmp/paper_scale [--positives 75000] [--pairs 60000]
        [--num-proc 2] [--out result.json] [--stages generate,sft_cold,tokenize_pairs,redi_warm,sft_warm]

Issue 21's failure, replayed end to end: the shipped SFT recipe (``qwen2.5-math-1.5b_sft.yaml``) died after
10 min at start-up on 75k positives (rank 0 tokenized alone, rank 1 timed out in a barrier), and stage 2
tokenized again. Stages (each one resumable: ``--work`` is kept, a finished stage's output is reused):

- ``generate``: curated-format ``positives.jsonl`` and ``pairs.jsonl`` (what ``redi-curate`` writes, without
  curating 516k raw rows first) with R1-like traces: log-normal length, median ~3k tokens of the real Qwen
  tokenizer (1.0 token a word here), each within the paper's 19,000-token completion limit; a pair's chosen
  trace is its problem's positive, as in the curated data.
- ``sft_cold``: ``torchrun --nproc-per-node 2`` of the shipped SFT recipe, sizes substituted only (a 2-layer,
  32-wide model with the recipe's 151,936 vocabulary, 1 step of 2 sequences), on an empty cache and the
  recipe's own ``parallel.timeout_s`` (600 s): rank 0 tokenizes the positives inside the run with
  ``data.num_proc`` workers, rank 1 polls for the cache; the time to the first step is measured.
- ``tokenize_pairs``: ``redi-tokenize`` with the shipped REDI recipe: the pairs into the same cache
  (``tokenized/`` beside the curated data).
- ``redi_warm`` / ``sft_warm``: the REDI and SFT recipes with the ready cache: time to the first step, and
  the check that neither run tokenized anything (no ``tokenize`` line in its log).
- ``sft_cold_t60``: the issue's exact failure, made harder: the SFT recipe on an empty cache of its own
  (``<work>/cache_t60``) with ONE tokenization worker (rank 0 alone, as in the report) and the collective
  timeout cut to ``parallel.timeout_s=60``: rank 1 waits several times that long and must still reach step 1.

Prints and (``--out``) writes wall times, tokens/s, peak RSS per process and the time to each first step.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_scale import TINY_RUN, run_stage  # noqa: E402

CONFIGS = os.path.join(ROOT, "examples", "configs")
SFT, REDI = os.path.join(CONFIGS, "qwen2.5-math-1.5b_sft.yaml"), os.path.join(CONFIGS, "qwen2.5-math-1.5b_redi.yaml")
STAGES = ("generate", "sft_cold", "tokenize_pairs", "redi_warm", "sft_warm", "sft_cold_t60")
MAX_TRACE_WORDS = 18_900  # + the answer line stays under the paper's 19,000 completion tokens


# ------------------------------------------------------------------------------------------ generate
class _Traces:
    """Random R1-like texts, fast: one join over a precomputed word list per trace."""

    def __init__(self, seed: int) -> None:
        from redi_megatron.data.synthetic import _WORDS

        self.words = list(_WORDS) + ["so", "x", "equals"]
        self.rng = random.Random(seed)

    def text(self, n: int) -> str:
        return " ".join(self.rng.choices(self.words, k=n))

    def trace(self, answer: str) -> str:
        n = MAX_TRACE_WORDS + 1
        while n > MAX_TRACE_WORDS:
            n = int(self.rng.lognormvariate(8.0, 0.7))
        return f"<think>\n{self.text(n)}\n</think>\n\nThe answer is $\\boxed{{{answer}}}$."


def generate(curated: str, positives: int, pairs: int, seed: int) -> dict:
    from redi_megatron.data.synthetic import write_jsonl

    os.makedirs(curated, exist_ok=True)
    pos_path, pair_path = os.path.join(curated, "positives.jsonl"), os.path.join(curated, "pairs.jsonl")
    if os.path.exists(pos_path) and os.path.exists(pair_path):
        return {"reused": True}
    t0 = time.perf_counter()
    gen = _Traces(seed)
    problems = [f"Problem {i}: {gen.text(gen.rng.randint(20, 200))}" for i in range(max(positives, pairs))]
    chosen: list[str] = []

    def pos_rows():
        for i in range(positives):
            completion = gen.trace("3")
            if i < pairs:
                chosen.append(completion)
            yield {"problem": problems[i], "completion": completion}

    def pair_rows():
        for i in range(pairs):
            yield {"problem": problems[i], "chosen": chosen[i] if i < len(chosen) else gen.trace("3"),
                   "rejected": gen.trace("4")}

    write_jsonl(pos_rows(), pos_path)  # atomic: a killed run leaves no half file
    write_jsonl(pair_rows(), pair_path)
    return {"wall_s": round(time.perf_counter() - t0, 1),
            "bytes": os.path.getsize(pos_path) + os.path.getsize(pair_path)}


# ------------------------------------------------------------------------------------------ runs
def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _train(recipe: str, data: str, tok: str, save_dir: str, num_proc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", _port(),
            "-m", "redi_megatron.training.cli", "--config", recipe, *TINY_RUN, f"data.train_path={data}",
            f"data.tokenizer={tok}", f"checkpoint.save_dir={save_dir}", f"data.num_proc={num_proc}", *extra]


def _tokenized_in(log: str) -> list[str]:
    with open(log) as f:
        return [line.strip() for line in f if line.startswith("tokenize ")]


def _cache_summary(cache: str) -> dict:
    out = {}
    for name in sorted(os.listdir(cache)) if os.path.isdir(cache) else []:
        meta = os.path.join(cache, name, "meta.json")
        if os.path.exists(meta):
            with open(meta) as f:
                m = json.load(f)
            out[name] = {k: m[k] for k in ("kind", "rows", "tokens", "max_completion_tokens") if k in m}
    return out


def run(args: argparse.Namespace) -> dict:
    from redi_megatron.data.templates import qwen_tokenizer_dir

    work = os.path.abspath(args.work)
    curated = os.path.join(work, "curated")
    tok = qwen_tokenizer_dir()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("REDI_DATA_CACHE", None)  # the default: tokenized/ beside the curated data, shared by both stages
    res: dict = {"positives": args.positives, "pairs": args.pairs, "num_proc": args.num_proc,
                 "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()[0]}
    pos, pairs = os.path.join(curated, "positives.jsonl"), os.path.join(curated, "pairs.jsonl")
    stages = args.stages.split(",")
    if "generate" in stages:
        res["generate"] = generate(curated, args.positives, args.pairs, args.seed)
        print(f"paper_scale: generate {res['generate']}", flush=True)
    runs = {"sft_cold": (SFT, pos, args.num_proc, ()), "redi_warm": (REDI, pairs, args.num_proc, ()),
            "sft_warm": (SFT, pos, args.num_proc, ()),
            "sft_cold_t60": (SFT, pos, 1, (f"data.cache_dir={os.path.join(work, 'cache_t60')}",
                                           "parallel.timeout_s=60"))}
    for stage in stages:
        if stage == "tokenize_pairs":
            argv = [sys.executable, "-m", "redi_megatron.training.tokenize_cli", "--config", REDI,
                    f"data.train_path={pairs}", f"data.tokenizer={tok}", f"data.num_proc={args.num_proc}"]
            res[stage] = run_stage(stage, argv, env, work, timeout=args.timeout)
        elif stage in runs:
            recipe, data, num_proc, extra = runs[stage]
            save = os.path.join(work, f"run_{stage}")
            res[stage] = run_stage(stage, _train(recipe, data, tok, save, num_proc, *extra), env, work,
                                   watch=os.path.join(save, "metrics.jsonl"), timeout=args.timeout)
            res[stage]["tokenize_lines"] = _tokenized_in(os.path.join(work, f"{stage}.log"))[-3:]
        elif stage != "generate":
            raise SystemExit(f"paper_scale: unknown stage {stage!r} (one of {', '.join(STAGES)})")
        if stage != "generate":
            print(f"paper_scale: {stage} {json.dumps(res[stage])}", flush=True)
    res["cache"] = _cache_summary(os.path.join(curated, "tokenized"))
    for name, entry in res["cache"].items():
        stage = "sft_cold" if entry.get("kind") == "sft" else "tokenize_pairs"
        if stage in res and entry.get("tokens"):
            res[stage]["tokens_per_s"] = round(entry["tokens"] / res[stage]["wall_s"])
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="working directory (kept: rerun to resume)")
    p.add_argument("--positives", type=int, default=75_000)
    p.add_argument("--pairs", type=int, default=60_000)
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="tokenization processes")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds a stage may take")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if min(args.positives, args.pairs, args.num_proc) < 1:
        p.error("--positives, --pairs and --num-proc must be >= 1")
    res = run(args)
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
