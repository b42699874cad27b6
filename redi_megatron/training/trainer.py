"""The training loop: SFT, REDI, DPO or SimPO on Megatron-Core, from one CPU process to many GPUs.

The loss is looked up in the registry; nothing here branches on which loss it is, beyond asking the
spec whether it needs pairs or offline reference log-probs.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

from redi_megatron.config.schema import RunConfig
from redi_megatron.errors import SharedError, UserError
from redi_megatron.parallel.state import ParallelGroups
from redi_megatron.training import checkpointing as ckpt
from redi_megatron.training.components import (
    Components,
    build_data,
    build_model_and_optimizer,
    resolve_init_checkpoint,
    resolve_tokenizer_dir,
    total_steps,
    validate,
    with_model,
)
from redi_megatron.training.preflight import check_data_kind, check_tokenizer_fits


def _init_groups(cfg: RunConfig):
    """Use the process groups the caller set up (tests), or create them from torchrun's env."""
    from megatron.core import parallel_state as ps

    from redi_megatron.parallel.state import groups, init_parallel

    if ps.model_parallel_is_initialized():
        p = cfg.parallel
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_context_parallel_world_size())
        if have != (p.tp, p.pp, p.cp):
            raise UserError(f"process groups are tp/pp/cp={have}, config asks for {(p.tp, p.pp, p.cp)}")
        return groups()
    p = cfg.parallel
    return init_parallel(tp=p.tp, pp=p.pp, cp=p.cp, vpp=p.vpp, seed=cfg.train.seed, timeout_s=p.timeout_s)


def _lock_run_dir(save_dir: str, stack: contextlib.ExitStack) -> None:
    """Rank 0 holds the run directory's lock for the whole run; every rank is refused (one line, exit 2)
    when another run (or a requeued job overlapping the old one) holds it. flock: a crash frees it."""
    from redi_megatron.locks import exclusive, lock_path_for
    from redi_megatron.parallel.collectives import broadcast_object, is_global_rank_zero

    refused = None
    if is_global_rank_zero():
        try:
            stack.enter_context(exclusive(lock_path_for(os.path.abspath(save_dir)), f"run directory {save_dir}"))
        except UserError as err:
            refused = str(err)
    refused = broadcast_object(refused)
    if refused:
        raise SharedError(refused)


def setup(cfg: RunConfig, stack: Optional[contextlib.ExitStack] = None) -> tuple[Components, Optional[dict]]:
    """Everything for the run, restored from the newest checkpoint in ``save_dir`` when resuming.
    ``stack``: holds the run directory's lock (taken before anything in ``save_dir`` is read)."""
    from redi_megatron.models.checkpoint import load_model_checkpoint
    from redi_megatron.parallel.collectives import world_size

    model_cfg, spec, hparams = validate(cfg, world_size())
    tokenizer_dir = resolve_tokenizer_dir(cfg)
    check_data_kind(cfg)  # these two are also run by redi-train before Megatron is imported
    check_tokenizer_fits(cfg, model_cfg, tokenizer_dir)
    grps = _init_groups(cfg)
    if stack is not None:
        _lock_run_dir(cfg.checkpoint.save_dir, stack)
    ckpt.ensure_run_dir(cfg.checkpoint.save_dir)
    dataset, sampler = build_data(cfg, spec, tokenizer_dir, grps)
    steps = total_steps(cfg, sampler.steps_per_epoch)
    chunks, optimizer, scheduler, use_te = build_model_and_optimizer(cfg, model_cfg, steps)
    c = Components(cfg=cfg, groups=grps, model_cfg=model_cfg, loss_spec=spec, loss_hparams=hparams,
                   chunks=chunks, optimizer=optimizer, scheduler=scheduler, dataset=dataset,
                   sampler=sampler, tokenizer_dir=tokenizer_dir, total_steps=steps, use_te=use_te)
    resume_from = ckpt.find_resume_point(cfg.checkpoint.save_dir, cfg.checkpoint.resume,
                                         cfg.checkpoint.on_corrupt, cfg.checkpoint.trust_unverified)
    state = None
    if resume_from is not None:
        _announce_resume(cfg, model_cfg, resume_from)
        state = ckpt.load_training_checkpoint(c, resume_from)
    elif cfg.checkpoint.init_from:
        load_model_checkpoint(chunks, resolve_init_checkpoint(cfg.checkpoint.init_from),
                              trust_unverified=cfg.checkpoint.trust_unverified)
    else:
        from redi_megatron.models.init import init_by_name

        init_by_name(chunks, model_cfg, cfg.train.seed, ParallelGroups.rank(grps.tp), ParallelGroups.size(grps.tp))
    if state is None:
        # bf16: the optimizer made its fp32 main copies of the weights when it was built, before the
        # weights above were loaded; without this its first step would write Megatron's random init back.
        optimizer.reload_model_params()
    if spec.needs_reference and not dataset.has_ref_logps:
        _attach_reference(c)
    if state is not None:
        c.sampler.load_state_dict(state["sampler"])
    return c, state


