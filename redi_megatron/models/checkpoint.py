"""The model checkpoint directory shared by the trainer and ``redi_megatron.convert``.

Layout of a checkpoint directory::

    model_config.json   ModelConfig fields (rebuilds the model for any layout)
    redi_meta.json      format version, dtype, the layout it was saved from, padded vocabulary, source
    model/              Megatron dist_checkpointing of ``model.sharded_state_dict()``
    tokenizer/          optional: HF files copied through so export can write them back: the tokenizer,
                        and the source model's config.json and generation_config.json
    <name>/             optional: more dist_checkpointing trees (e.g. ``optimizer/``), see ``extra_sharded``

``model/`` stores every tensor under its layout-independent key (layers stacked along a leading axis,
TP shards as offsets of the full tensor, ``[gate; up]`` and the fused QKV in Megatron's global order),
so it loads into any TP/PP/VPP layout, and into the Transformer Engine spec as well as the local spec
(the local spec maps its norm keys to TE's ``layer_norm_weight`` names). Loading casts to the model's
dtype. Writes are atomic: everything goes into ``.<name>.partial`` next to the target, which is
renamed into place only once complete.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from redi_megatron.errors import UserError
from redi_megatron.models.config import ModelConfig
from redi_megatron.models.manifest import verify_manifest, write_manifest
from redi_megatron.models.safe_load import check_metadata_pickles, unpickling_refused, weights_only_loads
from redi_megatron.outputs import check_output, discard, publish, staging_dir, staging_path
from redi_megatron.parallel.collectives import broadcast_object, is_global_rank_zero
from redi_megatron.typed import from_mapping

FORMAT_NAME = "redi-megatron-model"
FORMAT_VERSION = 1
MODEL_CONFIG_FILE = "model_config.json"
META_FILE = "redi_meta.json"
MODEL_SUBDIR = "model"
TOKENIZER_SUBDIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")
# Copied along with the tokenizer: export starts from the source's config (token ids, extra fields).
HF_SIDE_FILES = ("config.json", "generation_config.json")
_RESERVED = {MODEL_SUBDIR, TOKENIZER_SUBDIR, MODEL_CONFIG_FILE, META_FILE}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise UserError(f"unsupported checkpoint dtype {dtype}; use one of {sorted(_DTYPES)}")


def dtype_from_name(name: str, where: str = "dtype") -> torch.dtype:
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    key = aliases.get(name, name)
    if key not in _DTYPES:
        raise UserError(f"{where}: unknown dtype {name!r}; use one of {sorted(_DTYPES) + sorted(aliases)}")
    return _DTYPES[key]


# ---------------------------------------------------------------------------------------------------
# Reading the JSON side
# ---------------------------------------------------------------------------------------------------

def model_config_from_dict(data: Mapping[str, Any], where: str) -> ModelConfig:
    """``ModelConfig`` from a JSON object; unknown fields are an error (``where`` names the file)."""
    if not isinstance(data, Mapping):
        raise UserError(f"{where}: expected a JSON object of ModelConfig fields")
    return from_mapping(ModelConfig, data, source=where)


NOT_A_CHECKPOINT = "not a redi-megatron model checkpoint directory"


def read_json(path: Path, missing: str = "") -> Any:
    """The JSON in ``path``; ValueError naming the file when it is missing (``missing`` says what that
    means) or not valid JSON."""
    if not path.is_file():
        raise UserError(f"{path} is missing" + (f": {missing}" if missing else ""))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e


def read_model_config(ckpt_dir: str | Path) -> ModelConfig:
    """The ``ModelConfig`` a checkpoint was saved with."""
    path = Path(ckpt_dir) / MODEL_CONFIG_FILE
    return model_config_from_dict(read_json(path, NOT_A_CHECKPOINT), str(path))


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """``redi_meta.json`` of a checkpoint, after checking its format version."""
    path = Path(ckpt_dir) / META_FILE
    meta = read_json(path, NOT_A_CHECKPOINT)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise UserError(f"{path}: field 'format' must be {FORMAT_NAME!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {meta.get('format_version')!r} is not supported "
                         f"(this redi-megatron reads version {FORMAT_VERSION})")
    return meta


def tokenizer_files(directory: str | Path) -> list[Path]:
    """The HF tokenizer files present in ``directory`` (possibly none)."""
    d = Path(directory)
    return [d / name for name in TOKENIZER_FILES if (d / name).is_file()]


def passthrough_files(directory: str | Path) -> list[Path]:
    """What ``tokenizer/`` keeps from ``directory``: tokenizer files plus config/generation config."""
    d = Path(directory)
    return tokenizer_files(d) + [d / name for name in HF_SIDE_FILES if (d / name).is_file()]


# ---------------------------------------------------------------------------------------------------
# Model chunks <-> dist_checkpointing
# ---------------------------------------------------------------------------------------------------

def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):  # DDP(Float16Module(GPTModel)): the GPTModel owns the state
        chunk = chunk.module
    return chunk


def _chunk_keys(n: int) -> list[str]:
    # Megatron-LM's convention: "model" for one chunk, "model0", "model1", ... under virtual pipelining.
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def model_sharded_state_dict(chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    """The sharded state dict of this rank's chunks, as saved under ``model/``.

    The trainer passes it to ``optimizer.sharded_state_dict(...)`` to save optimizer state that refers
    to the same keys.
    """
    return {key: _unwrap(c).sharded_state_dict() for key, c in zip(_chunk_keys(len(chunks)), chunks)}


def saved_layout(chunks: Sequence[torch.nn.Module]) -> dict[str, Any]:
    """TP/PP/VPP/CP sizes and dtype of the chunks (read from their TransformerConfig)."""
    cfg = _unwrap(chunks[0]).config
    return {"tp": cfg.tensor_model_parallel_size, "pp": cfg.pipeline_model_parallel_size,
            "vpp": cfg.virtual_pipeline_model_parallel_size, "cp": cfg.context_parallel_size,
            "dtype": dtype_name(cfg.params_dtype)}


def _check_model_matches(chunks: Sequence[torch.nn.Module], cfg: ModelConfig, where: str) -> None:
    """Shape-defining fields of the checkpoint's config against the model being loaded into."""
    module = _unwrap(chunks[0])
    tc = module.config
    pairs = {
        "num_layers": tc.num_layers, "hidden_size": tc.hidden_size, "ffn_hidden_size": tc.ffn_hidden_size,
        "num_attention_heads": tc.num_attention_heads, "num_query_groups": tc.num_query_groups,
        "head_dim": tc.kv_channels, "add_qkv_bias": tc.add_qkv_bias,
        "tie_word_embeddings": module.share_embeddings_and_output_weights,
    }
    for name, model_value in pairs.items():
        if getattr(cfg, name) != model_value:
            raise UserError(f"{where}: checkpoint has {name}={getattr(cfg, name)!r} but the model being "
                             f"loaded has {model_value!r}")
    padded = cfg.padded_vocab_size(tc.tensor_model_parallel_size)
    if padded != module.vocab_size:
        raise UserError(f"{where}: checkpoint vocabulary pads to {padded} rows at TP="
                         f"{tc.tensor_model_parallel_size} but the model has {module.vocab_size}")


