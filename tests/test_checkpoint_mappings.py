"""The HF <-> Megatron tables, config translation and bad-input handling (no process groups, fast)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from redi_megatron.convert.hf_io import (
    SafetensorsReader,
    hf_config_for_export,
    parse_overrides,
    parse_size,
    read_hf_config,
)
from redi_megatron.convert.hf_to_megatron import main as hf_to_megatron_main
from redi_megatron.convert.hf_to_megatron import plan_conversion
from redi_megatron.convert.mappings import (
    LLAMA,
    QWEN2,
    QWEN3,
    Direct,
    FusedGateUp,
    FusedQKV,
    bind_layer,
    expected_hf_tensors,
    full_state_dict_to_hf,
    megatron_index,
)
from redi_megatron.models.checkpoint import check_output_dir, model_config_from_dict
from redi_megatron.models.config import ModelConfig
from redi_megatron.models.sharding import shard
from redi_megatron.outputs import MARKER, publish, staging_dir, staging_path

CFG = ModelConfig(family="qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
                  num_query_groups=4, kv_channels=16, vocab_size=300)


def _tensor_reader(tensors: dict[str, torch.Tensor]):
    def read(name, dim, start, stop):
        t = tensors[name]
        return t if dim is None else t.narrow(dim, start, stop - start)
    return read


def _param(partition_dim: int) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.empty(0))
    p.tensor_model_parallel, p.partition_dim = True, partition_dim
    return p


def _reference_qkv(q, k, v, groups: int, head_dim: int) -> torch.Tensor:
    """Megatron's fused layout written out: per KV group, its query heads, then its key, then its value."""
    heads_per_group = q.shape[0] // head_dim // groups
    rows = []
    for g in range(groups):
        for h in range(heads_per_group):
            rows.append(q[(g * heads_per_group + h) * head_dim:(g * heads_per_group + h + 1) * head_dim])
        rows += [k[g * head_dim:(g + 1) * head_dim], v[g * head_dim:(g + 1) * head_dim]]
    return torch.cat(rows)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_qkv_layout_shards_and_inverse(bias):
    rest = () if bias else (CFG.hidden_size,)
    q = torch.randn(8 * 16, *rest)
    k, v = torch.randn(4 * 16, *rest), torch.randn(4 * 16, *rest)
    m = FusedQKV("qkv", "q", "k", "v", bias=bias)
    read = _tensor_reader({"q": q, "k": k, "v": v})
    full = m.load(read, CFG, 0, 1)
    ref = _reference_qkv(q, k, v, groups=4, head_dim=16)
    assert torch.equal(full, ref)
    for tp in (2, 4):  # each rank's slice equals what the model's own sharding rule cuts from the full
        for r in range(tp):
            assert torch.equal(m.load(read, CFG, r, tp), shard(ref, _param(0), "linear_qkv.weight", r, tp))
    back = m.export(full, CFG)
    assert all(torch.equal(back[n], t) for n, t in (("q", q), ("k", k), ("v", v)))


def test_fused_gate_up_matches_megatron_sharding():
    gate, up = torch.randn(96, 64), torch.randn(96, 64)
    m = FusedGateUp("fc1", "gate", "up")
    read = _tensor_reader({"gate": gate, "up": up})
    full = m.load(read, CFG, 0, 1)
    assert torch.equal(full, torch.cat([gate, up]))
    for r in range(2):
        assert torch.equal(m.load(read, CFG, r, 2), shard(full, _param(0), "mlp.linear_fc1.weight", r, 2))
    assert all(torch.equal(a, b) for a, b in zip(m.export(full, CFG).values(), (gate, up)))


def test_vocab_rows_padded_per_rank_and_stripped():
    emb = torch.randn(300, 64)
    m = Direct("emb", "e", ("vocab", "hidden"), tp_dim=0, vocab=True)
    read = _tensor_reader({"e": emb})
    padded = CFG.padded_vocab_size(2)
    assert padded == 384
    parts = [m.load(read, CFG, r, 2) for r in range(2)]
    assert [p.shape[0] for p in parts] == [192, 192]
    full = torch.cat(parts)
    assert torch.equal(full[:300], emb) and torch.all(full[300:] == 0)
    assert torch.equal(m.export(full, CFG)["e"], emb)


