"""CISPO, Clipped IS-weight Policy Optimization (MiniMax-M1, MiniMax 2025, arXiv:2506.13585 §3.1): REINFORCE with a
clipped, stop-gradient importance-sampling weight on every token, so that no token loses its gradient:

    J = E[ (1 / Σ_i |o_i|) Σ_i Σ_t sg(r̂_{i,t}) · Â_{i,t} · log π_θ(o_{i,t}) ],
    r̂_{i,t} = clip(r_{i,t}, 1 − ε_low, 1 + ε_high),   Â: group-normalised (GRPO) advantages.

The paper puts no lower bound on the weight (ε_low large) and tunes only ε_high.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lit_rlhf.rlhf.algorithms.grpo import GRPO
from lit_rlhf.rlhf.critic_free import ClippedLossOutput, LossAggregation, add_kl_loss_term, aggregate_loss
from lit_rlhf.rlhf.masking import masked_mean

__all__ = ["CISPO", "cispo_policy_loss"]


def cispo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 1.0,
    clip_high: float = 0.28,
    aggregation: LossAggregation = "token_mean",
    num_tokens: Tensor | float | None = None,
    num_sequences: Tensor | float | None = None,
    max_length: int | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
) -> ClippedLossOutput:
    """CISPO's per-token loss ``−sg(clip(ρ, 1 − ε_low, 1 + ε_high)) · A · log π_θ`` (plus ``β·k3`` when
    ``ref_logprobs`` are given), aggregated by :func:`lit_rlhf.rlhf.aggregate_loss`.

    Its gradient is ``−clip(ρ)·A·∇log π_θ`` on every token; at ``ρ = 1`` it is the plain policy gradient, the
    same as the clipped surrogate's.

    Args:
        logprobs: ``[B, T]`` current log-probs (with gradient).
        old_logprobs: ``[B, T]`` log-probs at rollout time.
        advantages: ``[B, T]`` (or ``[B, 1]``) advantages, detached.
        mask: BoolTensor ``[B, T]`` of response tokens.
        clip_low: ε_low; 1.0 (a floor of 0, below every ratio) = no lower bound (the paper).
        clip_high: ε_high.
        aggregation, num_tokens, num_sequences, max_length: see :func:`lit_rlhf.rlhf.aggregate_loss`.
        ref_logprobs, kl_coef: the KL loss term (:func:`lit_rlhf.rlhf.add_kl_loss_term`).

    Returns:
        :class:`~lit_rlhf.rlhf.ClippedLossOutput`; ``clipfrac_low``/``clipfrac_high`` are the fractions of tokens
        whose weight was clipped from below/above (whatever the advantage's sign: the token keeps its gradient).
    """
    mask = mask.bool()
    advantages = advantages.expand_as(logprobs)
    logratio = torch.where(mask, logprobs - old_logprobs, 0)  # padding: ratio 1, no overflow
    ratio = torch.exp(logratio)
    weight = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high).detach()
    per_token = -weight * advantages * torch.where(mask, logprobs, 0)
    per_token, kl = add_kl_loss_term(per_token, logprobs, ref_logprobs, mask, kl_coef)
    loss = aggregate_loss(per_token, mask, aggregation, num_tokens, num_sequences, max_length)
    with torch.no_grad():
        low = masked_mean((ratio < 1 - clip_low).to(ratio.dtype), mask)
        high = masked_mean((ratio > 1 + clip_high).to(ratio.dtype), mask)
        approx_kl = masked_mean((ratio - 1) - logratio, mask)
        ratio_mean = masked_mean(ratio, mask)
    return ClippedLossOutput(loss, low, high, approx_kl, ratio_mean, kl)


@dataclass(frozen=True, kw_only=True)
class CISPO(GRPO):
    """Group-normalised advantages, CISPO's clipped stop-gradient IS weight on every token, a token mean over the
    optimizer step (the paper's ``1 / Σ_i |o_i|``)."""

    clip_low: float = 1.0
    """ε_low of the weight: 1.0 puts the floor at 0, below every ratio, i.e. no lower bound (the paper)."""
    clip_high: float = 0.28
    """ε_high of the weight (the paper tunes it and gives no value; DAPO's 0.28 is our default)."""

    def policy_loss(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        num_tokens: Tensor | float | None = None,
        num_sequences: Tensor | float | None = None,
        max_length: int | None = None,
        ref_logprobs: Tensor | None = None,
        kl_coef: float = 0.0,
    ) -> ClippedLossOutput:
        """:func:`cispo_policy_loss`; arguments and shapes as :meth:`Algorithm.policy_loss`."""
        return cispo_policy_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            self.clip_low,
            self.clip_high,
            self.loss_aggregation,
            num_tokens,
            num_sequences,
            max_length,
            ref_logprobs,
            kl_coef,
        )
