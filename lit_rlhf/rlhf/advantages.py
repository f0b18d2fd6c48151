"""Generalised advantage estimation (Schulman et al. 2016) for per-token RLHF rewards.

Notation for tensor shapes: ``B`` batch size, ``T`` response length.

    δ_t = r_t + γ V_{t+1} − V_t,      V_T ≡ 0 (no bootstrap past the last position)
    A_t = δ_t + γλ A_{t+1},          A_T ≡ 0
    R_t = A_t + V_t                  (the λ-return, the value target)

A response cut at ``max_new_tokens`` is treated as terminal (TRL, OpenRLHF; trl#1536 not adopted).
"""

import torch
from torch import Tensor


def _masked_inputs(rewards: Tensor, values: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if mask is None:
        return rewards, values
    keep = mask.bool()
    return torch.where(keep, rewards, 0), torch.where(keep, values, 0)


def _check_discounts(gamma: float, lam: float) -> None:
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}.")


def discounted_reverse_cumsum(x: Tensor, discount: float) -> Tensor:
    """``y_t = Σ_{j ≥ t} discount^(j − t) · x_j`` along the last dim, without a Python loop.

    Uses an upper-triangular ``[T, T]`` matrix ``W[t, j] = discount^(j − t)``: ``O(T²)`` memory and FLOPs per
    row, which is negligible next to a forward pass for response lengths up to a few thousand tokens.

    Args:
        x: ``[..., T]`` floating tensor.
        discount: Discount factor in ``[0, 1]``.

    Returns:
        ``[..., T]`` tensor like ``x``.
    """
    length = x.size(-1)
    idx = torch.arange(length, device=x.device)
    exponent = idx.unsqueeze(0) - idx.unsqueeze(1)  # [t, j] -> j - t
    # pow(0, 0) == 1 keeps the diagonal exact when discount == 0.
    weights = torch.full((), discount, dtype=x.dtype, device=x.device).pow(exponent.clamp(min=0).to(x.dtype))
    weights = torch.where(exponent >= 0, weights, 0)
    return x @ weights.T


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Vectorised GAE advantages and returns (same math as TRL/OpenRLHF's reversed loop).

    ``rewards`` and ``values`` are zeroed outside ``mask`` first (OpenRLHF), so with a right-padded prefix
    mask the padded tail has ``δ = 0`` and gets ``A = R = 0``, and the last masked position sees
    ``V_{t+1} = 0``. To reproduce TRL exactly, pass its value mask ``~padding_mask_p1`` (one slot past the
    EOS, where TRL puts the score).

    Args:
        rewards: ``[B, T]`` per-token rewards (KL penalty plus the sequence score at one position).
        values: ``[B, T]`` value estimates ``V(s_t)`` recorded at rollout time (detach them).
        mask: Optional ``[B, T]`` bool prefix mask of positions that take part.
        gamma: Discount γ (InstructGPT: 1, "no discount").
        lam: GAE λ (TRL/OpenAI: 0.95; OpenRLHF: 1.0, i.e. Monte-Carlo return minus V).

    Returns:
        ``(advantages, returns)``, both ``[B, T]``. ``returns = advantages + values`` use the **raw**
        advantages; whiten advantages only afterwards (docs/conventions.md#returns).
    """
    _check_discounts(gamma, lam)
    rewards, values = _masked_inputs(rewards, values, mask)
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    deltas = rewards + gamma * next_values - values
    advantages = discounted_reverse_cumsum(deltas, gamma * lam)
    return advantages, advantages + values


def gae_reference(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Reference GAE with the reversed loop of TRL ``ppo_trainer.py``; a test oracle for :func:`gae`.

    Args:
        rewards: ``[B, T]`` per-token rewards.
        values: ``[B, T]`` value estimates.
        mask: Optional ``[B, T]`` bool prefix mask.
        gamma: Discount γ.
        lam: GAE λ.

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, as :func:`gae`.
    """
    _check_discounts(gamma, lam)
    rewards, values = _masked_inputs(rewards, values, mask)
    length = rewards.size(-1)
    lastgaelam = torch.zeros_like(rewards[..., 0])
    advantages_reversed = []
    for t in reversed(range(length)):
        nextvalues = values[..., t + 1] if t < length - 1 else 0.0
        delta = rewards[..., t] + gamma * nextvalues - values[..., t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=-1)
    return advantages, advantages + values
