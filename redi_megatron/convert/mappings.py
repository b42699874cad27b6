"""Declarative HF <-> Megatron-Core parameter tables, one per model family.

Each table row says which Hugging Face tensor(s) make one Megatron tensor and how (in the spirit of
Megatron-Bridge's ``AutoMapping`` / ``QKVMapping`` / ``GatedMLPMapping``):

- :class:`Direct`: one tensor, same values. ``tp_dim`` is the tensor-parallel split (0: column-parallel,
  rows split; 1: row-parallel, columns split; None: replicated). ``vocab`` rows are padded with zeros to
  the TP-padded vocabulary on import and stripped on export.
- :class:`FusedQKV`: Megatron's ``linear_qkv`` is ``[groups, (heads/groups q, k, v), head_dim]`` along
  dim 0 (per KV group: that group's query heads, then its key head, then its value head), so a
  contiguous TP slice holds whole groups.
- :class:`FusedGateUp`: Megatron's gated ``linear_fc1`` is ``[gate; up]`` along dim 0, and a TP rank
  holds ``[gate_r; up_r]``.

Names are full Megatron names at TP=1/PP=1 with the local layer spec; ``te_megatron`` gives the name of
the same tensor in Transformer Engine's spec, where the norms are fused into the next linear layer
(derived from ``models.param_names``, the one list of names the two specs spell differently).
``{i}`` is the layer index. Shapes are symbolic (``"hidden"``, ``"ffn"``, ``"vocab"``, ``"q"`` = heads x
head_dim, ``"kv"`` = groups x head_dim), resolved against a ``ModelConfig`` by :func:`dims`.

A row's ``load`` builds one TP rank's shard by reading only the slices it needs (``read(name, dim,
start, stop)``), so conversion holds one copy of the weights in total, not one per rank.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from redi_megatron.errors import UserError
from redi_megatron.models.config import ModelConfig
from redi_megatron.models.param_names import te_name

# read(hf_name, dim, start, stop) -> tensor; dim None reads the whole tensor.
Reader = Callable[[str, Optional[int], int, Optional[int]], torch.Tensor]
Shape = tuple[str, ...]


def dims(cfg: ModelConfig) -> dict[str, int]:
    """Values of the symbolic dimension names used in the tables."""
    return {"hidden": cfg.hidden_size, "ffn": cfg.ffn_hidden_size, "vocab": cfg.vocab_size,
            "q": cfg.num_attention_heads * cfg.head_dim, "kv": cfg.num_query_groups * cfg.head_dim,
            "head": cfg.head_dim}


def resolve(shape: Shape, cfg: ModelConfig) -> tuple[int, ...]:
    d = dims(cfg)
    return tuple(d[s] for s in shape)


def _tp_range(size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    assert size % tp_size == 0, f"TP={tp_size} does not divide {size}"  # ModelConfig.validate checked it
    per = size // tp_size
    return tp_rank * per, (tp_rank + 1) * per


@dataclass(frozen=True)
class Direct:
    megatron: str
    hf: str
    shape: Shape
    tp_dim: Optional[int] = None
    vocab: bool = False
    te_megatron: Optional[str] = None
    untied_only: bool = False            # the output layer: absent when embeddings are tied

    def hf_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        return {self.hf: resolve(self.shape, cfg)}

    def load(self, read: Reader, cfg: ModelConfig, tp_rank: int, tp_size: int) -> torch.Tensor:
        if self.vocab:
            assert self.tp_dim == 0
            start, stop = _tp_range(cfg.padded_vocab_size(tp_size), tp_rank, tp_size)
            rows = read(self.hf, 0, min(start, cfg.vocab_size), min(stop, cfg.vocab_size))
            if rows.shape[0] == stop - start:
                return rows
            pad = rows.new_zeros((stop - start - rows.shape[0], *rows.shape[1:]))  # padded rows: zeros
            return torch.cat([rows, pad])
        if self.tp_dim is None:
            return read(self.hf, None, 0, None)
        start, stop = _tp_range(resolve(self.shape, cfg)[self.tp_dim], tp_rank, tp_size)
        return read(self.hf, self.tp_dim, start, stop)

    def export(self, full: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        return {self.hf: full[:cfg.vocab_size] if self.vocab else full}


@dataclass(frozen=True)
class FusedQKV:
    megatron: str
    q: str
    k: str
    v: str
    bias: bool = False                   # [q] / [kv] vectors instead of [q, hidden] / [kv, hidden]
    tp_dim: int = 0

    @property
    def hf(self) -> tuple[str, str, str]:
        return self.q, self.k, self.v

    def hf_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        rest: Shape = () if self.bias else ("hidden",)
        return {self.q: resolve(("q", *rest), cfg), self.k: resolve(("kv", *rest), cfg),
                self.v: resolve(("kv", *rest), cfg)}

    def load(self, read: Reader, cfg: ModelConfig, tp_rank: int, tp_size: int) -> torch.Tensor:
        hd, heads_per_group = cfg.head_dim, cfg.num_attention_heads // cfg.num_query_groups
        g0, g1 = _tp_range(cfg.num_query_groups, tp_rank, tp_size)
        q = read(self.q, 0, g0 * heads_per_group * hd, g1 * heads_per_group * hd)
        k = read(self.k, 0, g0 * hd, g1 * hd)
        v = read(self.v, 0, g0 * hd, g1 * hd)
        rest, groups = q.shape[1:], g1 - g0
        return torch.cat([q.reshape(groups, heads_per_group * hd, *rest), k.reshape(groups, hd, *rest),
                          v.reshape(groups, hd, *rest)], dim=1).reshape(-1, *rest)

    def export(self, full: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        hd, heads_per_group = cfg.head_dim, cfg.num_attention_heads // cfg.num_query_groups
        rest = full.shape[1:]
        grouped = full.reshape(cfg.num_query_groups, (heads_per_group + 2) * hd, *rest)
        q, k, v = grouped.split([heads_per_group * hd, hd, hd], dim=1)
        return {self.q: q.reshape(-1, *rest), self.k: k.reshape(-1, *rest), self.v: v.reshape(-1, *rest)}


@dataclass(frozen=True)
class FusedGateUp:
    megatron: str
    gate: str
    up: str
    tp_dim: int = 0

    @property
    def hf(self) -> tuple[str, str]:
        return self.gate, self.up

    def hf_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        return {self.gate: resolve(("ffn", "hidden"), cfg), self.up: resolve(("ffn", "hidden"), cfg)}

    def load(self, read: Reader, cfg: ModelConfig, tp_rank: int, tp_size: int) -> torch.Tensor:
        start, stop = _tp_range(cfg.ffn_hidden_size, tp_rank, tp_size)
        return torch.cat([read(self.gate, 0, start, stop), read(self.up, 0, start, stop)])

    def export(self, full: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        gate, up = full.chunk(2, dim=0)
        return {self.gate: gate, self.up: up}


Mapping = Union[Direct, FusedQKV, FusedGateUp]


@dataclass(frozen=True)
class Family:
    """One model family: its HF identity, the HF config features it requires, its parameter table."""

    name: str                            # ModelConfig.family
    architectures: tuple[str, ...]       # HF config.json "architectures"
    model_type: str
    add_qkv_bias: bool
    params: tuple[Mapping, ...]          # names with {i} are per layer
    qk_layernorm: bool = False           # per-head q/k RMSNorm (ModelConfig.qk_layernorm)
    rope_types: tuple[str, ...] = ("default",)   # HF rope_type values this family converts
    requires: tuple[tuple[str, Any], ...] = ()   # HF config attribute -> value this converter supports
    ignored_hf: tuple[str, ...] = (r".*\.rotary_emb\.inv_freq$",)  # regexes of HF tensors with no weight

    def is_layer(self, m: Mapping) -> bool:
        return "{i}" in m.megatron

    def rows(self, cfg: ModelConfig) -> Iterator[tuple[Mapping, Optional[int]]]:
        """(mapping, layer index or None) for every tensor of a model with this config, in HF order."""
        for m in self.params:
            if isinstance(m, Direct) and m.untied_only and cfg.tie_word_embeddings:
                continue
            if self.is_layer(m):
                for i in range(cfg.num_layers):
                    yield m, i
            else:
                yield m, None


def _layer_params(qkv_bias: bool, qk_norm: bool = False) -> tuple[Mapping, ...]:
    L, M = "decoder.layers.{i}.", "model.layers.{i}."
    rows: list[Mapping] = [
        Direct(L + "input_layernorm.weight", M + "input_layernorm.weight", ("hidden",),
               te_megatron=te_name(L + "input_layernorm.weight")),
        FusedQKV(L + "self_attention.linear_qkv.weight", M + "self_attn.q_proj.weight",
                 M + "self_attn.k_proj.weight", M + "self_attn.v_proj.weight"),
    ]
    if qkv_bias:
        rows.append(FusedQKV(L + "self_attention.linear_qkv.bias", M + "self_attn.q_proj.bias",
                             M + "self_attn.k_proj.bias", M + "self_attn.v_proj.bias", bias=True))
    if qk_norm:  # one [head_dim] weight shared by all heads: replicated across TP (same name in TE's spec)
        rows += [Direct(L + "self_attention.q_layernorm.weight", M + "self_attn.q_norm.weight", ("head",)),
                 Direct(L + "self_attention.k_layernorm.weight", M + "self_attn.k_norm.weight", ("head",))]
    rows += [
        Direct(L + "self_attention.linear_proj.weight", M + "self_attn.o_proj.weight", ("hidden", "q"),
               tp_dim=1),
        Direct(L + "pre_mlp_layernorm.weight", M + "post_attention_layernorm.weight", ("hidden",),
               te_megatron=te_name(L + "pre_mlp_layernorm.weight")),
        FusedGateUp(L + "mlp.linear_fc1.weight", M + "mlp.gate_proj.weight", M + "mlp.up_proj.weight"),
        Direct(L + "mlp.linear_fc2.weight", M + "mlp.down_proj.weight", ("hidden", "ffn"), tp_dim=1),
    ]
    return tuple(rows)


def _table(qkv_bias: bool, qk_norm: bool = False) -> tuple[Mapping, ...]:
    return (
        Direct("embedding.word_embeddings.weight", "model.embed_tokens.weight", ("vocab", "hidden"),
               tp_dim=0, vocab=True),
        *_layer_params(qkv_bias, qk_norm),
        Direct("decoder.final_layernorm.weight", "model.norm.weight", ("hidden",)),
        Direct("output_layer.weight", "lm_head.weight", ("vocab", "hidden"), tp_dim=0, vocab=True,
               untied_only=True),
    )


# HF config features the Megatron model built by redi_megatron.models.builder does not have.
_DENSE_SILU = (("hidden_act", "silu"),)

QWEN2 = Family(name="qwen2", architectures=("Qwen2ForCausalLM",), model_type="qwen2", add_qkv_bias=True,
               params=_table(qkv_bias=True),
               requires=_DENSE_SILU + (("use_sliding_window", False),))
# Qwen3 dense: no qkv bias, per-head q/k RMSNorm before RoPE, head_dim set on its own (128 at every size).
QWEN3 = Family(name="qwen3", architectures=("Qwen3ForCausalLM",), model_type="qwen3", add_qkv_bias=False,
               params=_table(qkv_bias=False, qk_norm=True), qk_layernorm=True,
               requires=_DENSE_SILU + (("attention_bias", False), ("use_sliding_window", False)))
# Llama 2 and Llama 3.x (3.1/3.2/3.3 carry rope_type "llama3"; 3.2-1B/3B tie their embeddings).
LLAMA = Family(name="llama", architectures=("LlamaForCausalLM",), model_type="llama", add_qkv_bias=False,
               params=_table(qkv_bias=False), rope_types=("default", "llama3"),
               requires=_DENSE_SILU + (("attention_bias", False), ("mlp_bias", False)))
FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN2, QWEN3, LLAMA)}
# ModelConfig rope field <- key of HF's rope_scaling / rope_parameters (rope_type "llama3").
LLAMA3_ROPE_FIELDS: tuple[tuple[str, str], ...] = (
    ("rope_scaling_factor", "factor"), ("rope_low_freq_factor", "low_freq_factor"),
    ("rope_high_freq_factor", "high_freq_factor"),
    ("rope_original_max_position_embeddings", "original_max_position_embeddings"))

# ModelConfig field <- HF config attribute; the inverse writes config.json on export.
CONFIG_FIELDS: tuple[tuple[str, str], ...] = (
    ("num_layers", "num_hidden_layers"), ("hidden_size", "hidden_size"),
    ("ffn_hidden_size", "intermediate_size"), ("num_attention_heads", "num_attention_heads"),
    ("num_query_groups", "num_key_value_heads"), ("vocab_size", "vocab_size"),
    ("max_position_embeddings", "max_position_embeddings"), ("norm_eps", "rms_norm_eps"),
    ("tie_word_embeddings", "tie_word_embeddings"), ("init_method_std", "initializer_range"),
)
# ModelConfig fields --override may change: they do not change any tensor's shape in the HF file.
OVERRIDABLE = ("rope_theta", "max_position_embeddings", "norm_eps", "init_method_std",
               "make_vocab_size_divisible_by")


def family_for_architecture(architectures: Optional[list], model_type: Optional[str], where: str) -> Family:
    """The family of an HF config (``where`` names the file in errors)."""
    for family in FAMILIES.values():
        if architectures and architectures[0] in family.architectures:
            return family
        if not architectures and model_type == family.model_type:
            return family
    known = sorted(a for f in FAMILIES.values() for a in f.architectures)
    raise UserError(f"{where}: unsupported architecture {architectures or model_type!r}; "
                     f"supported: {known}")


def family_for_config(cfg: ModelConfig) -> Family:
    if cfg.family not in FAMILIES:
        raise UserError(f"model family {cfg.family!r} has no conversion table (known: {sorted(FAMILIES)})")
    return FAMILIES[cfg.family]


def expected_hf_tensors(family: Family, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name a model with this config has, with its shape."""
    out: dict[str, tuple[int, ...]] = {}
    for m, layer in family.rows(cfg):
        for name, shape in m.hf_shapes(cfg).items():
            out[name.format(i=layer)] = shape
    return out


