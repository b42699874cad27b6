"""The demo's stages: what each one runs and how its outputs are checked.

Layout of the output directory::

    teacher/       raw.jsonl (OpenR1-Math-Raw rows), eval.jsonl (held-out problems), teacher.json
    models/base/   random-init HF Qwen2 + the demo tokenizer     models/<arm>/  exported HF
    curated/       redi-curate output (positives/, pairs/, curation_report.json)
    chosen/        chosen.jsonl: the pairs' chosen traces as SFT rows (the token-SFT arm's data)
    megatron/base/ redi-hf-to-megatron output                    configs/*.yaml  redi-train configs
    runs/<arm>/    redi-train save dirs (checkpoints, metrics); arms: sft, redi, control, token_sft
    eval/<model>/  redi-eval outputs (samples.jsonl, report.json)
    premise.json   the SFT model's probability of each pair's first rejected token (demo/analysis.py)
    plots/         redi-plot PNGs                                results.md, results.json
    logs/<stage>.log, commands.sh (every command run), demo_state.json (what is done)
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import sys
from typing import Any, Optional

from redi_megatron.demo.config import DemoConfig, StageBudget
from redi_megatron.demo.runner import Context, Stage, Tool

CURATE = Tool("redi-curate", "redi_megatron.data.curate", "redi_megatron/data/curate.py")
HF_TO_MEGATRON = Tool("redi-hf-to-megatron", "redi_megatron.convert.hf_to_megatron",
                      "redi_megatron/convert/hf_to_megatron.py")
MEGATRON_TO_HF = Tool("redi-megatron-to-hf", "redi_megatron.convert.megatron_to_hf",
                      "redi_megatron/convert/megatron_to_hf.py")
TRAIN = Tool("redi-train", "redi_megatron.training.cli", "redi_megatron/training/cli.py")
EVAL = Tool("redi-eval", "redi_megatron.eval.cli", "redi_megatron/eval/cli.py")
PLOT = Tool("redi-plot", "redi_megatron.training.plot", "redi_megatron/training/plot.py")
TORCHRUN = ("-m", "torch.distributed.run", "--standalone")
LABELS = {"sft": "SFT", "redi": "REDI", "control": "alpha=0 control", "token_sft": "token-level SFT"}
EVAL_BENCHMARK = "eval"  # redi-eval names a .jsonl benchmark after its file


def _threads(ctx: Context, processes: int = 1) -> int:
    if ctx.cfg.threads:
        return ctx.cfg.threads
    return max(1, (os.cpu_count() or 1) // processes)


def _missing(paths: list[str]) -> list[str]:
    return [f"missing {p}" for p in paths if not os.path.exists(p)]


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


# ---------------------------------------------------------------------------------------------------
# Built-in stages
# ---------------------------------------------------------------------------------------------------
def run_teacher(ctx: Context) -> None:
    from redi_megatron.demo.teacher import write_teacher_data

    cfg: DemoConfig = ctx.cfg
    out = write_teacher_data(ctx.path("teacher"), cfg.num_train_problems, cfg.eval.num_problems, cfg.seed, cfg.task)
    modes = out.stats["traces_by_error_mode"]
    print(f"    {out.num_train} problems x {cfg.task.generations} traces ({modes}); "
          f"{out.num_eval} held-out problems", flush=True)


def check_teacher(ctx: Context) -> list[str]:
    raw, held = ctx.path("teacher", "raw.jsonl"), ctx.path("teacher", "eval.jsonl")
    problems = _missing([raw, held, ctx.path("teacher", "teacher.json")])
    if problems:
        return problems
    cfg: DemoConfig = ctx.cfg
    if _count_lines(raw) != cfg.num_train_problems:
        problems.append(f"{raw} has {_count_lines(raw)} rows, expected {cfg.num_train_problems}")
    if _count_lines(held) != cfg.eval.num_problems:
        problems.append(f"{held} has {_count_lines(held)} problems, expected {cfg.eval.num_problems}")
    return problems


def run_base_model(ctx: Context) -> None:
    from redi_megatron.demo.model import build_base_model
    from redi_megatron.demo.tokenizer import save_demo_tokenizer

    cfg: DemoConfig = ctx.cfg
    tok = save_demo_tokenizer(ctx.path("tokenizer"), cfg.model.vocab_size)
    build_base_model(cfg.model, tok, ctx.path("models", "base"), cfg.seed)
    print(f"    tokenizer: {len(tok)} tokens; model: {cfg.model.num_parameters():,} parameters "
          f"({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size})", flush=True)


def check_hf_model(path: str) -> list[str]:
    """Problems with an HF model directory: config, weights and a loadable tokenizer."""
    problems = _missing([os.path.join(path, "config.json")])
    if not glob.glob(os.path.join(path, "*.safetensors")) and not glob.glob(os.path.join(path, "*.bin")):
        problems.append(f"no weights (*.safetensors) in {path}")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        problems.append(f"no tokenizer.json in {path}")
    return problems


def check_base_model(ctx: Context) -> list[str]:
    return _missing([ctx.path("tokenizer", "tokenizer.json")]) + check_hf_model(ctx.path("models", "base"))


# ---------------------------------------------------------------------------------------------------
# Curation
# ---------------------------------------------------------------------------------------------------
def run_curate(ctx: Context) -> None:
    ctx.command([sys.executable, "-m", CURATE.module, "--input", ctx.path("teacher", "raw.jsonl"),
                 "--output", ctx.path("curated"), "--tokenizer", ctx.path("tokenizer"), "--seed", str(ctx.cfg.seed),
                 "--num-proc", "1", "--overwrite"], threads=_threads(ctx))


def curation_counts(ctx: Context) -> dict[str, int]:
    with open(ctx.path("curated", "curation_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    return {name: int(o["kept"]) for name, o in report["outputs"].items()}


def check_curate(ctx: Context) -> list[str]:
    report = ctx.path("curated", "curation_report.json")
    problems = _missing([report])
    if problems:
        return problems
    counts = curation_counts(ctx)
    cfg: DemoConfig = ctx.cfg
    for name in ("positives", "pairs"):
        if counts.get(name, 0) < max(8, cfg.num_train_problems // 10):
            problems.append(f"curation kept only {counts.get(name, 0)} {name} of {cfg.num_train_problems} problems")
        if not (os.path.exists(ctx.path("curated", name)) or os.path.exists(ctx.path("curated", f"{name}.jsonl"))):
            problems.append(f"no {name} output in {ctx.path('curated')}")
    return problems


def curated_path(ctx: Context, name: str) -> str:
    jsonl = ctx.path("curated", f"{name}.jsonl")
    return jsonl if os.path.exists(jsonl) else ctx.path("curated", name)


def run_chosen(ctx: Context) -> None:
    """The pairs' chosen traces as SFT rows (``problem``, ``completion``) for the token-level SFT arm."""
    from redi_megatron.demo.analysis import read_pairs
    from redi_megatron.outputs import write_atomic

    rows = read_pairs(curated_path(ctx, "pairs"))
    os.makedirs(ctx.path("chosen"), exist_ok=True)
    write_atomic(ctx.path("chosen", "chosen.jsonl"),
                 (json.dumps({"problem": r["problem"], "completion": r["chosen"]}) + "\n" for r in rows))
    print(f"    {len(rows)} chosen traces", flush=True)