def _announce_resume(cfg: RunConfig, model_cfg, path) -> None:
    """Say what is resumed, and apply or refuse (naming the key) every setting changed since."""
    from redi_megatron.config.loader import to_dict
    from redi_megatron.models.checkpoint import read_meta
    from redi_megatron.parallel.collectives import is_global_rank_zero
    from redi_megatron.training.resume import check_resume_config

    try:
        applied = check_resume_config(read_meta(path).get("run_config", {}), to_dict(with_model(cfg, model_cfg)),
                                      str(path))
    except UserError as err:  # the same config and checkpoint on every rank: redi-train says it once
        raise SharedError(str(err)) from None
    if is_global_rank_zero():
        print(f"redi-train: resuming from {path.name} ({path})", flush=True)
        for line in applied:
            print(f"redi-train: applying a changed setting: {line}", flush=True)


def _attach_reference(c: Components) -> None:
    """Compute (or read back) DPO's reference log-probs, then re-make the sampler to carry them."""
    from redi_megatron.data import PackedStepSampler
    from redi_megatron.training.reference import reference_logps

    c.dataset.ref_logps = reference_logps(c, c.sampler)
    old = c.sampler
    c.sampler = PackedStepSampler(c.dataset, old.cfg, old.dp_rank, old.dp_size, pad_id=old.pad_id)


def train(cfg: RunConfig, stop_after: Optional[int] = None) -> dict[str, Any]:
    """Run (or resume) the configured job. ``stop_after`` ends it early after that step's checkpoint,
    as if the job had been killed there (used by the resume tests). Returns a summary; ``preempted``
    is the step saved after a stop signal (training/preemption.py), else None."""
    from redi_megatron.training.preemption import Preemption

    preempt = Preemption(cfg.train.preempt_signals)
    with contextlib.ExitStack() as stack:
        preempt.install()
        stack.callback(preempt.restore)
        return _train(cfg, stop_after, stack, preempt)


