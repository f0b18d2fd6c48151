"""Losses for the three InstructGPT stages: SFT NLL, reward-model ranking losses, PPO clipped losses.

Notation for tensor shapes: ``B`` batch size (sequences or prompts), ``L`` full sequence length, ``T``
response length, ``K`` responses per prompt, ``N`` preference pairs, ``V`` vocabulary size.

Token-level losses return a *sum* divided by a caller-supplied token count, so that splitting a batch into
micro-batches (gradient accumulation, several processes) gives exactly the loss and gradient of the whole
batch: pass the token count of the whole optimizer step to every micro-batch.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_rlhf.rlhf.logprobs import logprobs_from_logits
from lit_rlhf.rlhf.masking import masked_mean, masked_sum, masked_var

IGNORE_INDEX = -100


def sft_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token NLL with HF's shift and ``-100`` masking, plus the number of supervised tokens.

    ``logits[:, t]`` predicts ``labels[:, t + 1]`` (HF ``ForCausalLMLoss``). Return the sum, not the mean:
    the SFT loss is a token mean over the **whole optimizer step** (HF/TRL ``num_items_in_batch``), so divide
    by the supervised-token count summed over all micro-batches, not per micro-batch, which would give a mean
    of means (transformers#34242). Under DDP (gradients averaged over ``W`` processes) divide by the count
    summed over processes, divided by ``W``.

    Args:
        logits: ``[B, L, V]`` causal-LM logits.
        labels: LongTensor ``[B, L]`` input ids with prompt and padding set to ``-100``.

    Returns:
        ``(nll_sum, num_tokens)``: scalar summed NLL (float32 for half-precision logits) and a scalar
        LongTensor count of supervised tokens.
    """
    shift_labels = labels[:, 1:]
    supervised = shift_labels != IGNORE_INDEX
    # Ignored positions get a valid dummy id; masked_sum discards them.
    tokens = shift_labels.masked_fill(~supervised, 0)
    logprobs = logprobs_from_logits(logits[:, :-1], tokens)
    return -masked_sum(logprobs, supervised), supervised.sum()


def pairwise_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None) -> Tensor:
    """Bradley–Terry loss per pair, ``−log σ(r_c − r_r − margin)`` (Llama 2 Eq. 2 with a margin).

    Args:
        chosen_rewards: ``[N]`` rewards of the preferred responses.
        rejected_rewards: ``[N]`` rewards of the rejected responses.
        margin: Optional ``[N]`` margins ``m(r)``.

    Returns:
        ``[N]`` per-pair losses; TRL's loss is their mean.
    """
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    return -F.logsigmoid(logits)


