"""redi-hf-to-megatron: a Hugging Face model directory -> a redi-megatron model checkpoint.

    redi-hf-to-megatron --hf Qwen2.5-Math-1.5B --out ckpt/base --tp 2 --pp 1 \\
        --override rope_theta=300000 max_position_embeddings=32768

The output (see ``redi_megatron.models.checkpoint``) is a Megatron dist_checkpointing tree that loads
into any TP/PP layout, plus ``model_config.json``. ``--tp/--pp`` are checked against the model (heads,
KV groups, FFN and layers must divide) and fix the vocabulary padding; as one process the conversion
builds the TP1/PP1 model. Under ``torchrun --nproc-per-node tp*pp`` every rank converts only its own
shard, reading only the slices of the safetensors it needs.

Memory: the Megatron model (one copy of the weights, summed over ranks) plus one tensor in flight.
"""
from __future__ import annotations

if __name__ == "__main__":  # python -m: parse the arguments before torch is imported (convert/cli.py)
    from redi_megatron.convert.cli import hf_to_megatron

    raise SystemExit(hf_to_megatron())

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from redi_megatron.convert._launch import force_cpu, parallel_context, run_cli
from redi_megatron.convert.cli import hf_to_megatron_parser
from redi_megatron.convert.hf_io import SafetensorsReader, hf_dtype, parse_overrides, read_hf_config
from redi_megatron.convert.mappings import Family, bind_layer, expected_hf_tensors, is_ignored_hf, megatron_index
from redi_megatron.errors import UserError
from redi_megatron.models.checkpoint import check_output_dir, dtype_from_name, save_model_checkpoint
from redi_megatron.models.config import ModelConfig, ParallelConfig


@dataclass
class ConversionPlan:
    """Everything checked before any weight is read or anything is written."""

    hf_dir: Path
    family: Family
    model_cfg: ModelConfig
    raw_config: dict[str, Any]
    dtype: torch.dtype
    tp: int
    pp: int
    reader: SafetensorsReader


def _stable_vocab_padding(cfg: ModelConfig, tp: int) -> ModelConfig:
    """Pad the vocabulary so the padded size is the same at TP=1 and the target TP.

    True already whenever TP divides ``make_vocab_size_divisible_by`` (powers of two up to 128); for
    other TP sizes the multiple is raised to ``multiple * tp``, so the checkpoint reshards freely.
    """
    if cfg.padded_vocab_size(tp) == cfg.padded_vocab_size(1):
        return cfg
    return replace(cfg, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by * tp)


def check_hf_tensors(family: Family, cfg: ModelConfig, reader: SafetensorsReader) -> None:
    """Names and shapes of the HF tensors against what the config implies; errors name the file."""
    expected = expected_hf_tensors(family, cfg)
    present = reader.names()
    missing = sorted(set(expected) - present)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserError(f"{reader.dir}: missing tensor(s) {missing[:3]}{more} expected for "
                         f"{family.name} with {cfg.num_layers} layers")
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise UserError(f"{reader.where(name)}: tensor {name!r} has shape {list(reader.shape(name))}, "
                             f"expected {list(shape)} from config.json")
    unexpected = sorted(n for n in present - set(expected) if not is_ignored_hf(family, cfg, n))
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise UserError(f"{reader.dir}: unexpected tensor(s) {unexpected[:3]}{more}: the {family.name} "
                         f"table has no place for them (unsupported architecture variant?)")


def plan_conversion(hf_dir: str | Path, *, tp: int = 1, pp: int = 1,
                    overrides: Optional[dict[str, Any]] = None, dtype: Optional[str] = None
                    ) -> ConversionPlan:
    """Read and check config.json and the safetensors headers (no weights are read)."""
    hf = Path(hf_dir)
    family, cfg, raw = read_hf_config(hf, overrides)
    try:
        ParallelConfig(tp=tp, pp=pp).validate(tp * pp, cfg)
    except ValueError as e:
        raise UserError(f"--tp {tp} --pp {pp} do not fit {hf / 'config.json'}: {e}") from e
    cfg = _stable_vocab_padding(cfg, tp)
    reader = SafetensorsReader(hf)
    try:
        check_hf_tensors(family, cfg, reader)
    except ValueError:
        reader.close()
        raise
    if dtype is None:
        declared = hf_dtype(raw)
        torch_dtype = (dtype_from_name(declared, f"{hf / 'config.json'}: dtype") if declared
                       else reader.dtype(family.params[0].hf))
    else:
        torch_dtype = dtype_from_name(dtype, "--dtype")
    return ConversionPlan(hf, family, cfg, raw, torch_dtype, tp, pp, reader)


