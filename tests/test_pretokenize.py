"""The tokenized cache builder (issue 21): resumable after SIGKILL, byte-identical across worker counts,
named by content, shared by every stage on one curated directory, and never waited for inside a
collective (a real 2-rank torchrun run with slow tokenization and a 5 s collective timeout)."""
from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from redi_megatron.data import pretokenize as pt
from redi_megatron.data.templates import TemplateConfig

ROOT = Path(__file__).resolve().parents[1]
FILES = ("tokens.bin", "offsets.npy")


def _env(**extra):
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from redi_megatron.data.synthetic import tiny_tokenizer

    root = tmp_path_factory.mktemp("pretok")
    tiny_tokenizer(vocab_size=300).save_pretrained(str(root / "tok"))
    with open(root / "pos.jsonl", "w") as f:
        for i in range(47):
            f.write(json.dumps({"problem": f"What is {i} plus {i}?",
                                "completion": "so x equals " * (i % 9 + 1) + f"\\boxed{{{2 * i}}}"}) + "\n")
    return root


def _same(a: str, b: str) -> None:
    for name in FILES:
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name


def test_resume_after_sigkill_skips_finished_shards_and_matches(data, tmp_path, monkeypatch):
    ref = pt.pretokenize("sft", str(data / "pos.jsonl"), str(data / "tok"), TemplateConfig(),
                         str(tmp_path / "ref"), 1, False, shard_rows=5)
    cache = tmp_path / "cache"
    script = (
        "import sys, time\n"
        "from redi_megatron.data import pretokenize as pt\n"
        "from redi_megatron.data.templates import TemplateConfig\n"
        "orig = pt._tokenize_shard\n"
        "def slow(task):\n"
        "    out = orig(task); print('SHARD', task[2], flush=True); time.sleep(0.5); return out\n"
        "pt._tokenize_shard = slow\n"
        f"pt.pretokenize('sft', {str(data / 'pos.jsonl')!r}, {str(data / 'tok')!r}, TemplateConfig(), "
        f"{str(cache)!r}, 1, False, shard_rows=5)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env(), stdout=subprocess.PIPE, text=True)
    done = []
    for line in proc.stdout:
        if line.startswith("SHARD"):
            done.append(line.split()[1])
        if len(done) == 3:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert all(os.path.exists(p) for p in done) and not list(cache.glob("sft-*"))  # nothing published
    mtimes = {p: os.stat(p).st_mtime_ns for p in done}
    redone = []
    orig = pt._tokenize_shard

    def record(task):
        assert all(os.stat(p).st_mtime_ns == m for p, m in mtimes.items())  # finished shards untouched
        redone.append(task[2])
        return orig(task)

    monkeypatch.setattr(pt, "_tokenize_shard", record)
    ds = pt.pretokenize("sft", str(data / "pos.jsonl"), str(data / "tok"), TemplateConfig(), str(cache), 1, False,
                        shard_rows=5)
    assert not set(redone) & set(done) and len(redone) == 10 - 3  # 47 rows = 10 shards of 5
    _same(ref.cache_path, ds.cache_path)
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".content")) == [Path(ds.cache_path).name]
    meta = json.loads((Path(ds.cache_path) / "meta.json").read_text())
    assert (meta["rows"], meta["template"]) == (47, "qwen2.5-math") and meta["tokens"] == int(ds.offsets[-1])


def test_two_workers_write_the_same_bytes(data, tmp_path):
    one = pt.pretokenize("sft", str(data / "pos.jsonl"), str(data / "tok"), TemplateConfig(), str(tmp_path / "a"),
                         1, False, shard_rows=7)
    two = pt.pretokenize("sft", str(data / "pos.jsonl"), str(data / "tok"), TemplateConfig(), str(tmp_path / "b"),
                         2, True, shard_rows=7)
    _same(one.cache_path, two.cache_path)