def test_row_parallel_split_is_columns():
    w = torch.randn(64, 128)
    m = Direct("proj", "o", ("hidden", "q"), tp_dim=1)
    read = _tensor_reader({"o": w})
    assert torch.equal(torch.cat([m.load(read, CFG, r, 2) for r in range(2)], dim=1), w)
    assert torch.equal(m.load(read, CFG, 1, 2), shard(w, _param(1), "linear_proj.weight", 1, 2))


def test_tables_cover_each_tensor_once_and_te_names():
    for family, tied in ((QWEN2, True), (LLAMA, False), (QWEN3, True)):
        cfg = replace(CFG, family=family.name, tie_word_embeddings=tied, kv_channels=32)
        expected = expected_hf_tensors(family, cfg)
        # 2 norms, q, k, v, o, gate, up, down (+ 3 biases for Qwen2, + q/k norms for Qwen3)
        per_layer = {"qwen2": 12, "llama": 9, "qwen3": 11}[family.name]
        assert len(expected) == 2 + (0 if tied else 1) + cfg.num_layers * per_layer
        index = megatron_index(family, cfg)
        assert index["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"] == \
            index["decoder.layers.1.input_layernorm.weight"]
        assert ("output_layer.weight" in index) is not tied
    qwen3 = expected_hf_tensors(QWEN3, cfg)
    assert qwen3["model.layers.0.self_attn.q_norm.weight"] == (32,)
    assert qwen3["model.layers.0.self_attn.q_proj.weight"] == (cfg.num_attention_heads * 32, 64)


def test_whole_table_round_trips_with_local_or_te_names():
    cfg = replace(CFG, tie_word_embeddings=False)
    hf = {n: torch.randn(s) for n, s in expected_hf_tensors(QWEN2, cfg).items()}
    read = _tensor_reader(hf)
    full = {m.megatron.format(i=i): m.load(bind_layer(read, i), cfg, 0, 1) for m, i in QWEN2.rows(cfg)}
    assert full["output_layer.weight"].shape == (384, 64)
    te_names = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    te = {}
    for k, v in full.items():
        for local, te_name in te_names.items():
            k = k.replace(local, te_name)
        te[k] = v
    assert te.keys() != full.keys()
    for state_dict in (full, te):
        back = dict(full_state_dict_to_hf(state_dict, cfg))
        assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)


# --------------------------------------------------------------------------- HF directories

QWEN_MATH_CONFIG = {  # Qwen2.5-Math-1.5B's config.json (transformers 4.x format), shrunk
    "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 96,
    "max_position_embeddings": 4096, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "sliding_window": 4096, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.37.0", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
    "vocab_size": 300,
}