@torch.no_grad()
def load_hf_into_chunks(chunks: Sequence[torch.nn.Module], plan: ConversionPlan, tp_rank: int,
                        tp_size: int, progress: bool = True) -> None:
    """Fill this rank's chunks with its shards of the HF weights, tensor by tensor."""
    from tqdm import tqdm

    from redi_megatron.models.sharding import global_names

    index = megatron_index(plan.family, plan.model_cfg)
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        names = global_names(module)
        params = list(module.named_parameters())
        for local, param in tqdm(params, desc="hf->megatron", unit="tensor", disable=not progress):
            mapping, layer = index[names[local]]  # KeyError = a parameter the table does not describe
            split = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
            assert split == mapping.tp_dim, (names[local], mapping.tp_dim, split)  # table vs Megatron
            part = mapping.load(bind_layer(plan.reader.read, layer), plan.model_cfg, tp_rank, tp_size)
            assert part.shape == param.shape, (names[local], tuple(part.shape), tuple(param.shape))
            param.copy_(part)


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, tp: Optional[int] = None,
                           pp: Optional[int] = None, overrides: Optional[dict[str, Any]] = None,
                           dtype: Optional[str] = None, overwrite: bool = False, progress: bool = True,
                           plan: Optional[ConversionPlan] = None) -> Path:
    """Convert on every rank of the current Megatron layout (``init_parallel`` must have run).

    ``tp``/``pp`` (default: the current layout) are the layout to validate and pad for; the current
    layout must be that one or a single rank. ``plan`` skips re-reading the HF headers.
    """
    from redi_megatron.models.builder import build_model_chunks
    from redi_megatron.parallel.state import ParallelGroups, groups

    g = groups()
    tp_size, pp_size = ParallelGroups.size(g.tp), ParallelGroups.size(g.pp)
    tp, pp = tp or tp_size, pp or pp_size
    if (tp_size, pp_size) not in ((1, 1), (tp, pp)):
        raise UserError(f"running at TP{tp_size}/PP{pp_size}: convert for --tp {tp} --pp {pp} with "
                         f"tp*pp ranks or with one")
    plan = plan or plan_conversion(hf_dir, tp=tp, pp=pp, overrides=overrides, dtype=dtype)
    check_output_dir(out_dir, overwrite, inputs=[hf_dir])  # fail before the expensive part
    chunks = build_model_chunks(plan.model_cfg, ParallelConfig(tp=tp_size, pp=pp_size), dtype=plan.dtype)
    is_first = all(ParallelGroups.rank(x) == 0 for x in (g.tp, g.pp, g.dp, g.cp))
    try:
        load_hf_into_chunks(chunks, plan, ParallelGroups.rank(g.tp), tp_size, progress and is_first)
    finally:
        plan.reader.close()
    source = {"kind": "hf", "path": str(plan.hf_dir.resolve()), "overrides": overrides or {}}
    # tokenizer/ keeps the tokenizer and the HF config.json / generation_config.json for export.
    return save_model_checkpoint(chunks, plan.model_cfg, out_dir, tokenizer_dir=plan.hf_dir,
                                 overwrite=overwrite,
                                 extra_meta={"source": source, "target_layout": {"tp": tp, "pp": pp}})


build_parser = hf_to_megatron_parser  # the command line lives in convert/cli.py (parsed before torch is imported)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The tool's work, on parsed arguments (``convert.cli.hf_to_megatron`` parses them first)."""
    force_cpu()

    def body() -> int:
        overrides = parse_overrides(args.override)
        # Everything that can be checked without weights is checked before any process group exists.
        plan = plan_conversion(args.hf, tp=args.tp, pp=args.pp, overrides=overrides, dtype=args.dtype)
        check_output_dir(args.out, args.overwrite, inputs=[args.hf])
        with parallel_context(args.tp, args.pp):
            out = convert_hf_to_megatron(args.hf, args.out, tp=args.tp, pp=args.pp, overrides=overrides,
                                         overwrite=args.overwrite, progress=not args.no_progress,
                                         plan=plan)
        print(f"wrote {out}")
        return 0

    return run_cli("redi-hf-to-megatron", body)

