"""redi-megatron: Reinforcement Distillation (REDI) on Megatron-Core."""

__version__ = "0.1.0"
