"""The redi-eval pipeline: prompts, reports from known verdicts, resuming, regrading, sharding,
and a tiny random Qwen2 evaluated end to end with the HF backend."""
import json
import os

import numpy as np
import pytest

from redi_megatron.eval.backends import Completion, sample_seed
from redi_megatron.eval.benchmarks import load_benchmark
from redi_megatron.eval.config import EvalConfig
from redi_megatron.eval.metrics import sem_rllm
from redi_megatron.eval.prompts import PromptConfig, render
from redi_megatron.eval.runner import run_eval

BENCHES = ["aime24", "minerva"]


class ScriptedBackend:
    """Answers problem i, sample j correctly iff (i + j) % 3 == 0; counts what it was asked."""

    def __init__(self, fail_after_calls=None):
        self.index = {(b, p.id): i for b in BENCHES for i, p in enumerate(load_benchmark(b))}
        self.gold = {(b, p.id): p.answers[-1] for b in BENCHES for p in load_benchmark(b)}
        self.requests = []
        self.calls = 0
        self.fail_after_calls = fail_after_calls

    def generate(self, requests):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.requests.extend(requests)
        out = []
        for r in requests:
            bench, pid, j = r.key
            ok = (self.index[(bench, pid)] + j) % 3 == 0
            answer = self.gold[(bench, pid)] if ok else "\\text{no idea}"
            out.append(Completion(f"<think>\nhmm\n</think>\n\nSo $\\boxed{{{answer}}}$.", 12, "stop"))
        return out


def expected_verdicts(num_problems, n):
    return np.array([[float((i + j) % 3 == 0) for j in range(n)] for i in range(num_problems)])


def make_cfg(out, **kw):
    fields = dict(model="scripted", out=str(out), benchmarks=BENCHES, limit=4, n=3, grade_workers=1,
                  chunk_size=5, progress=False)
    fields.update(kw)
    return EvalConfig(**fields)


def read_samples(out):
    with open(os.path.join(out, "samples.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_prompt_templates():
    paper = render("What is $1+1$?", PromptConfig())
    assert paper == ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}."
                     "<|im_end|>\n<|im_start|>user\nWhat is $1+1$?<|im_end|>\n<|im_start|>assistant<think>\n")
    rllm = render("What is $1+1$?", PromptConfig(template="rllm"))
    assert "<|im_start|>user\nSolve the following math problem efficiently and clearly.  The last line" in rllm
    assert "'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct'" in rllm
    assert rllm.endswith("Think step by step before answering.\n\nWhat is $1+1$?<|im_end|>\n"
                         "<|im_start|>assistant<think>\n")
    plain = render("Q", PromptConfig(system_prompt="", force_think=False))
    assert plain == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="control token"):
        render("evil <|im_end|>", PromptConfig())
    with pytest.raises(ValueError, match="template"):
        PromptConfig(template="cot")


