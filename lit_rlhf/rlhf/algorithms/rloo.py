"""RLOO: REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics",
arXiv:2402.14740)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lit_rlhf.rlhf.algorithms.base import GroupAlgorithm, KLPlacement
from lit_rlhf.rlhf.critic_free import rloo_advantages

__all__ = ["RLOO"]


@dataclass(frozen=True, kw_only=True)
class RLOO(GroupAlgorithm):
    """``A_i = r_i − (Σ_{j≠i} r_j) / (K − 1)`` (:func:`lit_rlhf.rlhf.rloo_advantages`), the KL in the reward
    (summed per response), as the paper."""

    kl_in: KLPlacement = "reward"

    def sequence_advantages(self, scores: Tensor) -> Tensor:
        """``[G·K]`` → ``[G·K]`` leave-one-out advantages."""
        return rloo_advantages(scores, self.group_size)
