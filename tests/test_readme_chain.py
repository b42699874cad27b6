"""README.md's "pipeline on real data" runs as written (issue 13's probe: it curated into one directory
while the recipes read another, and later steps used run paths no recipe writes).

The commands are parsed from the README and run in order, in an empty directory that holds what the
README expects a user to have: ``OpenR1-Math-Raw/`` (synthetic rows in the dataset's schema, as parquet)
and ``Qwen2.5-Math-1.5B/`` (a tiny random Qwen2 with the real Qwen tokenizer and vocabulary), plus
``examples/configs``. What is substituted is only size: the model's layers and widths (its HF config),
the GPU count (one process instead of ``torchrun --nproc_per_node 8``), the steps and the batch size of
training, and the evaluation's samples, problems and tokens. Every path, flag and recipe value stays as
the README and the recipes give it.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# console script -> module (the console scripts would import the editable install, not this checkout)
MODULES = {"redi-curate": "redi_megatron.data.curate", "redi-hf-to-megatron": "redi_megatron.convert.hf_to_megatron",
           "redi-megatron-to-hf": "redi_megatron.convert.megatron_to_hf", "redi-eval": "redi_megatron.eval.cli",
           "redi-train": "redi_megatron.training.cli"}
# Size substitutions, appended to the README's arguments (argparse and key=value overrides: last wins).
TRAIN_SIZE = ["train.max_steps=2", "data.global_batch_size=2"]
EVAL_SIZE = ["--n", "2", "--max-new-tokens", "4", "--limit", "1", "--grade-workers", "1", "--batch-size", "8"]


def readme_chain(readme: str) -> list[list[str]]:
    """The commands of the README's "pipeline on real data" block, each as argv (continuations joined,
    comments dropped)."""
    block = readme.split("## The pipeline on real data", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    text = block.replace("\\\n", " ")
    return [argv for argv in (shlex.split(line, comments=True) for line in text.splitlines()) if argv]


def runnable(argv: list[str]) -> list[str]:
    """``argv`` as this test runs it: ``python -m <module>`` for a console script, one process instead
    of torchrun, and the size substitutions."""
    if argv[0] == "torchrun":
        m = argv.index("-m")
        assert argv[1].startswith("--nproc"), argv  # only the GPU count is dropped
        return [sys.executable, "-m", argv[m + 1], *argv[m + 2:], *TRAIN_SIZE]
    extra = EVAL_SIZE if argv[0] == "redi-eval" else []
    return [sys.executable, "-m", MODULES[argv[0]], *argv[1:], *extra]


OVER_LONG_WORDS = 33_000  # one token each: a positive over the SFT recipe's 31,968 completion tokens


def over_long_rows(n: int) -> list[dict]:
    """``n`` valid rows whose only (correct) generation is ~33k tokens: positives no recipe accepts."""
    from redi_megatron.data.synthetic import openr1_row

    return [openr1_row(f"Long problem {k}: what is {k} + 4?", "", str(k + 4),
                       ["<think>\n" + " step" * OVER_LONG_WORDS + f"\n</think>\n\nThe answer is $\\boxed{{{k + 4}}}$."],
                       [(True, True, True)], problem_type="Algebra", source="olympiads", synthetic=False)
            for k in range(n)]


def _user_files(root: str, tokenizer_dir: str, over_long: int = 0) -> None:
    """What the README assumes the user has: the raw dataset, the HF model, the recipes; ``over_long``
    extra rows with an over-long positive."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from redi_megatron.data.synthetic import raw_rows
    from redi_megatron.data.templates import load_tokenizer

    rows, cats = raw_rows(0)
    good = [r for r, c in zip(rows, cats) if not c.startswith("bad")]  # parquet needs one schema per column
    good += over_long_rows(over_long)
    raw = os.path.join(root, "OpenR1-Math-Raw", "data")  # the dataset's own layout
    os.makedirs(raw)
    pq.write_table(pa.Table.from_pylist(good), os.path.join(raw, "train-00000-of-00001.parquet"))

    model_dir = os.path.join(root, "Qwen2.5-Math-1.5B")
    tok = load_tokenizer(tokenizer_dir)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    # The model size substitution: Qwen2.5-Math-1.5B's architecture (tied embeddings, QKV bias, GQA) in
    # miniature; the README's converter overrides rope_theta and max_position_embeddings as for the real one.
    cfg = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    Qwen2ForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    shutil.copytree(os.path.join(REPO, "examples", "configs"), os.path.join(root, "examples", "configs"))