def _check_shapes(sharded: Mapping[str, Any], model_dir: Path) -> None:
    """Every plain sharded tensor requested must exist in the checkpoint with the same global shape."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = dist_checkpointing.load_tensors_metadata(str(model_dir))
    for chunk_sd in sharded.values():
        for value in chunk_sd.values():
            if not isinstance(value, ShardedTensor):
                continue  # factories (gated fc1) and objects are checked by dist_checkpointing itself
            if value.key not in stored:
                raise UserError(f"{model_dir}: checkpoint has no tensor {value.key!r}")
            if tuple(stored[value.key].global_shape) != tuple(value.global_shape):
                raise UserError(f"{model_dir}: tensor {value.key!r} has shape "
                                 f"{tuple(stored[value.key].global_shape)} in the checkpoint but "
                                 f"{tuple(value.global_shape)} in the model")


def _unsplit_gated_fc1(sharded: dict[str, dict]) -> dict[str, dict]:
    """Without TP, save and load the gated ``linear_fc1`` in place instead of through its factory.

    Megatron routes ``[gate; up]`` through a factory that splits it into two halves, because a TP
    rank's ``[gate_r; up_r]`` is two separate regions of the global ``[layers, 2*ffn, hidden]`` tensor.
    The halves are views of the parameter: the writer clones them and the loader concatenates them
    into new tensors, holding about half the model's weights twice. At TP=1 the parameter is one
    contiguous region, so it is addressed as one plain shard of the same global tensor; the stored
    tensor is identical and still reshards to any TP on load.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out: dict[str, dict] = {}
    for chunk_key, chunk_sd in sharded.items():
        out[chunk_key] = dict(chunk_sd)
        for key, value in chunk_sd.items():
            if not (isinstance(value, ShardedTensorFactory) and key.endswith("mlp.linear_fc1.weight")
                    and type(value.data) in (torch.Tensor, torch.nn.Parameter)):  # not FP8 storage
                continue
            gate, _ = value.build()
            axis = gate.prepend_axis_num  # the fc1 row axis in global coordinates
            if gate.axis_fragmentations[axis] != 2 or value.flattened_range is not None:
                continue  # TP > 1: the rank's gate and up rows are not contiguous globally
            layer_offsets = [(i, gate.global_offset[i], gate.axis_fragmentations[i]) for i in range(axis)]
            out[chunk_key][key] = ShardedTensor.from_rank_offsets(
                value.key, value.data, *layer_offsets, replica_id=value.replica_id, prepend_axis_num=axis)
    return out


