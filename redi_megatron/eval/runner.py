"""One evaluation run: prompts -> samples (resumable) -> grades -> reports.

Layout of ``cfg.out``::

    run_config.json    the protocol (model, template, sampling, seed) and the current n/grader
    samples.jsonl      every graded sample, appended chunk by chunk (see samples.py)
    report.json        metrics per benchmark and averaged (see metrics.py)
    report.md          the same as a Markdown table
    shards/            data-parallel workers' files while they run (merged and removed after)

Resuming: samples already in samples.jsonl (or left in shards/) are never regenerated. Changing the
protocol on an existing directory is refused; raising ``n`` or adding benchmarks generates only what
is new; changing the grader regrades the stored responses without generating anything.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from redi_megatron.data.templates import DEFAULT_TEMPLATE
from redi_megatron.errors import UserError
from redi_megatron.eval.backends import Completion, HFBackend, Request, VLLMBackend, sample_seed, vllm_available
from redi_megatron.eval.benchmarks import Problem, load_benchmarks
from redi_megatron.eval.config import PROTOCOL_FIELDS, EvalConfig
from redi_megatron.eval.grading import GradeResult, GradingPool
from redi_megatron.eval.prompts import render
from redi_megatron.eval.report import build_report, write_reports
from redi_megatron.eval.samples import SampleStore, read_jsonl_records, record_key
from redi_megatron.outputs import check_output

SAMPLES_FILE = "samples.jsonl"
RUN_CONFIG_FILE = "run_config.json"
SHARD_DIR = "shards"


def resolve_backend(cfg: EvalConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    import torch

    return "vllm" if vllm_available() and torch.cuda.is_available() else "hf"


def make_backend(cfg: EvalConfig) -> Any:
    sampling = cfg.sampling_config()
    if resolve_backend(cfg) == "vllm":
        return VLLMBackend(cfg.model, sampling, cfg.tokenizer, cfg.dtype, cfg.tensor_parallel_size,
                           cfg.gpu_memory_utilization, cfg.max_model_len, cfg.seed, cfg.progress,
                           enforce_eager=cfg.enforce_eager)
    return HFBackend(cfg.model, sampling, cfg.tokenizer, cfg.dtype, cfg.batch_size, cfg.progress)


def _model_id(model: str) -> str:
    return os.path.realpath(model) if os.path.exists(model) else model


def check_run_config(cfg: EvalConfig) -> dict:
    """Refuse a protocol change on an existing output directory; record the current settings."""
    path = os.path.join(cfg.out, RUN_CONFIG_FILE)
    current = dict(cfg.protocol(), model=_model_id(cfg.model), n=cfg.n, grader=cfg.grader,
                   require_think=cfg.require_think, benchmarks=list(cfg.benchmarks), limit=cfg.limit,
                   backend=cfg.backend, dtype=cfg.dtype)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        stored.setdefault("chat_template", DEFAULT_TEMPLATE)  # runs before templates had names used the default
        changed = {k: (stored.get(k), current[k]) for k in PROTOCOL_FIELDS if stored.get(k) != current[k]}
        if changed:
            details = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise UserError(f"{path}: this output directory holds samples from a different protocol ({details}); "
                             "use a new --out directory")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(current, f, indent=2)
    return current


def missing_requests(problems: dict[str, list[Problem]], done: Sequence[Any], cfg: EvalConfig,
                     tokenizer: Any = None) -> list[Request]:
    """Requests for every (problem, sample index < n) not in any of ``done`` (containers of keys).

    On a data-parallel shard only problems with ``index % num_shards == shard_index`` are kept, so all
    samples of a problem go to the same engine (prefix caching).
    """
    prompt_cfg = cfg.prompt_config()
    out = []
    for name, probs in problems.items():
        for index, problem in enumerate(probs):
            if cfg.shard_index is not None and index % cfg.num_shards != cfg.shard_index:
                continue
            keys = [(name, problem.id, j) for j in range(cfg.n)]
            keys = [k for k in keys if not any(k in d for d in done)]
            if not keys:
                continue
            prompt = render(problem.problem, prompt_cfg, tokenizer)
            out.extend(Request(k, prompt, sample_seed(cfg.seed, k)) for k in keys)
    return out


def _record(request: Request, problem: Problem, completion: Completion, result: Optional[GradeResult],
            cfg: EvalConfig) -> dict:
    benchmark, problem_id, sample_index = request.key
    return {
        "benchmark": benchmark, "problem_id": problem_id, "sample_index": sample_index,
        "gold": list(problem.answers), "response": completion.text,
        "extracted_answer": None if result is None else result.extracted,
        "correct": None if result is None else result.correct,
        "grader": None if result is None else cfg.grader, "require_think": cfg.require_think,
        "grade_status": None if result is None else result.status,
        "num_tokens": completion.num_tokens, "finish_reason": completion.finish_reason, "seed": request.seed,
    }


def _apply_grade(record: dict, result: GradeResult, cfg: EvalConfig) -> None:
    record.update(extracted_answer=result.extracted, correct=result.correct, grader=cfg.grader,
                  require_think=cfg.require_think, grade_status=result.status)


def _grade_records(records: list[dict], pool: GradingPool, cfg: EvalConfig, desc: str) -> None:
    results = pool.grade_many([(r["response"], r["gold"]) for r in records], cfg.grader,
                              require_think=cfg.require_think, progress=cfg.progress, desc=desc)
    for record, result in zip(records, results):
        _apply_grade(record, result, cfg)


def _needs_grading(record: dict, cfg: EvalConfig) -> bool:
    return record.get("grader") != cfg.grader or record.get("require_think", True) != cfg.require_think


def regrade_stale(store: SampleStore, pool: GradingPool, cfg: EvalConfig) -> int:
    """Regrade samples graded under another grader setting; returns how many."""
    stale = [r for r in store.records.values() if _needs_grading(r, cfg)]
    if stale:
        _grade_records(stale, pool, cfg, desc=f"regrading with {cfg.grader}")
        store.rewrite()
    return len(stale)


def absorb_shards(store: SampleStore, pool: GradingPool, cfg: EvalConfig) -> int:
    """Grade and append what data-parallel workers wrote, then delete their files."""
    added = 0
    for path in sorted(glob.glob(os.path.join(cfg.out, SHARD_DIR, "rank*.jsonl"))):
        records = [r for r in read_jsonl_records(path) if record_key(r) not in store]
        _grade_records(records, pool, cfg, desc=f"grading {os.path.basename(path)}")
        store.append(records)
        os.remove(path)
        added += len(records)
    return added


def _chunk_size(cfg: EvalConfig) -> int:
    if cfg.chunk_size is not None:
        return cfg.chunk_size
    return 2048 if resolve_backend(cfg) == "vllm" else 4 * cfg.batch_size


def generate_into(requests: list[Request], problems: dict[str, list[Problem]], backend: Any,
                  store: SampleStore, pool: Optional[GradingPool], cfg: EvalConfig) -> None:
    """Generate ``requests`` chunk by chunk; each chunk is graded (unless ``pool`` is None, on
    data-parallel workers) and appended before the next one starts."""
    by_id = {(name, p.id): p for name, probs in problems.items() for p in probs}
    size = _chunk_size(cfg)
    with tqdm(total=len(requests), desc="samples", disable=not cfg.progress) as bar:
        for start in range(0, len(requests), size):
            chunk = requests[start : start + size]
            completions = backend.generate(chunk)
            if len(completions) != len(chunk):
                raise RuntimeError(f"backend returned {len(completions)} completions for {len(chunk)} requests")
            chunk_problems = [by_id[r.key[:2]] for r in chunk]
            results: list[Optional[GradeResult]] = [None] * len(chunk)
            if pool is not None:
                results = pool.grade_many([(c.text, p.answers) for c, p in zip(completions, chunk_problems)],
                                          cfg.grader, require_think=cfg.require_think, progress=False)
            store.append(_record(r, p, c, g, cfg) for r, p, c, g in zip(chunk, chunk_problems, completions, results))
            bar.update(len(chunk))


def _prompt_tokenizer(cfg: EvalConfig) -> Any:
    if cfg.chat_format != "tokenizer":
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)


def check_hf_model_dir(model: str) -> None:
    """One line for a --model that is not an HF model directory redi-eval can load safely: a Megatron
    checkpoint or run directory of ours, or pickled weights (``pytorch_model.bin``, which can run code)."""
    root = Path(model)
    ours = [p for p in (root, *(d for d in root.iterdir() if d.is_dir())) if (p / "redi_meta.json").is_file()]
    if ours or (root / "config.yaml").is_file() and not (root / "config.json").is_file():
        raise UserError(f"--model {model} is a redi-megatron (Megatron) checkpoint or run directory, not an HF "
                        "model: export with redi-megatron-to-hf first (--megatron <checkpoint> --out <hf dir>)")
    if not any(root.glob("*.safetensors")) and any(root.glob("*.bin")):
        raise UserError(f"--model {model}: only pickled weights ({next(root.glob('*.bin')).name}), which redi-eval "
                        "does not load (they can run code): re-save with save_pretrained(safe_serialization=True)")
    # The backends load safetensors only (use_safetensors / load_format): a pytorch_model.bin beside them is
    # never read. They find model.safetensors or its index; other names would leave only the pickle to load.
    pickled = sorted(p.name for p in root.glob("*.bin"))
    if pickled and not any((root / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        found = ", ".join(sorted(p.name for p in root.glob("*.safetensors")))
        raise UserError(f"--model {model}: neither model.safetensors nor model.safetensors.index.json (found {found} "
                        f"beside the pickled {pickled[0]}, which redi-eval never loads: it can run code); re-save "
                        "with save_pretrained(safe_serialization=True)")


def run_eval(cfg: EvalConfig, backend: Any = None) -> Optional[dict]:
    """Run (or resume) an evaluation and write the reports; returns the report dict.

    ``backend``: anything with ``generate(list[Request]) -> list[Completion]``; built from ``cfg``
    when None. Data-parallel workers (``cfg.shard_index`` set) return None.
    """
    if backend is None and not os.path.isdir(cfg.model):  # before anything is written into --out
        raise UserError(f"--model {cfg.model}: no such model directory (redi-eval reads local HF model "
                        "directories, e.g. redi-megatron-to-hf's output; download hub models first)")
    if backend is None:
        check_hf_model_dir(cfg.model)
    if cfg.shard_index is None:  # an existing --out is resumed, but never one overlapping an input
        inputs = [cfg.model, cfg.tokenizer, *(b for b in cfg.benchmarks if b.endswith(".jsonl"))]
        check_output(cfg.out, inputs, overwrite=True)
        problems = load_benchmarks(cfg.benchmarks, cfg.limit)  # an unknown benchmark: nothing written yet
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.shard_index is not None:
        _run_shard(cfg, backend)
        return None
    run_config = check_run_config(cfg)
    store = SampleStore(os.path.join(cfg.out, SAMPLES_FILE))
    with GradingPool(cfg.grade_workers, cfg.grade_timeout) as pool:
        absorb_shards(store, pool, cfg)
        regrade_stale(store, pool, cfg)
        tokenizer = _prompt_tokenizer(cfg)
        requests = missing_requests(problems, [store], cfg, tokenizer)
        if requests and cfg.data_parallel_size > 1 and backend is None:
            failures = launch_shards(cfg)
            absorb_shards(store, pool, cfg)
            if failures:
                raise RuntimeError("data-parallel workers failed: " + "; ".join(failures))
        elif requests:
            generate_into(requests, problems, backend or make_backend(cfg), store, pool, cfg)
    report = build_report(problems, store, run_config)
    write_reports(report, cfg.out)
    return report


# ----------------------------------------------------------------------------------------------
# Data parallelism: one worker process per GPU group, problems sharded
# ----------------------------------------------------------------------------------------------
def _run_shard(cfg: EvalConfig, backend: Any = None) -> None:
    problems = load_benchmarks(cfg.benchmarks, cfg.limit)
    main = SampleStore(os.path.join(cfg.out, SAMPLES_FILE))
    os.makedirs(os.path.join(cfg.out, SHARD_DIR), exist_ok=True)
    shard_store = SampleStore(os.path.join(cfg.out, SHARD_DIR, f"rank{cfg.shard_index}.jsonl"))
    requests = missing_requests(problems, [main, shard_store], cfg, _prompt_tokenizer(cfg))
    if requests:
        generate_into(requests, problems, backend or make_backend(cfg), shard_store, None, cfg)


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def launch_shards(cfg: EvalConfig) -> list[str]:
    """Run ``data_parallel_size`` workers (``python -m redi_megatron.eval.runner``) and wait.

    Worker i sees GPUs ``[i*tp, (i+1)*tp)`` of the visible ones. Returns failure descriptions.
    """
    dp, tp = cfg.data_parallel_size, cfg.tensor_parallel_size
    gpus = _visible_gpus()
    if resolve_backend(cfg) == "vllm" and len(gpus) < dp * tp:
        raise UserError(f"data_parallel_size {dp} x tensor_parallel_size {tp} needs {dp * tp} GPUs, "
                         f"{len(gpus)} visible")
    shard_dir = os.path.join(cfg.out, SHARD_DIR)
    os.makedirs(shard_dir, exist_ok=True)
    config_path = os.path.join(shard_dir, "config.json")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(dict(cfg.to_dict(), data_parallel_size=1, num_shards=dp, progress=False), f)
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs = []
    try:
        for i in range(dp):
            path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
            env = dict(os.environ, PYTHONPATH=path)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * tp : (i + 1) * tp])
            log_path = os.path.join(shard_dir, f"rank{i}.log")
            with open(log_path, "w", encoding="utf-8") as log:
                cmd = [sys.executable, "-m", "redi_megatron.eval.runner", config_path, str(i)]
                procs.append((i, log_path, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
        for _, _, proc in tqdm(procs, desc="data-parallel workers", disable=not cfg.progress):
            proc.wait()
    finally:
        for _, _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [f"worker {i} exited with {p.returncode} (log: {log})" for i, log, p in procs if p.returncode != 0]


def _shard_main(argv: list[str]) -> None:
    config_path, index = argv
    with open(config_path, encoding="utf-8") as f:
        fields = json.load(f)
    run_eval(EvalConfig(**dict(fields, shard_index=int(index))))


if __name__ == "__main__":
    _shard_main(sys.argv[1:])
