"""Evaluation prompt templates.

Two templates (``--template``):

* ``paper``: the problem as the user turn under the Qwen2.5-Math system prompt "Please reason step
  by step, and put your final answer within \\boxed{}.", generation forced to start thinking.
* ``rllm``: the problem wrapped in rllm's ``MATH_QUERY_TEMPLATE`` ("Solve the following math
  problem efficiently and clearly. ..."), which is what REDI's ``--data-split data2`` evaluation fed
  the model (``scripts/data/deepscaler_dataset.py --use_math_template``). rllm sends only the user
  turn, so the model's chat template adds its default system prompt; REDI's models default to the
  same Qwen2.5-Math one, which is what the ``qwen`` format below renders.

Two ways to turn a template into text (``--chat-format``):

* ``qwen`` (default): the Qwen chat format rendered directly with the data pipeline's renderer
  (:func:`redi_megatron.data.templates.render_eval_prompt`), so evaluation prompts are
  byte-identical to the training prompts up to the forced ``<think>\\n``. Like the authors'
  ``qwen_w_ft.jinja`` the assistant turn opens as ``<|im_start|>assistant<think>\\n``.
* ``tokenizer``: the model tokenizer's own ``apply_chat_template`` (for baselines with their own
  template, e.g. DeepSeek-R1-Distill), then ``<think>\\n`` appended unless it is already there.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

from redi_megatron.data.templates import (
    DEFAULT_TEMPLATE,
    QWEN_MATH_SYSTEM_PROMPT,
    find_control_token,
    get_template,
    render_eval_prompt,
    render_prompt,
)
from redi_megatron.errors import UserError

RLLM_MATH_QUERY_TEMPLATE = (
    "Solve the following math problem efficiently and clearly.  The last line of your response should be of "
    "the following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' (without "
    "quotes) where ANSWER is just the final number or expression that solves the problem. Think step by step "
    "before answering.\n\n{problem}"
)
TEMPLATES = ("paper", "rllm")
CHAT_FORMATS = ("qwen", "tokenizer")
THINK_START = "<think>\n"


@dataclass(frozen=True)
class PromptConfig:
    """Which template, how it is rendered, and whether generation is forced to start thinking.

    ``system_prompt`` overrides the Qwen2.5-Math system prompt; ``""`` renders no system turn (in
    ``tokenizer`` format the chat template may still insert its own default).
    """

    template: str = "paper"
    chat_format: str = "qwen"
    system_prompt: Optional[str] = None
    force_think: bool = True
    chat_template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        get_template(self.chat_template)  # UserError naming the choices
        if self.template not in TEMPLATES:
            raise UserError(f"unknown prompt template {self.template!r}; choose one of {TEMPLATES}")
        if self.chat_format not in CHAT_FORMATS:
            raise UserError(f"unknown chat format {self.chat_format!r}; choose one of {CHAT_FORMATS}")


def user_message(problem: str, template: str) -> str:
    """The user turn's text for ``problem`` under ``template``."""
    if template == "rllm":
        return RLLM_MATH_QUERY_TEMPLATE.replace("{problem}", problem)
    return problem


def _system(cfg: PromptConfig) -> Optional[str]:
    if cfg.system_prompt is None:
        return QWEN_MATH_SYSTEM_PROMPT
    return cfg.system_prompt or None


def render(problem: str, cfg: PromptConfig, tokenizer: Any = None) -> str:
    """The full prompt text (special tokens as text) for one problem.

    ``tokenizer`` is needed only for ``chat_format="tokenizer"``.
    """
    user = user_message(problem, cfg.template)
    control = find_control_token(user)
    if control is not None:
        raise UserError(f"problem text contains the chat control token {control!r}: {problem[:80]!r}")
    if cfg.chat_format == "qwen":
        # the training template of the family: the generation prompt ends where training's completion begins
        tcfg = get_template(cfg.chat_template)
        if tcfg.name == DEFAULT_TEMPLATE or cfg.system_prompt is not None:
            tcfg = replace(tcfg, system_prompt=_system(cfg))
        return render_eval_prompt(user, tcfg) if cfg.force_think else render_prompt(user, tcfg)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError("chat_format='tokenizer' needs a tokenizer with a chat template; use chat_format='qwen'")
    messages = [{"role": "user", "content": user}]
    # rllm sends only the user turn; the paper's template states the system prompt explicitly.
    system = _system(cfg) if cfg.template == "paper" or cfg.system_prompt is not None else None
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if cfg.force_think and not text.rstrip(" ").endswith(("<think>\n", "<think>")):
        text += THINK_START
    return text
