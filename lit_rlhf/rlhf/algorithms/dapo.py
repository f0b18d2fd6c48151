"""DAPO, Decoupled Clip and Dynamic sAmpling Policy Optimization (Yu et al. 2025, arXiv:2503.14476): GRPO's
group-normalised advantages with

* **clip-higher**: ``ε_low = 0.2``, ``ε_high = 0.28`` (§3.1), so unlikely tokens can gain probability;
* **dynamic sampling**: only groups whose ``K`` rewards are not all equal enter the batch (§3.2, Eq. 11's
  ``0 < |{o_i : is_equivalent(a, o_i)}| < G``): :func:`signal_groups`, the :meth:`DAPO.keep_groups` hook;
* **token-level loss**: ``1 / Σ_i |o_i|`` over the step (§3.3), ``token_mean``;
* **overlong reward shaping**: the soft overlong punishment of Eq. 13 added to the score, :func:`overlong_penalty`;
* no KL to the reference (§2.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lit_rlhf.rlhf.algorithms.base import KLPlacement
from lit_rlhf.rlhf.algorithms.grpo import GRPO
from lit_rlhf.rlhf.critic_free import zero_signal_groups

__all__ = ["DAPO", "overlong_penalty", "signal_groups"]


def overlong_penalty(lengths: Tensor, max_length: int, cache_length: int) -> Tensor:
    """DAPO's soft overlong punishment (Eq. 13), with ``L_max = max_length`` and ``L_cache = cache_length``:

        R(y) = 0                               if |y| ≤ L_max − L_cache
             = ((L_max − L_cache) − |y|) / L_cache   if L_max − L_cache < |y| ≤ L_max
             = −1                              if L_max < |y|

    Args:
        lengths: ``[B]`` response lengths ``|y|`` in tokens.
        max_length: ``L_max`` ≥ 1.
        cache_length: ``L_cache`` in ``[0, L_max]``; 0 = no soft interval (−1 only beyond ``L_max``).

    Returns:
        ``[B]`` float penalties in ``[−1, 0]``.
    """
    if max_length < 1 or not 0 <= cache_length <= max_length:
        raise ValueError(
            f"overlong penalty needs 1 <= L_max and 0 <= L_cache <= L_max, got {max_length}, {cache_length}"
        )
    lengths = lengths.to(torch.float32)
    start = max_length - cache_length
    soft = (start - lengths) / max(cache_length, 1)
    penalty = torch.where(lengths <= start, torch.zeros_like(lengths), soft)
    return torch.where(lengths > max_length, torch.full_like(lengths, -1.0), penalty)


def signal_groups(scores: Tensor, group_size: int) -> Tensor:
    """DAPO's dynamic-sampling filter: the groups whose ``K`` rewards are not all equal (their group-relative
    advantages are not all 0).

    Args:
        scores: ``[G·K]`` rewards, a prompt's responses adjacent.
        group_size: ``K`` ≥ 2.

    Returns:
        BoolTensor ``[G]``, True = keep.
    """
    return ~zero_signal_groups(scores, group_size)


@dataclass(frozen=True, kw_only=True)
class DAPO(GRPO):
    """DAPO's defaults on GRPO's advantages. The zero-signal groups are left out, and more prompts are drawn
    until the step holds a full batch of groups with signal (``dynamic_sampling``, done by the module's
    sampling loop: :class:`~lit_rlhf.models.CriticFreeModule`); ``dynamic_sampling: false`` trains on the
    groups left of each batch instead (their rows keep their place, masked out)."""

    clip_high: float = 0.28
    kl_in: KLPlacement = "none"
    drop_zero_signal_groups: bool = True
    dynamic_sampling: bool = True
    overlong_max_length: int | None = None
    """``L_max`` of the overlong penalty; ``None`` = the sampling's ``max_new_tokens``."""
    overlong_cache: int | None = None
    """``L_cache``; ``None`` = ``L_max // 5`` (the paper's 4096 of 20480); 0 = no soft interval."""
    overlong_coef: float = 1.0
    """Weight of the penalty added to the score (0 = no overlong shaping)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.overlong_max_length is not None and self.overlong_max_length < 1:
            raise ValueError(f"algorithm.overlong_max_length must be >= 1 or null, got {self.overlong_max_length}")
        if self.overlong_cache is not None and self.overlong_cache < 0:
            raise ValueError(f"algorithm.overlong_cache must be >= 0 or null, got {self.overlong_cache}")
        if self.overlong_coef < 0:
            raise ValueError(f"algorithm.overlong_coef must be >= 0, got {self.overlong_coef}")

    def shape_scores(self, scores: Tensor, lengths: Tensor, max_length: int) -> Tensor:
        """``score + coef · overlong_penalty(|y|)`` ``[B]`` → ``[B]``."""
        if self.overlong_coef == 0:
            return scores
        limit = self.overlong_max_length or max_length
        cache = limit // 5 if self.overlong_cache is None else min(self.overlong_cache, limit)
        return scores + self.overlong_coef * overlong_penalty(lengths, limit, cache).to(scores.dtype)

    def keep_groups(self, scores: Tensor) -> Tensor | None:
        """:func:`signal_groups` when ``drop_zero_signal_groups`` (the default), else ``None``."""
        return signal_groups(scores, self.group_size) if self.drop_zero_signal_groups else None
