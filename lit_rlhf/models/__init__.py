"""LightningModules, one per stage (SFT, reward model, PPO, critic-free RL, DPO), and their configurations."""

from lit_rlhf.models.base import RLHFModule, WarmupCosineLR
from lit_rlhf.models.critic_free import CriticFreeModule
from lit_rlhf.models.critic_free_config import CriticFreeConfig
from lit_rlhf.models.dpo import DPOModule
from lit_rlhf.models.policy_gradient import PolicyGradientModule
from lit_rlhf.models.ppo import PPOModule
from lit_rlhf.models.ppo_config import KLConfig, PPOConfig, PTXConfig, RewardConfig, SamplingConfig, SharedBaseConfig
from lit_rlhf.models.reward import RewardModule
from lit_rlhf.models.sft import SFTModule

__all__ = [
    "CriticFreeConfig",
    "CriticFreeModule",
    "DPOModule",
    "KLConfig",
    "PPOConfig",
    "PPOModule",
    "PTXConfig",
    "PolicyGradientModule",
    "RLHFModule",
    "RewardConfig",
    "RewardModule",
    "SFTModule",
    "SamplingConfig",
    "SharedBaseConfig",
    "WarmupCosineLR",
]
