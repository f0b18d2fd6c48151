"""Callbacks from the user's card: LoRA/4-bit loading, HF export (KL monitor and reward normalization join
with the RM and PPO stages)."""

from lit_rlhf.callbacks.export import HFExport
from lit_rlhf.callbacks.kl_monitor import KLMonitor
from lit_rlhf.callbacks.model_loading import LoRAQuantization, apply_model_loading
from lit_rlhf.callbacks.preemption import PreemptionCheckpoint
from lit_rlhf.callbacks.reward_normalization import RewardNormalization, fit_reward_normalization

__all__ = [
    "HFExport",
    "KLMonitor",
    "LoRAQuantization",
    "PreemptionCheckpoint",
    "RewardNormalization",
    "apply_model_loading",
    "fit_reward_normalization",
]
