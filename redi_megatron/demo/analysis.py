"""What the demo measures besides pass@1: the premise of REDI's negative term, and accuracy by path.

**The premise.** REDI's negative term lowers the probability of each rejected trace's tokens. Where the
rejected trace leaves the chosen one (the first token at which they differ, after the shared prefix),
that push-down only changes what the student *samples* if the student could sample that token at all.
With temperature T and top-p, a token outside the nucleus (the most probable tokens whose mass reaches
top-p at temperature T) is never drawn, yet the term's gradient there, ``alpha/|y_l| * (onehot - p)``,
does not shrink as p -> 0; it only spills over through shared weights. :func:`premise` measures, under
one model, for every pair whose two sides differ: the rejected token's probability (temperature 1) and
whether it lies inside the sampling nucleus.

**Paths.** With the shortcut teacher a sample either answers "in its head" (``Mental math: ...``) or
works column by column; :func:`path_accuracy` splits a ``redi-eval`` output by path.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from redi_megatron.demo.teacher import is_shortcut


def first_divergence(chosen: Sequence[int], rejected: Sequence[int]) -> int:
    """Index of the first token where two completions differ (-1 when one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(chosen, rejected)) if x != y), -1)


def in_nucleus(logits: Any, token: Any, temperature: float, top_p: float) -> Any:
    """Whether ``token`` can be sampled at ``temperature`` with nucleus ``top_p``.

    logits: ``[B, V]``; token: ``[B]`` long. Returns ``[B]`` bool: True when the probability mass (at the
    temperature) of the tokens strictly more likely than ``token`` is below ``top_p``, which is the set
    HF's and vLLM's top-p samplers keep (the token that crosses top-p is kept).
    """
    import torch

    p = torch.softmax(logits.float() / temperature, dim=-1)
    pt = p.gather(-1, token[:, None])
    above = (p * (p > pt)).sum(-1)
    return above < top_p


def premise(model: Any, prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
            rejected: Sequence[Sequence[int]], temperature: float, top_p: float, batch: int = 64) -> dict[str, Any]:
    """The rejected trace's first diverging token under ``model`` (an HF causal LM), over all pairs.

    prompts, chosen, rejected: token ids per pair. Pairs whose sides are the same text (a judge's false
    negative) are counted in ``identical`` and skipped. Returns counts, the mean and median probability
    (temperature 1) of the rejected token, the share of pairs in which it is inside the sampling nucleus
    (``sampleable``), the share above 5%, and the mean probability of the chosen token there.
    """
    import torch

    items = []
    for p, c, r in zip(prompts, chosen, rejected):
        k = first_divergence(c, r)
        if k >= 0:
            items.append((list(p) + list(c[:k]), c[k], r[k]))
    wrong, right, sampleable = [], [], []
    model.eval()
    with torch.no_grad():
        for s in range(0, len(items), batch):
            chunk = items[s:s + batch]
            width = max(len(x[0]) for x in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (prefix, _, _) in enumerate(chunk):  # right padding; read the logits at the last real token
                ids[i, : len(prefix)] = torch.tensor(prefix)
                mask[i, : len(prefix)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            last = logits[torch.arange(len(chunk)), mask.sum(1) - 1]  # [B, V]
            probs = torch.softmax(last, -1)
            r_tok = torch.tensor([x[2] for x in chunk])
            c_tok = torch.tensor([x[1] for x in chunk])
            wrong += probs.gather(-1, r_tok[:, None]).squeeze(-1).tolist()
            right += probs.gather(-1, c_tok[:, None]).squeeze(-1).tolist()
            sampleable += in_nucleus(last, r_tok, temperature, top_p).tolist()
    w = np.asarray(wrong)
    return {"pairs": len(items), "identical": len(prompts) - len(items),
            "p_rejected_mean": float(w.mean()) if len(w) else float("nan"),
            "p_rejected_median": float(np.median(w)) if len(w) else float("nan"),
            "sampleable": float(np.mean(sampleable)) if len(w) else float("nan"),
            "over_5pct": float((w > 0.05).mean()) if len(w) else float("nan"),
            "p_chosen_mean": float(np.mean(right)) if len(w) else float("nan"),
            "temperature": temperature, "top_p": top_p}


def premise_by_model(model_dirs: Mapping[str, str], tokenizer_dir: str, pairs_path: str, temperature: float,
                     top_p: float) -> dict[str, dict[str, Any]]:
    """:func:`premise` of each HF model directory (by name) on a curated pairs output, encoded once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from redi_megatron.data.templates import encode_completions, encode_prompts

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = read_pairs(pairs_path)
    ids = [encode_prompts(tok, [r["problem"] for r in rows]), encode_completions(tok, [r["chosen"] for r in rows]),
           encode_completions(tok, [r["rejected"] for r in rows])]
    return {name: premise(AutoModelForCausalLM.from_pretrained(d), *ids, temperature, top_p)
            for name, d in model_dirs.items()}


def read_pairs(path: str) -> list[dict[str, Any]]:
    """``problem``, ``chosen``, ``rejected`` of each row of a curated pairs output (HF dataset dir or JSONL)."""
    from redi_megatron.data.tokenized import iter_rows

    return [{k: row[k] for k in ("problem", "chosen", "rejected")} for _, row in iter_rows(path)]


def pair_paths(pairs_path: str) -> dict[str, int]:
    """How many pairs have each (chosen path, rejected path) combination, e.g. ``working>shortcut``."""
    counts: dict[str, int] = {}
    for r in read_pairs(pairs_path):
        key = "{}>{}".format(*("shortcut" if is_shortcut(r[k]) else "working" for k in ("chosen", "rejected")))
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def path_accuracy(samples_path: str) -> dict[str, Any]:
    """Share of samples that take the shortcut, and the accuracy on each path, of one ``samples.jsonl``."""
    from redi_megatron.eval.samples import read_jsonl_records

    records = read_jsonl_records(samples_path)
    short = [bool(r["correct"]) for r in records if is_shortcut(r["response"])]
    work = [bool(r["correct"]) for r in records if not is_shortcut(r["response"])]
    return {"samples": len(records), "shortcut_rate": len(short) / max(1, len(records)),
            "shortcut_accuracy": float(np.mean(short)) if short else float("nan"),
            "working_accuracy": float(np.mean(work)) if work else float("nan")}