def _hf_dir(path: Path, config: dict = QWEN_MATH_CONFIG, edit=None) -> Path:
    """config.json + safetensors with the tensors the config implies (optionally edited)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    family, cfg, _ = read_hf_config(path)
    tensors = {n: torch.randn(s).to(torch.bfloat16) for n, s in expected_hf_tensors(family, cfg).items()}
    if edit:
        edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_reads_transformers4_config_with_overrides(tmp_path):
    family, cfg, raw = read_hf_config(_hf_dir(tmp_path / "m"), parse_overrides(
        ["rope_theta=300000", "max_position_embeddings=32768"]))
    assert family is QWEN2 and raw["torch_dtype"] == "bfloat16"
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == ("qwen2", 2, 64, 96)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim, cfg.vocab_size) == (4, 2, 16, 300)
    assert cfg.tie_word_embeddings and cfg.add_qkv_bias and cfg.norm_eps == 1e-6
    assert cfg.rope_theta == 300000.0 and cfg.max_position_embeddings == 32768
    plan = plan_conversion(tmp_path / "m")
    assert plan.dtype == torch.bfloat16


@pytest.mark.parametrize("source", [None, QWEN_MATH_CONFIG])
def test_export_config_loads_in_transformers(tmp_path, source):
    from transformers import AutoConfig

    cfg = model_config_from_dict({**vars(ModelConfig()), "vocab_size": 300, "rope_theta": 300000.0}, "t")
    out = hf_config_for_export(cfg, torch.bfloat16, source)
    assert out["rope_theta"] == 300000.0 and out["torch_dtype"] == "bfloat16"  # transformers 4.x keys
    (tmp_path / "config.json").write_text(json.dumps(out))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.rope_parameters["rope_theta"] == 300000.0
    assert (loaded.num_hidden_layers, loaded.num_key_value_heads, loaded.vocab_size) == (2, 2, 300)
    assert loaded.tie_word_embeddings and loaded.dtype == torch.bfloat16


@pytest.mark.parametrize("change,message", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": True},
     "attention_bias"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 16384,
      "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}},
     "rope_type='yarn' is not supported for llama"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     "rope_type='llama3' is not supported for qwen2"),
    ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": True}, "attention_bias"),
])
def test_unsupported_configs_are_refused(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**QWEN_MATH_CONFIG, **change}))
    with pytest.raises(ValueError, match=message) as err:
        read_hf_config(tmp_path)
    assert "config.json" in str(err.value)


LLAMA32_CONFIG = {  # Llama-3.2-1B's config.json (transformers 4.x format), shrunk
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
    "intermediate_size": 96, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 300,
}


def test_reads_llama32_rope_scaling_and_exports_it(tmp_path):
    from transformers import AutoConfig

    family, cfg, raw = read_hf_config(_hf_dir(tmp_path / "m", LLAMA32_CONFIG))
    assert family is LLAMA and cfg.tie_word_embeddings and not cfg.add_qkv_bias and not cfg.qk_layernorm
    assert (cfg.rope_type, cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
            cfg.rope_original_max_position_embeddings, cfg.rope_theta) == ("llama3", 32.0, 1.0, 4.0, 8192, 5e5)
    out = hf_config_for_export(cfg, torch.bfloat16, raw)
    assert out["rope_scaling"] == {**LLAMA32_CONFIG["rope_scaling"]}  # transformers 4.x / vLLM read this
    (tmp_path / "config.json").write_text(json.dumps(out))
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == {**LLAMA32_CONFIG["rope_scaling"],
                                                                    "rope_theta": 500000.0}


@pytest.mark.parametrize("field,value,message", [
    ("rope_type", "yarn", "rope_type must be one of"), ("rope_scaling_factor", 0.5, ">= 1"),
    ("rope_low_freq_factor", 0.0, "> 0"), ("rope_high_freq_factor", 1.0, "must be > model.rope_low"),
    ("rope_original_max_position_embeddings", 0, ">= 1")])
def test_rope_fields_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        replace(ModelConfig(), **{field: value}).validate()


def test_llama3_frequencies_equal_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from redi_megatron.models.rope import inv_freq_for

    hf = LlamaConfig(**{k: v for k, v in LLAMA32_CONFIG.items() if k != "architectures"})
    cfg = replace(ModelConfig(family="llama", hidden_size=64, num_attention_heads=4, add_qkv_bias=False),
                  rope_theta=5e5, rope_type="llama3", rope_scaling_factor=32.0)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert torch.equal(inv_freq_for(cfg), ref)
    assert not torch.equal(inv_freq_for(replace(cfg, rope_type="default")), ref)


@pytest.mark.parametrize("tp,pp,message", [(3, 1, "num_attention_heads=4"), (4, 1, "num_query_groups=2"),
                                           (1, 3, "num_layers=2")])
def test_layout_must_divide_model(tmp_path, tp, pp, message):
    hf = _hf_dir(tmp_path / "m")
    with pytest.raises(ValueError, match=message) as err:
        plan_conversion(hf, tp=tp, pp=pp)
    assert f"--tp {tp} --pp {pp}" in str(err.value)


def _drop_k(t): del t["model.layers.1.self_attn.k_proj.weight"]
def _bad_shape(t): t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(97, 64)
def _extra(t): t["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
def _tied_lm_head(t): t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()


@pytest.mark.parametrize("edit,message", [
    (_drop_k, r"missing tensor\(s\) \['model.layers.1.self_attn.k_proj.weight'\]"),
    (_bad_shape, r"model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' has shape \[97, 64\], "
                 r"expected \[96, 64\]"),
    (_extra, r"unexpected tensor\(s\) \['model.layers.0.self_attn.o_proj.bias'\]"),
])
def test_bad_tensors_are_refused(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        plan_conversion(_hf_dir(tmp_path / "m", edit=edit))


def test_tied_lm_head_in_file_is_accepted(tmp_path):
    plan_conversion(_hf_dir(tmp_path / "m", edit=_tied_lm_head))


def test_sharded_index_must_match_files(tmp_path):
    hf = _hf_dir(tmp_path / "m")
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="missing shard model-00002-of-00002.safetensors"):
        SafetensorsReader(hf)
    (hf / "model.safetensors.index.json").unlink()
    (hf / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        SafetensorsReader(hf)


def test_overrides_and_sizes_are_checked():
    assert parse_overrides(["rope_theta=1e6", "max_position_embeddings=32768"]) == \
        {"rope_theta": 1e6, "max_position_embeddings": 32768}
    with pytest.raises(ValueError, match="hidden_size: not an overridable"):
        parse_overrides(["hidden_size=128"])
    with pytest.raises(ValueError, match="'max_position_embeddings' must be int, got 'lots'"):
        parse_overrides(["max_position_embeddings=lots"])
    with pytest.raises(ValueError, match="'norm_eps' must be float, got True"):  # typed like a config file
        parse_overrides(["norm_eps=true"])
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_overrides(["rope_theta"])
    assert parse_size("5GB") == 5 * 10**9 and parse_size("40KB") == 40_000 and parse_size("1GiB") == 2**30
    with pytest.raises(ValueError, match="max-shard-size"):
        parse_size("big")


def test_cli_refuses_existing_output_and_leaves_it_alone(tmp_path, capsys):
    hf = _hf_dir(tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert hf_to_megatron_main(["--hf", str(hf), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert hf_to_megatron_main(["--hf", str(hf), "--out", str(tmp_path / "new"), "--tp", "3"]) == 2
    assert not (tmp_path / "new").exists() and not staging_path(tmp_path / "new").exists()


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_cli_refuses_an_output_overlapping_its_input_even_with_overwrite(tmp_path, capsys, where):
    hf = _hf_dir(tmp_path / "m")
    before = sorted((p.name, p.stat().st_size) for p in hf.iterdir())
    out = {"same": hf, "parent": tmp_path, "inside": hf / "converted"}[where]
    assert hf_to_megatron_main(["--hf", str(hf), "--out", str(out), "--overwrite"]) == 2
    assert "overlaps the input" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_size) for p in hf.iterdir()) == before  # the source is intact


def test_output_under_a_file_or_unwritable_is_refused_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_output_dir(tmp_path / "file" / "out", overwrite=False)
    with pytest.raises(ValueError, match="not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)


def test_atomic_publish_replaces_only_when_complete(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(ValueError, match="already exists"):
        out.mkdir() or check_output_dir(out, overwrite=False)
    (out / "old.txt").write_text("old")
    tmp = staging_dir(out)
    (tmp / "new.txt").write_text("new")
    assert (out / "old.txt").exists()  # untouched until publish
    publish(tmp, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"] and not tmp.exists()
    assert not list(tmp_path.glob(".ckpt.*"))


def test_leftovers_not_made_by_the_tools_are_never_deleted(tmp_path):
    out = tmp_path / "ckpt"
    mine = staging_path(out)
    mine.mkdir()
    (mine / "precious.txt").write_text("a user's file that happens to sit there")
    with pytest.raises(ValueError, match="not made by redi-megatron"):
        staging_dir(out)
    assert (mine / "precious.txt").exists()
    (mine / MARKER).write_text("")  # one of ours, from a crashed run: replaced
    assert not list(staging_dir(out).glob("precious.txt"))