def check_chosen(ctx: Context) -> list[str]:
    path = ctx.path("chosen", "chosen.jsonl")
    problems = _missing([path])
    if not problems and _count_lines(path) != curation_counts(ctx)["pairs"]:
        problems.append(f"{path} has {_count_lines(path)} rows, expected one per pair")
    return problems


def run_premise(ctx: Context) -> None:
    from redi_megatron.demo.analysis import pair_paths, premise_by_model
    from redi_megatron.outputs import write_atomic

    e = ctx.cfg.eval
    m = premise_by_model({"sft": ctx.path("models", "sft")}, ctx.path("tokenizer"), curated_path(ctx, "pairs"),
                         e.temperature, e.top_p)["sft"]
    m["pair_paths"] = pair_paths(curated_path(ctx, "pairs"))
    write_atomic(ctx.path("premise.json"), json.dumps(m, indent=2))
    print(f"    premise, SFT model, {m['pairs']} pairs: the rejected trace's first diverging token can be sampled "
          f"(T {e.temperature}, top-p {e.top_p}) in {100 * m['sampleable']:.1f}% of pairs; its probability: mean "
          f"{100 * m['p_rejected_mean']:.2f}%, median {100 * m['p_rejected_median']:.3g}%, > 5% in "
          f"{100 * m['over_5pct']:.1f}% of pairs", flush=True)


