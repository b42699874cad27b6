"""Grading throughput: answers graded per second, in-process vs the process pool.

Responses are built to look like real R1-style outputs: a long thinking part (reference solutions
of other problems concatenated up to --think-chars), ``</think>``, then a summary that is the
problem's own reference solution ending in a boxed answer. A third of the answers are correct
(the gold), a third wrong (the gold with "+1" appended), a third have no box after ``</think>``.
Problems come from math500 (which ships reference solutions).

    python benchmarks/grading.py                       # both graders, 1 and all-CPU workers
    python benchmarks/grading.py --samples 3000 --think-chars 60000 --workers 1,2,4
"""
from __future__ import annotations

import argparse
import os
import random
import time

from redi_megatron.eval.benchmarks import DATA_DIR
from redi_megatron.eval.grading import GradingPool, grade_detailed


def load_math500() -> list[dict]:
    import json

    with open(os.path.join(DATA_DIR, "math500.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def build_items(count: int, think_chars: int, seed: int) -> list[tuple[str, str]]:
    rows = load_math500()
    rng = random.Random(seed)
    items = []
    for i in range(count):
        row = rows[i % len(rows)]
        thinking = []
        while sum(map(len, thinking)) < think_chars:
            thinking.append(rng.choice(rows)["solution"])
        summary = row["solution"]
        kind = i % 3
        if kind == 1:
            summary += f"\n\nSo the final answer is $\\boxed{{{row['answer']}+1}}$."
        elif kind == 2:
            summary = summary.replace("\\boxed", "")
        reasoning = "\n\nWait, let me re-check.\n\n".join(thinking)[:think_chars]
        response = "<think>\n" + reasoning + "\n</think>\n\n" + summary
        items.append((response, row["answer"]))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--think-chars", type=int, default=40000, help="~4 chars per token: 40000 ~ 10k tokens")
    parser.add_argument("--workers", default=f"1,{os.cpu_count()}", help="comma-separated pool sizes")
    parser.add_argument("--graders", default="rllm,math_verify")
    parser.add_argument("--serial-samples", type=int, default=300, help="samples for the in-process baseline")
    args = parser.parse_args()

    items = build_items(args.samples, args.think_chars, seed=0)
    mean_chars = sum(len(r) for r, _ in items) / len(items)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{len(items)} responses, mean {mean_chars:,.0f} characters; {os.cpu_count()} CPUs, load average {load}")
    workers = sorted({int(w) for w in args.workers.split(",")})
    for grader in args.graders.split(","):
        serial = items[: args.serial_samples]
        for r, g in items[-10:]:  # imports and parser caches, as the warmed-up pool gets
            grade_detailed(r, g, grader)
        start, cpu_start = time.perf_counter(), time.process_time()
        verdicts = [grade_detailed(r, g, grader).correct for r, g in serial]
        serial_rate = len(serial) / (time.perf_counter() - start)
        cpu_rate = len(serial) / (time.process_time() - cpu_start)
        print(f"\n[{grader}] in-process, one answer at a time: {serial_rate:8.1f} answers/s "
              f"({cpu_rate:.1f} per CPU-second; {sum(verdicts)}/{len(serial)} correct)")
        for w in workers:
            with GradingPool(workers=w) as pool:
                pool.grade_many(items[: 4 * w], grader, progress=False)  # start and warm the workers
                start = time.perf_counter()
                results = pool.grade_many(items, grader, progress=False)
                rate = len(items) / (time.perf_counter() - start)
            correct = sum(r.correct for r in results)
            slowest = max(r.seconds for r in results)
            print(f"[{grader}] pool, {w} worker(s):                {rate:8.1f} answers/s "
                  f"(x{rate / serial_rate:.2f} vs in-process; {correct}/{len(items)} correct, "
                  f"slowest answer {slowest * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
