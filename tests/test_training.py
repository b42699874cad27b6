"""The trainer end to end on a tiny model: learning, stage chaining, parallel layouts, exact resume."""
from __future__ import annotations

import math
import os

import pytest
import torch

from redi_megatron.config.loader import from_dict
from redi_megatron.testing.distributed import run_distributed

TINY_MODEL = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  num_query_groups=2, vocab_size=320)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Curated positives and pairs from the synthetic OpenR1 fixture, with a tiny BPE tokenizer."""
    from redi_megatron.data.curate import CurationConfig, curate
    from redi_megatron.data.synthetic import raw_rows, tiny_tokenizer, write_jsonl

    root = tmp_path_factory.mktemp("train_data")
    tok = tiny_tokenizer(vocab_size=300)
    tok.save_pretrained(str(root / "tokenizer"))
    rows, _ = raw_rows(0)
    write_jsonl(rows, str(root / "raw.jsonl"))
    curate(CurationConfig(input=str(root / "raw.jsonl"), output=str(root / "curated"), tokenizer="", num_proc=1,
                          progress=False, output_format="jsonl", max_prompt_tokens=200,
                          max_completion_tokens=400, length_filter="both"), tokenizer=tok)
    return {"tokenizer": str(root / "tokenizer"), "positives": str(root / "curated" / "positives.jsonl"),
            "pairs": str(root / "curated" / "pairs.jsonl"), "root": root}


def _cfg(data, save_dir, loss="sft", **over):
    tree = {
        "model": dict(TINY_MODEL),
        "data": {"train_path": data["positives" if loss == "sft" else "pairs"], "tokenizer": data["tokenizer"],
                 "global_batch_size": 8, "micro_batch_tokens": 512 if loss == "sft" else 1024},
        "loss": {"name": loss, "params": {"alpha": 0.8} if loss == "redi" else {}},
        "optimizer": {"lr": 3e-3, "warmup_ratio": 0.0, "decay": "constant", "clip_grad": 1.0},
        "train": {"dtype": "fp32", "max_steps": 4, "seed": 3},
        "checkpoint": {"save_dir": str(save_dir), "keep_last": 2},
        "logging": {"tensorboard": False},
    }
    for key, value in over.items():
        section, name = key.split("__")
        tree.setdefault(section, {})[name] = value
    return from_dict(tree)


def _train(cfg, stop_after=None):
    from redi_megatron.training.trainer import train

    out = train(cfg, stop_after=stop_after)
    return [h["loss"] for h in out["history"]], out


def test_sft_learns_and_redi_chains_from_its_checkpoint(data, tmp_path):
    cfg = _cfg(data, tmp_path / "sft", train__max_steps=6)
    losses, out = run_distributed(_train, 1, args=(cfg,), timeout=240)[0]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.3, losses
    sft_ckpt = out["last_checkpoint"]
    assert os.path.isfile(os.path.join(sft_ckpt, "config.yaml"))
    assert os.path.isdir(os.path.join(sft_ckpt, "optimizer"))

    # A run directory means its newest checkpoint.
    redi = _cfg(data, tmp_path / "redi", loss="redi", checkpoint__init_from=str(tmp_path / "sft"), optimizer__lr=1e-3,
                parallel__tp=2, train__max_steps=2)
    redi.model = type(redi.model)()  # architecture must come from the checkpoint, not the recipe
    redi.data.tokenizer = ""          # and so does the tokenizer
    results = run_distributed(_train, 2, tp=2, args=(redi,), timeout=240)
    (losses_tp, out_tp), _ = results
    assert len(losses_tp) == 2 and all(math.isfinite(x) for x in losses_tp)
    metrics = out_tp["history"][0]
    assert {"chosen_logps", "rejected_logps", "margin", "accuracy", "grad_norm", "lr"} <= set(metrics)


@pytest.mark.parametrize("loss,layout", [("sft", dict(tp=2)), ("redi", dict(cp=2)), ("redi", dict(pp=2)),
                                         ("sft", dict(dp=2))])
def test_parallel_layouts_match_single_rank(data, tmp_path, loss, layout):
    ref_cfg = _cfg(data, tmp_path / "ref", loss=loss, train__max_steps=2)
    ref, _ = run_distributed(_train, 1, args=(ref_cfg,), timeout=240)[0]
    par = {k: v for k, v in layout.items() if k != "dp"}
    cfg = _cfg(data, tmp_path / "par", loss=loss, train__max_steps=2,
               **{f"parallel__{k}": v for k, v in par.items()})
    got, _ = run_distributed(_train, 2, args=(cfg,), timeout=240, **par)[0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=2e-4, atol=2e-4)


def test_kill_and_resume_continues_exactly(data, tmp_path):
    # Weight decay and a warmup/decay schedule make any lost optimizer or scheduler state visible.
    over = dict(optimizer__weight_decay=0.1, optimizer__warmup_ratio=0.25, optimizer__decay="linear")
    full, _ = run_distributed(_train, 1, args=(_cfg(data, tmp_path / "full", loss="redi", **over),),
                              timeout=240)[0]
    cfg = _cfg(data, tmp_path / "killed", loss="redi", **over)
    first, _ = run_distributed(_train, 1, args=(cfg, 2), timeout=240)[0]
    resumed, out = run_distributed(_train, 1, args=(cfg,), timeout=240)[0]
    assert out["start_step"] == 2
    torch.testing.assert_close(torch.tensor(first + resumed), torch.tensor(full), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("override,message", [
    ({"parallel__tp": 3}, "does not divide"),
    ({"data__train_path": "/nonexistent/pairs.jsonl"}, "does not exist"),
    ({"loss__name": "ppo"}, "unknown loss"),
    ({"train__dtype": "fp16"}, "train.dtype"),
])
def test_bad_config_fails_fast(data, tmp_path, override, message):
    from redi_megatron.training.components import validate

    with pytest.raises(ValueError, match=message):  # from the loader or from validate()
        validate(_cfg(data, tmp_path / "bad", **override), world_size=3 if "parallel__tp" in override else 1)


def test_samples_over_the_length_limits_are_an_error(data, tmp_path):
    from redi_megatron.losses import registry
    from redi_megatron.parallel.state import ParallelGroups
    from redi_megatron.training.components import build_data

    cfg = _cfg(data, tmp_path / "len", loss="redi", data__max_completion_tokens=150)
    none = ParallelGroups(None, None, None, None, None)
    with pytest.raises(ValueError, match="completion longer than data.max_completion_tokens=150"):
        build_data(cfg, registry.get_loss("redi"), data["tokenizer"], none)


def test_fp8_without_transformer_engine_is_a_clear_error(data, tmp_path):
    from redi_megatron.models.builder import build_gpt_model
    from redi_megatron.models.config import ModelConfig, ParallelConfig

    def build():
        try:
            build_gpt_model(ModelConfig(), ParallelConfig(), fp8="delayed")
        except ValueError as err:
            return str(err)
        return "built"

    assert "Transformer Engine" in run_distributed(build, 1)[0]
