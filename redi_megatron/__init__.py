"""redi-megatron: Reinforcement Distillation (REDI) on Megatron-Core."""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core warns once per module (four times per tool start) that TE/apex are missing; on CPU that is
# expected, and on GPU the trainer reports what it uses (the TE spec, or a clear error for FP8 without TE).
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed"):
    _warnings.filterwarnings("ignore", message=_message, category=UserWarning)
