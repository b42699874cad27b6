"""Synthetic OpenR1-Math rows in the published schemas, with realistic failure cases.

For tests and demos (no real OpenR1 rows are available offline). Every row is built from a declared
category, so the expected count of every curation rule is known by construction; ``RAW_LAYOUT``
lists the categories and their sizes. Text lengths are controlled in "filler sentences" so that tests can
use small token limits (e.g. prompt <= 200, completion <= 400 tokens) to exercise the length filter.
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterable
from typing import Any, Optional

from redi_megatron.outputs import write_atomic

# category -> number of rows in the current-schema fixture
RAW_LAYOUT: dict[str, int] = {
    "pair": 150,  # valid, >= 1 correct and >= 1 incorrect generation
    "only_correct": 40,
    "only_incorrect": 25,
    "invalid": 27,  # problem_is_valid "No", null or "Incomplete"
    "invalid_cn_k12": 3,  # invalid AND cn_k12: counted as invalid (validity is checked first)
    "cn_k12": 20,  # valid, would form pairs, but excluded by source
    "bad": 20,  # structural problems, see _bad_row
    "long_prompt": 3,  # pair rows whose problem is over the test prompt limit
    "long_chosen": 2,  # pair rows whose first correct generation is over the test completion limit
    "long_rejected": 2,  # pair rows whose first incorrect generation is over the limit
    "control_token": 2,  # pair rows whose chosen generation contains "<|im_end|>"
}
BAD_KINDS = (
    ["misaligned"] * 4 + ["no_correctness"] * 2 + ["no_reparsed"] * 2 + ["generations_str"] * 2
    + ["generations_empty_list"] * 3 + ["generation_empty_string"] * 2 + ["problem_none"] * 2
    + ["label_str"] * 2 + ["source_none"] * 1
)
assert len(BAD_KINDS) == RAW_LAYOUT["bad"]

SOURCES = ("olympiads", "amc_aime", "aops_forum", "cn_contest", "inequalities", "number_theory")
_WORDS = "we add the two numbers carefully and check each step of the computation again".split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(12)).capitalize() + "."


def _problem(rng: random.Random, k: int, long: bool = False) -> tuple[str, str]:
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    filler = " ".join(_sentence(rng) for _ in range(30 if long else rng.randint(0, 3)))
    return f"Problem {k}: compute ${a} + {b}$. {filler}".strip(), str(a + b)


def _generation(rng: random.Random, answer: str, correct: bool, long: bool = False) -> str:
    steps = "\n".join(_sentence(rng) for _ in range(60 if long else rng.randint(1, 8)))
    shown = answer if correct else str(int(answer) + rng.randint(1, 9))
    return f"<think>\n{steps}\n</think>\n\nThe answer is $\\boxed{{{shown}}}$."


def _labels(rng: random.Random, correct: bool) -> tuple[Optional[bool], bool, bool]:
    """(llama_verification, math_verify_answer, math_verify_reparsed_answer) for one generation."""
    if correct:
        return True, rng.random() < 0.9, True
    kind = rng.choice(["llama_false", "reparsed_false", "both_false", "llama_null"])
    llama = {"llama_false": False, "reparsed_false": True, "both_false": False, "llama_null": None}[kind]
    reparsed = kind == "llama_false"  # llama_false -> reparsed True (still incorrect under AND)
    return llama, reparsed, reparsed


def _pattern(rng: random.Random, category: str) -> list[bool]:
    n = rng.randint(2, 4)
    if category == "only_correct":
        return [True] * n
    if category == "only_incorrect":
        return [False] * n
    flags = [rng.random() < 0.5 for _ in range(n)]
    flags[rng.randrange(n)] = True
    if all(flags):
        flags[rng.randrange(n)] = False
    return flags


def openr1_row(problem: str, solution: str, answer: str, generations: list[str],
               labels: list[tuple[Optional[bool], bool, bool]], *, problem_type: str, source: str,
               synthetic: bool, problem_is_valid: Any = "Yes") -> dict[str, Any]:
    """One row in the current OpenR1-Math-Raw schema.

    ``labels``: per generation ``(llama_verification, math_verify_answer, math_verify_reparsed_answer)``.
    """
    return {
        "problem": problem, "solution": solution, "answer": answer,
        "problem_type": problem_type, "question_type": "math-word-problem", "problem_is_valid": problem_is_valid,
        "solution_is_valid": "Yes", "source": source, "synthetic": synthetic, "generations": generations,
        "generations_count": len(generations),
        "correctness": {
            "llama_verification": [lab[0] for lab in labels],
            "math_verify_answer": [lab[1] for lab in labels],
            "math_verify_reparsed_answer": [lab[2] for lab in labels],
        },
        "reparsed_answers": [answer] * len(generations),
    }


def _row(rng: random.Random, k: int, category: str) -> dict[str, Any]:
    problem, answer = _problem(rng, k, long=category == "long_prompt")
    flags = _pattern(rng, category)
    first_true, first_false = flags.index(True) if True in flags else -1, flags.index(False) if False in flags else -1
    gens = []
    for i, ok in enumerate(flags):
        long = (category == "long_chosen" and i == first_true) or (category == "long_rejected" and i == first_false)
        gens.append(_generation(rng, answer, ok, long=long))
    if category == "control_token":
        gens[first_true] = gens[first_true].replace("\n</think>", "<|im_end|>\n</think>")
    labels = [_labels(rng, ok) for ok in flags]
    valid = rng.choice(["Yes", "Yes", "Yes", "yes", " YES "])
    if category.startswith("invalid"):
        valid = [None, "No", "Incomplete"][0 if k % 9 == 0 else (2 if k % 7 == 0 else 1)]
    source = "cn_k12" if category in ("cn_k12", "invalid_cn_k12") else rng.choice(SOURCES)
    return openr1_row(problem, f"Adding gives {answer}.", answer, gens, labels, problem_type="Algebra",
                      source=source, synthetic=False, problem_is_valid=valid)


def _bad_row(rng: random.Random, k: int, kind: str) -> dict[str, Any]:
    row = _row(rng, k, "pair")
    corr = row["correctness"]
    if kind == "misaligned":
        corr["llama_verification"] = corr["llama_verification"][:-1]
    elif kind == "no_correctness":
        row["correctness"] = None
    elif kind == "no_reparsed":
        del corr["math_verify_reparsed_answer"]
    elif kind == "generations_str":
        row["generations"] = row["generations"][0]
    elif kind == "generations_empty_list":
        row["generations"] = []
        for key in corr:
            corr[key] = []
    elif kind == "generation_empty_string":
        row["generations"][-1] = "   "
    elif kind == "problem_none":
        row["problem"] = None
    elif kind == "label_str":
        corr["math_verify_reparsed_answer"][0] = "true"
    elif kind == "source_none":
        row["source"] = None
    return row


def raw_rows(seed: int = 0) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, category of each row) in the current OpenR1-Math-Raw schema, in a seeded random order.

    Bad rows have the category ``"bad:<kind>"`` with a kind from ``BAD_KINDS``.
    """
    rng = random.Random(seed)
    cats = [c for c, n in RAW_LAYOUT.items() for _ in range(n)]
    rng.shuffle(cats)
    bad = list(BAD_KINDS)
    rng.shuffle(bad)
    rows = []
    for k, cat in enumerate(cats):
        if cat == "bad":
            cats[k] = f"bad:{bad.pop()}"
            rows.append(_bad_row(rng, k, cats[k][4:]))
        else:
            rows.append(_row(rng, k, cat))
    return rows, cats


