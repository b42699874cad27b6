"""Issue 24, what a newcomer trips on: a loss typo is one line with a suggestion before Megatron starts;
``redi-train --help`` points at keys, ranges, recipes and docs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_loss_typo_is_one_line_with_a_suggestion_before_megatron():
    r = _run("import sys; from redi_megatron.training.cli import main; "
             "rc = main(['--config', 'examples/configs/tiny_cpu_redi.yaml', 'loss.name=redy']); "
             "print('megatron' if 'megatron.core' in sys.modules else 'no-megatron'); sys.exit(rc)")
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert "\n" not in err and "did you mean 'loss.name=redi'" in err, err
    assert r.stdout.strip() == "no-megatron"


def test_train_help_points_at_keys_ranges_recipes_and_docs():
    r = _run("from redi_megatron.training.cli import main; main(['--help'])")
    out = " ".join(r.stdout.split())
    for needle in ("docs/training.md", "Allowed ranges", "examples/configs", "optimizer.*", "loss.params"):
        assert needle in out, needle


def _eval(tmp_path, model, *extra):
    import pytest

    from redi_megatron.eval.cli import main

    out = tmp_path / "evalout"
    with pytest.raises(SystemExit) as e:
        main(["--model", str(model), "--out", str(out), "--backend", "hf", *extra])
    return e.value.code, out


def test_eval_at_a_megatron_checkpoint_or_run_dir_says_export_first_and_writes_nothing(tmp_path, capsys):
    ckpt = tmp_path / "run" / "step_000010"
    ckpt.mkdir(parents=True)
    (ckpt / "redi_meta.json").write_text("{}")
    for model in (ckpt, ckpt.parent):
        code, out = _eval(tmp_path, model)
        err = capsys.readouterr().err.strip()
        assert code == 2 and "export with redi-megatron-to-hf first" in err and "\n" not in err, err
        assert not out.exists()


def test_eval_refuses_pickled_weights_in_one_line(tmp_path, capsys):
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"crafted pickle")
    code, out = _eval(tmp_path, model)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "pytorch_model.bin" in err and "\n" not in err, err
    assert not out.exists()


def test_eval_unknown_benchmark_leaves_no_out(tmp_path, capsys):
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    code, out = _eval(tmp_path, model, "--benchmarks", "aime2099")
    assert code == 2, capsys.readouterr().err
    assert not out.exists()


def test_a_tokenizer_dir_without_tokenizer_json_names_dir_and_file(tmp_path, capsys):
    import shutil

    from redi_megatron.data.curate import main
    from redi_megatron.data.synthetic import raw_rows, write_jsonl
    from redi_megatron.data.templates import qwen_tokenizer_dir

    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copy(Path(qwen_tokenizer_dir()) / "tokenizer_config.json", tok / "tokenizer_config.json")
    path = write_jsonl(raw_rows(seed=0)[0][:4], str(tmp_path / "raw.jsonl"))
    rc = main(["--input", path, "--tokenizer", str(tok), "--output", str(tmp_path / "o"), "--num-proc", "1",
               "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"{tok} has no tokenizer.json" in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_demo_results_md_points_at_the_plots(tmp_path, monkeypatch):
    import types

    from redi_megatron.demo import results, runner

    monkeypatch.setattr(results, "summarize", lambda *a, **k: {})
    monkeypatch.setattr(results, "render", lambda *a, **k: "# Results\n")
    monkeypatch.setattr(runner, "load_state", lambda out: {})
    cfg = types.SimpleNamespace(to_dict=dict, eval=types.SimpleNamespace(samples_per_problem=1))
    results.write_results(str(tmp_path), cfg, ["base", "sft"])
    text = (tmp_path / "results.md").read_text()
    assert "plots/sft/" in text and "plots/stage2/" in text


def test_every_curate_option_has_help_text():
    from redi_megatron.data.curate import build_arg_parser

    missing = [a.option_strings[0] for a in build_arg_parser()._actions if a.option_strings and not a.help]
    assert missing == []


def test_megatron_to_hf_at_an_hf_dir_names_the_flag(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    r = _run(f"import sys; from redi_megatron.convert.megatron_to_hf import main; "
             f"sys.exit(main(['--megatron', {str(hf)!r}, '--out', {str(tmp_path / 'o')!r}]))")
    err = r.stderr.strip()
    assert r.returncode == 2 and "--megatron" in err and "checkpoint.init_from" not in err, err
    assert "redi-hf-to-megatron" in err and "\n" not in err, err
