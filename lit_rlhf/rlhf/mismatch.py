"""Mismatch between a rollout engine's log-probs and the trainer's, and its importance-sampling correction.

An inference engine (vLLM) and the trainer compute the same policy's log-probs with different kernels, batch
shapes and sometimes dtypes, so the engine samples from a distribution ``π_engine`` slightly different from the
trainer's ``π_old`` (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training").
lit_rlhf keeps recomputing the behaviour log-probs with the trainer (the first PPO ratio stays exactly 1;
docs/conventions.md#rollout-engines), measures the gap every step (:func:`logprob_gap`), and offers the
truncated importance-sampling correction of that paper (TIS) and its masked variant (MIS) for the sampling
mismatch (:func:`truncated_is_weights`; verl's rollout correction offers the same token/sequence levels).

Notation for tensor shapes: ``B`` batch size, ``T`` response length. Masks are 1/True on response tokens.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = ["ImportanceWeights", "logprob_gap", "truncated_is_weights"]

ISLevel = Literal["token", "sequence"]
ISMode = Literal["truncate", "mask"]


def logprob_gap(engine_logprobs: Tensor, trainer_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and max of ``|engine - trainer|`` over the response tokens (the ``rollout/engine_logprob_gap`` metric).

    Args:
        engine_logprobs: ``[B, T]`` the engine's log-probs of the sampled tokens.
        trainer_logprobs: ``[B, T]`` the trainer's log-probs of the same tokens (same temperature).
        mask: ``[B, T]`` bool or 0/1, 1 on response tokens.

    Returns:
        ``(mean_abs, max_abs)``: scalar float32 tensors, in nats; both 0 when the mask is empty. Entries
        outside the mask are ignored even when they hold ``inf``/``nan``.
    """
    _check_shapes(engine_logprobs, trainer_logprobs, mask)
    keep = mask.bool()
    gap = torch.where(keep, (engine_logprobs.float() - trainer_logprobs.float()).abs(), 0.0)
    count = keep.sum()
    if count == 0:
        zero = gap.new_zeros(())
        return zero, zero.clone()
    return gap.sum() / count, gap.max()


class ImportanceWeights(NamedTuple):
    """What :func:`truncated_is_weights` returns."""

    weights: Tensor
    """``[B, T]`` non-negative, no gradient, 0 outside the mask: multiply each token's policy-gradient loss by it."""
    capped_fraction: Tensor
    """Scalar: the fraction of response tokens (``token`` level) or of sequences with a response token
    (``sequence`` level) whose ratio exceeded ``cap`` (truncated or masked)."""


def truncated_is_weights(
    trainer_logprobs: Tensor,
    engine_logprobs: Tensor,
    mask: Tensor,
    level: ISLevel = "token",
    mode: ISMode = "truncate",
    cap: float = 2.0,
) -> ImportanceWeights:
    """Importance weights ``π_old / π_engine`` that correct for sampling from the engine, capped at ``cap``.

    With ``ρ = exp(trainer - engine)`` (token level: per token; sequence level: ``exp(Σ_t (trainer - engine))``
    over the sequence's response tokens, shared by all its tokens):

    * ``mode="truncate"`` (TIS, Yao et al. 2025): ``w = min(ρ, cap)``;
    * ``mode="mask"`` (MIS, masked importance sampling): ``w = ρ`` where ``ρ <= cap``, else 0 (the token or
      sequence is left out of the update).

    The ratio is computed from log-probs without overflow (``exp`` is taken only of values ``<= log(cap)``).

    Args:
        trainer_logprobs: ``[B, T]`` the trainer's recomputed behaviour log-probs (``π_old``).
        engine_logprobs: ``[B, T]`` the engine's log-probs of the sampled tokens (``π_engine``).
        mask: ``[B, T]`` bool or 0/1, 1 on response tokens.
        level: ``"token"`` or ``"sequence"``.
        mode: ``"truncate"`` or ``"mask"``.
        cap: ``C > 0``; 2.0 is TIS's default.

    Returns:
        :class:`ImportanceWeights` (weights ``[B, T]`` detached, in the trainer log-probs' float dtype, at least
        float32).
    """
    _check_shapes(engine_logprobs, trainer_logprobs, mask)
    if level not in ("token", "sequence"):
        raise ValueError(f"importance-sampling level must be 'token' or 'sequence', got {level!r}")
    if mode not in ("truncate", "mask"):
        raise ValueError(f"importance-sampling mode must be 'truncate' or 'mask', got {mode!r}")
    if not cap > 0:
        raise ValueError(f"importance-sampling cap must be > 0, got {cap}")
    keep = mask.bool()
    dtype = torch.promote_types(trainer_logprobs.dtype, torch.float32)
    log_ratio = torch.where(keep, trainer_logprobs.detach().to(dtype) - engine_logprobs.detach().to(dtype), 0.0)
    if level == "sequence":
        seq = log_ratio.sum(-1, keepdim=True)  # [B, 1]
        log_ratio = seq.expand_as(log_ratio)
        has_tokens = keep.any(-1)
        seq_over = seq.squeeze(-1) > math.log(cap)
        capped = (seq_over & has_tokens).sum() / has_tokens.sum().clamp(min=1)
    else:
        over_tok = (log_ratio > math.log(cap)) & keep
        capped = over_tok.sum() / keep.sum().clamp(min=1)
    over = log_ratio > math.log(cap)
    safe = torch.exp(torch.clamp(log_ratio, max=math.log(cap)))  # = min(ρ, cap)
    weights = safe if mode == "truncate" else torch.where(over, 0.0, safe)
    weights = torch.where(keep, weights, 0.0)
    return ImportanceWeights(weights, capped.to(dtype))


def _check_shapes(engine_logprobs: Tensor, trainer_logprobs: Tensor, mask: Tensor) -> None:
    if not engine_logprobs.shape == trainer_logprobs.shape == mask.shape:
        raise ValueError(
            f"engine log-probs {tuple(engine_logprobs.shape)}, trainer log-probs {tuple(trainer_logprobs.shape)} "
            f"and mask {tuple(mask.shape)} must have the same [B, T] shape"
        )
