"""HF and vLLM backends send the model the same prompt token ids (vLLM engine stubbed out here)."""
from __future__ import annotations

import types

import pytest

from redi_megatron.eval import backends
from redi_megatron.eval.backends import Request, SamplingConfig, VLLMBackend, encode_prompts


class _StubLLM:
    """Records what VLLMBackend hands to ``LLM.generate``; returns one empty 'stop' completion each."""

    def __init__(self, tokenizer, **_: object) -> None:
        self.tokenizer, self.prompts = tokenizer, None

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, params, use_tqdm=False):
        self.prompts = prompts
        out = types.SimpleNamespace(text="", token_ids=[1], finish_reason="stop")
        return [types.SimpleNamespace(outputs=[out]) for _ in prompts]


def test_vllm_backend_sends_the_hf_token_ids(qwen_tok, monkeypatch):
    fake = types.SimpleNamespace(LLM=lambda **kw: _StubLLM(qwen_tok), SamplingParams=lambda **kw: kw)
    monkeypatch.setattr(backends, "import_vllm", lambda: fake)
    prompt = "<|im_start|>user\nWhat is 2+3? Put the answer in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    requests = [Request(("b", "p", i), prompt + "x" * i, seed=i) for i in range(3)]
    backend = VLLMBackend("unused", SamplingConfig(max_new_tokens=4))
    backend.generate(requests)
    sent = [p["prompt_token_ids"] for p in backend.llm.prompts]
    hf = encode_prompts(qwen_tok, requests)
    assert sent == hf
    # The ids are the HF backend's (no added special tokens): <|im_start|> first, once.
    assert all(ids[0] == qwen_tok.convert_tokens_to_ids("<|im_start|>") for ids in sent)
    assert sent[0] == qwen_tok(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.vllm
def test_vllm_is_importable_in_the_vllm_environment():
    import vllm

    assert hasattr(vllm, "LLM")
