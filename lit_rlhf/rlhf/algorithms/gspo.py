"""GSPO, Group Sequence Policy Optimization (Zheng et al. 2025, arXiv:2507.18071): the importance ratio of a whole
response, ``s_i = (π_θ(y_i|x) / π_old(y_i|x))^{1/|y_i|} = exp(mean_t (log π_θ − log π_old))``, clipped per
sequence with a small range, and group-normalised advantages (GRPO's):

    J = E[ (1/G) Σ_i min(s_i A_i, clip(s_i, 1 − ε_low, 1 + ε_high) A_i) ]      (the paper's Eq. 5)

The surrogate is :func:`lit_rlhf.rlhf.clipped_policy_loss` with ``log s_i`` on every token of response ``i``;
``sequence_mean`` aggregation then gives each response the weight ``1/G`` of Eq. 5 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lit_rlhf.rlhf.algorithms.grpo import GRPO
from lit_rlhf.rlhf.critic_free import LossAggregation

__all__ = ["GSPO", "GSPOToken", "sequence_logratio"]


def sequence_logratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GSPO's length-normalised sequence log-ratio ``log s_i = (1/|y_i|) Σ_t (log π_θ(y_t) − log π_old(y_t))``.

    Args:
        logprobs: ``[B, T]`` current log-probs (with gradient).
        old_logprobs: ``[B, T]`` log-probs at rollout time.
        mask: BoolTensor ``[B, T]`` of response tokens.

    Returns:
        ``[B]`` (0 for a row without a response token).
    """
    mask = mask.bool()
    total = torch.where(mask, logprobs - old_logprobs, 0).sum(-1)
    return total / mask.sum(-1).clamp(min=1)


@dataclass(frozen=True, kw_only=True)
class GSPO(GRPO):
    """Sequence-level ratio clipped per response; defaults as the paper's experiments (ε_low = 3e-4,
    ε_high = 4e-4, §5.1) and a per-response mean of the loss."""

    clip_low: float = 3e-4
    clip_high: float = 4e-4
    loss_aggregation: LossAggregation = "sequence_mean"

    def importance_logratio(self, logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
        """``log s_i`` ``[B, T]`` on every token of response ``i``, 0 outside ``mask``."""
        per_sequence = sequence_logratio(logprobs, old_logprobs, mask)
        return torch.where(mask, per_sequence[:, None], 0)


@dataclass(frozen=True, kw_only=True)
class GSPOToken(GSPO):
    """GSPO-token (the paper's Eq. 13): ``s_{i,t} = sg[s_i] · π_θ(y_t) / sg[π_θ(y_t)]``, equal to ``s_i`` in value
    and in gradient when every token of a response has the same advantage (as here), but defined for per-token
    advantages."""

    def importance_logratio(self, logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
        """``sg[log s_i] + log π_θ(y_t) − sg[log π_θ(y_t)]`` ``[B, T]``, 0 outside ``mask``."""
        per_sequence = sequence_logratio(logprobs, old_logprobs, mask).detach()
        return torch.where(mask, per_sequence[:, None] + logprobs - logprobs.detach(), 0)
