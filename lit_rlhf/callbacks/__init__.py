"""Callbacks from the user's card: LoRA/4-bit loading, HF export (KL monitor and reward normalization join
with the RM and PPO stages)."""

from lit_rlhf.callbacks.export import HFExport
from lit_rlhf.callbacks.model_loading import LoRAQuantization, apply_model_loading

__all__ = ["HFExport", "LoRAQuantization", "apply_model_loading"]
