"""Sizing probe for the demo: plain-PyTorch training of the demo model on the teacher's data.

Not part of the pipeline (``redi-demo`` trains with ``redi-train`` on Megatron-Core). This single-process
stand-in answers the questions that choose the demo's task and budget on a given machine:

* ``throughput``: training tokens/s and step time of candidate model sizes;
* ``curve``: SFT on correct traces with greedy held-out accuracy (by operand length) every few steps;
* ``experiment``: teacher -> curate -> SFT on positives -> stage 2 on pairs with REDI and with alpha = 0
  (SFT on the same positives for the same steps, the control) -> pass@1 of each on held-out problems;
* ``slips``: how much probability a demo run's models put on the teacher's first wrong token of each pair.

Usage::

    python -m redi_megatron.demo.probe throughput --layers 4 --hidden 128
    python -m redi_megatron.demo.probe curve --digits 2 5 --layers 2 --hidden 64 --steps 1500 --batch 16
    python -m redi_megatron.demo.probe experiment --digits 3 3 --sft-steps 300 --stage2-steps 150
    python -m redi_megatron.demo.probe slips --run runs/demo
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from redi_megatron.demo.model import DemoModelSpec


def _pad(seqs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int):
    """(prompt, completion) id lists -> input_ids [B, S], loss_mask [B, S-1] (1 where the label is completion)."""
    import torch

    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1))
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(list(p) + list(c))
        mask[i, len(p) - 1 : len(p) + len(c) - 1] = 1.0
    return ids, mask


def _token_logps(model: Any, ids: Any, mask: Any) -> Any:
    """[B, S-1] log-prob of each next token, zero outside the completion."""
    import torch

    logits = model(input_ids=ids).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logp * mask


def _schedule(step: int, total: int, warmup: float) -> float:
    w = max(1, int(total * warmup))
    return (step + 1) / w if step < w else max(0.0, (total - step) / max(1, total - w))


def train(model: Any, batches: list[Any], loss_kind: str, lr: float, alpha: float = 0.8,
          warmup: float = 0.1, gamma: float = 0.0, log: list[dict[str, float]] = None) -> tuple[float, float]:
    """Adam with linear warmup/decay over ``batches``; returns (wall, process CPU) seconds per step.

    CPU seconds divided by the threads used estimate the wall time on an idle machine (the shared
    development machine is rarely idle).

    SFT batches: list of (prompt, completion); pair batches: list of (prompt, chosen, rejected).
    """
    import torch

    from redi_megatron.losses.redi import redi_loss

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    model.train()
    start, cpu = time.perf_counter(), time.process_time()
    for step, batch in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = lr * _schedule(step, len(batches), warmup)
        if loss_kind == "sft":
            ids, mask = _pad(batch, 0)
            logp = _token_logps(model, ids, mask)
            loss = -logp.sum() / mask.sum()
            metrics = {"loss": float(loss.detach())}
        else:
            seqs = [(p, c) for p, c, _ in batch] + [(p, r) for p, _, r in batch]
            ids, mask = _pad(seqs, 0)
            seq_logp = _token_logps(model, ids, mask).sum(-1)
            lens = mask.sum(-1)
            n = len(batch)
            losses, m = redi_loss(seq_logp[:n], seq_logp[n:], lens[:n], lens[n:], alpha=alpha,
                                  neg_weighting_gamma=gamma)
            loss = losses.mean()
            metrics = {"loss": float(loss.detach()), "chosen": float(m["chosen_logps_norm"].mean()),
                       "rejected": float(m["rejected_logps_norm"].mean())}
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log is not None:
            log.append(dict(metrics, step=step))
    n = max(1, len(batches))
    return (time.perf_counter() - start) / n, (time.process_time() - cpu) / n


def _batches(items: list[Any], batch: int, steps: int, seed: int) -> list[list[Any]]:
    import random

    rng = random.Random(seed)
    order: list[Any] = []
    out = []
    for _ in range(steps):
        if len(order) < batch:
            more = list(items)
            rng.shuffle(more)
            order += more
        out.append(order[:batch])
        order = order[batch:]
    return out


def throughput(args: argparse.Namespace) -> None:
    import torch
    from transformers import Qwen2ForCausalLM

    from redi_megatron.data.templates import encode_completions, encode_prompts
    from redi_megatron.demo.teacher import TaskConfig, teacher_rows
    from redi_megatron.demo.tokenizer import build_tokenizer

    torch.set_num_threads(args.threads)
    tok = build_tokenizer()
    rows, _ = teacher_rows(64, 0, TaskConfig(min_digits=args.digits[0], max_digits=args.digits[1]))
    seqs = list(zip(encode_prompts(tok, [r["problem"] for r in rows]),
                    encode_completions(tok, [r["generations"][0] for r in rows])))
    for layers, hidden in zip(args.layers, args.hidden):
        spec = DemoModelSpec(num_layers=layers, hidden_size=hidden, ffn_hidden_size=4 * hidden)
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(spec.hf_config(tok))
        batches = _batches(seqs, args.batch, args.steps + 2, 0)
        train(model, batches[:2], "sft", 1e-3)
        sec, cpu = train(model, batches[2:], "sft", 1e-3)
        tokens = sum(len(p) + len(c) for b in batches[2:] for p, c in b) / args.steps
        print(json.dumps({"layers": layers, "hidden": hidden, "params": spec.num_parameters(), "batch": args.batch,
                          "tokens_per_step": tokens, "threads": torch.get_num_threads(),
                          "wall_s_per_step": round(sec, 4), "cpu_s_per_step": round(cpu, 4),
                          "tokens_per_wall_s": round(tokens / sec),
                          "tokens_per_cpu_s": round(tokens / cpu)}), flush=True)


def _greedy_accuracy(model: Any, tok: Any, problems: list[tuple[int, int]], texts: list[str],
                     max_new_tokens: int) -> tuple[float, dict[int, float]]:
    """Greedy exact-match accuracy overall and by the longer operand's digit count."""
    import re

    import torch

    from redi_megatron.data.templates import render_prompt

    enc = [tok(render_prompt(t), add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), tok.pad_token_id)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):  # left padding
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>")])
    model.train()
    by_len: dict[int, list[bool]] = {}
    for i, (a, b) in enumerate(problems):
        m = re.search(r"\\boxed\{(\d+)\}", tok.decode(out[i, width:]))
        by_len.setdefault(max(len(str(a)), len(str(b))), []).append(bool(m) and m.group(1) == str(a + b))
    total = sum(sum(v) for v in by_len.values()) / len(problems)
    return total, {k: round(sum(v) / len(v), 3) for k, v in sorted(by_len.items())}


