"""Build Megatron-Core GPT models (Qwen2 / Qwen3 / Llama) for the current rank's pipeline stage(s)."""
from __future__ import annotations

from typing import Optional

import torch

from redi_megatron.compat import cpu as cpu_compat
from redi_megatron.models.config import FP8Options, ModelConfig, ParallelConfig, transformer_config
from redi_megatron.models.layer_specs import block_spec, have_transformer_engine, require_transformer_engine
from redi_megatron.models.rope import install_rope


def build_gpt_model(model: ModelConfig, parallel: ParallelConfig, *, dtype: torch.dtype = torch.float32,
                    vp_stage: Optional[int] = None, use_te: Optional[bool] = None,
                    recompute: Optional[str] = None, fp8: Optional[str] = None,
                    fp8_options: Optional[FP8Options] = None):
    """One GPTModel chunk for this rank (``vp_stage`` selects the virtual stage under VPP).

    ``use_te=None`` picks Transformer Engine when CUDA and TE are both present, the local CPU spec
    otherwise. Returns logits ``[B, S//CP, V_padded//TP]`` on the last stage when called without labels.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    on_gpu = cpu_compat.cuda_available()
    if use_te is None:
        use_te = on_gpu and have_transformer_engine()
    if use_te or fp8:
        require_transformer_engine("fp8 training" if fp8 else "the Transformer Engine layer spec")
    config = transformer_config(model, parallel, dtype=dtype, on_gpu=on_gpu, recompute=recompute, fp8=fp8,
                                use_te=use_te, fp8_options=fp8_options)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, use_te, vp_stage),
        vocab_size=model.padded_vocab_size(parallel.tp),
        max_sequence_length=model.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rope_theta) if float(model.rope_theta).is_integer() else model.rope_theta,
        vp_stage=vp_stage,
    )
    install_rope(gpt, model)
    return gpt.cuda() if on_gpu else gpt


def build_model_chunks(model: ModelConfig, parallel: ParallelConfig, **kwargs) -> list:
    """All model chunks this rank holds: one, or ``vpp`` under virtual pipelining."""
    if parallel.vpp is None:
        return [build_gpt_model(model, parallel, **kwargs)]
    return [build_gpt_model(model, parallel, vp_stage=i, **kwargs) for i in range(parallel.vpp)]
