"""Length limits are checked from curation's stored counts before anything is tokenized, and
``data.overlong=drop`` trains on exactly what a hand-filtered copy of the data would give (issue 21)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from redi_megatron.config.loader import from_dict
from redi_megatron.errors import UserError

LIMIT = 150  # completion tokens; the tiny fixture's completions go up to 400


def _cfg(train_path, tokenizer, save_dir, loss="sft", **data):
    return from_dict({
        "model": dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                      num_query_groups=2, vocab_size=320),
        "data": {"train_path": str(train_path), "tokenizer": tokenizer, "global_batch_size": 8,
                 "micro_batch_tokens": 1024, "max_completion_tokens": LIMIT, **data},
        "loss": {"name": loss, "params": {"alpha": 0.8} if loss == "redi" else {}},
        "checkpoint": {"save_dir": str(save_dir)},
    })


def _build(cfg):
    from redi_megatron.losses import registry
    from redi_megatron.parallel.state import ParallelGroups
    from redi_megatron.training.components import build_data

    return build_data(cfg, registry.get_loss(cfg.loss.name), cfg.data.tokenizer,
                      ParallelGroups(None, None, None, None, None))


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _over(rows, keys):
    return [i for i, r in enumerate(rows) if any(r[k] > LIMIT for k in keys)]


@pytest.fixture
def no_tokenizing(monkeypatch):
    """Any tokenization of training data fails the test."""
    import redi_megatron.data.templates as templates
    import redi_megatron.data.tokenized as tokenized

    def boom(*a, **k):
        raise AssertionError("training data was tokenized")

    for mod in (templates, tokenized):
        for name in ("encode_prompts", "encode_completions"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, boom)
    monkeypatch.delenv("REDI_DATA_CACHE", raising=False)


@pytest.mark.parametrize("kind", ["positives", "pairs"])
def test_over_long_data_is_refused_before_tokenizing(tiny_train_data, tmp_path, no_tokenizing, kind):
    d = tiny_train_data
    keys = ["completion_tokens"] if kind == "positives" else ["chosen_tokens", "rejected_tokens"]
    bad = _over(_rows(d[kind]), keys)
    assert 0 < len(bad) < len(_rows(d[kind]))
    cfg = _cfg(d[kind], d["tokenizer"], tmp_path / "run", loss="sft" if kind == "positives" else "redi")
    with pytest.raises(UserError) as e:
        _build(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{d[kind]}: {len(bad)} sample(s) have a completion longer than "
                                              f"data.max_completion_tokens={LIMIT}, e.g. sample ids {bad[:10]}")
    assert "counts stored by redi-curate" in msg and "data.overlong=drop" in msg
    assert not (tmp_path / "run").exists()  # no cache entry was even started


def test_without_matching_counts_the_tokenized_lengths_decide(tiny_train_data, tmp_path):
    """Data whose report names another tokenizer: the stored counts are not trusted; the run is refused
    from the tokenized lengths, with the same message."""
    from redi_megatron.data.lengths import stored_lengths
    from redi_megatron.data.templates import get_template, load_tokenizer

    d = tiny_train_data
    data = tmp_path / "curated"
    shutil.copytree(os.path.dirname(d["positives"]), data, ignore=shutil.ignore_patterns("tokenized"))
    report = json.loads((data / "curation_report.json").read_text())
    report["token_counts"]["tokenizer_sha256"] = "0" * 64
    (data / "curation_report.json").write_text(json.dumps(report))
    tok = load_tokenizer(d["tokenizer"])
    assert stored_lengths(str(data / "positives.jsonl"), "sft", get_template("qwen2.5-math"), tok)[0] is None
    bad = _over(_rows(d["positives"]), ["completion_tokens"])
    with pytest.raises(UserError, match=rf"{len(bad)} sample\(s\) .* e\.g\. sample ids \{bad[:10]}.*tokenized lengths"):
        _build(_cfg(data / "positives.jsonl", d["tokenizer"], tmp_path / "run"))


def test_stored_counts_equal_the_tokenized_lengths_hf_and_jsonl(tiny_train_data, tmp_path):
    import datasets

    from redi_megatron.data import build_pair_dataset
    from redi_megatron.data.lengths import same_lengths, stored_lengths, tokenized_lengths
    from redi_megatron.data.templates import get_template, load_tokenizer

    d = tiny_train_data
    tok, template = load_tokenizer(d["tokenizer"]), get_template("qwen2.5-math")
    hf = tmp_path / "curated" / "pairs"
    datasets.Dataset.from_list(_rows(d["pairs"])).save_to_disk(str(hf))
    shutil.copy(os.path.join(os.path.dirname(d["pairs"]), "curation_report.json"), hf.parent)
    tokenized = tokenized_lengths(build_pair_dataset(d["pairs"], tok, template, cache_dir=False, progress=False))
    for path in (d["pairs"], str(hf)):
        stored, _ = stored_lengths(path, "pair", template, tok)
        assert stored is not None and same_lengths(stored, tokenized), path


def test_drop_trains_on_what_hand_filtered_data_gives(tiny_train_data, tmp_path, capsys):
    import torch

    d = tiny_train_data
    rows = _rows(d["pairs"])
    bad = _over(rows, ["chosen_tokens", "rejected_tokens"])
    by_hand = tmp_path / "by_hand.jsonl"
    by_hand.write_text("".join(json.dumps(r) + "\n" for i, r in enumerate(rows) if i not in set(bad)))
    ds, sampler = _build(_cfg(d["pairs"], d["tokenizer"], tmp_path / "drop", loss="redi", overlong="drop"))
    out = capsys.readouterr().out
    assert f"data.overlong=drop: dropping {len(bad)} of {len(rows)} sample(s) of {d['pairs']}" in out
    assert f"training on {len(rows) - len(bad)}" in out
    ref_ds, ref_sampler = _build(_cfg(by_hand, d["tokenizer"], tmp_path / "ref", loss="redi"))
    assert len(ds) == len(ref_ds) == len(rows) - len(bad)
    assert ds.source_rows().tolist() == [i for i in range(len(rows)) if i not in set(bad)]
    assert len(np.load(os.path.join(ds.cache_path, "offsets.npy"))) == 3 * len(rows) + 1  # the cache holds all
    for _ in range(3):
        a, b = sampler.next_step(), ref_sampler.next_step()
        assert (a.global_num_loss_tokens, a.global_num_pairs) == (b.global_num_loss_tokens, b.global_num_pairs)
        assert len(a.microbatches) == len(b.microbatches)
        for x, y in zip(a.microbatches, b.microbatches):
            for name, v in vars(x).items():
                w = getattr(y, name)
                assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, name


def test_select_is_a_renumbered_view(tiny_train_data):
    from redi_megatron.data import build_sft_dataset

    d = tiny_train_data
    ds = build_sft_dataset(d["positives"], d["tokenizer"], cache_dir=False, progress=False)
    view = ds.select([5, 2, 9])
    assert len(view) == 3 and view.source_rows().tolist() == [5, 2, 9]
    assert view.seq_lengths().tolist() == ds.seq_lengths()[[5, 2, 9]].tolist()
    for j, i in enumerate([5, 2, 9]):
        (s,), (t,) = view.sequences(j), ds.sequences(i)
        assert np.array_equal(s.input_ids, t.input_ids) and s.num_prompt_tokens == t.num_prompt_tokens
        assert s.sample_id == j
    assert view.select([2, 0]).source_rows().tolist() == [9, 5]
    with pytest.raises(IndexError):
        ds.select([len(ds)])