def _plain(trace: str) -> str:
    """The trace without the restated operands and the place names (``9+1=10, write 0, carry 1.``)."""
    import re

    lines = trace.split("\n")
    lines[1] = "Add the digits column by column, starting from the right."
    return "\n".join(re.sub(r"^[a-z-]+: (?=\d)", "", line) for line in lines)


def curve(args: argparse.Namespace) -> None:
    """SFT on one correct trace per problem; greedy accuracy on held-out problems every ``--every`` steps."""
    import random

    import torch
    from transformers import Qwen2ForCausalLM

    from redi_megatron.data.templates import encode_completions, encode_prompts
    from redi_megatron.demo.teacher import TaskConfig, correct_trace, problem_text, sample_problems
    from redi_megatron.demo.tokenizer import build_tokenizer

    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    problems = sample_problems(rng, TaskConfig(min_digits=args.digits[0], max_digits=args.digits[1]),
                               args.problems + args.eval_problems)
    train_p, held = problems[: args.problems], problems[args.problems:]
    tok = build_tokenizer()
    traces = [correct_trace(a, b).text for a, b in train_p]
    if args.plain:
        traces = [_plain(t) for t in traces]
    items = list(zip(encode_prompts(tok, [problem_text(a, b, rng) for a, b in train_p]),
                     encode_completions(tok, traces)))
    held_texts = [problem_text(a, b, rng) for a, b in held]
    spec = DemoModelSpec(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden)
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(spec.hf_config(tok))
    batches = _batches(items, args.batch, args.steps, args.seed)
    for start in range(0, args.steps, args.every):
        log: list[dict[str, float]] = []
        # one schedule over all steps, trained in slices so accuracy can be measured in between
        sec, cpu = train_slice(model, batches, start, min(start + args.every, args.steps), args.lr, log)
        acc, by_len = _greedy_accuracy(model, tok, held, held_texts, args.max_new_tokens)
        print(json.dumps({"step": start + len(log), "loss": round(log[-1]["loss"], 4), "greedy": round(acc, 3),
                          "by_digits": by_len, "wall_s_per_step": round(sec, 3),
                          "cpu_s_per_step": round(cpu, 3)}), flush=True)