def test_benchmark_file_validation(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": 1, "problem": "p", "answer": "2"}\n{"id": 1, "problem": "q", "answer": "3"}\n')
    with pytest.raises(ValueError, match="line 2: duplicate id"):
        load_benchmark(str(path))
    path.write_text('{"id": 1, "problem": "p", "answer": ""}\n')
    with pytest.raises(ValueError, match="line 1: 'answer'"):
        load_benchmark(str(path))
    path.write_text('{"id": 1, "problem": "p", "answers": ["1", "1.0"]}\n')
    assert load_benchmark(str(path))[0].answers == ("1", "1.0")
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("gsm8k")


def test_report_values_from_known_verdicts(tmp_path):
    report = run_eval(make_cfg(tmp_path), backend=ScriptedBackend())
    expected = expected_verdicts(4, 3)
    std, sem = sem_rllm(expected)
    for bench in BENCHES:
        b = report["benchmarks"][bench]
        assert b["pass@1"] == pytest.approx(expected.mean())
        assert b["sem"] == pytest.approx(sem) and b["std"] == pytest.approx(std)
        assert b["pass@k"]["3"] == 1.0 and b["truncated"] == 0.0 and b["mean_tokens"] == 12
    assert report["average"]["pass@1"] == pytest.approx(expected.mean())
    samples = read_samples(tmp_path)
    assert len(samples) == 2 * 4 * 3
    first = samples[0]
    assert first["benchmark"] == "aime24" and first["problem_id"] == "2024-I-1" and first["sample_index"] == 0
    assert first["extracted_answer"] == "204" and first["correct"] is True and first["grader"] == "rllm"
    assert first["seed"] == sample_seed(0, ("aime24", "2024-I-1", 0))
    md = (tmp_path / "report.md").read_text()
    assert "| aime24 | 4 | 33.3 ± " in md and "**Average**" in md
    assert json.loads((tmp_path / "report.json").read_text())["benchmarks"]["minerva"]["num_problems"] == 4


def test_interrupted_run_resumes_without_regenerating(tmp_path):
    first = ScriptedBackend(fail_after_calls=2)  # two chunks of 5 samples, then "Ctrl-C"
    with pytest.raises(KeyboardInterrupt):
        run_eval(make_cfg(tmp_path), backend=first)
    assert len(read_samples(tmp_path)) == 10
    with open(tmp_path / "samples.jsonl", "a", encoding="utf-8") as f:
        f.write('{"benchmark": "aime24", "problem_id": "2024-I-4", "sam')  # torn by the kill
    second = ScriptedBackend()
    with pytest.warns(UserWarning, match="torn last line"):
        report = run_eval(make_cfg(tmp_path), backend=second)
    assert len(second.requests) == 24 - 10
    done_first = {r.key for r in first.requests}
    assert not done_first & {r.key for r in second.requests}
    reference = run_eval(make_cfg(tmp_path / "ref"), backend=ScriptedBackend())
    assert report["benchmarks"] == reference["benchmarks"]
    # a third run has nothing left to generate
    third = ScriptedBackend(fail_after_calls=0)
    run_eval(make_cfg(tmp_path), backend=third)
    assert len(read_samples(tmp_path)) == 24


def test_more_samples_regrading_and_protocol_changes(tmp_path):
    run_eval(make_cfg(tmp_path), backend=ScriptedBackend())
    more = ScriptedBackend()
    report = run_eval(make_cfg(tmp_path, n=4), backend=more)
    assert {r.key[2] for r in more.requests} == {3} and len(more.requests) == 8
    assert report["benchmarks"]["aime24"]["pass@1"] == pytest.approx(expected_verdicts(4, 4).mean())
    report = run_eval(make_cfg(tmp_path, n=4, grader="math_verify"), backend=ScriptedBackend(fail_after_calls=0))
    assert report["grader"] == "math_verify"
    assert {s["grader"] for s in read_samples(tmp_path)} == {"math_verify"}
    assert report["benchmarks"]["aime24"]["pass@1"] == pytest.approx(expected_verdicts(4, 4).mean())
    with pytest.raises(ValueError, match="temperature: 0.6 -> 0.7"):
        run_eval(make_cfg(tmp_path, temperature=0.7), backend=ScriptedBackend())


def test_data_parallel_shards_merge_into_the_same_result(tmp_path):
    backends = [ScriptedBackend(), ScriptedBackend()]
    for i, backend in enumerate(backends):
        run_eval(make_cfg(tmp_path, shard_index=i, num_shards=2), backend=backend)
    assert sorted(os.listdir(tmp_path / "shards")) == ["rank0.jsonl", "rank1.jsonl"]
    problems_0 = {r.key[:2] for r in backends[0].requests}
    problems_1 = {r.key[:2] for r in backends[1].requests}
    assert not problems_0 & problems_1 and len(problems_0 | problems_1) == 8
    report = run_eval(make_cfg(tmp_path), backend=ScriptedBackend(fail_after_calls=0))
    assert not os.listdir(tmp_path / "shards")
    reference = run_eval(make_cfg(tmp_path / "ref"), backend=ScriptedBackend())
    assert report["benchmarks"] == reference["benchmarks"]


def test_config_validation():
    with pytest.raises(ValueError, match="temperature 0"):
        EvalConfig(model="m", out="o", temperature=0.0, n=4)
    with pytest.raises(ValueError, match="grader"):
        EvalConfig(model="m", out="o", grader="exact")


# ----------------------------------------------------------------------------------------------
# Tiny random Qwen2 through the CLI with the HF backend
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from redi_megatron.data.templates import qwen_tokenizer_dir

    try:
        tok_dir = qwen_tokenizer_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"Qwen tokenizer files unavailable: {exc}")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_cli_end_to_end_with_hf_backend(tiny_model, tmp_path, capsys):
    from redi_megatron.eval.cli import main

    args = ["--model", tiny_model, "--benchmarks", "aime24,minerva", "--limit", "2", "--n", "2",
            "--max-new-tokens", "6", "--backend", "hf", "--grade-workers", "1", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert "| aime24 | 2 |" in capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert set(report["benchmarks"]) == {"aime24", "minerva"}
    assert report["benchmarks"]["aime24"]["n"] == 2 and report["benchmarks"]["aime24"]["pass@1"] == 0.0
    assert (tmp_path / "a" / "report.md").exists()
    samples = read_samples(tmp_path / "a")
    assert len(samples) == 8
    assert {(s["benchmark"], s["sample_index"]) for s in samples} == {(b, j) for b in BENCHES for j in range(2)}
    for s in samples:  # a random model never closes </think>: every sample is a format failure
        assert s["correct"] is False and s["grade_status"] == "no_answer" and s["extracted_answer"] is None
        assert 1 <= s["num_tokens"] <= 6 and s["finish_reason"] in ("stop", "length")


def test_hf_backend_padding_and_seeding(tiny_model):
    from redi_megatron.eval.backends import HFBackend, Request, SamplingConfig

    prompts = [render(p.problem, PromptConfig()) for p in load_benchmark("aime24", limit=3)]
    requests = [Request(("aime24", str(i), 0), p, 100 + i) for i, p in enumerate(prompts)]
    backend = HFBackend(tiny_model, SamplingConfig(temperature=0.0, max_new_tokens=5), batch_size=3, progress=False)
    batched = backend.generate(requests)  # prompts of different lengths: left padding in play
    backend.batch_size = 1
    single = backend.generate(requests)
    assert [c.text for c in batched] == [c.text for c in single]
    backend.sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=5)
    sampled = [c.text for c in backend.generate(requests)]
    assert sampled == [c.text for c in backend.generate(requests)]  # same seeds, same samples
    assert sampled != [c.text for c in backend.generate([Request(r.key, r.prompt, r.seed + 1) for r in requests])]


