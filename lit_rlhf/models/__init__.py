"""LightningModules, one per InstructGPT stage."""

from lit_rlhf.models.base import RLHFModule, WarmupCosineLR
from lit_rlhf.models.ppo import PPOModule
from lit_rlhf.models.reward import RewardModule, RewardScoreWriter
from lit_rlhf.models.sft import SFTModule

__all__ = ["PPOModule", "RLHFModule", "RewardModule", "RewardScoreWriter", "SFTModule", "WarmupCosineLR"]
