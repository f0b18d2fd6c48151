"""LightningModules, one per InstructGPT stage, and the configuration of the PPO stage."""

from lit_rlhf.models.base import RLHFModule, WarmupCosineLR
from lit_rlhf.models.ppo import PPOModule
from lit_rlhf.models.ppo_config import KLConfig, PPOConfig, PTXConfig, RewardConfig, SamplingConfig, SharedBaseConfig
from lit_rlhf.models.reward import RewardModule
from lit_rlhf.models.sft import SFTModule

__all__ = [
    "KLConfig",
    "PPOConfig",
    "PPOModule",
    "PTXConfig",
    "RLHFModule",
    "RewardConfig",
    "RewardModule",
    "SFTModule",
    "SamplingConfig",
    "SharedBaseConfig",
    "WarmupCosineLR",
]
