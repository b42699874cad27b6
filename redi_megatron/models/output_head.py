"""The last stage can return its final hidden states instead of logits (``parallel.fused_logprobs`` then
computes log-probs without materialising ``[T, V/TP]`` logits).

The output layer module stays in place, so its weight (untied) keeps its name in checkpoints, the
optimizer and DDP; only its forward becomes the identity. The loss takes the weight from
:func:`output_weight`: the very Parameter Megatron's own output layer would have used (the embedding
when tied, which Megatron's ``finalize_model_grads`` all-reduces between the first and last stage).
"""
from __future__ import annotations

from typing import Optional

import torch


def return_hidden_states(gpt: torch.nn.Module) -> None:
    """Make ``gpt`` (a GPTModel on the last pipeline stage) return ``[B, S_local, H]`` hidden states."""
    if not getattr(gpt, "post_process", False):
        return

    def identity(hidden_states, weight=None, runtime_gather_output=None):
        return hidden_states, None

    gpt.output_layer.forward = identity
    gpt.returns_hidden_states = True


def returns_hidden_states(model: torch.nn.Module) -> bool:
    """Whether ``model`` (a GPTModel or its DDP wrapper) returns hidden states instead of logits."""
    return bool(getattr(getattr(model, "module", model), "returns_hidden_states", False))


def output_weight(model: torch.nn.Module) -> Optional[torch.Tensor]:
    """The output projection ``[V_padded/TP, H]`` Megatron's output layer uses (None off the last stage)."""
    gpt = getattr(model, "module", model)
    if not getattr(gpt, "post_process", False):
        return None
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight
