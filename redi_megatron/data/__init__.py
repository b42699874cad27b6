"""Data: OpenR1 curation (``redi-curate``), chat templates, tokenized datasets and packed Megatron batches.

Names are imported lazily so that ``redi_megatron.data.templates`` (used by evaluation) does not pull in
torch or datasets.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ROLE_SFT": "batch", "ROLE_CHOSEN": "batch", "ROLE_REJECTED": "batch", "Microbatch": "batch",
    "StepBatch": "batch", "SequenceSpec": "batch", "build_microbatch": "batch",
    "PackingConfig": "sampler", "PackedStepSampler": "sampler", "StepPlan": "sampler",
    "TokenizedDataset": "tokenized", "build_sft_dataset": "tokenized", "build_pair_dataset": "tokenized",
    "TemplateConfig": "templates", "QWEN_MATH_SYSTEM_PROMPT": "templates", "render_prompt": "templates",
    "render_eval_prompt": "templates", "render_completion": "templates", "encode_prompt": "templates",
    "encode_completion": "templates", "load_tokenizer": "templates", "qwen_tokenizer_dir": "templates",
    "TEMPLATES": "templates", "get_template": "templates", "check_data_template": "template_record",
    "CurationConfig": "curate", "curate": "curate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
