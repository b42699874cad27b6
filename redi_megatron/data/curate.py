"""``redi-curate``: OpenR1-Math-Raw -> positives (SFT stage) and pairs (REDI stage), as the paper did.

Pipeline (defaults are the paper's rules, every one configurable):

1. read parquet/JSONL (a file or a directory) in chunks, in parallel processes;
2. per row: keep ``problem_is_valid == yes``, drop ``source == cn_k12``, validate fields (bad rows are
   counted and listed by row index, ``--strict`` makes the first one an error), label each generation
   correct when ``llama_verification AND math_verify_reparsed_answer``;
3. positive = first correct generation; pair = first correct + first incorrect;
4. token lengths with the real tokenizer; length filter (prompt <= 800, completions <= 19,000 tokens);
5. order = the authors' ``datasets.Dataset.shuffle(seed=42)`` of the raw rows;
6. write HF datasets on disk (or JSONL) with provenance, and ``curation_report.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from redi_megatron.errors import UserError
from redi_megatron.locks import exclusive, lock_path_for
from redi_megatron.outputs import check_output, discard, publish, staging_dir

from .curate_report import Report, write_outputs
from .curate_worker import LENGTH_AUTHORS, LENGTH_EXACT, WorkerSpec, init_worker, process_chunk
from .lengths import RECORD_KEY as LENGTH_RECORD_KEY
from .lengths import length_record
from .openr1 import SCHEMAS, RowRules, detect_schema, resolve_rule
from .readers import file_columns, list_input_files, plan_chunks
from .templates import (
    DEFAULT_TEMPLATE,
    QWEN_MATH_SYSTEM_PROMPT,
    TemplateConfig,
    check_tokenizer,
    get_template,
    load_tokenizer,
)

OUTPUTS = ("positives", "pairs")
LENGTH_FILTER_SCOPES = ("pairs", "both", "none")


@dataclass
class CurationConfig:
    """Schema of a curation run (CLI flags map 1:1 onto these fields)."""

    input: str
    output: str
    tokenizer: str
    schema: str = "auto"  # auto | openr1-raw | openr1-raw-v1 | openr1-220k
    correctness_rule: str = "auto"  # see openr1.CORRECTNESS_RULES; auto = the schema's default
    require_valid: bool = True
    valid_values: tuple[str, ...] = ("yes",)
    exclude_sources: tuple[str, ...] = ("cn_k12",)
    require_complete_reasoning: bool = True
    shuffle_seed: Optional[int] = 42  # None keeps the input order
    max_prompt_tokens: Optional[int] = 800
    max_completion_tokens: Optional[int] = 19000
    # "both": positives and pairs within the limits, so every shipped recipe accepts what curation writes
    # (tests/test_recipes.py checks recipe limits >= these). The authors filtered the pair set only
    # (their SFT set had no length filter): "pairs" reproduces them exactly.
    length_filter: str = "both"  # pairs | both | none
    length_measure: str = LENGTH_EXACT  # exact | authors
    outputs: tuple[str, ...] = OUTPUTS
    output_format: str = "hf"  # hf | jsonl
    system_prompt: Optional[str] = QWEN_MATH_SYSTEM_PROMPT
    eos_token: Optional[str] = "<|endoftext|>"
    strict: bool = False
    num_proc: int = 0  # 0 = auto: usable cores bounded by available memory (~0.3 GB a worker)
    rows_per_chunk: int = 512
    overwrite: bool = False
    progress: bool = True
    chat_template: str = DEFAULT_TEMPLATE  # a name in data.templates.TEMPLATES; recorded in curation_report.json
    # also build the tokenized caches of the outputs (the ones redi-train opens); off by default (docs/data.md)
    tokenize: bool = False

    def validate(self) -> None:
        """ValueError naming the offending field."""
        get_template(self.chat_template)
        if self.schema != "auto" and self.schema not in SCHEMAS:
            raise UserError(f"schema: {self.schema!r} not in {('auto',) + SCHEMAS}")
        if self.length_filter not in LENGTH_FILTER_SCOPES:
            raise UserError(f"length_filter: {self.length_filter!r} not in {LENGTH_FILTER_SCOPES}")
        if self.length_measure not in (LENGTH_EXACT, LENGTH_AUTHORS):
            raise UserError(f"length_measure: {self.length_measure!r} not in {(LENGTH_EXACT, LENGTH_AUTHORS)}")
        if not self.outputs or any(o not in OUTPUTS for o in self.outputs):
            raise UserError(f"outputs: {self.outputs!r} must be a non-empty subset of {OUTPUTS}")
        if self.output_format not in ("hf", "jsonl"):
            raise UserError(f"output_format: {self.output_format!r} not in ('hf', 'jsonl')")
        for name in ("max_prompt_tokens", "max_completion_tokens"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise UserError(f"{name}: must be positive or None, got {v}")
        if self.num_proc < 0 or self.rows_per_chunk < 1:
            raise UserError("num_proc must be >= 0 (0 = auto) and rows_per_chunk >= 1")

    def template(self) -> TemplateConfig:
        """The named template; system_prompt / eos_token override only the default (Qwen2.5-Math) one."""
        base = get_template(self.chat_template)
        if base.name != DEFAULT_TEMPLATE:
            return base
        return dataclasses.replace(base, system_prompt=self.system_prompt, eos_token=self.eos_token)


def _detect_schema(files: Sequence[str], requested: str) -> str:
    found = {f: detect_schema(file_columns(f), f) for f in files}
    kinds = sorted(set(found.values()))
    if len(kinds) > 1:
        detail = ", ".join(f"{os.path.basename(f)}={s}" for f, s in list(found.items())[:6])
        raise UserError(f"input files mix schemas {kinds} ({detail}); curate them separately")
    if requested != "auto" and requested != kinds[0]:
        raise UserError(f"schema {requested!r} requested but {files[0]} looks like {kinds[0]}")
    return kinds[0]


def shuffle_ranks(n: int, seed: Optional[int]) -> np.ndarray:
    """rank[i] = position of raw row i after ``datasets.Dataset.shuffle(seed=seed)`` (int64 [n]).

    The authors shuffled with HF datasets, which draws ``np.random.default_rng(seed).permutation(n)``.
    """
    if seed is None:
        return np.arange(n, dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(n)
    ranks = np.empty(n, dtype=np.int64)
    ranks[perm] = np.arange(n, dtype=np.int64)
    return ranks


def _results(chunks: list, spec: WorkerSpec, num_proc: int):
    """ChunkResults in chunk order, from a spawn pool (or in-process when num_proc == 1)."""
    if num_proc == 1 or len(chunks) == 1:
        init_worker(spec)
        for c in chunks:
            yield process_chunk(c)
        return
    import multiprocessing as mp

    # spawn: the parent may hold torch / tokenizer threads, which fork would copy in a broken state
    with mp.get_context("spawn").Pool(num_proc, initializer=init_worker, initargs=(spec,)) as pool:
        yield from pool.imap(process_chunk, chunks)


def curate(cfg: CurationConfig, tokenizer: Any = None) -> dict[str, Any]:
    """Run the curation; returns the report (also written to ``<output>/curation_report.json``).

    ``tokenizer`` (a fast HF tokenizer) overrides loading ``cfg.tokenizer`` from disk. With
    ``num_proc > 1`` workers are spawned processes: call this under ``if __name__ == "__main__":``.
    """
    cfg.validate()
    files = list_input_files(cfg.input)
    schema = _detect_schema(files, cfg.schema)
    rules = RowRules(
        schema=schema,
        correctness_rule=resolve_rule(schema, cfg.correctness_rule),
        require_valid=cfg.require_valid,
        valid_values=tuple(v.strip().lower() for v in cfg.valid_values),
        exclude_sources=tuple(cfg.exclude_sources),
        require_complete_reasoning=cfg.require_complete_reasoning,
    )
    # One writer per output: a second curate into the same --output is refused, not interleaved.
    with exclusive(lock_path_for(cfg.output), f"--output {cfg.output}"):
        report, result = _curate_locked(cfg, files, schema, rules, tokenizer)
    report.print_summary()
    if cfg.tokenize:
        tokenize_outputs(cfg, tokenizer)
    return result


def tokenize_outputs(cfg: CurationConfig, tokenizer: Any = None) -> list[str]:
    """Build the tokenized cache entries of the curated outputs where ``redi-train`` will look for them
    (``$REDI_DATA_CACHE``, else ``tokenized/`` beside them). Returns the entry directories."""
    from .pretokenize import pretokenize
    from .tokenized import KIND_PAIR, KIND_SFT, shared_cache_dir

    template = cfg.template()
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer, template)
    entries = []
    for name in cfg.outputs:
        path = os.path.join(cfg.output, f"{name}.jsonl" if cfg.output_format == "jsonl" else name)
        root = shared_cache_dir("", path, os.path.join(cfg.output, "tokenized"), announce=cfg.progress)
        ds = pretokenize(KIND_PAIR if name == "pairs" else KIND_SFT, path, tok, template, root, cfg.num_proc,
                         cfg.progress)
        entries.append(ds.cache_path)
    return entries


def _curate_locked(cfg: CurationConfig, files: list, schema: Any, rules: RowRules,
                   tokenizer: Any) -> tuple[Report, dict[str, Any]]:
    # Everything is checked before anything is written; the old output stays until the new one is whole.
    check_output(cfg.output, [cfg.input, cfg.tokenizer or None], overwrite=cfg.overwrite, flag="--output")
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer, cfg.template())
    check_tokenizer(tok, cfg.template(), where=str(cfg.tokenizer))
    chunks = plan_chunks(files, cfg.rows_per_chunk)
    n = sum(c.num_rows for c in chunks)
    if n == 0:
        raise UserError(f"{cfg.input}: no rows")
    spec = WorkerSpec(rules, cfg.template(), cfg.length_measure, os.path.abspath(cfg.input), tok)
    report = Report(cfg, schema, rules.correctness_rule, files, n)
    ranks = shuffle_ranks(n, cfg.shuffle_seed)
    stage = staging_dir(cfg.output)
    scratch = os.path.join(stage, ".scratch")
    os.makedirs(scratch)
    try:
        _process_all(cfg, chunks, spec, report, ranks, scratch, n)
        report.check_not_empty(cfg.outputs)
        write_outputs(dataclasses.replace(cfg, output=str(stage)), report, scratch)
        shutil.rmtree(scratch)
        result = report.to_dict()
        result["chat_template"] = cfg.template().name  # training checks it (data/template_record.py)
        # the limits applied and what the stored counts mean: training checks lengths from them (data/lengths.py)
        result[LENGTH_RECORD_KEY] = length_record(cfg, cfg.template(), tok)
        with open(os.path.join(stage, "curation_report.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
        publish(stage, cfg.output)
    except BaseException:
        discard(stage)  # no half-written output; an earlier complete one is untouched
        raise
    return report, result


def _workers(cfg: CurationConfig) -> int:
    """``cfg.num_proc``, or for 0 what the cores and memory allow (printed once)."""
    from .resources import CURATE_WORKER_BYTES, worker_count

    n = worker_count(cfg.num_proc, CURATE_WORKER_BYTES)
    if cfg.num_proc == 0 and cfg.progress:
        print(f"redi-curate: {n} worker process(es) (auto: usable cores, ~0.3 GB each within available memory)",
              flush=True)
    return n


def _process_all(cfg, chunks, spec, report: Report, ranks: np.ndarray, tmp: str, n: int) -> None:
    from tqdm import tqdm

    bar = tqdm(total=n, desc="curate rows", unit="row", disable=not cfg.progress, mininterval=2.0)
    writers = {name: open(os.path.join(tmp, f"{name}.jsonl"), "wb") for name in cfg.outputs}
    try:
        for res in _results(chunks, spec, min(_workers(cfg), len(chunks))):
            if cfg.strict and res.bad_rows:
                b = res.bad_rows[0]
                raise UserError(f"--strict: bad row {b['index']} ({b['file']} row {b['row']}): {b['reason']}")
            report.add_chunk(res)
            for name, writer in writers.items():
                for rec in getattr(res, name):
                    if report.keep(name, rec):
                        rec["shuffle_rank"] = int(ranks[rec["original_index"]])
                        report.remember(name, rec["shuffle_rank"], writer.tell())
                        writer.write(json.dumps(rec, ensure_ascii=False).encode("utf-8") + b"\n")
            bar.update(res.num_rows)
    finally:
        for w in writers.values():
            w.close()
        bar.close()


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="redi-curate",
        description="Curate OpenR1-Math-Raw into REDI positives and pairs (paper rules by default).",
    )
    p.add_argument("--input", required=True, help="parquet/JSONL file or a directory of them")
    p.add_argument("--output", required=True, help="output directory (positives/, pairs/, curation_report.json)")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory (the model's)")
    p.add_argument("--schema", default="auto", choices=("auto",) + SCHEMAS,
                   help="input row layout; auto = detected from the columns")
    p.add_argument("--correctness-rule", default="auto",
                   help="which verifier columns mark a trace correct; auto = the schema's own (docs/data.md)")
    p.add_argument("--no-require-valid", dest="require_valid", action="store_false",
                   help="keep problems whose validity column is not one of --valid-values")
    p.add_argument("--valid-values", nargs="+", default=["yes"],
                   help="validity-column values that mark a problem valid (case-insensitive)")
    p.add_argument("--exclude-sources", nargs="*", default=["cn_k12"],
                   help="problem sources to drop (the authors drop cn_k12); none = keep all")
    p.add_argument("--keep-incomplete", dest="require_complete_reasoning", action="store_false",
                   help="220k: also use generations whose reasoning is marked incomplete")
    p.add_argument("--seed", type=int, default=42, help="shuffle seed (the authors' 42)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    p.add_argument("--max-prompt-tokens", type=int, default=800, help="<= 0 disables")
    p.add_argument("--max-completion-tokens", type=int, default=19000, help="<= 0 disables")
    p.add_argument("--length-filter", default="both", choices=LENGTH_FILTER_SCOPES,
                   help="which outputs the token limits apply to (both: what the shipped recipes accept; "
                        "pairs: the authors' exact selection, which keeps over-long positives)")
    p.add_argument("--length-measure", default=LENGTH_EXACT, choices=(LENGTH_EXACT, LENGTH_AUTHORS),
                   help="how lengths are counted: the exact templated tokens, or the authors' way")
    p.add_argument("--outputs", nargs="+", default=list(OUTPUTS), choices=OUTPUTS,
                   help="datasets to write: positives (SFT) and/or pairs (REDI/DPO/SimPO)")
    p.add_argument("--format", dest="output_format", default="hf", choices=("hf", "jsonl"),
                   help="HF datasets directories or JSONL files")
    p.add_argument("--system-prompt", default=QWEN_MATH_SYSTEM_PROMPT,
                   help="system prompt of the chat template (default: Qwen2.5-Math's)")
    p.add_argument("--chat-template", default=DEFAULT_TEMPLATE, help="template name (docs/data.md)")
    p.add_argument("--eos-token", default="<|endoftext|>", help="'tokenizer' = the tokenizer's own eos_token")
    p.add_argument("--strict", action="store_true", help="the first bad row is an error")
    p.add_argument("--num-proc", type=int, default=0,
                   help="worker processes; 0 (default) = usable cores, bounded by available memory at ~0.3 GB each")
    p.add_argument("--rows-per-chunk", type=int, default=512, help="rows per worker task")
    p.add_argument("--tokenize", action="store_true",
                   help="also build the outputs' tokenized caches (tokenized/ beside them, or $REDI_DATA_CACHE), "
                        "the ones redi-train opens with the same tokenizer and template (docs/data.md)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output (kept until the new one is complete)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def config_from_args(argv: Optional[Sequence[str]] = None) -> CurationConfig:
    a = build_arg_parser().parse_args(argv)
    return CurationConfig(
        input=a.input, output=a.output, tokenizer=a.tokenizer, schema=a.schema,
        correctness_rule=a.correctness_rule, require_valid=a.require_valid,
        valid_values=tuple(a.valid_values), exclude_sources=tuple(a.exclude_sources),
        require_complete_reasoning=a.require_complete_reasoning,
        shuffle_seed=None if a.no_shuffle else a.seed,
        max_prompt_tokens=a.max_prompt_tokens if a.max_prompt_tokens > 0 else None,
        max_completion_tokens=a.max_completion_tokens if a.max_completion_tokens > 0 else None,
        length_filter=a.length_filter, length_measure=a.length_measure, outputs=tuple(a.outputs),
        output_format=a.output_format, system_prompt=a.system_prompt or None,
        eos_token=None if a.eos_token == "tokenizer" else a.eos_token, strict=a.strict,
        num_proc=a.num_proc, rows_per_chunk=a.rows_per_chunk, overwrite=a.overwrite, progress=a.progress,
        chat_template=a.chat_template, tokenize=a.tokenize,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = config_from_args(argv)
    try:
        curate(cfg)
    except UserError as e:
        print(f"redi-curate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
