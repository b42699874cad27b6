"""REDI vs SFT optimizer-step time on the same tokens, and throughput (CPU now, GPU mode ready).

The SFT run trains on exactly the sequences of the REDI run (each pair's chosen and rejected as two
SFT samples, same global batch in sequences, same packing budget), so the ratio isolates the cost of
the pair loss (whole-sequence reductions, pair bookkeeping). Target: REDI/SFT <= 1.05.

    python benchmarks/train_step.py                       # CPU, tiny model, 1 process
    python benchmarks/train_step.py --hidden 256 --layers 4 --steps 6
    torchrun --nproc_per_node 8 benchmarks/train_step.py --gpu --hidden 1536 --layers 28 \
        --heads 12 --groups 2 --ffn 8960 --vocab 151936 --tokens 16384   # tokens/s/GPU and MFU

MFU uses 6 * params * tokens (+ attention 12 * layers * hidden * seq per token) against the peak
bf16 dense FLOP/s given by --peak-tflops (989 for H100 SXM, 790 measured here for H200).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile


def _write_data(root: str, n_pairs: int, words: int, seed: int) -> tuple[str, str]:
    rng = random.Random(seed)
    vocab = ["add", "the", "carry", "digit", "step", "check", "sum", "so", "we", "get", "then", "next"]
    text = lambda k: " ".join(rng.choice(vocab) for _ in range(k))  # noqa: E731
    pairs, sft = os.path.join(root, "pairs.jsonl"), os.path.join(root, "sft.jsonl")
    with open(pairs, "w") as fp, open(sft, "w") as fs:
        for i in range(n_pairs):
            problem = f"Problem {i}: {text(20)}"
            chosen = f"<think>\n{text(rng.randint(words // 2, words))}\n</think>\n\\boxed{{{i}}}"
            rejected = f"<think>\n{text(rng.randint(words // 2, words))}\n</think>\n\\boxed{{{i + 1}}}"
            fp.write(json.dumps({"problem": problem, "chosen": chosen, "rejected": rejected}) + "\n")
            for completion in (chosen, rejected):
                fs.write(json.dumps({"problem": problem, "completion": completion}) + "\n")
    return pairs, sft


def _model_flops_per_token(a) -> float:
    head = a.hidden // a.heads
    attn_params = a.hidden * (a.heads + 2 * a.groups) * head + a.heads * head * a.hidden
    params = a.layers * (attn_params + 3 * a.hidden * a.ffn) + a.vocab * a.hidden
    return 6 * params + 12 * a.layers * a.hidden * a.tokens


def _run(a, loss: str, path: str, tokenizer: str, save: str) -> list[float]:
    from redi_megatron.config.loader import from_dict
    from redi_megatron.training.step import train_step
    from redi_megatron.training.trainer import setup

    per_step = a.pairs_per_step * (1 if loss == "redi" else 2)
    cfg = from_dict({
        "model": dict(num_layers=a.layers, hidden_size=a.hidden, ffn_hidden_size=a.ffn,
                      num_attention_heads=a.heads, num_query_groups=a.groups, vocab_size=a.vocab),
        "parallel": {"tp": a.tp},
        "data": {"train_path": path, "tokenizer": tokenizer, "global_batch_size": per_step,
                 "micro_batch_tokens": a.tokens},
        "loss": {"name": loss, "params": {"alpha": 0.8} if loss == "redi" else {}},
        "optimizer": {"lr": 1e-5, "warmup_ratio": 0.0, "decay": "constant"},
        "train": {"dtype": "bf16" if a.gpu else "fp32", "max_steps": a.steps + a.warmup},
        "checkpoint": {"save_dir": save, "resume": False},
        "logging": {"tensorboard": False},
    })
    c, _ = setup(cfg)
    times, tokens = [], []
    for i in range(a.steps + a.warmup):
        m = train_step(c, c.sampler.next_step())
        if i >= a.warmup:
            times.append(m["step_seconds"])
            tokens.append(m["tokens"])
    return [statistics.median(times), sum(tokens) / sum(times)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--vocab", type=int, default=320)
    p.add_argument("--tokens", type=int, default=2048, help="packed row length (micro_batch_tokens)")
    p.add_argument("--pairs-per-step", type=int, default=8)
    p.add_argument("--words", type=int, default=120, help="max words per completion")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    a = p.parse_args(argv)
    from redi_megatron.data.synthetic import tiny_tokenizer
    from redi_megatron.parallel.collectives import is_global_rank_zero
    from redi_megatron.parallel.state import destroy_parallel

    root = tempfile.mkdtemp(prefix="redi_bench_")
    tokenizer = os.path.join(root, "tokenizer")
    tiny_tokenizer(vocab_size=min(a.vocab, 300)).save_pretrained(tokenizer)
    pairs, sft = _write_data(root, a.pairs_per_step * (a.steps + a.warmup), a.words, seed=0)
    results = {}
    for loss, path in (("sft", sft), ("redi", pairs)):
        results[loss] = _run(a, loss, path, tokenizer, os.path.join(root, loss))
        destroy_parallel()
        os.environ.pop("MASTER_PORT", None) if "TORCHELASTIC_RUN_ID" not in os.environ else None
    if is_global_rank_zero():
        (sft_t, sft_tps), (redi_t, redi_tps) = results["sft"], results["redi"]
        world = int(os.environ.get("WORLD_SIZE", "1"))
        print(f"SFT  step {sft_t * 1e3:8.1f} ms  {sft_tps:10.0f} tokens/s")
        print(f"REDI step {redi_t * 1e3:8.1f} ms  {redi_tps:10.0f} tokens/s")
        print(f"REDI/SFT step time ratio: {redi_t / sft_t:.3f} (target <= 1.05)")
        if a.gpu:
            per_gpu = redi_tps / world
            mfu = per_gpu * _model_flops_per_token(a) / (a.peak_tflops * 1e12)
            print(f"REDI tokens/s/GPU {per_gpu:.0f}  MFU {100 * mfu:.1f}% (peak {a.peak_tflops} TFLOP/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