def load_model_checkpoint(chunks: Sequence[torch.nn.Module], ckpt_dir: str | Path, *,
                          trust_unverified: bool = False) -> dict[str, Any]:
    """Load ``ckpt_dir/model`` into this rank's chunks (any layout, any dtype). Collective.

    The files are first checked against the checkpoint's manifest (``models.manifest``), before any
    loader unpickles anything; unless ``trust_unverified``, torch's pickled metadata is then read with
    an unpickler that knows only the classes it needs and non-tensor items load as ``weights_only``
    (``models.safe_load``). Returns the checkpoint's ``redi_meta.json``. Raises ``UserError`` when a
    file is missing, damaged or refused, or the checkpoint does not fit the model (architecture,
    vocabulary padding, missing or misshaped tensors).
    """
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt = Path(ckpt_dir)
    meta = read_meta(ckpt)
    verify_manifest(ckpt, trust_unverified)
    _check_model_matches(chunks, read_model_config(ckpt), str(ckpt / MODEL_CONFIG_FILE))
    if not trust_unverified:
        check_metadata_pickles(ckpt / MODEL_SUBDIR)
    sharded = _unsplit_gated_fc1(model_sharded_state_dict(chunks))
    _check_shapes(sharded, ckpt / MODEL_SUBDIR)
    loaded = _load_tree(sharded, ckpt / MODEL_SUBDIR, trust_unverified, strict=StrictHandling.RAISE_UNEXPECTED)
    for key, chunk in zip(_chunk_keys(len(chunks)), chunks):
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    return meta


def load_extra_sharded(ckpt_dir: str | Path, name: str, sharded_state_dict: dict, *,
                       trust_unverified: bool = False) -> dict:
    """Load the extra tree ``ckpt_dir/<name>`` saved through ``extra_sharded`` (e.g. optimizer state),
    as carefully as the model (``load_model_checkpoint``; call that first: it verifies the manifest)."""
    path = Path(ckpt_dir) / name
    if not (path / "metadata.json").is_file():
        raise UserError(f"{path} is not a dist_checkpointing directory (no metadata.json)")
    if not trust_unverified:
        check_metadata_pickles(path)
    return _load_tree(sharded_state_dict, path, trust_unverified)


_MEGATRON_LOAD_DEPRECATIONS = ("`load_state_dict` is deprecated", "Please use DTensor instead and we are deprecating "
                               "ShardedTensor")


def _load_tree(sharded: dict, path: Path, trust_unverified: bool, **kwargs: Any) -> dict:
    """``dist_checkpointing.load``; unless trusted, every ``torch.load`` in it is ``weights_only``."""
    from megatron.core import dist_checkpointing

    try:
        with weights_only_loads(not trust_unverified), warnings.catch_warnings():
            # megatron-core 0.16's loader calls torch.distributed.checkpoint.load_state_dict and builds
            # ShardedTensors, both deprecated by torch 2.13 (a FutureWarning each, on every load); nothing
            # for a user to act on. Other warnings still show.
            for message in _MEGATRON_LOAD_DEPRECATIONS:
                warnings.filterwarnings("ignore", message=message, category=FutureWarning)
            return dist_checkpointing.load(sharded, str(path), **kwargs)
    except BaseException as e:  # torch's CheckpointException is no Exception; anything else is re-raised
        if not trust_unverified and unpickling_refused(e):
            raise UserError(f"{path}: holds a pickled object that is not plain data, refused (checkpoints are "
                            "code: if you trust this one's source, pass checkpoint.trust_unverified=true or "
                            "--trust-unverified)") from None
        raise


# ---------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------

def check_output_dir(out_dir: str | Path, overwrite: bool, inputs: Sequence[Optional[str | Path]] = ()) -> Path:
    """``redi_megatron.outputs.check_output``: refused if it exists (unless ``overwrite``) or overlaps
    an input; validated before anything is written."""
    return check_output(out_dir, inputs, overwrite=overwrite)