def test_cache_is_named_by_content(data, tmp_path):
    cache = str(tmp_path / "cache")
    a = pt.pretokenize("sft", str(data / "pos.jsonl"), str(data / "tok"), TemplateConfig(), cache, 1, False)
    elsewhere = tmp_path / "copy" / "renamed.jsonl"
    elsewhere.parent.mkdir()
    shutil.copy(data / "pos.jsonl", elsewhere)
    assert pt.cache_entry("sft", str(elsewhere), a_tok(data), TemplateConfig(), cache) == a.cache_path
    text = elsewhere.read_text()
    elsewhere.write_text(text.replace("What is 3 ", "What is 4 ", 1))  # one byte
    assert pt.cache_entry("sft", str(elsewhere), a_tok(data), TemplateConfig(), cache) != a.cache_path
    memo = json.loads((tmp_path / "cache" / ".content-hashes.json").read_text())
    assert str(elsewhere) in memo and memo[str(elsewhere)]["size"] == elsewhere.stat().st_size


def a_tok(data):
    from redi_megatron.data.templates import load_tokenizer

    return load_tokenizer(str(data / "tok"))


def test_stages_on_one_curated_dir_share_one_cache(tiny_train_data, tmp_path, monkeypatch):
    """SFT builds the positives, REDI then builds only the pairs, a third run builds nothing; the cache
    sits beside the curated data (data.cache_dir "")."""
    from redi_megatron.config.loader import load_config
    from redi_megatron.training.tokenize_cli import main, tokenize_for_run

    curated = tmp_path / "curated"
    # the session fixture's dir may already hold a cache that earlier tests built: copy the data only
    shutil.copytree(Path(tiny_train_data["positives"]).parent, curated, ignore=shutil.ignore_patterns("tokenized"))
    monkeypatch.delenv("REDI_DATA_CACHE", raising=False)
    built = []
    orig = pt._build_entry
    monkeypatch.setattr(pt, "_build_entry", lambda kind, *a, **k: (built.append(kind), orig(kind, *a, **k))[1])
    common = [f"data.tokenizer={tiny_train_data['tokenizer']}", "data.num_proc=1",
              f"checkpoint.save_dir={tmp_path / 'run'}"]
    sft = load_config(str(ROOT / "examples/configs/tiny_cpu_sft.yaml"),
                      [f"data.train_path={curated / 'positives.jsonl'}", *common])
    redi = load_config(str(ROOT / "examples/configs/tiny_cpu_redi.yaml"),
                       [f"data.train_path={curated / 'pairs.jsonl'}", *common])
    a = tokenize_for_run(sft, progress=False)
    b = tokenize_for_run(redi, progress=False)
    assert built == ["sft", "pair"] and a.kind == "sft" and b.kind == "pair"
    assert Path(a.cache_path).parent == Path(b.cache_path).parent == curated / "tokenized"
    assert main(["--config", str(ROOT / "examples/configs/tiny_cpu_redi.yaml"), "--quiet",
                 f"data.train_path={curated / 'pairs.jsonl'}", *common]) == 0
    assert built == ["sft", "pair"]  # the third run found everything
    assert main(["--config", str(ROOT / "examples/configs/tiny_cpu_sft.yaml"),
                 f"data.train_path={curated / 'nope.jsonl'}", *common]) == 2


