"""A tiny tokenizer for the demo, built in code (no download), in the Qwen2.5 format.

* Byte-level BPE like Qwen2's: every byte has a token, so no text is ever lost or mapped to ``<unk>``;
  Qwen2's pre-tokenizer regex splits numbers into single digits (what makes column arithmetic learnable).
* A few hundred merges learned from the demo's own phrasing, so traces are short (about 70 tokens).
* Qwen's special tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` and the (non-special, as in
  Qwen3) ``<think>``, ``</think>``, each a single id.
* A chat template rendering the Qwen2.5-Math chat format: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``
  per message, the Qwen2.5-Math system prompt when no system message is given, and
  ``<|im_start|>assistant\\n`` as the generation prompt.

``save_demo_tokenizer(dir)`` writes it with ``save_pretrained`` so ``AutoTokenizer.from_pretrained(dir)``
loads it offline.
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterable
from typing import Any, Optional

from redi_megatron.data.templates import QWEN_MATH_SYSTEM_PROMPT
from redi_megatron.errors import UserError

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
THINK_TOKENS = (THINK, END_THINK)
# Qwen2's pre-tokenization pattern (tokenizer.json of the Qwen2.5 models): digits are split one by one.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
DEFAULT_VOCAB_SIZE = 384  # 256 bytes + 5 added tokens + 123 merges; a multiple of 128 (no TP padding)

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_MATH_SYSTEM_PROMPT.replace("\\", "\\\\") + "<|im_end|>\\n' }}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def default_corpus(seed: int = 0, num_problems: int = 300) -> list[str]:
    """Texts the merges are learned from: the chat scaffolding and teacher traces of every error mode."""
    from redi_megatron.demo.teacher import TaskConfig, teacher_rows

    # The scaffolding is repeated so its words get merges too (it opens every prompt).
    corpus = [f"system\n{QWEN_MATH_SYSTEM_PROMPT}\nuser\nassistant\n"] * 200
    for digits in ((2, 2), (3, 3), (4, 5)):
        rows, _ = teacher_rows(num_problems // 3, seed, TaskConfig(min_digits=digits[0], max_digits=digits[1],
                                                                   error_rate=0.5))
        corpus += [r["problem"] for r in rows] + [g for r in rows for g in r["generations"]]
    random.Random(seed).shuffle(corpus)
    return corpus


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, corpus: Optional[Iterable[str]] = None) -> Any:
    """The demo tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    ``vocab_size`` counts the 256 byte tokens, the 5 added tokens and the learned merges; it must be
    at least 261. Deterministic for a given corpus (the default corpus is fixed).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    added = len(SPECIAL_TOKENS) + len(THINK_TOKENS)
    if vocab_size < 256 + added:
        raise UserError(f"vocab_size must be >= {256 + added} (bytes + added tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS), special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(corpus if corpus is not None else default_corpus()), trainer)
    # Qwen3 marks the think tags as added but not special: they survive skip_special_tokens decoding.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, unk_token=None,
        model_max_length=4096, padding_side="right", clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) <= vocab_size, (len(fast), vocab_size)
    return fast


def save_demo_tokenizer(out_dir: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Any:
    """Build the tokenizer, ``save_pretrained`` it into ``out_dir`` and return it."""
    tok = build_tokenizer(vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok
