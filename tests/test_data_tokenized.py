"""Tokenized SFT/pair datasets: ids equal the template encoders, caching, ref log-probs, input formats."""
import json
import math
import os

import datasets
import numpy as np
import pytest

from redi_megatron.data.batch import ROLE_CHOSEN, ROLE_REJECTED, ROLE_SFT
from redi_megatron.data.synthetic import tiny_tokenizer
from redi_megatron.data.templates import TemplateConfig, encode_completion, encode_prompt, qwen_tokenizer_dir
from redi_megatron.data.tokenized import build_pair_dataset, build_sft_dataset

PROBLEMS = [f"Problem {i}: compute ${i} + {2 * i}$." for i in range(12)]


def _gen(i, ok=True):
    answer = 3 * i + (0 if ok else 1)
    return f"<think>\nAdd them{' carefully' * (i % 4)}.\n</think>\n\nThe answer is $\\boxed{{{answer}}}$."


@pytest.fixture(scope="module")
def tok(qwen_tok):
    return qwen_tok


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_sft_ids_match_encoders(tmp_path, tok):
    path = _write(tmp_path / "pos.jsonl", [{"problem": p, "completion": _gen(i)} for i, p in enumerate(PROBLEMS)])
    ds = build_sft_dataset(path, tok, cache_dir=str(tmp_path / "cache"), progress=False)
    assert len(ds) == 12 and ds.kind == "sft" and not ds.has_ref_logps
    for i in (0, 5, 11):
        prompt, comp = encode_prompt(tok, PROBLEMS[i]), encode_completion(tok, _gen(i))
        assert ds[i]["prompt_ids"].tolist() == prompt and ds[i]["completion_ids"].tolist() == comp
        (seq,) = ds.sequences(i)
        assert seq.input_ids.tolist() == prompt + comp and seq.num_prompt_tokens == len(prompt)
        assert (seq.role, seq.sample_id) == (ROLE_SFT, i)
        assert ds.seq_lengths()[i, 0] == len(prompt) + len(comp) and ds.loss_token_counts()[i, 0] == len(comp)


def test_cache_hit_and_invalidation(tmp_path, tok):
    path = _write(tmp_path / "pos.jsonl", [{"problem": p, "completion": _gen(i)} for i, p in enumerate(PROBLEMS)])
    cache = str(tmp_path / "cache")
    a = build_sft_dataset(path, tok, cache_dir=cache, progress=False)
    b = build_sft_dataset(path, qwen_tokenizer_dir(), cache_dir=cache, progress=False)  # a directory works too
    assert a.cache_path == b.cache_path and np.array_equal(a.tokens, b.tokens)
    c = build_sft_dataset(path, tok, template=TemplateConfig(system_prompt=None), cache_dir=cache, progress=False)
    assert c.cache_path != a.cache_path and c[0]["prompt_ids"].shape[0] == a[0]["prompt_ids"].shape[0] - 20
    _write(path, [{"problem": p, "completion": _gen(i + 1)} for i, p in enumerate(PROBLEMS)])
    os.utime(path, ns=(1, 1))
    d = build_sft_dataset(path, tok, cache_dir=cache, progress=False)
    assert d.cache_path != a.cache_path and d[1]["completion_ids"].tolist() == encode_completion(tok, _gen(2))
    assert len([n for n in os.listdir(cache) if not n.startswith(".")]) == 3


