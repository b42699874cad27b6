"""Checks of a run's inputs against each other, made before any process group, model or tokenized cache
exists: each failure is one line naming the keys involved (``UserError``, exit 2) instead of an error at
the first microbatch, minutes later (issue 24)."""
from __future__ import annotations

import os

from redi_megatron.config.schema import RunConfig
from redi_megatron.data.data_kind import PAIRS, data_kind
from redi_megatron.data.templates import tokenizer_id_bound
from redi_megatron.errors import UserError
from redi_megatron.models.config import ModelConfig


def preflight(cfg: RunConfig) -> None:
    """The cross checks below, from the config alone (no Megatron import, nothing written). ``redi-train``
    runs them before importing the trainer, and ``trainer.setup`` again for callers of ``train``."""
    from redi_megatron.training.components import resolve_model_config, resolve_tokenizer_dir

    if not (cfg.data.train_path and os.path.exists(cfg.data.train_path)):
        return  # components.validate names that, first thing in setup
    check_data_kind(cfg)
    check_tokenizer_fits(cfg, resolve_model_config(cfg), resolve_tokenizer_dir(cfg))


def check_tokenizer_fits(cfg: RunConfig, model_cfg: ModelConfig, tokenizer_dir: str) -> None:
    """Every id the tokenizer can produce must be a row of the model's vocabulary: a larger tokenizer
    (e.g. ``init_from`` a checkpoint with vocab 384 and a 512-token tokenizer) would put labels outside the
    vocabulary, which the loss only finds at the first microbatch."""
    ids = tokenizer_id_bound(tokenizer_dir)
    if ids is None or ids <= model_cfg.vocab_size:
        return
    tok_key = "data.tokenizer" if cfg.data.tokenizer else "checkpoint.init_from's tokenizer/"
    model_key = ("model_config.json of checkpoint.init_from" if cfg.checkpoint.init_from else "model.vocab_size")
    raise UserError(f"{tokenizer_dir}: the tokenizer ({tok_key}) has {ids} token ids but the model's vocabulary "
                    f"({model_key}) has {model_cfg.vocab_size} ({model_cfg.padded_vocab_size(cfg.parallel.tp)} "
                    f"rows padded); use the model's own tokenizer or a model with a vocabulary of at least {ids}")


def check_data_kind(cfg: RunConfig) -> None:
    """Pairs given to a per-sequence loss (SFT) or positives given to a pair loss (REDI, DPO, SimPO) fail
    only at tokenizing ("row 0: chosen is missing"); the columns tell before anything is read in full."""
    from redi_megatron.losses.registry import get_loss

    spec = get_loss(cfg.loss.name)
    wants = PAIRS if spec.normalizer == "pairs" else "positives"
    kind, where = data_kind(cfg.data.train_path)
    if kind is None or kind == wants:
        return
    what = {PAIRS: "preference pairs (chosen/rejected)", "positives": "positives (problem + completion)"}
    raise UserError(f"data.train_path={cfg.data.train_path!r} holds {what[kind]} ({where}) but loss.name="
                    f"{cfg.loss.name!r} trains on {what[wants]}: point data.train_path at the curated "
                    f"{wants} (redi-curate writes {PAIRS}/ and positives/ side by side) or change loss.name")
