"""One optimizer step through Megatron's pipeline schedule, and forward-only passes."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Optional

import torch

from redi_megatron.data.batch import Microbatch, StepBatch
from redi_megatron.models.inputs import model_inputs
from redi_megatron.models.output_head import output_weight, returns_hidden_states
from redi_megatron.parallel.collectives import sum_over
from redi_megatron.parallel.loss_scaling import OutputHead, make_loss_func, reduce_step_metrics
from redi_megatron.parallel.state import ParallelGroups

if TYPE_CHECKING:
    from redi_megatron.training.components import Components


def output_head(model: torch.nn.Module) -> Optional[OutputHead]:
    """The fused output layer's weight when ``model`` returns hidden states, else None (logits)."""
    if not returns_hidden_states(model):
        return None
    gpt = getattr(model, "module", model)
    return OutputHead(output_weight(gpt), sequence_parallel=gpt.config.sequence_parallel)


def model_device(chunks: list) -> torch.device:
    """Where the model's parameters live (the device every microbatch is moved to)."""
    return next(chunks[0].parameters()).device


def run_schedule(chunks: list, microbatches: list[Microbatch], groups: ParallelGroups,
                 make_func: Callable[[Microbatch, Optional[OutputHead]], Callable], forward_only: bool
                 ) -> list[dict]:
    """Run ``microbatches`` through ``get_forward_backward_func``; returns the last stage's metrics list.

    Each microbatch goes to the model's device once, here (pinned, non-blocking on CUDA), before the
    model and its ``loss_func`` see it. ``make_func(mb, head)`` builds the microbatch's Megatron
    ``loss_func`` (validated before the forward); ``head`` is set when the model chunk returns hidden
    states (the fused output layer) and None when it returns logits.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = model_device(chunks)

    def forward_step(data_iterator, model):
        mb = next(data_iterator).to(device, non_blocking=True)
        loss_func = make_func(mb, output_head(model))
        return model(**model_inputs(mb, groups)), loss_func

    if not microbatches:
        return []
    iters = [iter(microbatches) for _ in chunks]
    # THD rows: micro_batch_size is 1 and seq_length the packed row length T. The schedules divide it by
    # CP (and by TP under sequence parallelism) themselves; with variable_seq_lengths (no VPP) they
    # exchange each microbatch's real shape instead, and under VPP the sampler makes every row of the
    # step T tokens long.
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters if len(iters) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(microbatches),
        seq_length=max(mb.tokens.shape[1] for mb in microbatches), micro_batch_size=1,
        forward_only=forward_only)


def forward_backward(c: "Components", batch: StepBatch) -> list[dict]:
    """Zero the gradients, then forward/backward over this rank's microbatches of one global batch.

    Afterwards every parameter's ``main_grad`` holds the gradient of the global-batch loss (Megatron's
    ``finalize_model_grads`` has reduced it over DP/CP and divided by the global normaliser). Returns
    the last stage's per-microbatch metrics.
    """
    for chunk in c.chunks:
        chunk.zero_grad_buffer()
    c.optimizer.zero_grad()
    vocab = c.model_cfg.vocab_size

    def make(mb, head):
        return make_loss_func(c.loss_spec, c.loss_hparams, mb, c.groups, vocab_size=vocab, head=head)

    for chunk in c.chunks:
        chunk.train()
    return run_schedule(c.chunks, batch.microbatches, c.groups, make, forward_only=False)


def train_step(c: "Components", batch: StepBatch) -> dict[str, float]:
    """:func:`forward_backward` over one global batch, then the optimizer step, if the step is finite.

    ``c`` is the run's ``Components``; ``batch`` its ``StepBatch``. The loss and the gradient norm are
    reduced first (identical on every rank); when either is NaN/inf the update is not applied (weights,
    optimizer state and lr schedule stay as they were) and ``nonfinite`` is 1. Returns logged scalars:
    the loss per normaliser and the loss's metrics, lr, grad norm (before clipping), tokens, seconds.
    """
    start = time.perf_counter()
    metrics = reduce_step_metrics(forward_backward(c, batch), c.groups)
    # Megatron's bf16/fp32 optimizers clip with whatever norm they get: a NaN norm would poison every
    # weight. So the norm is computed here first: prepare_grads() moves the reduced gradients into the
    # optimizer's main gradients (a copy; step() repeats it, which is idempotent without an fp16 loss
    # scaler), then one extra pass computes the norm that step() will clip with.
    c.optimizer.prepare_grads()
    grad_norm = float(c.optimizer.get_grad_norm())
    finite = math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
    ok = False
    if finite:
        ok, _, _ = c.optimizer.step()
        c.scheduler.step(increment=1)
    local_tokens = sum(int((mb.seq_ids >= 0).sum()) for mb in batch.microbatches)
    (tokens,) = sum_over(c.groups.dp, float(local_tokens))
    metrics.update(lr=c.optimizer.param_groups[0]["lr"], grad_norm=grad_norm, update_skipped=float(not ok),
                   nonfinite=float(not finite), tokens=tokens, step_seconds=time.perf_counter() - start)
    return metrics


@torch.no_grad()
def forward_only(c: "Components", microbatches: list[Microbatch],
                 make_func: Callable[[Microbatch, Optional[OutputHead]], Callable]) -> list[dict]:
    """Forward-only pass (e.g. DPO reference log-probs); returns the last stage's outputs."""
    for chunk in c.chunks:
        chunk.eval()
    return run_schedule(c.chunks, microbatches, c.groups, make_func, forward_only=True)