def train_slice(model: Any, batches: list[Any], start: int, stop: int, lr: float,
                log: list[dict[str, float]], warmup: float = 0.1) -> tuple[float, float]:
    """SFT steps ``[start, stop)`` of a schedule over ``len(batches)`` steps (optimizer kept on the model)."""
    import torch

    opt = getattr(model, "_probe_opt", None)
    if opt is None:
        opt = model._probe_opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t, c = time.perf_counter(), time.process_time()
    for step in range(start, stop):
        for g in opt.param_groups:
            g["lr"] = lr * _schedule(step, len(batches), warmup)
        ids, mask = _pad(batches[step], 0)
        loss = -_token_logps(model, ids, mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append({"loss": float(loss.detach()), "step": step})
    n = max(1, stop - start)
    return (time.perf_counter() - t) / n, (time.process_time() - c) / n


def _evaluate(model: Any, tok: Any, eval_path: str, n: int, work: str, name: str, limit: int,
              seed: int = 0, max_new_tokens: int = 160) -> dict[str, Any]:
    from redi_megatron.eval.config import EvalConfig
    from redi_megatron.eval.runner import run_eval

    path = os.path.join(work, name)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    # force_think=False: the traces open <think> themselves, as in training (what redi-demo does too)
    cfg = EvalConfig(model=path, out=os.path.join(work, f"eval_{name}"), benchmarks=[eval_path], n=n,
                     max_new_tokens=max_new_tokens, backend="hf", batch_size=64, grade_workers=1, progress=False,
                     limit=limit, force_think=False, seed=seed)
    t = time.perf_counter()
    rep = run_eval(cfg)
    b = next(iter(rep["benchmarks"].values()))
    return {"pass@1": round(b["pass@1"], 4), "sem_rllm": round(b["sem"], 4),
            "eval_s": round(time.perf_counter() - t, 1)}


def _validation_split(teacher: Any, count: int, seed: int, task: Any) -> str:
    """Write ``validation.jsonl`` beside the teacher's files: problems in neither the training rows nor the
    held-out set, for choosing settings without looking at the numbers the demo reports."""
    from redi_megatron.data.synthetic import write_jsonl
    from redi_megatron.demo.teacher import operands, problem_operands, validation_problems

    with open(teacher.train_path, encoding="utf-8") as f:
        seen = [operands(json.loads(line)) for line in f if line.strip()]
    with open(teacher.eval_path, encoding="utf-8") as f:
        seen += [problem_operands(json.loads(line)["problem"]) for line in f if line.strip()]
    path = os.path.join(os.path.dirname(teacher.eval_path), "validation.jsonl")
    write_jsonl(validation_problems(count, seed, task, exclude=seen), path)
    return path


def experiment(args: argparse.Namespace) -> None:
    import copy

    import torch
    from transformers import Qwen2ForCausalLM

    from redi_megatron.data.curate import CurationConfig, curate
    from redi_megatron.data.templates import encode_completions, encode_prompts
    from redi_megatron.demo.teacher import TaskConfig, write_teacher_data
    from redi_megatron.demo.tokenizer import build_tokenizer

    torch.set_num_threads(args.threads)
    work = args.work or tempfile.mkdtemp(prefix="redi_probe_")
    os.makedirs(work, exist_ok=True)
    task = TaskConfig(min_digits=args.digits[0], max_digits=args.digits[1], error_rate=args.error_rate,
                      shortcut_rate=args.shortcut_rate,
                      **({"error_weights": tuple(args.error_weights)} if args.error_weights else {}))
    t0 = time.perf_counter()
    teacher = write_teacher_data(os.path.join(work, "teacher"), args.problems, args.eval_problems, args.seed, task)
    if args.validation:
        teacher.eval_path = _validation_split(teacher, args.eval_problems, args.seed, task)
    tok = build_tokenizer()
    cur = os.path.join(work, "curated")
    curate(CurationConfig(input=teacher.train_path, output=cur, tokenizer="", output_format="jsonl", num_proc=1,
                          progress=False, overwrite=True), tokenizer=tok)
    pos = [json.loads(x) for x in open(os.path.join(cur, "positives.jsonl"))]
    pairs = [json.loads(x) for x in open(os.path.join(cur, "pairs.jsonl"))]
    sft_items = list(zip(encode_prompts(tok, [r["problem"] for r in pos]),
                         encode_completions(tok, [r["completion"] for r in pos])))
    pair_items = list(zip(encode_prompts(tok, [r["problem"] for r in pairs]),
                          encode_completions(tok, [r["chosen"] for r in pairs]),
                          encode_completions(tok, [r["rejected"] for r in pairs])))
    result: dict[str, Any] = {"args": vars(args), "positives": len(pos), "pairs": len(pairs),
                              "data_s": round(time.perf_counter() - t0, 1)}
    spec = DemoModelSpec(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
                         tie_word_embeddings=not args.untied)
    sft_dir = os.path.join(work, "sft")
    if os.path.exists(os.path.join(sft_dir, "probe_sft.json")):  # reuse the stage-1 model of an earlier call
        model = Qwen2ForCausalLM.from_pretrained(sft_dir)
        with open(os.path.join(sft_dir, "probe_sft.json")) as f:
            result["sft"] = json.load(f)
        if "pass@1" not in result["sft"]:
            result["sft"].update(_evaluate(model, tok, teacher.eval_path, args.n, work, "sft", args.eval_limit,
                                           args.seed, args.max_new_tokens))
    else:
        torch.manual_seed(args.seed)
        model = Qwen2ForCausalLM(spec.hf_config(tok))
        sft_log: list[dict[str, float]] = []
        sec, cpu = train(model, _batches(sft_items, args.batch, args.sft_steps, args.seed), "sft", args.lr,
                         log=sft_log)
        result["sft"] = {"steps": args.sft_steps, "lr": args.lr, "wall_s_per_step": round(sec, 3),
                         "cpu_s_per_step": round(cpu, 3), "final_loss": sft_log[-1]["loss"]}
        result["sft"].update(_evaluate(model, tok, teacher.eval_path, args.n, work, "sft", args.eval_limit,
                                       args.seed, args.max_new_tokens))
        with open(os.path.join(sft_dir, "probe_sft.json"), "w") as f:
            json.dump(result["sft"], f)
    print(json.dumps(result), flush=True)
    for name, alpha in (("redi", args.alpha), ("control", 0.0))[: 1 if args.skip_control else 2]:
        m2 = copy.deepcopy(model)
        log: list[dict[str, float]] = []
        sec, cpu = train(m2, _batches(pair_items, args.pair_batch, args.stage2_steps, args.seed + 1), "pairs",
                         args.stage2_lr, alpha=alpha, gamma=args.gamma if alpha else 0.0, log=log)
        result[name] = {"wall_s_per_step": round(sec, 3), "cpu_s_per_step": round(cpu, 3), "final": log[-1]}
        result[name].update(_evaluate(m2, tok, teacher.eval_path, args.n, work, f"{name}_{args.tag}",
                                      args.eval_limit, args.seed, args.max_new_tokens))
        print(json.dumps({name: result[name]}), flush=True)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def slips(args: argparse.Namespace) -> None:
    """For each pair of a demo run: p(rejected's first differing token) and p(chosen's) after the shared prefix.

    Says whether a model puts probability on its teacher's mistakes, which is what REDI's negative term
    can take away.
    """
    import numpy as np
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from redi_megatron.data.templates import encode_completions, encode_prompts
    from redi_megatron.demo.analysis import first_divergence

    tok = AutoTokenizer.from_pretrained(os.path.join(args.run, "tokenizer"))
    pairs = load_from_disk(os.path.join(args.run, "curated", "pairs"))
    prompts = encode_prompts(tok, pairs["problem"])
    chosen, rejected = encode_completions(tok, pairs["chosen"]), encode_completions(tok, pairs["rejected"])
    for name in args.models:
        model = Qwen2ForCausalLM.from_pretrained(os.path.join(args.run, "models", name)).eval()
        wrong, right = [], []
        with torch.no_grad():
            for p, c, r in zip(prompts, chosen, rejected):
                k = first_divergence(c, r)
                if k < 0:
                    continue  # a judge's false negative: the same trace on both sides
                probs = torch.softmax(model(input_ids=torch.tensor([list(p) + list(c[:k])])).logits[0, -1].float(), -1)
                wrong.append(float(probs[r[k]]))
                right.append(float(probs[c[k]]))
        w = np.array(wrong)
        print(json.dumps({"model": name, "pairs": len(w), "p_wrong_mean": round(float(w.mean()), 5),
                          "p_wrong_median": float(f"{np.median(w):.3g}"), "frac_p_wrong_over_5pct":
                          round(float((w > 0.05).mean()), 4), "p_right_mean": round(float(np.mean(right)), 4)}),
              flush=True)


def main(argv: Sequence[str] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m redi_megatron.demo.probe", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--layers", type=int, nargs="+", default=[2, 4, 4])
    t.add_argument("--hidden", type=int, nargs="+", default=[64, 128, 256])
    t.add_argument("--digits", type=int, nargs=2, default=[3, 3])
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("curve")
    c.add_argument("--digits", type=int, nargs=2, default=[2, 5])
    c.add_argument("--problems", type=int, default=2000)
    c.add_argument("--eval-problems", type=int, default=128)
    c.add_argument("--layers", type=int, default=2)
    c.add_argument("--hidden", type=int, default=64)
    c.add_argument("--batch", type=int, default=16)
    c.add_argument("--steps", type=int, default=1500)
    c.add_argument("--every", type=int, default=300)
    c.add_argument("--lr", type=float, default=3e-3)
    c.add_argument("--max-new-tokens", type=int, default=224)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--plain", action="store_true", help="traces without restated operands and place names")
    e = sub.add_parser("experiment")
    e.add_argument("--digits", type=int, nargs=2, default=[3, 3])
    e.add_argument("--problems", type=int, default=2000)
    e.add_argument("--eval-problems", type=int, default=200)
    e.add_argument("--eval-limit", type=int, default=None)
    e.add_argument("--error-rate", type=float, default=0.35)
    e.add_argument("--shortcut-rate", type=float, default=0.0,
                   help="the shortcut teacher's share of mental-math traces (0: the slip teacher)")
    e.add_argument("--validation", action="store_true",
                   help="evaluate on a validation split (neither training nor the demo's held-out problems)")
    e.add_argument("--error-weights", type=float, nargs="+", default=None,
                   help="relative frequency of each teacher error mode (redi_megatron.demo.teacher.ERROR_MODES)")
    e.add_argument("--layers", type=int, default=4)
    e.add_argument("--hidden", type=int, default=128)
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--untied", action="store_true", help="separate input and output embeddings")
    e.add_argument("--pair-batch", type=int, default=16)
    e.add_argument("--sft-steps", type=int, default=300)
    e.add_argument("--stage2-steps", type=int, default=150)
    e.add_argument("--lr", type=float, default=1e-3)
    e.add_argument("--stage2-lr", type=float, default=3e-4)
    e.add_argument("--alpha", type=float, default=0.8)
    e.add_argument("--gamma", type=float, default=0.0, help="REDI neg_weighting_gamma")
    e.add_argument("--skip-control", action="store_true", help="only the REDI run of stage 2")
    e.add_argument("--n", type=int, default=4)
    e.add_argument("--max-new-tokens", type=int, default=160)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--json", default=None)
    e.add_argument("--work", default=None, help="work directory; its SFT model is reused when present")
    e.add_argument("--tag", default="run", help="names this call's stage-2 outputs in --work")
    s = sub.add_parser("slips", help="a demo run's models' probability of the teacher's first wrong token")
    s.add_argument("--run", required=True, help="a redi-demo --out directory")
    s.add_argument("--models", nargs="+", default=["sft", "redi", "control"])
    a = p.parse_args(argv)
    {"throughput": throughput, "curve": curve, "experiment": experiment, "slips": slips}[a.cmd](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
