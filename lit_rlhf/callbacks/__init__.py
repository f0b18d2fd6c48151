"""Callbacks from the user's card (KL monitor, reward normalization, LoRA/4-bit loading) and the run's
plumbing (HF export, pre-emption checkpoints, a held-out judge of PPO rollouts)."""

from lit_rlhf.callbacks.export import HFExport
from lit_rlhf.callbacks.kl_monitor import KLMonitor
from lit_rlhf.callbacks.model_loading import LoRAQuantization, apply_model_loading
from lit_rlhf.callbacks.predictions import JsonlPredictionWriter
from lit_rlhf.callbacks.preemption import PreemptionCheckpoint
from lit_rlhf.callbacks.reward_normalization import RewardNormalization, fit_reward_normalization
from lit_rlhf.callbacks.rollout_scorer import RolloutScorer

__all__ = [
    "HFExport",
    "JsonlPredictionWriter",
    "KLMonitor",
    "LoRAQuantization",
    "PreemptionCheckpoint",
    "RewardNormalization",
    "RolloutScorer",
    "apply_model_loading",
    "fit_reward_normalization",
]