# ---------------------------------------------------------------------------------------------------
# Checkpoint conversion
# ---------------------------------------------------------------------------------------------------
def run_hf_to_megatron(ctx: Context) -> None:
    ctx.command([sys.executable, "-m", HF_TO_MEGATRON.module, "--hf", ctx.path("models", "base"),
                 "--out", ctx.path("megatron", "base"), "--tp", str(ctx.cfg.redi.tp), "--pp", "1", "--overwrite"],
                threads=_threads(ctx))


def check_megatron_base(ctx: Context) -> list[str]:
    return _missing([ctx.path("megatron", "base", "model_config.json")])


def latest_checkpoint(run_dir: str) -> Optional[tuple[int, str]]:
    """(step, directory) of the newest complete checkpoint of a ``redi-train`` run, or None."""
    from redi_megatron.training.checkpointing import list_checkpoints

    found = list_checkpoints(run_dir)
    return (found[-1][0], str(found[-1][1])) if found else None


def export_stage(name: str) -> Stage:
    def run(ctx: Context) -> None:
        out = ctx.path("models", name)
        newest = latest_checkpoint(ctx.path("runs", name))
        assert newest is not None, "the training stage's check guarantees a checkpoint"
        ctx.command([sys.executable, "-m", MEGATRON_TO_HF.module, "--megatron", newest[1], "--out", out,
                     "--overwrite"], threads=_threads(ctx))
        if not os.path.exists(os.path.join(out, "tokenizer.json")):
            # the converter writes weights and config; the tokenizer is the demo's
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(ctx.path("tokenizer")).save_pretrained(out)

    return Stage(f"export_{name}", f"Megatron -> HF checkpoint of the {name} model (redi-megatron-to-hf)",
                 run, lambda ctx: check_hf_model(ctx.path("models", name)), tools=(MEGATRON_TO_HF,),
                 after=(name,))


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
def train_config(ctx: Context, name: str, budget: StageBudget, loss: str, params: dict[str, Any],
                 train_path: str, init_from: str, num_samples: int) -> dict[str, Any]:
    """A complete ``redi-train`` config, built from the run-config schema's dataclasses."""
    from redi_megatron.config import schema
    from redi_megatron.models.config import ModelConfig, ParallelConfig

    cfg: DemoConfig = ctx.cfg
    epochs = math.ceil(budget.steps * budget.global_batch_size / max(1, num_samples)) + 1  # max_steps stops it
    run = schema.RunConfig(
        name=f"demo-{name}",
        model=ModelConfig(**cfg.model.trainer_overrides()),
        parallel=ParallelConfig(tp=budget.tp),
        data=schema.DataConfig(train_path=train_path, tokenizer=ctx.path("tokenizer"),
                               global_batch_size=budget.global_batch_size,
                               micro_batch_tokens=budget.micro_batch_tokens,
                               seed=cfg.seed),
        loss=schema.LossConfig(name=loss, params=dict(params)),
        optimizer=schema.OptimizerConfig(lr=budget.lr, min_lr=0.0, warmup_ratio=budget.warmup_ratio,
                                         decay="linear"),
        train=schema.TrainConfig(epochs=float(epochs), max_steps=budget.steps, seed=cfg.seed, dtype="fp32"),
        checkpoint=schema.CheckpointConfig(init_from=init_from, save_dir=ctx.path("runs", name), save_interval=0,
                                           keep_last=1, resume=True),
        logging=schema.LoggingConfig(log_interval=1, tensorboard=False, jsonl=True),
    )
    return dataclasses.asdict(run)