def raw_v1_rows(seed: int = 0, n: int = 40) -> list[dict[str, Any]]:
    """Earlier OpenR1-Math-Raw schema: ``correctness_math_verify`` + ``correct_count``."""
    rows = []
    rows_, cats = raw_rows(seed)
    for r, cat in zip(rows_, cats):
        if cat.startswith("bad") or cat == "control_token" or cat.startswith("long"):
            continue
        mv = r.pop("correctness")["math_verify_answer"]
        r.pop("reparsed_answers")
        r["correctness_math_verify"] = mv
        r["correct_count"] = sum(bool(v) for v in mv)
        rows.append(r)
    return rows[:n]


def openr1_220k_rows(seed: int = 0, n: int = 40) -> list[dict[str, Any]]:
    """OpenR1-Math-220k schema (no ``problem_is_valid``; ``is_reasoning_complete``; llama may be null)."""
    rng = random.Random(seed + 1)
    rows = []
    for k in range(n):
        r = _row(rng, k, "pair")
        corr = r.pop("correctness")
        for key in ("problem_is_valid", "solution_is_valid", "synthetic", "generations_count", "reparsed_answers"):
            r.pop(key)
        r["uuid"] = f"00000000-0000-0000-0000-{k:012d}"
        r["correctness_math_verify"] = corr["math_verify_reparsed_answer"]
        r["correctness_llama"] = None if k % 3 == 0 else corr["llama_verification"]
        r["is_reasoning_complete"] = [k % 5 != 0 or i > 0 for i in range(len(r["generations"]))]
        r["finish_reasons"] = None
        r["correctness_count"] = sum(bool(v) for v in r["correctness_math_verify"])
        r["messages"] = [{"role": "user", "content": r["problem"]}]
        rows.append(r)
    return rows