def _meta(chunks: Sequence[torch.nn.Module], model_cfg: ModelConfig,
          extra_meta: Optional[Mapping[str, Any]], extra_names: Sequence[str]) -> dict[str, Any]:
    import megatron.core

    layout = saved_layout(chunks)
    meta: dict[str, Any] = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "dtype": layout.pop("dtype"),
        "saved_layout": layout, "padded_vocab_size": model_cfg.padded_vocab_size(layout["tp"]),
        "megatron_core_version": getattr(megatron.core, "__version__", "unknown"),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extra_sharded": list(extra_names),
    }
    for key, value in (extra_meta or {}).items():
        if key in meta:
            raise ValueError(f"extra_meta may not set the reserved field {key!r}")
        meta[key] = value
    return meta


def save_model_checkpoint(chunks: Sequence[torch.nn.Module], model_cfg: ModelConfig, out_dir: str | Path,
                          tokenizer_dir: Optional[str | Path] = None,
                          extra_meta: Optional[Mapping[str, Any]] = None, *, overwrite: bool = False,
                          extra_sharded: Optional[Mapping[str, dict]] = None) -> Path:
    """Save this rank's chunks as a model checkpoint directory. Collective over all ranks.

    Args:
        chunks: this rank's model chunks (GPTModel or DDP-wrapped), one per virtual stage.
        model_cfg: the architecture, written to ``model_config.json``.
        out_dir: the checkpoint directory; refused if it exists unless ``overwrite``.
        tokenizer_dir: a directory whose HF tokenizer files, config.json and generation_config.json
            (those present) are copied into ``tokenizer/``: an HF model directory, or the
            ``tokenizer/`` of the checkpoint training started from.
        extra_meta: JSON-serialisable fields merged into ``redi_meta.json`` (e.g. step, source).
        extra_sharded: more sharded state dicts saved under ``out_dir/<name>/`` in the same atomic
            write, e.g. ``{"optimizer": optimizer.sharded_state_dict(model_sharded_state_dict(chunks))}``.

    Requires ``torch.distributed`` and Megatron's parallel state (``init_parallel``), also at world
    size 1. Returns ``out_dir``.
    """
    from megatron.core import dist_checkpointing

    from redi_megatron.compat.children import install_orphan_safe_writer_queue

    install_orphan_safe_writer_queue()  # a kill -9 of this rank must not leave the writer's helper behind
    out = check_output_dir(out_dir, overwrite)
    extra = dict(extra_sharded or {})
    for name in extra:
        if name in _RESERVED or not name.isidentifier():
            raise ValueError(f"extra_sharded name {name!r} is reserved or not a plain identifier")
    tok_files = passthrough_files(tokenizer_dir) if tokenizer_dir is not None else []
    if tokenizer_dir is not None and not tok_files:
        raise UserError(f"tokenizer_dir {tokenizer_dir} has none of the files "
                         f"{TOKENIZER_FILES + HF_SIDE_FILES}")
    meta = _meta(chunks, model_cfg, extra_meta, list(extra))
    json.dumps(meta)  # fail before writing anything if extra_meta is not JSON-serialisable
    coordinator = is_global_rank_zero()
    tmp = staging_path(out)
    if coordinator:
        # dist_checkpointing.save requires the directory to exist on rank 0; the other ranks only
        # write into it after the save's first collective, which rank 0 joins after this.
        staging_dir(out)
        for name in [MODEL_SUBDIR, *extra]:
            (tmp / name).mkdir()
    try:
        dist_checkpointing.save(_unsplit_gated_fc1(model_sharded_state_dict(chunks)), str(tmp / MODEL_SUBDIR))
        for name, sharded in extra.items():
            dist_checkpointing.save(sharded, str(tmp / name))
    except BaseException:
        if coordinator:
            discard(tmp)
        raise
    failure: Optional[BaseException] = None
    if coordinator:
        try:
            _write_side_files(tmp, model_cfg, tok_files, meta)
            publish(tmp, out)
        except BaseException as e:  # noqa: BLE001 - reported to every rank below, then re-raised
            discard(tmp)
            failure = e
    # Every rank returns only once the directory is in place (or learns that it is not).
    status = broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if status is not None:
        raise RuntimeError(f"saving {out} failed on rank 0: {status}")
    return out


def _write_side_files(tmp: Path, model_cfg: ModelConfig, tok_files: list[Path], meta: dict) -> None:
    (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model_cfg), indent=2) + "\n")
    if tok_files:
        (tmp / TOKENIZER_SUBDIR).mkdir()
        for f in tok_files:
            shutil.copy2(f, tmp / TOKENIZER_SUBDIR / f.name)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    write_manifest(tmp)  # last: sizes and checksums of everything above
