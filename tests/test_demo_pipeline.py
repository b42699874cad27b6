"""redi-demo's orchestration: resumable stages, tool checks, configs it writes, the results table."""
import dataclasses
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import yaml

from redi_megatron.demo import cli, results, runner, stages
from redi_megatron.demo.config import full_config, quick_config
from redi_megatron.demo.runner import Context, Stage, StageError, Tool


def _file_stage(name, after=(), calls=None):
    def run(ctx):
        calls.append(name)
        with open(ctx.path(f"{name}.txt"), "w") as f:
            f.write(name)

    return Stage(name, name, run, lambda ctx: [] if os.path.exists(ctx.path(f"{name}.txt")) else [f"no {name}"],
                 after=after)


def test_stages_resume_skip_and_rerun_downstream(tmp_path):
    calls = []
    pipe = [_file_stage("a", calls=calls), _file_stage("b", ["a"], calls), _file_stage("c", ["b"], calls),
            _file_stage("d", [], calls)]
    ctx = Context(out=str(tmp_path), cfg=None, echo=False)
    quiet = lambda msg: None  # noqa: E731
    runner.run_stages(pipe, ctx, {"k": 1}, progress=quiet)
    assert calls == ["a", "b", "c", "d"]
    runner.run_stages(pipe, ctx, {"k": 1}, progress=quiet)
    assert calls == ["a", "b", "c", "d"]  # all done: nothing ran
    os.remove(tmp_path / "b.txt")  # damaged output: b and what reads it run again, d does not
    runner.run_stages(pipe, ctx, {"k": 1}, progress=quiet)
    assert calls[4:] == ["b", "c"]
    runner.run_stages(pipe, ctx, {"k": 1}, redo=["a"], progress=quiet)
    assert calls[6:] == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"other settings \(k: 1 -> 2\)"):
        runner.run_stages(pipe, ctx, {"k": 2}, progress=quiet)


def test_a_stage_whose_outputs_fail_their_check_is_an_error(tmp_path):
    bad = Stage("bad", "writes nothing", lambda ctx: None, lambda ctx: ["expected x.bin"])
    with pytest.raises(StageError, match="expected x.bin"):
        runner.run_stages([bad], Context(out=str(tmp_path), cfg=None, echo=False), {}, progress=lambda m: None)
    assert "bad" not in runner.load_state(str(tmp_path))["stages"]


