"""Build what a run needs from its config: groups, model chunks, optimizer, schedule, data."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Optional

import torch

from redi_megatron.config.schema import RunConfig
from redi_megatron.data.template_record import check_data_template
from redi_megatron.data.templates import get_template
from redi_megatron.errors import UserError
from redi_megatron.losses.registry import LossSpec, get_loss
from redi_megatron.models.config import ModelConfig
from redi_megatron.parallel.state import ParallelGroups

if TYPE_CHECKING:  # heavy imports, for the annotations only
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from redi_megatron.data.sampler import PackableDataset, PackedStepSampler

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Components:
    """Everything one rank of a run holds: built by ``trainer.setup`` from the resolved config."""

    cfg: RunConfig
    groups: ParallelGroups
    model_cfg: ModelConfig
    loss_spec: LossSpec
    loss_hparams: Any                  # the loss's own hyper-parameter dataclass (loss_spec.config_cls)
    chunks: "list[DistributedDataParallel]"  # one per virtual pipeline stage
    optimizer: "MegatronOptimizer"
    scheduler: "OptimizerParamScheduler"
    dataset: "PackableDataset"
    sampler: "PackedStepSampler"
    tokenizer_dir: Optional[str]
    total_steps: int
    use_te: bool


def resolve_init_checkpoint(path: str, what: str = "checkpoint.init_from") -> str:
    """``checkpoint.init_from`` as a model checkpoint directory: a checkpoint itself, or a run directory
    (the previous stage's ``save_dir``), which means its newest complete checkpoint. ``what`` names the
    setting in errors (``--megatron`` for the converter)."""
    from redi_megatron.training.checkpointing import checkpoints_dir, latest_checkpoint

    if not os.path.isdir(path):
        raise UserError(f"{what}: {path!r} is not a directory")
    if os.path.isfile(os.path.join(path, "model_config.json")):
        return path
    if checkpoints_dir(path).is_dir():
        newest = latest_checkpoint(path)
        if newest is None:
            raise UserError(f"{what}: run directory {path!r} has no complete checkpoint")
        return str(newest)
    hf = (" (it is an HF model directory: convert it with redi-hf-to-megatron first)"
          if os.path.isfile(os.path.join(path, "config.json")) else "")
    raise UserError(f"{what}: {path!r} is neither a model checkpoint (model_config.json) "
                    f"nor a run directory (checkpoints/){hf}")


def resolve_model_config(cfg: RunConfig) -> ModelConfig:
    """The architecture: from ``checkpoint.init_from`` when given (the checkpoint decides), else ``model``."""
    if not cfg.checkpoint.init_from:
        return cfg.model
    from redi_megatron.models.checkpoint import read_model_config

    return read_model_config(resolve_init_checkpoint(cfg.checkpoint.init_from))


def resolve_tokenizer_dir(cfg: RunConfig) -> str:
    if cfg.data.tokenizer:
        path = cfg.data.tokenizer
    elif cfg.checkpoint.init_from:
        path = os.path.join(resolve_init_checkpoint(cfg.checkpoint.init_from), "tokenizer")
    else:
        raise UserError("data.tokenizer is empty and checkpoint.init_from has no tokenizer/: set one")
    if not os.path.isdir(path):
        raise UserError(f"tokenizer directory {path!r} does not exist (data.tokenizer or "
                         f"checkpoint.init_from/tokenizer)")
    return path


def validate_data_and_loss(cfg: RunConfig) -> tuple[LossSpec, Any]:
    """The data path exists and was curated with ``data.chat_template``; the loss and its parameters
    are known. Shared by ``validate`` and ``redi-tokenize`` (which needs no model)."""
    if not cfg.data.train_path:
        raise UserError("data.train_path is required")
    if not os.path.exists(cfg.data.train_path):
        raise UserError(f"data.train_path: {cfg.data.train_path!r} does not exist")
    check_data_template(cfg.data.train_path, cfg.data.chat_template)
    spec = get_loss(cfg.loss.name)
    return spec, spec.make_hparams(cfg.loss.params)


def validate(cfg: RunConfig, world_size: int) -> tuple[ModelConfig, LossSpec, Any]:
    """Fail fast, before any process group or model exists, on config errors the schema's types cannot
    express (the loader has already checked every type and enumerated value)."""
    spec, hparams = validate_data_and_loss(cfg)
    model_cfg = resolve_model_config(cfg)
    cfg.parallel.validate(world_size, model_cfg)
    if cfg.train.fp8:
        cfg.train.fp8_options.validate(model_cfg.num_layers, cfg.parallel.pp)
    if cfg.data.micro_batch_tokens % sequence_multiple(cfg):
        raise UserError(f"data.micro_batch_tokens={cfg.data.micro_batch_tokens} must be a multiple of "
                         f"{sequence_multiple(cfg)} (2*CP, times TP with sequence parallelism; with FP8 16 per rank)")
    return model_cfg, spec, hparams


def sequence_multiple(cfg: RunConfig) -> int:
    """Every packed sequence is padded to a multiple of this (``ParallelConfig.seq_multiple``: the CP
    split, the SP scatter, and 16 tokens per rank's GEMM under FP8)."""
    return cfg.parallel.seq_multiple(fp8=bool(cfg.train.fp8))


def build_data(cfg: RunConfig, spec: LossSpec, tokenizer_dir: str, groups: ParallelGroups):
    from redi_megatron.data import (
        PackedStepSampler,
        PackingConfig,
        build_pair_dataset,
        build_sft_dataset,
        load_tokenizer,
    )
    from redi_megatron.data.lengths import same_lengths, stored_lengths, tokenized_lengths
    from redi_megatron.parallel.collectives import is_global_rank_zero

    template = get_template(cfg.data.chat_template)
    tokenizer = load_tokenizer(tokenizer_dir, template)
    pairs = dataset_kind(spec) == "pair"
    build = partial(build_pair_dataset if pairs else build_sft_dataset, template=template)
    rank0 = is_global_rank_zero()
    # Lengths are checked from curation's stored counts BEFORE tokenizing: a run over the limits is
    # refused in seconds, not after an hour of tokenization (issue 21). Every rank reads them (cheap).
    stored, why = stored_lengths(cfg.data.train_path, "pair" if pairs else "sft", template, tokenizer)
    if stored is not None:
        apply_overlong(stored, cfg, rank0, announce=False)
    elif rank0:
        print(f"length check waits for the tokenized lengths: {why}", flush=True)
    # Rank 0 tokenizes and publishes the on-disk cache (atomic rename); the other ranks wait for it by
    # polling the file system, NOT in a barrier: a collective has a timeout (600 s), and tokenizing a
    # paper-scale set alone takes longer, which killed the run (issue 21).
    cache = data_cache_dir(cfg, announce=rank0)
    dataset = build(cfg.data.train_path, tokenizer, cache_dir=cache, num_proc=cfg.data.num_proc,
                    progress=rank0, wait=not rank0)
    packing = PackingConfig(
        global_batch_size=cfg.data.global_batch_size, micro_batch_tokens=cfg.data.micro_batch_tokens,
        pad_to_multiple_of=sequence_multiple(cfg),
        # The interleaved (VPP) schedule exchanges no shapes, so every microbatch of a step has one
        # length, and it needs a microbatch count that is a multiple of PP: ranks get empty
        # (zero-loss) microbatches up to that.
        row_shape="step" if cfg.parallel.vpp is not None else "trim",
        microbatch_multiple=cfg.parallel.pp if cfg.parallel.vpp is not None else 1,
        seed=cfg.data.seed)
    # The tokenized lengths decide (the stored counts were only the early check).
    lengths = tokenized_lengths(dataset)
    if stored is not None and rank0 and not same_lengths(stored, lengths):
        print(f"warning: the token counts stored by redi-curate ({why}) differ from the tokenized lengths; "
              "the tokenized ones are used", flush=True)
    keep = apply_overlong(lengths, cfg, rank0, announce=True)
    if keep is not None:
        dataset = dataset.select(keep)
    check_lengths(dataset, cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampler = PackedStepSampler(dataset, packing, ParallelGroups.rank(groups.dp),
                                ParallelGroups.size(groups.dp), pad_id=pad_id)
    return dataset, sampler


def data_cache_dir(cfg: RunConfig, announce: bool = True) -> str:
    """The tokenized cache root of a run (``data.cache_dir``; "" = ``$REDI_DATA_CACHE``, else beside the
    curated data, else ``<save_dir>/cache/tokenized``): one cache per curated directory, shared by SFT,
    REDI, DPO, SimPO and ``redi-tokenize``."""
    from redi_megatron.data.tokenized import shared_cache_dir

    return shared_cache_dir(cfg.data.cache_dir, cfg.data.train_path,
                            os.path.join(cfg.checkpoint.save_dir, "cache", "tokenized"), announce)


def dataset_kind(spec: LossSpec) -> str:
    """The tokenized dataset a loss trains on: ``"pair"`` (chosen/rejected) or ``"sft"``."""
    return "pair" if spec.normalizer == "pairs" else "sft"


def apply_overlong(lengths, cfg: RunConfig, rank0: bool, announce: bool):
    """``data.overlong`` on ``lengths``: raises (``"error"``) or returns the sample ids to keep (``"drop"``;
    None = all), printing the drop on rank 0 when ``announce``."""
    from redi_megatron.data.lengths import select_within_limits

    d = cfg.data
    keep, line = select_within_limits(d.train_path, lengths, d.max_prompt_tokens, d.max_completion_tokens,
                                      d.overlong)
    if line and announce and rank0:
        print(line, flush=True)
    return keep


def check_lengths(dataset, cfg: RunConfig) -> None:
    """``data.max_prompt_tokens`` / ``max_completion_tokens`` are limits the trained samples must respect
    (training never truncates): a violation is an error naming the samples."""
    from redi_megatron.data.lengths import select_within_limits, tokenized_lengths

    d = cfg.data
    select_within_limits(d.train_path, tokenized_lengths(dataset), d.max_prompt_tokens, d.max_completion_tokens,
                         "error")


def total_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    steps = math.ceil(cfg.train.epochs * steps_per_epoch)
    if cfg.train.max_steps is not None:
        steps = min(steps, cfg.train.max_steps)
    if steps < 1:
        raise UserError(f"the run has no steps (train.epochs={cfg.train.epochs}, "
                         f"{steps_per_epoch} steps per epoch, train.max_steps={cfg.train.max_steps})")
    return steps


def build_model_and_optimizer(cfg: RunConfig, model_cfg: ModelConfig, steps: int):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from redi_megatron.models.builder import build_model_chunks
    from redi_megatron.models.layer_specs import have_transformer_engine
    from redi_megatron.models.output_head import return_hidden_states
    from redi_megatron.parallel.loss_scaling import validate_megatron_config

    torch.manual_seed(cfg.train.seed)
    dtype = DTYPES[cfg.train.dtype]
    use_te = torch.cuda.is_available() and have_transformer_engine()
    chunks = build_model_chunks(model_cfg, cfg.parallel, dtype=dtype, use_te=use_te,
                                recompute=cfg.train.recompute, fp8=cfg.train.fp8,
                                fp8_options=cfg.train.fp8_options)
    if cfg.train.fused_logprobs:
        for chunk in chunks:
            return_hidden_states(chunk)
    validate_megatron_config(chunks[0].config)
    o = cfg.optimizer
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                            use_distributed_optimizer=o.use_distributed_optimizer)
    wrapped = [DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c) for c in chunks]
    for chunk in wrapped:
        chunk.broadcast_params()
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16, params_dtype=dtype,
        use_distributed_optimizer=o.use_distributed_optimizer), wrapped)
    warmup = warmup_steps(o.warmup_ratio, steps)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else o.lr, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(steps, warmup + 1), lr_decay_style=o.decay, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=steps, wd_incr_style="constant")
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped, optimizer, scheduler, use_te


def warmup_steps(ratio: float, steps: int) -> int:
    """Warmup steps as HF's ``get_warmup_steps`` (the authors' stack) counts them: ``ceil(ratio * steps)``
    (1662 steps at 0.1 -> 167). The product is rounded first so 0.1 * 1660 = 166.00000000000003 stays 166."""
    return math.ceil(round(ratio * steps, 9))


def with_model(cfg: RunConfig, model_cfg: ModelConfig) -> RunConfig:
    """The config as resolved (architecture from the checkpoint), for saving next to checkpoints."""
    return replace(cfg, model=model_cfg)