@pytest.mark.slow
def test_readme_real_data_chain_runs_as_written(tmp_path):
    from redi_megatron.data.templates import qwen_tokenizer_dir

    try:
        tokenizer_dir = qwen_tokenizer_dir()
    except FileNotFoundError as e:
        pytest.skip(f"real Qwen tokenizer files unavailable: {e}")
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        chain = readme_chain(f.read())
    assert [argv[0] for argv in chain] == ["redi-curate", "redi-hf-to-megatron", "torchrun", "torchrun",
                                          "redi-megatron-to-hf", "redi-eval"]
    _user_files(str(tmp_path), tokenizer_dir)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for argv in chain:
        r = subprocess.run(runnable(argv), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{shlex.join(argv)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"

    # what the chain made: curated data, the base checkpoint, two runs, the exported model, a report
    curate_out = tmp_path / "data" / "openr1_curated"
    assert (curate_out / "positives").is_dir() and (curate_out / "pairs").is_dir()
    assert (tmp_path / "checkpoints" / "qwen2.5-math-1.5b" / "manifest.json").is_file()
    for run in ("qwen2.5-math-1.5b_sft", "qwen2.5-math-1.5b_redi"):
        assert (tmp_path / "runs" / run / "checkpoints" / "step_0000002" / "manifest.json").is_file(), run
    redi_cfg = json.loads((tmp_path / "runs" / "qwen2.5-math-1.5b_redi" / "checkpoints" / "step_0000002"
                           / "redi_meta.json").read_text())["run_config"]
    assert redi_cfg["loss"]["name"] == "redi" and redi_cfg["loss"]["params"]["alpha"] == 0.8
    assert (tmp_path / "hf" / "qwen-redi" / "config.json").is_file()
    report = json.loads((tmp_path / "eval" / "qwen-redi" / "report.json").read_text())
    assert sorted(report["benchmarks"]) == sorted(["math500", "aime24", "amc", "minerva", "olympiadbench"])


@pytest.mark.slow
def test_readme_chain_with_over_long_positives_still_trains(tmp_path):
    """Issue 21: raw data with positives longer than the SFT recipe accepts. Curation as written drops them
    (its default filter is the recipes' limits) and SFT trains; curated the authors' way (--length-filter
    pairs) they are kept, the recipe refuses them in one line before tokenizing anything, and
    data.overlong=drop trains without them."""
    from redi_megatron.data.templates import qwen_tokenizer_dir

    try:
        tokenizer_dir = qwen_tokenizer_dir()
    except FileNotFoundError as e:
        pytest.skip(f"real Qwen tokenizer files unavailable: {e}")
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        curate, convert, sft = readme_chain(f.read())[:3]
    _user_files(str(tmp_path), tokenizer_dir, over_long=2)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    def run(argv, *extra, expect=0):
        r = subprocess.run(runnable(argv) + list(extra), cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == expect, f"{shlex.join(argv)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout + r.stderr

    run(curate)
    report = json.loads((tmp_path / "data" / "openr1_curated" / "curation_report.json").read_text())
    assert report["outputs"]["positives"]["removed"]["completion_too_long"] == 2
    run(convert)
    run(sft)
    assert (tmp_path / "runs" / "qwen2.5-math-1.5b_sft" / "checkpoints" / "step_0000002").is_dir()

    # the authors' curation keeps them: refused before tokenization, then trained without them
    run(curate, "--length-filter", "pairs", "--overwrite")
    report = json.loads((tmp_path / "data" / "openr1_curated" / "curation_report.json").read_text())
    assert report["outputs"]["positives"]["over_length_limits_but_kept"] == 2
    refused = run(sft, "checkpoint.save_dir=runs/refused", expect=2)
    assert "2 sample(s) have a completion longer than data.max_completion_tokens=31968" in refused
    assert "counts stored by redi-curate" in refused and "Traceback" not in refused
    # nothing was tokenized: no cache in the run, none beside the (re-curated) data
    assert not (tmp_path / "runs" / "refused" / "cache").exists()
    assert not (tmp_path / "data" / "openr1_curated" / "tokenized").exists()
    dropped = run(sft, "checkpoint.save_dir=runs/dropped", "data.overlong=drop")
    assert "data.overlong=drop: dropping 2 of" in dropped
    assert (tmp_path / "runs" / "dropped" / "checkpoints" / "step_0000002").is_dir()