def test_two_rank_run_reaches_its_first_step_while_rank0_tokenizes_slowly(tiny_train_data, tmp_path):
    """Issue 21's crash: rank 1 waited for rank 0's tokenization inside a barrier and hit the collective
    timeout. Here tokenizing takes 15 s (test hook) and the collective timeout is 5 s: rank 1 must wait by
    polling the file system, and the run must reach step 1. Then redi-tokenize finds that cache as is."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    save, cache = tmp_path / "run", tmp_path / "cache"
    args = [f"data.train_path={tiny_train_data['positives']}", f"data.tokenizer={tiny_train_data['tokenizer']}",
            f"data.cache_dir={cache}", f"checkpoint.save_dir={save}", "data.num_proc=1",
            "data.max_prompt_tokens=200", "data.max_completion_tokens=312"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
           "-m", "redi_megatron.training.cli", "--config", str(ROOT / "examples/configs/tiny_cpu_sft.yaml"),
           *args, "train.max_steps=1", "checkpoint.save_interval=0", "parallel.timeout_s=5"]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(**{pt.DELAY_ENV: "15"}), capture_output=True, text=True,
                         timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "sleeping 15 s before tokenizing" in log
    steps = [json.loads(x)["step"] for x in (save / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]
    entry = next(cache.glob("sft-*"))
    mtime = (entry / "meta.json").stat().st_mtime_ns
    tok = subprocess.run([sys.executable, "-m", "redi_megatron.training.tokenize_cli", "--config",
                          str(ROOT / "examples/configs/tiny_cpu_sft.yaml"), *args], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert tok.returncode == 0 and str(entry) in tok.stdout, tok.stdout + tok.stderr
    assert "tokenize sft:" not in tok.stdout and (entry / "meta.json").stat().st_mtime_ns == mtime


def test_curate_tokenize_builds_what_the_trainer_opens(tiny_train_data, tmp_path, monkeypatch):
    """redi-curate --tokenize writes the caches beside its outputs; the SFT and REDI runs then build nothing."""
    from redi_megatron.config.loader import load_config
    from redi_megatron.data.curate import CurationConfig, curate
    from redi_megatron.training.tokenize_cli import tokenize_for_run

    monkeypatch.delenv("REDI_DATA_CACHE", raising=False)
    out = tmp_path / "curated"
    curate(CurationConfig(input=str(tiny_train_data["root"] / "raw.jsonl"), output=str(out),
                          tokenizer=tiny_train_data["tokenizer"], num_proc=1, progress=False, output_format="jsonl",
                          max_prompt_tokens=200, max_completion_tokens=400, length_filter="both", tokenize=True))
    assert sorted(p.name.split("-")[0] for p in (out / "tokenized").iterdir() if not p.name.startswith(".")) == \
        ["pair", "sft"]
    built = []
    orig = pt._build_entry
    monkeypatch.setattr(pt, "_build_entry", lambda kind, *a, **k: (built.append(kind), orig(kind, *a, **k))[1])
    for recipe, data in (("tiny_cpu_sft.yaml", "positives.jsonl"), ("tiny_cpu_redi.yaml", "pairs.jsonl")):
        cfg = load_config(str(ROOT / "examples/configs" / recipe),
                          [f"data.train_path={out / data}", f"data.tokenizer={tiny_train_data['tokenizer']}",
                           f"checkpoint.save_dir={tmp_path / 'run'}"])
        tokenize_for_run(cfg, progress=False)
    assert built == []


def test_a_second_builder_waits_for_the_lock_holder_then_builds(data, tmp_path):
    """Two runs started together on one curated directory: the second waits (no refusal, no timeout) and
    builds (resuming) once the holder is gone without publishing."""
    import threading
    import time

    from redi_megatron.locks import exclusive

    cache = str(tmp_path / "cache")
    final = pt.cache_entry("sft", str(data / "pos.jsonl"), a_tok(data), TemplateConfig(), cache)
    key = os.path.basename(final).split("-", 1)[1]
    got = {}
    with exclusive(os.path.join(cache, f".building-{key}.lock"), "test holder"):
        t = threading.Thread(target=lambda: got.update(ds=pt.pretokenize(
            "sft", str(data / "pos.jsonl"), str(data / "tok"), TemplateConfig(), cache, 1, False)))
        t.start()
        time.sleep(2.0)
        assert t.is_alive() and not os.path.exists(final)  # waiting, not refused, not building
    t.join(timeout=60)
    assert not t.is_alive() and got["ds"].cache_path == final and len(got["ds"]) == 47
