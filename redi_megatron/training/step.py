"""One optimizer step through Megatron's pipeline schedule, and forward-only passes."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from redi_megatron.models.inputs import model_inputs
from redi_megatron.parallel.collectives import sum_over
from redi_megatron.parallel.loss_scaling import make_loss_func, reduce_step_metrics
from redi_megatron.parallel.state import ParallelGroups


def run_schedule(chunks: list, microbatches: list, groups: ParallelGroups, use_te: bool,
                 make_func: Callable[[Any], Callable], forward_only: bool) -> list:
    """Run ``microbatches`` through ``get_forward_backward_func``; returns the last stage's metrics list.

    ``make_func(mb)`` builds the microbatch's Megatron ``loss_func`` (validated before the forward).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        loss_func = make_func(mb)
        return model(**model_inputs(mb, groups, use_te)), loss_func

    if not microbatches:
        return []
    rows, seq = microbatches[0].tokens.shape
    iters = [iter(microbatches) for _ in chunks]
    cp = ParallelGroups.size(groups.cp)
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters if len(iters) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(microbatches),
        seq_length=seq // cp, micro_batch_size=rows, forward_only=forward_only)


def train_step(c, batch) -> dict[str, float]:
    """Forward/backward over this rank's microbatches of one global batch, then the optimizer step.

    ``c`` is the run's ``Components``; ``batch`` its ``StepBatch``. Returns logged scalars (identical on
    every rank): the loss per normaliser and the loss's metrics, lr, grad norm, tokens, seconds.
    """
    start = time.perf_counter()
    for chunk in c.chunks:
        chunk.zero_grad_buffer()
    c.optimizer.zero_grad()
    vocab = c.model_cfg.vocab_size

    def make(mb):
        return make_loss_func(c.loss_spec, c.loss_hparams, mb, c.groups, vocab_size=vocab)

    for chunk in c.chunks:
        chunk.train()
    metrics_list = run_schedule(c.chunks, batch.microbatches, c.groups, c.use_te, make, forward_only=False)
    ok, grad_norm, _ = c.optimizer.step()
    c.scheduler.step(increment=1)
    metrics = reduce_step_metrics(metrics_list, c.groups)
    local_tokens = sum(int((mb.seq_ids >= 0).sum()) for mb in batch.microbatches)
    (tokens,) = sum_over(c.groups.dp, float(local_tokens))
    metrics.update(lr=c.optimizer.param_groups[0]["lr"], grad_norm=float(grad_norm or 0.0),
                   update_skipped=float(not ok), tokens=tokens,
                   step_seconds=time.perf_counter() - start)
    return metrics


@torch.no_grad()
def forward_only(c, microbatches: list, make_func: Callable[[Any], Callable]) -> list:
    """Forward-only pass (e.g. DPO reference log-probs); returns the last stage's outputs."""
    for chunk in c.chunks:
        chunk.eval()
    return run_schedule(c.chunks, microbatches, c.groups, c.use_te, make_func, forward_only=True)
