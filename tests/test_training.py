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
def data(tiny_train_data):
    return tiny_train_data


def _cfg(data, save_dir, loss="sft", **over):
    tree = {
        "model": dict(TINY_MODEL),
        "data": {"train_path": data["positives" if loss == "sft" else "pairs"], "tokenizer": data["tokenizer"],
                 "global_batch_size": 8, "micro_batch_tokens": 512 if loss == "sft" else 1024},
        "loss": {"name": loss, "params": {"alpha": 0.8} if loss == "redi" else {}},  # DPO: default beta
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


def _first_step_grads(cfg, plain: bool = False) -> dict:
    """The trainer's first step up to the optimizer: full (TP-gathered) gradients of this PP stage.

    ``plain``: also the gradient written independently of ``parallel.loss_scaling`` and Megatron's
    schedule (single rank only): plain autograd on each microbatch's logits, the loss from its formula
    divided by the step's global normaliser, accumulated by DDP's hooks without ``finalize_model_grads``.
    """
    from redi_megatron.models.inputs import model_inputs
    from redi_megatron.models.output_head import output_weight, returns_hidden_states
    from redi_megatron.parallel.reductions import sequence_sums
    from redi_megatron.testing.params import gather_stage_tensors
    from redi_megatron.training.step import forward_backward
    from redi_megatron.training.trainer import setup

    # The distributed optimizer reduce-scatters: each rank's main_grad would hold only its own shard.
    cfg.optimizer.use_distributed_optimizer = False
    c, _ = setup(cfg)
    batch = c.sampler.next_step()
    forward_backward(c, batch)
    out = {"trainer": gather_stage_tensors(c.chunks, c.groups.tp, select=lambda p: p.main_grad),
           "microbatches": len(batch.microbatches)}
    if plain:
        (model,) = c.chunks
        model.zero_grad_buffer()
        for mb in batch.microbatches:
            y = model(**model_inputs(mb, c.groups))
            if returns_hidden_states(model):  # the fused head: project here, plainly, all positions
                y = y @ output_weight(model).t()
            logits = y.float()[0, :, :c.model_cfg.vocab_size]
            tok = torch.log_softmax(logits, -1).gather(-1, mb.labels[0, :, None])[:, 0] * mb.loss_mask[0]
            if cfg.loss.name == "sft":
                loss = -tok.sum() / batch.global_num_loss_tokens
            else:  # REDI: -logp(y_w)/|y_w| + alpha * logp(y_l)/|y_l|, per pair, over the step's pairs
                norm = sequence_sums(tok[None], mb.seq_ids, mb.num_sequences) / mb.num_loss_tokens
                sign = torch.where(mb.roles == 1, -1.0, cfg.loss.params["alpha"])
                loss = (sign * norm).sum() / batch.global_num_pairs
            loss.backward()
        out["plain"] = gather_stage_tensors(c.chunks, c.groups.tp, select=lambda p: p.main_grad)
    return out


@pytest.fixture(scope="module")
def single_rank_grads(data, tmp_path_factory):
    """The single-rank trainer's first-step gradients per case, checked against the plain gradient."""
    cache = {}

    def get(loss, **over):
        key = (loss, tuple(sorted(over.items())))
        if key not in cache:
            cfg = _cfg(data, tmp_path_factory.mktemp("ref"), loss=loss, **over)
            cache[key] = run_distributed(_first_step_grads, 1, args=(cfg, loss != "dpo"), timeout=240)[0]
        return cache[key]
    return get


@pytest.mark.parametrize("loss", ["sft", "redi"])
def test_trainer_gradient_is_the_global_mean_gradient(single_rank_grads, loss):
    """Catches any normaliser bug (e.g. sums instead of means, per-microbatch instead of global)."""
    ref = single_rank_grads(loss)
    assert ref["microbatches"] > 1
    for key, plain in ref["plain"].items():
        assert plain.abs().max() > 0, key
        torch.testing.assert_close(ref["trainer"][key], plain, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("loss,layout,over", [
    ("sft", dict(tp=2), {}), ("redi", dict(cp=2), {}), ("redi", dict(pp=2), {}), ("sft", dict(dp=2), {}),
    # VPP: everything packs into one microbatch, which the interleaved schedule refuses at PP 2 unless the
    # sampler pads the step with an empty one; DPO's reference pass runs through the same schedule.
    ("dpo", dict(pp=2, vpp=2), dict(model__num_layers=4, data__micro_batch_tokens=16384)),
])
def test_parallel_layouts_match_single_rank_gradients(data, tmp_path, single_rank_grads, loss, layout, over):
    ref = single_rank_grads(loss, **over)
    par = {k: v for k, v in layout.items() if k != "dp"}
    cfg = _cfg(data, tmp_path / "par", loss=loss, **over, **{f"parallel__{k}": v for k, v in par.items()})
    results = run_distributed(_first_step_grads, 2, args=(cfg,), timeout=240, **par)
    grads: dict = {}
    for r in results:
        grads.update(r["trainer"])
    assert grads.keys() == ref["trainer"].keys()
    for key, expect in ref["trainer"].items():
        assert expect.abs().max() > 0, key
        torch.testing.assert_close(grads[key], expect, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


def test_warmup_steps_round_up_like_hf():
    from redi_megatron.training.components import warmup_steps

    assert warmup_steps(0.1, 1662) == 167 and warmup_steps(0.1, 1660) == 166 and warmup_steps(0.0, 50) == 0


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


def _weights_before_and_after_a_zero_lr_step(cfg):
    from redi_megatron.testing.params import gather_stage_tensors
    from redi_megatron.training.step import train_step
    from redi_megatron.training.trainer import setup

    c, _ = setup(cfg)
    before = gather_stage_tensors(c.chunks, c.groups.tp)
    train_step(c, c.sampler.next_step())
    return before, gather_stage_tensors(c.chunks, c.groups.tp)


@pytest.mark.parametrize("distributed_optimizer", [True, False])
def test_bf16_first_step_keeps_the_loaded_weights(data, tmp_path, distributed_optimizer):
    """bf16 keeps fp32 main weights in the optimizer: they must be refreshed after the weights are
    loaded (init_from or random init), or the first step writes the optimizer's stale copy back."""
    cfg = _cfg(data, tmp_path / "bf16", train__dtype="bf16", optimizer__lr=0.0,
               optimizer__use_distributed_optimizer=distributed_optimizer)
    before, after = run_distributed(_weights_before_and_after_a_zero_lr_step, 1, args=(cfg,), timeout=240)[0]
    for key, value in before.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(after[key], value), key


def _diverge(cfg, nan_steps):
    """Train with a NaN planted in one gradient at ``nan_steps`` (a fault injection standing for a loss
    spike); returns the summary and, per checkpoint on disk, whether its weights are finite."""
    from redi_megatron.training import step as step_module
    from redi_megatron.training.checkpointing import list_checkpoints
    from redi_megatron.training.trainer import train

    original, calls = step_module.forward_backward, []

    def planted(c, batch):
        out = original(c, batch)
        calls.append(1)
        if len(calls) in nan_steps:
            next(c.chunks[0].parameters()).main_grad.view(-1)[0] = float("nan")
        return out

    step_module.forward_backward = planted
    out = train(cfg)
    return out, {s: _checkpoint_is_finite(p) for s, p in list_checkpoints(cfg.checkpoint.save_dir)}


def _checkpoint_is_finite(path) -> bool:
    from redi_megatron.models.builder import build_gpt_model
    from redi_megatron.models.checkpoint import load_model_checkpoint, read_model_config
    from redi_megatron.models.config import ParallelConfig

    model = build_gpt_model(read_model_config(path), ParallelConfig())
    load_model_checkpoint([model], path)
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("mode,nan_steps,stops_at", [("stop", (3,), 3), ("skip", (3, 5, 6), 6)])
def test_nonfinite_steps_are_never_applied_saved_or_kept(data, tmp_path, mode, nan_steps, stops_at):
    """Saving every step with keep_last 2 (the probe that used to leave only NaN checkpoints)."""
    cfg = _cfg(data, tmp_path / mode, train__max_steps=10, checkpoint__save_interval=1, checkpoint__keep_last=2,
               train__on_nonfinite=mode, train__max_skipped_steps=2)
    out, finite = run_distributed(_diverge, 1, args=(cfg, nan_steps), timeout=240)[0]
    flags = [int(h["nonfinite"]) for h in out["history"]]
    assert out["last_step"] == stops_at and out["nonfinite"], (flags, out["nonfinite"])
    assert flags == [int(s in nan_steps) for s in range(1, stops_at + 1)]
    assert all(h["update_skipped"] == h["nonfinite"] for h in out["history"])
    assert all(math.isfinite(h["loss"]) for h, f in zip(out["history"], flags) if not f)
    saved = sorted(finite)  # keep_last 2 of the finite steps only
    assert all(finite.values()) and saved == [s for s in range(1, stops_at) if s not in nan_steps][-2:]
    assert out["last_checkpoint"].endswith(f"step_{saved[-1]:07d}")


def _truncate_newest_shard(save_dir) -> str:
    from redi_megatron.training.checkpointing import list_checkpoints

    _, newest = list_checkpoints(str(save_dir))[-1]
    shard = sorted((newest / "model").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    return newest.name


def test_damaged_newest_checkpoint_falls_back_or_refuses(data, tmp_path, capsys):
    cfg = _cfg(data, tmp_path / "run", checkpoint__save_interval=1, checkpoint__keep_last=3, train__max_steps=3)
    run_distributed(_train, 1, args=(cfg, 2), timeout=240)  # killed after step 2: checkpoints 1, 2
    damaged = _truncate_newest_shard(tmp_path / "run")
    refuse = _cfg(data, tmp_path / "run", checkpoint__save_interval=1, checkpoint__keep_last=3, train__max_steps=3,
                  checkpoint__on_corrupt="refuse")
    with pytest.raises(Exception, match=r"step_0000002: model/.*\.distcp has 100 bytes"):
        run_distributed(_train, 1, args=(refuse,), timeout=240)
    losses, out = run_distributed(_train, 1, args=(cfg,), timeout=240)[0]
    assert out["start_step"] == 1 and out["last_step"] == 3  # resumed from step 1
    assert (tmp_path / "run" / "checkpoints" / f"{damaged}.damaged").is_dir()  # set aside, not deleted


def test_resume_refuses_changed_settings_and_applies_harmless_ones(data, tmp_path):
    cfg = _cfg(data, tmp_path / "run", train__max_steps=3)
    run_distributed(_train, 1, args=(cfg, 2), timeout=240)
    changed = _cfg(data, tmp_path / "run", train__max_steps=44, optimizer__lr=5e-2)
    with pytest.raises(Exception, match=r"optimizer.lr 0.003 -> 0.05, train.max_steps 3 -> 44 changed"):
        run_distributed(_train, 1, args=(changed,), timeout=240)
    fine = _cfg(data, tmp_path / "run", train__max_steps=3, logging__log_interval=2)
    losses, out = run_distributed(_train, 1, args=(fine,), timeout=240)[0]
    assert out["start_step"] == 2 and out["last_step"] == 3


# The new families' recipes (examples/configs/models/*.yaml) with sizes shrunk and structure kept.
NEW_FAMILIES = {
    "qwen3": dict(TINY_MODEL, family="qwen3", kv_channels=32, add_qkv_bias=False, qk_layernorm=True,
                  rope_theta=1e6, tie_word_embeddings=True),
    "llama3": dict(TINY_MODEL, family="llama", add_qkv_bias=False, rope_theta=5e5, rope_type="llama3",
                   rope_scaling_factor=32.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                   rope_original_max_position_embeddings=8192, norm_eps=1e-5, tie_word_embeddings=True),
}


@pytest.mark.parametrize("family,loss", [("qwen3", "sft"), ("llama3", "redi")])
def test_new_family_recipe_trains_at_tp2(data, tmp_path, family, loss):
    """SFT (Qwen3) and REDI (Llama 3.2) through the trainer at TP2; the checkpoint records the family."""
    import yaml

    cfg = _cfg(data, tmp_path / family, loss=loss, parallel__tp=2, train__max_steps=6)
    cfg.model = type(cfg.model)(**NEW_FAMILIES[family])
    results = run_distributed(_train, 2, tp=2, args=(cfg,), timeout=240)
    losses, out = results[0]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    if loss == "sft":
        assert losses[-1] < losses[0] - 0.3, losses
    saved = yaml.safe_load(open(os.path.join(out["last_checkpoint"], "config.yaml")))
    model = saved.get("model", saved)
    for key, value in NEW_FAMILIES[family].items():
        assert model[key] == value, key
