"""Critic-free policy optimisation: group and leave-one-out baselines (GRPO, Dr. GRPO, RLOO), REINFORCE++
returns, the clipped surrogate with separate low/high ranges (DAPO clip-higher), the k3 KL loss term, and the
three ways of averaging a per-token loss (docs/conventions.md#critic-free-rl).

Notation for tensor shapes: ``B`` responses (``B = G·K``: ``G`` prompts, ``K`` responses per prompt, a
prompt's responses adjacent), ``T`` response length.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lit_rlhf.rlhf.advantages import discounted_reverse_cumsum
from lit_rlhf.rlhf.kl import kl_penalty
from lit_rlhf.rlhf.masking import ReduceFn, masked_mean, masked_sum

LossAggregation = Literal["token_mean", "sequence_mean", "fixed_length"]


def _groups(scores: Tensor, group_size: int) -> Tensor:
    if group_size < 2:
        raise ValueError(f"group-relative baselines need group_size >= 2, got {group_size}")
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores must be [G·K] with K = {group_size} adjacent per prompt, got {tuple(scores.shape)}")
    return scores.view(-1, group_size)


def group_advantages(scores: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's group-relative advantage of each response (Shao et al. 2024, DeepSeekMath §4.1.2).

    ``A_i = (r_i − mean_g r) / (std_g r + eps)`` with the unbiased (Bessel) standard deviation of the prompt's
    ``K`` rewards, as TRL ``GRPOTrainer`` (``scale_rewards="group"``, ``eps = 1e-4``) and OpenRLHF
    ``group_norm``. ``scale=False`` is Dr. GRPO (Liu et al. 2025): ``A_i = r_i − mean_g r``, no division by a
    standard deviation, which up-weights low-variance (too easy or too hard) prompts. A group whose rewards are all
    equal gets ``A = 0`` either way.

    Args:
        scores: ``[G·K]`` sequence rewards, the ``K`` responses of a prompt adjacent.
        group_size: ``K`` ≥ 2.
        scale: divide by the group's standard deviation (GRPO) or not (Dr. GRPO).
        eps: added to the standard deviation.

    Returns:
        ``[G·K]`` advantages, one per response (the same for every token of it).
    """
    groups = _groups(scores, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if scale:
        centred = centred / (groups.std(1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out advantage (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics").

    ``A_i = r_i − (Σ_{j≠i} r_j) / (K − 1)``: the baseline of each response is the mean reward of the other
    ``K − 1`` responses to its prompt, so it does not depend on the response itself and the estimator stays
    unbiased. Equals ``K/(K−1) · (r_i − mean_g r)`` (TRL ``RLOOTrainer``, OpenRLHF ``rloo``).

    Args:
        scores: ``[G·K]`` sequence rewards, the ``K`` responses of a prompt adjacent.
        group_size: ``K`` ≥ 2.

    Returns:
        ``[G·K]`` advantages.
    """
    groups = _groups(scores, group_size)
    baseline = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


def zero_signal_groups(scores: Tensor, group_size: int) -> Tensor:
    """Groups whose ``K`` rewards are all equal: their group-relative advantages are 0, they teach nothing
    (DAPO's "dynamic sampling" filters them).

    Args:
        scores: ``[G·K]`` sequence rewards, a prompt's responses adjacent.
        group_size: ``K``.

    Returns:
        BoolTensor ``[G]``.
    """
    groups = _groups(scores, group_size)
    return (groups == groups[:, :1]).all(1)


def reinforce_pp_advantages(
    rewards: Tensor, mask: Tensor, gamma: float = 1.0, eps: float = 1e-8, reduce_fn: ReduceFn | None = None
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): returns without a critic, normalised over the global batch.

    ``G_t = Σ_{s ≥ t} γ^{s−t} r_s`` (the per-token reward holds ``−β·KL_s`` on every token and the score on the
    last one, :func:`lit_rlhf.rlhf.rewards.per_token_rewards`), then ``A = (G − μ) / sqrt(σ² + eps)`` with the
    mean and the **population** variance over every masked token of every process (OpenRLHF
    ``get_cumulative_returns`` + its advantage normalisation, which clamps ``σ²`` at ``1e-8`` instead of adding
    ``eps``; the two differ by less than ``eps/σ²`` relative).

    Args:
        rewards: ``[B, T]`` per-token rewards.
        mask: BoolTensor ``[B, T]`` of response tokens.
        gamma: discount.
        eps: added to the variance.
        reduce_fn: sum over processes (see :func:`lit_rlhf.rlhf.masking.masked_whiten`); ``None`` = this process.

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` and 0 outside ``mask``.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    mask = mask.bool()
    returns = discounted_reverse_cumsum(torch.where(mask, rewards, 0), gamma).masked_fill(~mask, 0)
    reduce = reduce_fn if reduce_fn is not None else (lambda t: t)
    v = returns.to(torch.promote_types(returns.dtype, torch.float32))
    total, count = reduce(torch.stack([masked_sum(v, mask), mask.sum().to(v.dtype)])).unbind()
    if float(count) == 0:
        raise ValueError("REINFORCE++ normalisation needs at least one response token in the batch.")
    mean = total / count
    var = reduce(masked_sum((v - mean) ** 2, mask)) / count
    advantages = ((v - mean) * torch.rsqrt(var + eps)).to(returns.dtype).masked_fill(~mask, 0)
    return advantages, returns


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    aggregation: LossAggregation = "token_mean",
    num_tokens: Tensor | float | None = None,
    num_sequences: Tensor | float | None = None,
    max_length: int | None = None,
) -> Tensor:
    """Average a per-token loss over a batch, the way chosen (docs/conventions.md#loss-aggregation).

    * ``token_mean``: ``Σ_{i,t} l / N_tokens`` — every token weighs the same (DAPO, TRL ``"dapo"``; TRL
      ``"bnpo"`` when the normaliser is the micro-batch's own). Long responses weigh more than short ones.
    * ``sequence_mean``: ``(1/N_seq) Σ_i (1/|o_i|) Σ_t l`` — each response weighs the same (GRPO paper, TRL
      ``"grpo"``). A token of a short response weighs more, so for a positive advantage short answers are
      favoured, for a negative one long answers are penalised less (Dr. GRPO's length bias).
    * ``fixed_length``: ``Σ_{i,t} l / (N_seq · L_max)`` — a constant normaliser (Dr. GRPO, TRL ``"dr_grpo"``);
      unbiased in length, but the loss scale shrinks when responses are much shorter than ``L_max``.

    Passing the counts of the whole optimizer step (all micro-batches; under DDP summed over processes and
    divided by the number of processes) makes gradient accumulation equal one big batch.

    Args:
        per_token_loss: ``[B, T]``.
        mask: BoolTensor ``[B, T]`` of response tokens.
        aggregation: ``"token_mean"``, ``"sequence_mean"`` or ``"fixed_length"``.
        num_tokens: ``token_mean`` denominator; default ``mask.sum()``.
        num_sequences: ``sequence_mean``/``fixed_length`` denominator; default the rows with a response token.
        max_length: ``L_max`` of ``fixed_length`` (the sampling's ``max_new_tokens``).

    Returns:
        Scalar tensor.
    """
    mask = mask.bool()
    if aggregation == "token_mean":
        return masked_sum(per_token_loss, mask) / (mask.sum() if num_tokens is None else num_tokens)
    rows = mask.any(-1).sum() if num_sequences is None else num_sequences
    if aggregation == "sequence_mean":
        per_sequence = torch.where(mask, per_token_loss, 0).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_sequence.sum() / rows
    if aggregation == "fixed_length":
        if max_length is None or max_length < 1:
            raise ValueError("loss aggregation 'fixed_length' needs max_length >= 1 (the sampling's max_new_tokens)")
        return masked_sum(per_token_loss, mask) / (rows * max_length)
    raise ValueError(f"unknown loss aggregation {aggregation!r}; expected token_mean, sequence_mean or fixed_length")


def add_kl_loss_term(
    per_token_loss: Tensor, logprobs: Tensor, ref_logprobs: Tensor | None, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """GRPO's KL loss term (Shao et al. 2024, Eq. 3): ``per_token_loss + β·k3(π_θ, π_ref)`` on every token.

    Args:
        per_token_loss: ``[B, T]`` policy loss per token.
        logprobs: ``[B, T]`` current log-probs (with gradient).
        ref_logprobs: ``[B, T]`` reference log-probs; ``None`` = no term.
        mask: BoolTensor ``[B, T]`` of response tokens.
        kl_coef: β.

    Returns:
        ``(per_token_loss [B, T], kl)``: the loss with the term, and the detached token-mean k3 (a 0 scalar
        without ``ref_logprobs``).
    """
    kl = torch.zeros((), device=logprobs.device)
    if ref_logprobs is not None:
        per_token_kl = kl_penalty(logprobs, torch.where(mask, ref_logprobs, logprobs), "k3")
        per_token_loss = per_token_loss + kl_coef * per_token_kl
        kl = masked_mean(per_token_kl.detach(), mask)
    return per_token_loss, kl


class ClippedLossOutput(NamedTuple):
    """Result of :func:`clipped_policy_loss`; the statistics are detached token means over this call."""

    loss: Tensor
    """Scalar: the aggregated ``max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)) + β·k3``."""
    clipfrac_low: Tensor
    """Fraction of tokens with ``ρ < 1 − ε_low`` and ``A < 0`` (clipped from below, no gradient)."""
    clipfrac_high: Tensor
    """Fraction of tokens with ``ρ > 1 + ε_high`` and ``A > 0`` (clipped from above, no gradient)."""
    approx_kl: Tensor
    """k3 estimate of ``KL(π_old || π_θ)``."""
    ratio_mean: Tensor
    """Mean ``ρ = π_θ / π_old``; 1 on the first minibatch of each rollout."""
    kl: Tensor
    """Mean per-token k3 ``KL(π_θ || π_ref)`` of the loss term (0 without reference log-probs)."""


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    aggregation: LossAggregation = "token_mean",
    num_tokens: Tensor | float | None = None,
    num_sequences: Tensor | float | None = None,
    max_length: int | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    logratio: Tensor | None = None,
) -> ClippedLossOutput:
    """Clipped surrogate with separate ranges, ``max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high))`` per token
    (PPO when ``ε_low = ε_high``; DAPO's clip-higher raises ``ε_high`` so unlikely tokens can gain mass), plus
    GRPO's KL loss term ``β·k3(π_θ, π_ref)`` when ``ref_logprobs`` are given, aggregated by
    :func:`aggregate_loss`. Equals TRL ``GRPOTrainer._compute_loss`` (token-level importance sampling).

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the current policy (with gradient).
        old_logprobs: ``[B, T]`` the same at rollout time.
        advantages: ``[B, T]`` (or ``[B, 1]``, broadcast) advantages, detached.
        mask: BoolTensor ``[B, T]`` of response tokens.
        clip_low, clip_high: ε_low, ε_high.
        aggregation, num_tokens, num_sequences, max_length: see :func:`aggregate_loss`.
        ref_logprobs: ``[B, T]`` reference log-probs for the KL loss term; ``None`` = no term.
        kl_coef: β of the KL loss term.
        logratio: ``[B, T]`` log importance ratio to clip instead of the per-token ``log π_θ − log π_old``
            (GSPO's sequence-level ratio, :mod:`lit_rlhf.rlhf.algorithms.gspo`); 0 outside ``mask``.

    Returns:
        :class:`ClippedLossOutput`.
    """
    mask = mask.bool()
    advantages = advantages.expand_as(logprobs)
    if logratio is None:
        logratio = torch.where(mask, logprobs - old_logprobs, 0)  # padding: ratio 1, no overflow
    ratio = torch.exp(logratio)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.max(-advantages * ratio, -advantages * clipped)
    per_token, kl = add_kl_loss_term(per_token, logprobs, ref_logprobs, mask, kl_coef)
    loss = aggregate_loss(per_token, mask, aggregation, num_tokens, num_sequences, max_length)
    with torch.no_grad():
        low = masked_mean(((ratio < 1 - clip_low) & (advantages < 0)).to(ratio.dtype), mask)
        high = masked_mean(((ratio > 1 + clip_high) & (advantages > 0)).to(ratio.dtype), mask)
        approx_kl = masked_mean((ratio - 1) - logratio, mask)
        ratio_mean = masked_mean(ratio, mask)
    return ClippedLossOutput(loss, low, high, approx_kl, ratio_mean, kl)
