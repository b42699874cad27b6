"""redi-megatron-to-hf: a redi-megatron model checkpoint (any TP/PP layout) -> a Hugging Face directory.

    redi-megatron-to-hf --megatron ckpt/step_1000 --out hf/step_1000 --dtype bf16

Writes config.json (readable by transformers 4.x/vLLM and 5.x), generation_config.json, safetensors
(sharded past ``--max-shard-size``, with the usual index) and the tokenizer files the checkpoint
carries. Vocabulary padding is stripped. Runs as one process: the checkpoint reshards on load.

Memory: the Megatron model (one copy of the weights) plus one converted tensor at a time: each shard's
header is written first and tensors stream to disk.
"""
from __future__ import annotations

if __name__ == "__main__":  # python -m: parse the arguments before torch is imported (convert/cli.py)
    from redi_megatron.convert.cli import megatron_to_hf

    raise SystemExit(megatron_to_hf())

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from redi_megatron.convert._launch import force_cpu, parallel_context, run_cli
from redi_megatron.convert.cli import megatron_to_hf_parser
from redi_megatron.convert.hf_io import StreamingSafetensorsWriter, hf_config_for_export, parse_size
from redi_megatron.convert.mappings import expected_hf_tensors, family_for_config, full_state_dict_to_hf
from redi_megatron.errors import UserError
from redi_megatron.models.checkpoint import (
    TOKENIZER_SUBDIR,
    check_output_dir,
    dtype_from_name,
    load_model_checkpoint,
    read_meta,
    read_model_config,
    tokenizer_files,
)
from redi_megatron.models.config import ModelConfig, ParallelConfig
from redi_megatron.outputs import discard, publish, staging_dir


def _side_file(ckpt: Path, name: str) -> Optional[dict[str, Any]]:
    path = ckpt / TOKENIZER_SUBDIR / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e


def _generation_config(source: Optional[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    if source:
        return {k: v for k, v in source.items() if k != "transformers_version"}
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if config.get(k) is not None}
    return {"_from_model_config": True, **ids}


def load_megatron_model(ckpt_dir: str | Path, dtype: Optional[torch.dtype] = None, *, trust_unverified: bool = False
                        ) -> tuple[torch.nn.Module, ModelConfig, dict[str, Any]]:
    """The checkpoint as one TP1/PP1 GPTModel (current process must be a single rank); its files are
    verified against its manifest first (``trust_unverified``: accept a checkpoint without one)."""
    from redi_megatron.models.builder import build_gpt_model

    cfg = read_model_config(ckpt_dir)
    meta = read_meta(ckpt_dir)
    model = build_gpt_model(cfg, ParallelConfig(), dtype=dtype or dtype_from_name(meta["dtype"]))
    load_model_checkpoint([model], ckpt_dir, trust_unverified=trust_unverified)
    return model.eval(), cfg, meta


def _exported(name: str) -> bool:
    """Whether an entry of an earlier export is one this tool writes (weights of any sharding, configs,
    tokenizer files); anything else in ``--out`` is the user's and survives ``--overwrite``."""
    return (name.endswith(".safetensors") or name == "model.safetensors.index.json"
            or name in ("config.json", "generation_config.json") or name.startswith(".")
            or name in _TOKENIZER_NAMES)


_TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


@torch.no_grad()
def export_megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path, *, dtype: Optional[str] = None,
                          max_shard_size: str = "5GB", overwrite: bool = False, progress: bool = True,
                          allow_nonfinite: bool = False, trust_unverified: bool = False) -> Path:
    """Write the HF directory for a checkpoint. Needs a single-rank Megatron parallel state.

    Refuses weights holding NaN or inf (a diverged run) unless ``allow_nonfinite``."""
    from tqdm import tqdm

    ckpt = Path(megatron_dir)
    family = family_for_config(read_model_config(ckpt))  # fail early on a family with no table
    out = check_output_dir(out_dir, overwrite, inputs=[ckpt])
    max_bytes = parse_size(max_shard_size)
    model, cfg, meta = load_megatron_model(ckpt, trust_unverified=trust_unverified)
    if not allow_nonfinite:
        check_finite_weights(model, ckpt)
    out_dtype = dtype_from_name(dtype, "--dtype") if dtype else dtype_from_name(meta["dtype"])
    plan = [(name, shape, out_dtype) for name, shape in expected_hf_tensors(family, cfg).items()]
    tmp = staging_dir(out)
    writer = StreamingSafetensorsWriter(tmp, plan, max_bytes)
    try:
        params = {name: p.detach() for name, p in model.named_parameters()}  # TP1/PP1: full names
        for name, tensor in tqdm(full_state_dict_to_hf(params, cfg), total=len(plan), desc="megatron->hf",
                                 unit="tensor", disable=not progress):
            writer.write(name, tensor.to(out_dtype))
        writer.close()
        config = hf_config_for_export(cfg, out_dtype, _side_file(ckpt, "config.json"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = _generation_config(_side_file(ckpt, "generation_config.json"), config)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for f in tokenizer_files(ckpt / TOKENIZER_SUBDIR):
            shutil.copy2(f, tmp / f.name)
        publish(tmp, out, ours=_exported)  # a user's README.md / eval_results/ in an old export are kept
    except BaseException:
        writer.abort()
        discard(tmp)
        raise
    return out


def resolve_checkpoint(path: str) -> str:
    """``path`` itself, or the newest complete checkpoint when ``path`` is a run directory."""
    from redi_megatron.training.components import resolve_init_checkpoint

    resolved = resolve_init_checkpoint(path, what="--megatron")
    if resolved != path:
        print(f"redi-megatron-to-hf: exporting {resolved} (the newest checkpoint of {path})")
    return resolved


def check_finite_weights(model: torch.nn.Module, where: str | Path) -> None:
    """ValueError naming the first parameters with NaN or inf values."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise UserError(f"{where}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {', '.join(bad[:3])}): the "
                         "run diverged; export an earlier checkpoint, or pass --allow-nonfinite to export anyway")


build_parser = megatron_to_hf_parser  # the command line lives in convert/cli.py (parsed before torch is imported)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The tool's work, on parsed arguments (``convert.cli.megatron_to_hf`` parses them first)."""
    force_cpu()

    def body() -> int:
        args.megatron = resolve_checkpoint(args.megatron)
        read_meta(args.megatron)
        family_for_config(read_model_config(args.megatron))
        check_output_dir(args.out, args.overwrite, inputs=[args.megatron])
        if args.dtype:
            dtype_from_name(args.dtype, "--dtype")
        parse_size(args.max_shard_size)
        with parallel_context():
            out = export_megatron_to_hf(args.megatron, args.out, dtype=args.dtype,
                                        max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                        progress=not args.no_progress, allow_nonfinite=args.allow_nonfinite,
                                        trust_unverified=args.trust_unverified)
        print(f"wrote {out}")
        return 0

    return run_cli("redi-megatron-to-hf", body)