def _train(cfg: RunConfig, stop_after: Optional[int], stack: contextlib.ExitStack, preempt) -> dict[str, Any]:
    from redi_megatron.config.loader import save_resolved, to_dict
    from redi_megatron.parallel.collectives import any_over_world, is_global_rank_zero
    from redi_megatron.training.collapse import CollapseMonitor
    from redi_megatron.training.logging import MetricsLogger
    from redi_megatron.training.preemption import write_marker
    from redi_megatron.training.step import train_step

    c, state = setup(cfg, stack)
    start = state["step"] if state else 0
    resolved = with_model(cfg, c.model_cfg)
    if is_global_rank_zero():
        save_resolved(resolved, os.path.join(cfg.checkpoint.save_dir, "config.yaml"))
    resolved_dict = to_dict(resolved)
    logger = MetricsLogger(cfg.logging, cfg.checkpoint.save_dir, total_steps=c.total_steps,
                           start_step=start, run_name=cfg.name, config=resolved_dict,
                           enabled=is_global_rank_zero())
    monitor = CollapseMonitor(cfg.logging.collapse)
    if state and state.get("collapse_monitor"):
        monitor.load_state_dict(state["collapse_monitor"])
    history, saved_at, stopped, nonfinite, preempted = [], None, None, None, None
    skipped_in_a_row = 0
    try:
        for step in range(start + 1, c.total_steps + 1):
            # Checked between steps, so the step in flight when the signal came is finished and saved;
            # every rank stops at the same step even if only one got the signal.
            if any_over_world(preempt.requested()):
                preempt.ignore()  # a second signal must not interrupt the save
                done = step - 1
                if saved_at != done and done > start:
                    ckpt.save_training_checkpoint(c, done, c.sampler.state_dict(), resolved_dict,
                                                  monitor.state_dict())
                    saved_at = done
                last = ckpt.latest_checkpoint(cfg.checkpoint.save_dir)
                if is_global_rank_zero():
                    write_marker(cfg.checkpoint.save_dir, done, preempt.received, str(last))
                logger.message(f"preempted ({preempt.received or 'signal on another rank'}): saved step "
                               f"{done}, exiting 75 for a requeue")
                preempted = done
                break
            metrics = train_step(c, c.sampler.next_step())
            history.append(metrics)
            # The step's own time, so checkpoint saves and the reference pass do not count as training.
            logger.log_step(step, metrics, tokens=int(metrics["tokens"]), step_time=metrics["step_seconds"])
            verdict = monitor.update(step, metrics)
            if verdict.action != "none":
                logger.message(verdict.message)
            if metrics["nonfinite"]:
                skipped_in_a_row += 1
                nonfinite = _nonfinite_message(cfg, step, metrics, skipped_in_a_row,
                                               ckpt.latest_checkpoint(cfg.checkpoint.save_dir))
                logger.message(nonfinite)
                if cfg.train.on_nonfinite == "stop" or skipped_in_a_row >= cfg.train.max_skipped_steps:
                    break
                continue  # skip: the update was not applied and nothing is saved for this step
            skipped_in_a_row, nonfinite = 0, None
            interval = cfg.checkpoint.save_interval
            if verdict.action == "stop" or step == c.total_steps or (interval and step % interval == 0) \
                    or step == stop_after:
                ckpt.save_training_checkpoint(c, step, c.sampler.state_dict(), resolved_dict,
                                              monitor.state_dict())
                saved_at = step
            if verdict.action == "stop":
                stopped = verdict.message
                break
            if step == stop_after:
                break
    finally:
        logger.close()
    last = ckpt.latest_checkpoint(cfg.checkpoint.save_dir) if saved_at is None else \
        ckpt.step_dir(cfg.checkpoint.save_dir, saved_at)
    return {"start_step": start, "last_step": start + len(history), "total_steps": c.total_steps,
            "history": history, "last_checkpoint": None if last is None else str(last), "stopped": stopped,
            "preempted": preempted,
            "nonfinite": nonfinite if cfg.train.on_nonfinite == "stop" or
            skipped_in_a_row >= cfg.train.max_skipped_steps else None}


def _nonfinite_message(cfg: RunConfig, step: int, metrics: dict, in_a_row: int, last_good: Optional[Any]) -> str:
    what = f"step {step}: loss {metrics['loss']}, grad norm {metrics['grad_norm']}"
    if cfg.train.on_nonfinite == "skip" and in_a_row < cfg.train.max_skipped_steps:
        return (f"{what}: non-finite, update skipped ({in_a_row} in a row; the run stops at "
                f"train.max_skipped_steps={cfg.train.max_skipped_steps})")
    kept = f"the last checkpoint, {last_good}, is finite" if last_good else "there is no checkpoint yet"
    return (f"{what}: non-finite, update not applied; stopping. Nothing of this step was saved and {kept} "
            "(lower optimizer.lr, or train.on_nonfinite=skip for rare spikes)")