def write_jsonl(rows: Iterable[dict[str, Any]], path: str) -> str:
    """Write rows as JSON Lines, atomically (creating parent directories); returns ``path``."""
    return write_atomic(path, (json.dumps(r, ensure_ascii=False) + "\n" for r in rows), fsync=False)


def tiny_tokenizer(vocab_size: int = 400, corpus: Optional[list[str]] = None) -> Any:
    """A small byte-level BPE ``PreTrainedTokenizerFast`` with the Qwen chat special tokens.

    Trained in well under a second on synthetic math text (or ``corpus``); works with every function
    in :mod:`redi_megatron.data.templates` and with tiny demo models (vocab of ``vocab_size`` ids).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    if corpus is None:
        rows, _ = raw_rows(0)
        corpus = [r["problem"] for r in rows if isinstance(r.get("problem"), str)]
        corpus += [g for r in rows if isinstance(r.get("generations"), list) for g in r["generations"]]
        corpus += [QWEN_SYSTEM_FOR_CORPUS, "system user assistant"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


QWEN_SYSTEM_FOR_CORPUS = "Please reason step by step, and put your final answer within \\boxed{}."


def write_scale_fixture(path: str, num_rows: int, seed: int = 0) -> str:
    """JSONL of ``num_rows`` current-schema rows with R1-like trace lengths, for throughput runs.

    2-4 generations per row of log-normal length (median ~3k words), ~1/3 invalid, ~1/3 cn_k12,
    labels random. Returns ``path``.
    """
    rng = random.Random(seed)
    words = _WORDS + ["so", "x", "equals"]

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    with open(path, "w", encoding="utf-8") as f:
        for i in range(num_rows):
            g = rng.randint(2, 4)
            gens = [f"<think>\n{text(int(rng.lognormvariate(8.0, 0.7)))}\n</think>\n\nThe answer is $\\boxed{{3}}$."
                    for _ in range(g)]
            llama = [rng.random() < 0.5 for _ in range(g)]
            row = {"problem": f"Problem {i}: {text(rng.randint(20, 200))}", "answer": "3",
                   "problem_is_valid": rng.choice(["Yes", "Yes", "No"]),
                   "source": rng.choice(["olympiads", "cn_k12", "amc_aime"]), "generations": gens,
                   "correctness": {"llama_verification": llama, "math_verify_answer": llama,
                                   "math_verify_reparsed_answer": [v or rng.random() < 0.2 for v in llama]}}
            f.write(json.dumps(row) + "\n")
    return path