def center_rewards_penalty(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """``mean((r_c + r_r)²)``, TRL's ``center_rewards_coefficient`` term (Eisenstein et al. 2023, Eq. 2).

    The pairwise loss is shift-invariant; this pins the reward offset near 0. Multiply by the coefficient
    (recommended 0.01) and add it to the loss.

    Args:
        chosen_rewards: ``[N]`` rewards of the preferred responses.
        rejected_rewards: ``[N]`` rewards of the rejected responses.

    Returns:
        Scalar tensor.
    """
    return ((chosen_rewards + rejected_rewards) ** 2).mean()


class KwiseLossOutput(NamedTuple):
    """Result of :func:`kwise_ranking_loss`; every field but ``loss`` is detached."""

    loss: Tensor
    """Scalar: mean over prompts with ≥ 1 valid pair of each prompt's mean pair loss."""
    per_prompt_loss: Tensor
    """``[B]``: mean loss over the prompt's valid pairs (0 for prompts without any)."""
    num_pairs: Tensor
    """LongTensor ``[B]``: valid (non-tie, non-padded) pairs per prompt."""
    pair_correct: Tensor
    """LongTensor ``[B]``: valid pairs with ``r_w > r_l`` (strict; a tie in reward counts as wrong)."""
    pair_margin_sum: Tensor
    """``[B]``: ``Σ (r_w − r_l)`` over valid pairs."""


def kwise_ranking_loss(
    rewards: Tensor,
    ranks: Tensor,
    response_mask: Tensor,
    margin: Tensor | None = None,
) -> KwiseLossOutput:
    """InstructGPT Eq. 1: all ``C(K, 2)`` comparisons of a prompt form one batch element.

    Every ordered pair ``(w, l)`` with ``ranks[w] < ranks[l]`` contributes
    ``−log σ(r_w − r_l − margin[w, l])``. Equal ranks are ties and are dropped (InstructGPT App. C.2). Each
    prompt averages over its valid pairs (the paper's ``1/C(K, 2)`` without ties), then prompts are averaged,
    so every prompt weighs the same whatever its ``K``. At ``K = 2`` this is the mean of
    :func:`pairwise_loss`.

    Args:
        rewards: ``[B, K]`` reward-model outputs; values at padded slots are ignored (even ``nan``).
        ranks: ``[B, K]`` ranks, lower is better; equal ranks are ties.
        response_mask: BoolTensor ``[B, K]``, False for padded response slots (prompts with fewer responses).
        margin: Optional ``[B, K, K]``; ``margin[b, w, l]`` is the margin of pair ``w`` better than ``l``.

    Returns:
        :class:`KwiseLossOutput`. With no valid pair in the batch ``loss`` is a 0 still attached to
        ``rewards``'s graph, so a backward pass through it works.
    """
    valid_slot = response_mask.bool()
    valid = (ranks.unsqueeze(-1) < ranks.unsqueeze(-2)) & valid_slot.unsqueeze(-1) & valid_slot.unsqueeze(-2)
    # Zero the diffs of invalid pairs before the loss, so nan/inf padding cannot leak into gradients.
    diff = torch.where(valid, rewards.unsqueeze(-1) - rewards.unsqueeze(-2), 0)
    logits = diff if margin is None else diff - torch.where(valid, margin, 0)
    pair_losses = torch.where(valid, -F.logsigmoid(logits), 0)
    num_pairs = valid.sum(dim=(-2, -1))
    per_prompt_loss = pair_losses.sum(dim=(-2, -1)) / num_pairs.clamp(min=1)
    has_pairs = num_pairs > 0
    loss = torch.where(has_pairs, per_prompt_loss, 0).sum() / has_pairs.sum().clamp(min=1)
    return KwiseLossOutput(
        loss=loss,
        per_prompt_loss=per_prompt_loss.detach(),
        num_pairs=num_pairs,
        pair_correct=(valid & (diff > 0)).sum(dim=(-2, -1)),
        pair_margin_sum=diff.detach().sum(dim=(-2, -1)),
    )


class PolicyLossOutput(NamedTuple):
    """Result of :func:`ppo_policy_loss`; the statistics are detached masked means over this call's tokens."""

    loss: Tensor
    """Scalar: ``Σ_masked max(−A·ρ, −A·clip(ρ)) / num_tokens``."""
    clipfrac: Tensor
    """Fraction of tokens where the clipped branch is active (TRL/OpenAI; zero gradient there)."""
    approx_kl: Tensor
    """k3 estimate of ``KL(π_old || π_θ)``: ``mean((ρ − 1) − log ρ)`` (CleanRL ``approx_kl``)."""
    ratio_mean: Tensor
    """Mean of ``ρ = π_θ / π_old``; ≈ 1 on the first minibatch of each rollout (docs/conventions.md#frozen-rollout)."""


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    num_tokens: Tensor | float | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate, per token ``max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))``.

    Args:
        logprobs: ``[B, T]`` temperature-scaled log-probs of the rollout tokens under the current policy.
        old_logprobs: ``[B, T]`` the same recorded at rollout time (behaviour policy), frozen across epochs.
        advantages: ``[B, T]`` (whitened) advantages, detached.
        mask: BoolTensor ``[B, T]`` of response tokens (``ResponseMasks.mask``).
        clip_range: ε.
        num_tokens: Denominator of the loss; defaults to ``mask.sum()`` (token mean of this call). Pass the
            masked-token count of the whole minibatch (all micro-batches) to make gradient accumulation equal
            one big batch exactly. Under DDP, which averages gradients over ``W`` processes, pass the count
            summed over processes divided by ``W``.

    Returns:
        :class:`PolicyLossOutput`.
    """
    # Padding gets ratio 1 (TRL's INVALID_LOGPROB trick): garbage there cannot overflow exp() into nan grads.
    logratio = torch.where(mask.bool(), logprobs - old_logprobs, 0)
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    denominator = mask.sum() if num_tokens is None else num_tokens
    loss = masked_sum(torch.max(pg_losses, pg_losses2), mask) / denominator
    with torch.no_grad():
        clipfrac = masked_mean((pg_losses2 > pg_losses).to(ratio.dtype), mask)
        approx_kl = masked_mean((ratio - 1) - logratio, mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossOutput(loss, clipfrac, approx_kl, ratio_mean)


class ValueLossOutput(NamedTuple):
    """Result of :func:`ppo_value_loss`; ``clipfrac`` is a detached masked mean over this call's tokens."""

    loss: Tensor
    """Scalar: ``½ · Σ_masked max((V − R)², (V_clip − R)²) / num_tokens``."""
    clipfrac: Tensor
    """Fraction of tokens where the clipped squared error is the larger one."""


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float | None = 0.2,
    num_tokens: Tensor | float | None = None,
) -> ValueLossOutput:
    """Clipped value loss with ``V_clip = clip(V, V_old − ε_v, V_old + ε_v)`` (TRL, OpenAI 2019, N+).

    Args:
        values: ``[B, T]`` current value predictions.
        old_values: ``[B, T]`` values recorded at rollout time, frozen across epochs.
        returns: ``[B, T]`` targets from :func:`lit_rlhf.rlhf.advantages.gae` (raw advantages + values).
        mask: BoolTensor ``[B, T]``. Use the response mask; with TRL's score placement (EOS + 1) use TRL's
            ``~padding_mask_p1`` instead, or the slot that holds the score is never fitted
            (docs/conventions.md#value-loss).
        clip_range: ε_v; ``None`` disables value clipping.
        num_tokens: Denominator; defaults to ``mask.sum()``. See :func:`ppo_policy_loss`.

    Returns:
        :class:`ValueLossOutput`.
    """
    vf_losses1 = (values - returns) ** 2
    if clip_range is None:
        vf_losses2 = vf_losses1
    else:
        values_clipped = torch.clamp(values, old_values - clip_range, old_values + clip_range)
        vf_losses2 = (values_clipped - returns) ** 2
    denominator = mask.sum() if num_tokens is None else num_tokens
    loss = 0.5 * masked_sum(torch.max(vf_losses1, vf_losses2), mask) / denominator
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses2 > vf_losses1).to(vf_losses1.dtype), mask)
    return ValueLossOutput(loss, clipfrac)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 − Var(R − V) / Var(R)`` over the masked tokens (OpenAI's ``val/var_explained``).

    1 is a perfect value function, 0 is no better than a constant, negative is worse. Detached.

    Args:
        values: ``[B, T]`` value predictions.
        returns: ``[B, T]`` value targets.
        mask: BoolTensor ``[B, T]``.

    Returns:
        Scalar tensor; ``nan``/``−inf`` when the returns have zero variance.
    """
    with torch.no_grad():
        var_returns = masked_var(returns, mask, unbiased=False)
        var_residual = masked_var(returns - values, mask, unbiased=False)
        return 1 - var_residual / var_returns
