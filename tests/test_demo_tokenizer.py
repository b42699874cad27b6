"""The demo tokenizer (built in code, loads offline) and the random-init tiny Qwen2 base model."""
import json

import pytest

from redi_megatron.data import templates
from redi_megatron.demo.model import DemoModelSpec, build_base_model
from redi_megatron.demo.teacher import teacher_rows
from redi_megatron.demo.tokenizer import DEFAULT_VOCAB_SIZE, build_tokenizer, save_demo_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import AutoTokenizer

    d = str(tmp_path_factory.mktemp("tok"))
    built = save_demo_tokenizer(d)
    return built, AutoTokenizer.from_pretrained(d), d


def test_loads_offline_and_matches_the_built_one(saved):
    built, loaded, _ = saved
    assert loaded.is_fast and len(loaded) == len(built) <= DEFAULT_VOCAB_SIZE
    rows, _ = teacher_rows(5, seed=0)
    for text in [rows[0]["problem"], *rows[0]["generations"]]:
        assert loaded.encode(text) == built.encode(text)


def test_special_tokens_are_single_ids_and_the_chat_checks_pass(saved):
    _, tok, d = saved
    ids = [templates.special_token_id(tok, t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>",
                                                        "</think>")]
    assert len(set(ids)) == 5
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"
    templates.check_tokenizer(tok, templates.TemplateConfig(), where=d)
    assert templates.load_tokenizer(d) is not None  # what redi-curate and the trainer call
    # think tags are not special (as in Qwen3): they survive skip_special_tokens
    assert tok.decode(tok.encode("<think>\nx\n</think>"), skip_special_tokens=True) == "<think>\nx\n</think>"


def test_digits_are_single_tokens_and_decoding_is_lossless(saved):
    _, tok, _ = saved
    pieces = tok.convert_ids_to_tokens(tok.encode("12345+67890=80235"))
    assert [p for p in pieces if p.isdigit()] == list("123456789080235")
    assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p))
    for text in ["héllo wörld ∑ 中文 🙂\t\r\n", "$\\boxed{8,590}$", "  two  spaces ", "<|im_end|> inside"]:
        assert tok.decode(tok.encode(text)) == text


def test_chat_template_is_the_qwen25_math_format(saved):
    _, tok, _ = saved
    problem = "Compute $12 + 34$."
    msgs = [{"role": "user", "content": problem}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == templates.render_prompt(problem)
    with_system = [{"role": "system", "content": "S"}] + msgs + [{"role": "assistant", "content": "A"}]
    assert tok.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nCompute $12 + 34$.<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n")


def test_traces_are_short(saved):
    _, tok, _ = saved
    rows, _ = teacher_rows(20, seed=1)
    lengths = [len(templates.encode_completion(tok, g)) for r in rows for g in r["generations"]]
    assert max(lengths) < 130  # 3-digit traces: short sequences keep CPU training cheap


def test_build_is_deterministic():
    a, b = build_tokenizer(), build_tokenizer()
    assert json.loads(a.backend_tokenizer.to_str()) == json.loads(b.backend_tokenizer.to_str())
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(vocab_size=100)


def test_base_model_is_a_loadable_random_qwen2(saved, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, tok, _ = saved
    spec = DemoModelSpec(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2)
    out = build_base_model(spec, tok, str(tmp_path / "m"), seed=5)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == spec.num_parameters()
    ids = torch.tensor([AutoTokenizer.from_pretrained(out).encode("1+2=3")])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], spec.vocab_size)
    stop = set(model.generation_config.eos_token_id)
    assert stop == {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    again = AutoModelForCausalLM.from_pretrained(build_base_model(spec, tok, str(tmp_path / "m2"), seed=5))
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)  # same seed, same weights
    cfg = spec.trainer_overrides()
    assert (cfg["hidden_size"], cfg["num_query_groups"], cfg["vocab_size"]) == (32, 2, spec.vocab_size)
    with pytest.raises(ValueError, match="even"):
        DemoModelSpec(num_query_groups=3, num_attention_heads=3, hidden_size=96).validate(300)
