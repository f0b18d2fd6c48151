"""GRPO (Shao et al. 2024, DeepSeekMath §4.1.2, arXiv:2402.03300) and Dr. GRPO (Liu et al. 2025, "Understanding
R1-Zero-Like Training", arXiv:2503.20783): group-relative advantages, a per-token KL loss term."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lit_rlhf.rlhf.algorithms.base import GroupAlgorithm
from lit_rlhf.rlhf.critic_free import LossAggregation, group_advantages

__all__ = ["GRPO", "DrGRPO"]


@dataclass(frozen=True, kw_only=True)
class GRPO(GroupAlgorithm):
    """``A_i = (r_i − mean_g r) / (std_g r + eps)`` (:func:`lit_rlhf.rlhf.group_advantages`), the KL as a
    ``β·k3`` loss term."""

    std_eps: float = 1e-4
    """eps of ``std + eps`` (TRL 1e-4; OpenRLHF 1e-9)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.std_eps >= 0:
            raise ValueError(f"algorithm.std_eps must be >= 0, got {self.std_eps}")

    def sequence_advantages(self, scores: Tensor) -> Tensor:
        """``[G·K]`` → ``[G·K]`` group-normalised advantages."""
        return group_advantages(scores, self.group_size, True, self.std_eps)


@dataclass(frozen=True, kw_only=True)
class DrGRPO(GroupAlgorithm):
    """``A_i = r_i − mean_g r`` (no division by the group's standard deviation) with the constant normaliser
    ``fixed_length`` (token sum / (responses · max_new_tokens)): Dr. GRPO's two corrections of GRPO's biases."""

    loss_aggregation: LossAggregation = "fixed_length"

    def sequence_advantages(self, scores: Tensor) -> Tensor:
        """``[G·K]`` → ``[G·K]`` group-centred advantages."""
        return group_advantages(scores, self.group_size, scale=False)
