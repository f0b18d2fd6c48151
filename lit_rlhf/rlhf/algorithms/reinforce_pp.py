"""REINFORCE++ and REINFORCE++-baseline (Hu et al. 2025, arXiv:2501.03262): discounted returns with the KL in
the per-token reward, whitened over the global batch; no critic."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lit_rlhf.rlhf.algorithms.base import Algorithm
from lit_rlhf.rlhf.critic_free import group_advantages, reinforce_pp_advantages
from lit_rlhf.rlhf.masking import ReduceFn

__all__ = ["REINFORCEPP", "REINFORCEPPBaseline"]


@dataclass(frozen=True, kw_only=True)
class REINFORCEPP(Algorithm):
    """``A = whiten(Σ_{s ≥ t} γ^{s−t} r_s)`` over every masked token of every process
    (:func:`lit_rlhf.rlhf.reinforce_pp_advantages`). Any ``group_size`` ≥ 1."""

    gamma: float = 1.0
    """Discount of the reward-to-go."""
    eps: float = 1e-8
    """Added to the variance of the whitening."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"algorithm.gamma must lie in [0, 1], got {self.gamma}")
        if not self.eps >= 0:
            raise ValueError(f"algorithm.eps must be >= 0, got {self.eps}")

    def advantages(
        self,
        rewards: Tensor,
        mask: Tensor,
        values: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Whitened reward-to-go ``[B, T]`` and the reward-to-go ``[B, T]``; see :meth:`Algorithm.advantages`."""
        return reinforce_pp_advantages(rewards, mask, self.gamma, self.eps, reduce_fn=reduce_fn)


@dataclass(frozen=True, kw_only=True)
class REINFORCEPPBaseline(REINFORCEPP):
    """REINFORCE++ with the group's mean score subtracted from each score before the returns (the paper's
    "REINFORCE++-baseline" for K samples per prompt; OpenRLHF ``reinforce_baseline``), then the same global
    whitening."""

    min_group_size = 2
    group_size: int = 4

    def shape_scores(self, scores: Tensor, lengths: Tensor, max_length: int) -> Tensor:
        """``s_i − mean_g s`` ``[G·K]`` → ``[G·K]``."""
        return group_advantages(scores, self.group_size, scale=False)