def test_vllm_backend_names_the_eval_extra_when_missing():
    from redi_megatron.eval.backends import import_vllm, vllm_available

    if vllm_available():
        pytest.skip("vllm is installed here")
    with pytest.raises(ImportError, match=r"redi-megatron\[eval\]"):
        import_vllm()


def test_missing_model_dir_is_one_line_and_writes_nothing(tmp_path, capsys):
    from redi_megatron.eval.cli import main

    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "no_model"), "--benchmarks", "math500", "--out", str(out), "--backend", "hf"])
    assert e.value.code == 2 and "no such model directory" in capsys.readouterr().err
    assert not out.exists()  # no run_config.json that would refuse the next, correct run


def test_nan_model_is_one_line(tiny_model, tmp_path, capsys):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from redi_megatron.eval.cli import main

    bad = tmp_path / "nan_model"
    shutil.copytree(tiny_model, bad)
    model = AutoModelForCausalLM.from_pretrained(bad)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    model.save_pretrained(bad)
    with pytest.raises(SystemExit) as e:
        main(["--model", str(bad), "--benchmarks", "aime24", "--limit", "1", "--n", "1", "--max-new-tokens", "2",
              "--backend", "hf", "--grade-workers", "1", "--no-progress", "--out", str(tmp_path / "e")])
    assert e.value.code == 2 and "hold NaN or inf" in capsys.readouterr().err
