"""The demo's tiny Qwen2 model: one spec, rendered as an HF ``Qwen2Config`` and as the trainer's ``ModelConfig``.

The base model is randomly initialised from a seed (no download) and saved with the demo tokenizer beside
it, so the directory is a complete HF model that ``redi-hf-to-megatron`` and ``redi-eval`` accept.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from redi_megatron.demo.tokenizer import ENDOFTEXT, IM_END
from redi_megatron.errors import UserError
from redi_megatron.typed import ranged


@dataclass(frozen=True)
class DemoModelSpec:
    """Architecture of the demo model (Qwen2: GQA, SwiGLU, RMSNorm, RoPE, QKV bias, tied embeddings)."""

    num_layers: int = ranged(4, ">=1")
    hidden_size: int = ranged(128, ">=1")
    ffn_hidden_size: int = ranged(512, ">=1")
    num_attention_heads: int = ranged(4, ">=1")
    num_query_groups: int = ranged(2, ">=1")
    vocab_size: int = ranged(384, ">=1")  # embedding rows: the tokenizer's size rounded up to a multiple of 128
    max_position_embeddings: int = ranged(512, ">=1")
    rope_theta: float = ranged(10000.0, ">0")
    norm_eps: float = ranged(1e-6, ">0")
    init_method_std: float = ranged(0.02, ">0")
    tie_word_embeddings: bool = True

    def validate(self, tokenizer_size: int) -> None:
        """ValueError when the tokenizer does not fit or TP=2 could not shard the model."""
        if tokenizer_size > self.vocab_size:
            raise UserError(f"DemoModelSpec.vocab_size {self.vocab_size} < tokenizer size {tokenizer_size}")
        if self.hidden_size % self.num_attention_heads:
            raise UserError("DemoModelSpec.hidden_size must be divisible by num_attention_heads")
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size"):
            if getattr(self, name) % 2:
                raise UserError(f"DemoModelSpec.{name} must be even (the REDI stage runs at TP=2)")

    def num_parameters(self) -> int:
        h, f, head = self.hidden_size, self.ffn_hidden_size, self.hidden_size // self.num_attention_heads
        kv = self.num_query_groups * head
        attn = h * h + 2 * h * kv + h + 2 * kv + h * h  # q, k, v (with bias), o
        layer = attn + 3 * h * f + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embeddings + h

    def hf_config(self, tokenizer: Any) -> Any:
        """``transformers.Qwen2Config`` of this spec (ids of the special tokens from ``tokenizer``)."""
        from transformers import Qwen2Config

        eos = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
        return Qwen2Config(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups, max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta, rms_norm_eps=self.norm_eps, initializer_range=self.init_method_std,
            tie_word_embeddings=self.tie_word_embeddings, hidden_act="silu", attention_dropout=0.0,
            use_sliding_window=False,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, torch_dtype="float32",
        )

    def trainer_overrides(self) -> dict[str, Any]:
        """``model.*`` fields of the run-config schema (``redi_megatron.models.config.ModelConfig``)."""
        return {
            "family": "qwen2", "num_layers": self.num_layers, "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.ffn_hidden_size, "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_query_groups, "vocab_size": self.vocab_size,
            "make_vocab_size_divisible_by": 128, "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta, "norm_eps": self.norm_eps, "add_qkv_bias": True,
            "tie_word_embeddings": self.tie_word_embeddings, "init_method_std": self.init_method_std,
        }


def build_base_model(spec: DemoModelSpec, tokenizer: Any, out_dir: str, seed: int) -> str:
    """Randomly initialise the model from ``seed`` and save it (safetensors) with ``tokenizer`` in ``out_dir``."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    spec.validate(len(tokenizer))
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(spec.hf_config(tokenizer)).float()
    stop = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    # Sampling knobs are set by redi-eval; only the stop ids matter here.
    model.generation_config = GenerationConfig(eos_token_id=stop, pad_token_id=stop[1])
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "demo_model_spec.json"), "w", encoding="utf-8") as f:
        json.dump(dict(asdict(spec), seed=seed, num_parameters=spec.num_parameters()), f, indent=2)
    return out_dir