def train_stage(name: str, title: str, loss: str, params: dict[str, Any], data: str, init_from: str,
                after: list[str]) -> Stage:
    def budget(ctx: Context) -> StageBudget:
        return ctx.cfg.sft if name == "sft" else ctx.cfg.redi

    def run(ctx: Context) -> None:
        import yaml

        b = budget(ctx)
        # "chosen" is built from the pairs (one chosen trace per pair)
        path = ctx.path("chosen", "chosen.jsonl") if data == "chosen" else curated_path(ctx, data)
        count = curation_counts(ctx)["pairs" if data == "chosen" else data]
        cfg = train_config(ctx, name, b, loss, params, path, ctx.path(*init_from.split("/")), count)
        os.makedirs(ctx.path("configs"), exist_ok=True)
        path = ctx.path("configs", f"{name}.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        launch = [*TORCHRUN, "--nproc_per_node", str(b.tp)] if b.tp > 1 else []
        ctx.command([sys.executable, *launch, "-m", TRAIN.module, "--config", path], threads=_threads(ctx, b.tp))

    def check(ctx: Context) -> list[str]:
        run_dir = ctx.path("runs", name)
        newest = latest_checkpoint(run_dir)
        steps = budget(ctx).steps
        if newest is None or newest[0] != steps:
            return [f"{run_dir} has no checkpoint of step {steps} (newest: {newest and newest[0]})"]
        return _missing([os.path.join(run_dir, "metrics.jsonl")])

    return Stage(name, title, run, check, tools=(TRAIN,), after=after)


# ---------------------------------------------------------------------------------------------------
# Evaluation, results, plots
# ---------------------------------------------------------------------------------------------------
def eval_stage(name: str, after: list[str]) -> Stage:
    def run(ctx: Context) -> None:
        e = ctx.cfg.eval
        max_new = e.base_max_new_tokens if name == "base" else e.max_new_tokens
        ctx.command([
            sys.executable, "-m", EVAL.module, "--model", ctx.path("models", name),
            "--tokenizer", ctx.path("tokenizer"),
            "--out", ctx.path("eval", name), "--benchmarks", ctx.path("teacher", f"{EVAL_BENCHMARK}.jsonl"),
            "--n", str(e.samples_per_problem), "--temperature", str(e.temperature), "--top-p", str(e.top_p),
            "--max-new-tokens", str(max_new), "--seed", str(ctx.cfg.seed), "--backend", e.backend,
            "--dtype", "float32", "--batch-size", str(e.batch_size), "--grade-workers", "1",
            # the demo's traces open <think> themselves, exactly as in training
            "--no-force-think",
            # vLLM: torch.compile costs more than it saves on a model this small
            *(["--enforce-eager"] if e.backend == "vllm" else []),
        ], threads=_threads(ctx))

    def check(ctx: Context) -> list[str]:
        path = ctx.path("eval", name, "report.json")
        problems = _missing([path])
        if problems:
            return problems
        with open(path, encoding="utf-8") as f:
            bench = json.load(f)["benchmarks"].get(EVAL_BENCHMARK)
        e = ctx.cfg.eval
        if bench is None or bench["num_problems"] != e.num_problems or bench["n"] != e.samples_per_problem:
            problems.append(f"{path} does not cover {e.num_problems} problems x {e.samples_per_problem} samples")
        return problems

    return Stage(f"eval_{name}", f"pass@1 of the {name} model on the held-out problems (redi-eval)",
                 run, check, tools=(EVAL,), after=after)


def model_names(cfg: DemoConfig) -> list[str]:
    return ["base", "sft", "redi"] + (["control"] if cfg.control else []) + (["token_sft"] if cfg.token_sft else [])


def run_results(ctx: Context) -> None:
    from redi_megatron.demo.results import write_results

    text = write_results(ctx.out, ctx.cfg, model_names(ctx.cfg), pairs_path=curated_path(ctx, "pairs"))
    print(text, flush=True)


def check_results(ctx: Context) -> list[str]:
    return _missing([ctx.path("results.md"), ctx.path("results.json")])


def run_plots(ctx: Context) -> None:
    ctx.command([sys.executable, "-m", PLOT.module, ctx.path("runs", "sft"), "--labels", "SFT",
                 "--out", ctx.path("plots", "sft")], threads=1)
    stage2 = [n for n in ("redi", "control", "token_sft") if n in model_names(ctx.cfg)]
    ctx.command([sys.executable, "-m", PLOT.module, *[ctx.path("runs", n) for n in stage2],
                 "--labels", ",".join(LABELS[n] for n in stage2), "--out", ctx.path("plots", "stage2")], threads=1)


def check_plots(ctx: Context) -> list[str]:
    return [f"no PNG in {d}" for d in (ctx.path("plots", "sft"), ctx.path("plots", "stage2"))
            if not glob.glob(os.path.join(d, "*.png"))]


def build_stages(cfg: DemoConfig) -> list[Stage]:
    """The pipeline for ``cfg`` in run order."""
    alpha = {"alpha": cfg.alpha}
    stages = [
        Stage("teacher", "synthetic teacher traces (OpenR1-Math-Raw schema) and held-out problems",
              run_teacher, check_teacher),
        Stage("base_model", "demo tokenizer and a random-init tiny Qwen2 (HF)", run_base_model, check_base_model),
        Stage("curate", "positives and pairs from the teacher's rows (redi-curate)", run_curate, check_curate,
              tools=(CURATE,), after=("teacher", "base_model")),
        eval_stage("base", after=["teacher", "base_model"]),
        Stage("hf_to_megatron", "HF -> Megatron checkpoint of the base model (redi-hf-to-megatron)",
              run_hf_to_megatron, check_megatron_base,
              tools=(HF_TO_MEGATRON,), after=("base_model",)),
        train_stage("sft", f"SFT on the positives (redi-train, TP={cfg.sft.tp})", "sft", {}, "positives",
                    "megatron/base", after=["curate", "hf_to_megatron"]),
        export_stage("sft"),
        eval_stage("sft", after=["export_sft"]),
        Stage("premise", "before stage 2: can the SFT model sample the rejected traces' first diverging tokens?",
              run_premise, lambda ctx: _missing([ctx.path("premise.json")]), after=("export_sft", "curate")),
        train_stage("redi", f"REDI (alpha={cfg.alpha}) on the pairs from the SFT model (redi-train, TP={cfg.redi.tp})",
                    "redi", alpha, "pairs", "runs/sft", after=["sft"]),
        export_stage("redi"),
        eval_stage("redi", after=["export_redi"]),
    ]
    if cfg.control:
        stages += [
            train_stage("control", f"control: the same stage 2 with alpha=0 (SFT on the pairs' positives, "
                        f"TP={cfg.redi.tp})", "redi", {"alpha": 0.0}, "pairs", "runs/sft", after=["sft"]),
            export_stage("control"),
            eval_stage("control", after=["export_control"]),
        ]
    if cfg.token_sft:
        stages += [
            Stage("chosen", "the pairs' chosen traces as SFT rows", run_chosen, check_chosen, after=("curate",)),
            train_stage("token_sft", f"baseline: token-level SFT on the pairs' chosen traces, stage 2's steps and "
                        f"lr (TP={cfg.redi.tp})", "sft", {}, "chosen", "runs/sft", after=["sft", "chosen"]),
            export_stage("token_sft"),
            eval_stage("token_sft", after=["export_token_sft"]),
        ]
    stages += [
        Stage("results", "table of pass@1 with standard errors, the premise and accuracy by path", run_results,
              check_results, after=[f"eval_{n}" for n in model_names(cfg)] + ["premise"]),
        Stage("plots", "training curves (redi-plot)", run_plots, check_plots, tools=(PLOT,),
              after=[n for n in model_names(cfg) if n != "base"]),
    ]
    return stages
