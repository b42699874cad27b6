"""RoPE inverse frequencies for the rope types we support, computed as Hugging Face computes them.

Megatron's ``RotaryEmbedding`` knows only Llama 3's scaling with its constants hard-wired (low 1, high 4,
original context 8192); Llama 3.x checkpoints carry their own values, so we compute the frequencies
from the model config and install them on the built model.
"""
from __future__ import annotations

import math

import torch

from redi_megatron.models.config import ModelConfig


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """``[dim // 2]`` float32 inverse frequencies ``theta ** (-2i / dim)``."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1 scaling of ``[dim // 2]`` frequencies: long wavelengths divided by ``factor``, short ones
    kept, the band between interpolated (transformers' ``_compute_llama3_parameters``)."""
    old = original_max_position_embeddings
    low_wavelen, high_wavelen = old / low_freq_factor, old / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def inv_freq_for(cfg: ModelConfig) -> torch.Tensor:
    """The model's ``[head_dim // 2]`` inverse frequencies."""
    inv = default_inv_freq(cfg.rope_theta, cfg.head_dim)
    if cfg.rope_type == "llama3":
        inv = llama3_inv_freq(inv, cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                              cfg.rope_original_max_position_embeddings)
    return inv


def install_rope(gpt: torch.nn.Module, cfg: ModelConfig) -> None:
    """Replace the GPTModel's rotary frequencies by the config's (no-op for the default type)."""
    if cfg.rope_type == "default":
        return
    rotary = gpt.rotary_pos_emb
    rotary.inv_freq = inv_freq_for(cfg).to(rotary.inv_freq.device)
    cache_clear = getattr(rotary.forward, "cache_clear", None)  # Megatron caches the cos/sin table
    if cache_clear is not None:
        cache_clear()
