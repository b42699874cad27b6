"""Worker side of ``redi-curate``: read one chunk, apply the row rules, measure token lengths.

Runs in pool processes (or in-process with ``num_proc=1``). Everything returned is plain Python so
it pickles cheaply; the main process applies the length filter, counts and writes the outputs.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .openr1 import STATUS_BAD, STATUS_OK, WANTED_COLUMNS, RowOutcome, RowRules, evaluate_row
from .readers import Chunk, read_chunk
from .templates import TemplateConfig, encode_completions, encode_prompts, find_control_token, render_prompt

LENGTH_EXACT = "exact"
LENGTH_AUTHORS = "authors"


@dataclass
class WorkerSpec:
    """What every worker needs (pickled once per worker)."""

    rules: RowRules
    template: TemplateConfig
    length_measure: str
    input_root: str  # file paths in the outputs are stored relative to it
    tokenizer: Any = None


@dataclass
class ChunkResult:
    num_rows: int
    status_counts: dict[str, int] = field(default_factory=dict)
    source_excluded: dict[str, int] = field(default_factory=dict)
    bad_rows: list[dict[str, Any]] = field(default_factory=list)
    positives: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    no_correct: int = 0
    no_incorrect: int = 0  # rows with a correct generation but no incorrect one
    null_labels: int = 0
    incomplete_generations: int = 0


_SPEC: Optional[WorkerSpec] = None


def init_worker(spec: WorkerSpec) -> None:
    """Pool initializer: keep the spec; one tokenization thread per process (the pool is the parallelism)."""
    global _SPEC
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _SPEC = spec


def reason_kind(reason: str) -> str:
    """A reason with its indices and counts replaced by '#', for aggregated counts."""
    return re.sub(r"\d+", "#", reason)


def _authors_lengths(tok: Any, problem: str, gens: list[str], cfg: TemplateConfig) -> tuple[int, list[int]]:
    """The authors' length measure (study_length_distribution.py): prompt rendered without the generation
    prompt plus 1; each completion rendered as its own conversation (system turn + assistant turn) plus 1."""
    prompt = render_prompt(problem, cfg)[: -len(cfg.generation_prompt)]
    system = "" if cfg.system_prompt is None else f"<|im_start|>system\n{cfg.system_prompt}<|im_end|>\n"
    texts = [prompt] + [f"{system}<|im_start|>assistant\n{g}<|im_end|>\n" for g in gens]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return len(ids[0]) + 1, [len(x) + 1 for x in ids[1:]]


def _measure(problem: str, gens: list[str], spec: WorkerSpec) -> tuple[int, list[int]]:
    if spec.length_measure == LENGTH_AUTHORS:
        return _authors_lengths(spec.tokenizer, problem, gens, spec.template)
    prompt_ids = encode_prompts(spec.tokenizer, [problem], spec.template)[0]
    return len(prompt_ids), [len(x) for x in encode_completions(spec.tokenizer, gens, spec.template)]


def _records(out: RowOutcome, index: int, where: dict[str, Any], spec: WorkerSpec, res: ChunkResult) -> None:
    f = out.fields
    gens = f["generations"]
    wanted = [i for i in (out.positive, out.negative) if i is not None]
    if not wanted:
        return
    prompt_len, comp_lens = _measure(f["problem"], [gens[i] for i in wanted], spec)
    length = dict(zip(wanted, comp_lens))
    control = find_control_token(f["problem"]) or next(
        (t for t in (find_control_token(gens[i]) for i in wanted) if t), None
    )
    base = {
        "problem": f["problem"], "answer": f["answer"], "source": f["source"], "uuid": f["uuid"],
        "original_index": index, "source_file": where["file"], "source_row": where["row"],
        "num_generations": out.num_generations, "prompt_tokens": prompt_len, "control_token": control,
    }
    if out.positive is not None:
        res.positives.append({
            **base, "completion": gens[out.positive], "gen_idx": out.positive,
            "completion_tokens": length[out.positive],
        })
        if out.negative is not None:
            res.pairs.append({
                **base, "chosen": gens[out.positive], "rejected": gens[out.negative],
                "chosen_gen_idx": out.positive, "rejected_gen_idx": out.negative,
                "chosen_tokens": length[out.positive], "rejected_tokens": length[out.negative],
            })


def process_chunk(chunk: Chunk) -> ChunkResult:
    """Evaluate every row of ``chunk``; rows keep their global index ``chunk.first_index + k``."""
    spec = _SPEC
    assert spec is not None, "init_worker was not called"
    res = ChunkResult(num_rows=0)
    rel = (os.path.relpath(chunk.path, spec.input_root) if os.path.isdir(spec.input_root)
           else os.path.basename(chunk.path))
    for batch in read_chunk(chunk, WANTED_COLUMNS):
        for row, parse_error in batch:
            k = res.num_rows
            res.num_rows += 1
            index, where = chunk.first_index + k, {"file": rel, "row": chunk.row_in_file + k}
            out = RowOutcome(STATUS_BAD, parse_error) if row is None else evaluate_row(row, spec.rules)
            res.status_counts[out.status] = res.status_counts.get(out.status, 0) + 1
            if out.status == STATUS_BAD:
                res.bad_rows.append({"index": index, **where, "reason": out.reason})
                continue
            if out.status != STATUS_OK:
                if out.status == "source_excluded":
                    src = str(row.get("source"))
                    res.source_excluded[src] = res.source_excluded.get(src, 0) + 1
                continue
            res.null_labels += out.null_labels
            res.incomplete_generations += out.incomplete
            if out.positive is None:
                res.no_correct += 1
            elif out.negative is None:
                res.no_incorrect += 1
            _records(out, index, where, spec, res)
    assert res.num_rows == chunk.num_rows, f"{chunk.path}: read {res.num_rows} rows, planned {chunk.num_rows}"
    return res