def test_pairs_with_ref_logps_from_hf_dir(tmp_path, tok):
    rows = [{"problem": p, "chosen": _gen(i), "rejected": _gen(i, ok=False), "source": "olympiads",
             "chosen_ref_logp": -10.0 - i, "rejected_ref_logp": -20.5 - i} for i, p in enumerate(PROBLEMS)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "pairs"))
    ds = build_pair_dataset(str(tmp_path / "pairs"), tok, cache_dir=False, progress=False)
    assert ds.kind == "pair" and ds.has_ref_logps and ds.seq_lengths().shape == (12, 2)
    chosen, rejected = ds.sequences(3)
    prompt = encode_prompt(tok, PROBLEMS[3])
    assert chosen.input_ids.tolist() == prompt + encode_completion(tok, _gen(3))
    assert rejected.input_ids.tolist() == prompt + encode_completion(tok, _gen(3, ok=False))
    assert (chosen.role, rejected.role) == (ROLE_CHOSEN, ROLE_REJECTED)
    assert (chosen.ref_logp, rejected.ref_logp) == (-13.0, -23.5)
    ds.ref_logps = np.full((12, 2), -1.5)  # what a reference pass attaches
    assert ds.sequences(0)[1].ref_logp == -1.5
    with pytest.raises(ValueError, match=r"must be \[12, 2\]"):
        ds.ref_logps = np.zeros((11, 2))
    with pytest.raises(ValueError, match="non-finite values, e.g. sample 2"):
        ds.ref_logps = np.where(np.arange(24).reshape(12, 2) == 5, np.nan, -1.0)


def test_authors_message_formats_and_tiny_tokenizer(tmp_path):
    tiny = tiny_tokenizer(vocab_size=300)
    sft = _write(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": p},
                                                         {"role": "assistant", "content": _gen(i)}]}
                                            for i, p in enumerate(PROBLEMS)])
    ds = build_sft_dataset(sft, tiny, cache_dir=False, progress=False)
    assert ds.sequences(2)[0].input_ids.tolist() == encode_prompt(tiny, PROBLEMS[2]) + encode_completion(tiny, _gen(2))
    dpo = _write(tmp_path / "dpo.jsonl", [{
        "prompt": p, "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": _gen(i)}],
        "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": _gen(i, False)}]}
        for i, p in enumerate(PROBLEMS)])
    pairs = build_pair_dataset(dpo, tiny, cache_dir=False, progress=False)
    assert pairs[4]["rejected_ids"].tolist() == encode_completion(tiny, _gen(4, False))
    assert not pairs.has_ref_logps


@pytest.mark.parametrize("bad,match", [
    ({"problem": "p"}, "row 1: completion is missing"),
    ({"problem": "", "completion": "c"}, "row 1: problem is missing, empty"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "row 1: messages must be"),
])
def test_sft_errors_name_row(tmp_path, bad, match):
    tiny = tiny_tokenizer(vocab_size=300)
    path = _write(tmp_path / "x.jsonl", [{"problem": "p", "completion": "c"}, bad])
    with pytest.raises(ValueError, match=match):
        build_sft_dataset(path, tiny, cache_dir=False, progress=False)


def test_ref_logp_errors(tmp_path):
    tiny = tiny_tokenizer(vocab_size=300)
    base = {"problem": "p", "chosen": "a", "rejected": "b"}
    partial = _write(tmp_path / "a.jsonl", [{**base, "chosen_ref_logp": -1.0, "rejected_ref_logp": -2.0}, base])
    with pytest.raises(ValueError, match="row 1 lacks"):
        build_pair_dataset(partial, tiny, cache_dir=False, progress=False)
    nan = _write(tmp_path / "b.jsonl", [{**base, "chosen_ref_logp": math.nan, "rejected_ref_logp": -2.0}])
    with pytest.raises(ValueError, match="row 0: chosen_ref_logp must be a finite number"):
        build_pair_dataset(nan, tiny, cache_dir=False, progress=False)


def test_wait_polls_until_published_without_tokenizing(tmp_path, tok):
    """Non-building ranks wait on the file system (no collective timeout) and never tokenize (issue 21)."""
    import threading
    import time

    path = _write(tmp_path / "sft.jsonl", [{"problem": p, "completion": _gen(i)} for i, p in enumerate(PROBLEMS)])
    cache = str(tmp_path / "cache")
    got = {}
    waiter = threading.Thread(target=lambda: got.update(
        ds=build_sft_dataset(path, tok, cache_dir=cache, progress=False, wait=True)))
    waiter.start()
    time.sleep(1.5)
    assert waiter.is_alive() and "ds" not in got  # still waiting: nothing published yet
    assert not os.path.exists(cache) or not os.listdir(cache)  # and the waiter built nothing itself
    built = build_sft_dataset(path, tok, cache_dir=cache, progress=False)
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    np.testing.assert_array_equal(np.asarray(got["ds"].tokens), np.asarray(built.tokens))