def test_failing_command_reports_its_log_tail(tmp_path):
    ctx = Context(out=str(tmp_path), cfg=None, echo=False, log_path=str(tmp_path / "x.log"))
    with pytest.raises(StageError, match="status 3[\\s\\S]*boom"):
        ctx.command([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    assert "import sys" in open(tmp_path / "commands.sh").read()


def test_missing_tools_are_named_with_the_stages_that_need_them(tmp_path):
    ghost = Tool("redi-ghost", "redi_megatron.no_such_module", "nobody")
    assert "not installed" in ghost.missing_reason()
    assert Tool("redi-eval", "redi_megatron.eval.cli", "x").missing_reason() is None
    found = runner.missing_tools([Stage("s", "t", None, None, tools=(ghost,))])
    assert list(found.values()) == [["s"]] and "redi-ghost" in next(iter(found))


def test_cli_lists_stages_and_explains_missing_tools(tmp_path, capsys, monkeypatch):
    assert cli.main(["--out", str(tmp_path / "o"), "--quick", "--list-stages"]) == 0
    listing = capsys.readouterr().out
    for name in ("teacher", "curate", "sft", "redi", "eval_redi", "results", "plots"):
        assert f" {name} " in listing
    assert " control " not in listing and " token_sft " in listing  # --quick: no alpha=0 control
    assert " premise " in listing
    ghost = Tool("redi-train", "redi_megatron.no_such_trainer", "the trainer")
    monkeypatch.setattr(stages, "TRAIN", ghost)
    assert cli.main(["--out", str(tmp_path / "o"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "redi-train" in err and "sft" in err and "--until" in err
    assert not os.path.exists(tmp_path / "o")  # refused before doing anything
    assert cli.main(["--out", str(tmp_path / "o"), "--quick", "--until", "nope"]) == 2
    assert "no such stage" in capsys.readouterr().err
    if importlib.util.find_spec("vllm") is None:
        assert cli.main(["--out", str(tmp_path / "o"), "--quick", "--eval-backend", "vllm"]) == 2
        assert "vLLM is not installed" in capsys.readouterr().err
        assert not os.path.exists(tmp_path / "o")


def test_presets_are_valid_and_the_quick_one_is_smaller():
    full, quick = full_config(), quick_config(seed=3)
    full.validate()
    quick.validate()
    assert quick.seed == 3 and quick.quick and not quick.control and full.control
    assert quick.sft.steps < full.sft.steps and quick.eval.num_problems < full.eval.num_problems
    assert full.redi.tp == 2 and quick.redi.tp == 2  # REDI runs tensor-parallel over 2 gloo processes


def test_train_config_fills_the_run_schema(tmp_path):
    from redi_megatron.config import schema

    cfg = full_config(seed=4)
    ctx = Context(out=str(tmp_path), cfg=cfg, echo=False)
    d = stages.train_config(ctx, "redi", cfg.redi, "redi", {"alpha": 0.8}, "/data/pairs", "/ckpt/sft", 1000)
    assert set(d) == {f.name for f in dataclasses.fields(schema.RunConfig)}
    assert d["parallel"]["tp"] == 2 and d["loss"] == {"name": "redi", "params": {"alpha": 0.8}}
    assert d["train"]["max_steps"] == cfg.redi.steps and d["train"]["dtype"] == "fp32"
    assert d["train"]["epochs"] * 1000 >= cfg.redi.steps * cfg.redi.global_batch_size  # max_steps governs
    assert d["model"]["hidden_size"] == cfg.model.hidden_size and d["model"]["vocab_size"] == cfg.model.vocab_size
    assert d["checkpoint"]["init_from"] == "/ckpt/sft" and d["checkpoint"]["save_dir"] == ctx.path("runs", "redi")
    assert yaml.safe_load(yaml.safe_dump(d)) == d


def test_pass1_and_standard_errors_match_plain_formulas():
    rng = np.random.default_rng(0)
    a = (rng.random((50, 4)) < 0.6).astype(float)
    b = (rng.random((50, 4)) < 0.4).astype(float)
    p, se = results.pass1_se(a)
    per = a.mean(axis=1)
    assert p == pytest.approx(a.mean())
    assert se == pytest.approx(math.sqrt(sum((x - per.mean()) ** 2 for x in per) / 49 / 50))
    d, dse = results.paired_difference(a, b)
    diffs = a.mean(1) - b.mean(1)
    assert d == pytest.approx(a.mean() - b.mean())
    assert dse == pytest.approx(np.std(diffs, ddof=1) / math.sqrt(50))
    assert "beyond 2 SE" in results.verdict_text(0.1, 0.02)
    assert "within 2 SE" in results.verdict_text(0.01, 0.02)


def _fake_eval(out, name, correct):
    d = os.path.join(out, "eval", name)
    os.makedirs(d)
    problems, n = correct.shape
    with open(os.path.join(d, "samples.jsonl"), "w") as f:
        for i in range(problems):
            for j in range(n):
                f.write(json.dumps({"benchmark": "eval", "problem_id": f"p{i}", "sample_index": j, "response": "",
                                    "correct": bool(correct[i, j]), "grader": "rllm"}) + "\n")
    bench = {"sem": 0.01, "no_answer": 0.0, "truncated": 0.0, "mean_tokens": 10.0}
    with open(os.path.join(d, "report.json"), "w") as f:
        json.dump({"benchmarks": {"eval": bench}}, f)


def test_results_table_from_eval_outputs(tmp_path):
    out = str(tmp_path)
    os.makedirs(os.path.join(out, "teacher"))
    with open(os.path.join(out, "teacher", "eval.jsonl"), "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": f"p{i}", "problem": f"{i}+1", "answer": str(i + 1)}) + "\n")
    base = np.zeros((6, 2))
    sft = np.array([[1, 0], [0, 0], [1, 1], [0, 1], [0, 0], [1, 0]])
    redi = np.array([[1, 1], [0, 1], [1, 1], [1, 1], [0, 0], [1, 1]])
    for name, m in (("base", base), ("sft", sft), ("redi", redi)):
        _fake_eval(out, name, m)
    cfg = quick_config()
    cfg.eval.samples_per_problem = 2
    text = results.write_results(out, cfg, ["base", "sft", "redi"])
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["models"]["sft"]["pass@1"] == pytest.approx(sft.mean())
    assert saved["differences"]["redi-sft"]["diff"] == pytest.approx(redi.mean() - sft.mean())
    assert "REDI (stage 2, pairs)" in text and "| 75.0 |" in text
    assert "redi - sft: +33.3" in text


def test_quick_demo_first_stages_run_and_resume(tmp_path, capsys):
    """Teacher, tokenizer + base model and redi-curate through the CLI; a rerun skips them."""
    out = str(tmp_path / "demo")
    assert cli.main(["--out", out, "--quick", "--until", "curate", "--quiet"]) == 0
    for path in ("teacher/raw.jsonl", "teacher/eval.jsonl", "tokenizer/tokenizer.json", "models/base/config.json",
                 "curated/curation_report.json", "logs/curate.log", "commands.sh"):
        assert os.path.exists(os.path.join(out, path)), path
    first = capsys.readouterr().out
    assert "[3/3] curate" in first
    assert cli.main(["--out", out, "--quick", "--until", "curate", "--quiet"]) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == 3
    assert cli.main(["--out", out, "--quick", "--seed", "1", "--until", "curate"]) == 2
    assert "seed: 0 -> 1" in capsys.readouterr().err


def test_quiet_mode_heartbeat_shows_the_latest_progress_line(capsys):
    beat = runner._Heartbeat(every=0.0)
    beat.feed(b"loading\n[sft] step 1/9 | loss 2.0\r\x1b[A[sft] step 2/9 | loss 1.5\r")
    assert capsys.readouterr().out.strip() == ".. [sft] step 2/9 | loss 1.5"
    slow = runner._Heartbeat(every=3600.0)
    slow.feed(b"step 3/9\n")
    assert capsys.readouterr().out == ""  # at most one line per interval


@pytest.mark.parametrize("tied", [True, False])
def test_model_spec_counts_the_parameters_hf_builds(tied):
    from transformers import Qwen2ForCausalLM

    from redi_megatron.demo.model import DemoModelSpec
    from redi_megatron.demo.tokenizer import build_tokenizer

    spec = DemoModelSpec(num_layers=2, hidden_size=64, ffn_hidden_size=256, tie_word_embeddings=tied)
    model = Qwen2ForCausalLM(spec.hf_config(build_tokenizer()))
    assert spec.num_parameters() == sum(p.numel() for p in model.parameters())
    assert spec.trainer_overrides()["tie_word_embeddings"] is tied


def test_first_divergence_of_two_completions():
    from redi_megatron.demo.analysis import first_divergence

    assert first_divergence([5, 6, 7, 8], [5, 6, 9, 8]) == 2
    assert first_divergence([5, 6], [5, 6, 7]) == -1
    assert first_divergence([1], [2]) == 0


def test_restart_only_touches_a_demo_directory(tmp_path, capsys):
    from redi_megatron.demo.cli import main

    user = tmp_path / "project"
    for name in ("models", "runs", "eval", "logs"):
        (user / name).mkdir(parents=True)
        (user / name / "mine.txt").write_text("a user's work")
    assert main(["--out", str(user), "--restart", "--until", "teacher", "--quick"]) == 2
    assert "not a redi-demo directory" in capsys.readouterr().err
    assert all((user / name / "mine.txt").is_file() for name in ("models", "runs", "eval", "logs"))


def test_seeds_run_each_seed_in_its_own_directory_and_aggregate(tmp_path, capsys):
    from redi_megatron.demo import seeds

    out = str(tmp_path / "s")
    assert cli.main(["--out", out, "--quick", "--seeds", "3", "4", "--until", "teacher", "--quiet"]) == 0
    rows = [open(os.path.join(out, f"seed-{k}", "teacher", "raw.jsonl")).readline() for k in (3, 4)]
    assert rows[0] != rows[1]  # different seeds, different teacher data
    assert cli.main(["--out", out, "--seeds", "3", "3"]) == 2
    # aggregation of finished seeds: mean and SD (ddof 1) of each pass@1 and paired difference
    for k, (sft, redi) in zip((3, 4), ((0.5, 0.6), (0.7, 0.6))):
        res = {"config": {"teacher": "shortcut"},
               "models": {"sft": {"pass@1": sft}, "redi": {"pass@1": redi}},
               "differences": {"redi-sft": {"diff": redi - sft, "se": 0.02}},
               "paths": {"sft": {"shortcut_rate": 0.3, "shortcut_accuracy": 0.0, "working_accuracy": 0.8}},
               "premise": {"sft": {"sampleable": 0.9, "p_rejected_mean": 0.2, "p_rejected_median": 0.1,
                                   "over_5pct": 0.8}}}
        with open(os.path.join(out, f"seed-{k}", "results.json"), "w") as f:
            json.dump(res, f)
    text = seeds.write_seeds(out, [3, 4])
    agg = json.load(open(os.path.join(out, "seeds.json")))
    assert agg["models"]["sft"]["mean"] == pytest.approx(0.6)
    assert agg["differences"]["redi-sft"]["mean"] == pytest.approx(0.0)
    assert agg["differences"]["redi-sft"]["sd"] == pytest.approx(np.std([0.1, -0.1], ddof=1))
    assert "| redi - sft | 0.0 +/- 14.1 (10.0, -10.0) | 2.0, 2.0 |" in text
    with pytest.raises(ValueError, match="seed 5 has not finished"):
        seeds.aggregate(out, [3, 5])
