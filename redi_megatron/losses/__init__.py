"""Training objectives (pure torch, no parallelism): SFT, REDI, DPO, SimPO and the loss registry."""
from redi_megatron.losses.dpo import DPOConfig, dpo_loss
from redi_megatron.losses.redi import RediConfig, redi_loss, redi_sequence_terms
from redi_megatron.losses.registry import (
                                           ROLE_CHOSEN,
                                           ROLE_REJECTED,
                                           ROLE_SFT,
                                           LossInputs,
                                           LossSpec,
                                           available_losses,
                                           get_loss,
                                           register_loss,
)
from redi_megatron.losses.sft import SFTConfig, sft_loss
from redi_megatron.losses.simpo import SimPOConfig, simpo_loss

__all__ = [
    "sft_loss", "redi_loss", "redi_sequence_terms", "dpo_loss", "simpo_loss",
    "SFTConfig", "RediConfig", "DPOConfig", "SimPOConfig",
    "LossSpec", "LossInputs", "register_loss", "get_loss", "available_losses",
    "ROLE_SFT", "ROLE_CHOSEN", "ROLE_REJECTED",
]