def is_ignored_hf(family: Family, cfg: ModelConfig, name: str) -> bool:
    """HF tensors that carry no weight of ours: rotary buffers, and lm_head when tied (HF ignores it)."""
    if cfg.tie_word_embeddings and name == "lm_head.weight":
        return True
    return any(re.fullmatch(p, name) for p in family.ignored_hf)


def megatron_index(family: Family, cfg: ModelConfig) -> dict[str, tuple[Mapping, Optional[int]]]:
    """Full Megatron name (local-spec and TE-spec spellings) -> (mapping, layer)."""
    index: dict[str, tuple[Mapping, Optional[int]]] = {}
    for m, layer in family.rows(cfg):
        index[m.megatron.format(i=layer)] = (m, layer)
        te = getattr(m, "te_megatron", None)
        if te:
            index[te.format(i=layer)] = (m, layer)
    return index


def bind_layer(read: Reader, layer: Optional[int]) -> Reader:
    """A reader that fills ``{i}`` in the names a mapping asks for."""
    return lambda name, dim, start, stop: read(name.format(i=layer), dim, start, stop)


def full_state_dict_to_hf(full: dict[str, torch.Tensor], cfg: ModelConfig
                          ) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors from a full (TP1/PP1-named) Megatron state dict, in HF order; vocab padding stripped.

    Accepts local-spec or TE-spec names (e.g. from ``gather_full_state_dict`` on either spec).
    """
    family = family_for_config(cfg)
    for m, layer in family.rows(cfg):
        names = [m.megatron.format(i=layer)]
        te = getattr(m, "te_megatron", None)
        if te:
            names.append(te.format(i=layer))
        found = [n for n in names if n in full]
        if not found:
            raise UserError(f"state dict has no tensor {names[0]!r}")
        for hf_name, tensor in m.export(full[found[0]], cfg).items():
            yield hf_name.format(i=layer), tensor
