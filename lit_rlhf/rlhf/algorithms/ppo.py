"""PPO with a critic (Schulman et al. 2017, arXiv:1707.06347; InstructGPT, Ouyang et al. 2022): GAE advantages
(Schulman et al. 2016) whitened over the global batch, the clipped surrogate and the clipped value loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from lit_rlhf.rlhf.advantages import gae
from lit_rlhf.rlhf.algorithms.base import Algorithm
from lit_rlhf.rlhf.losses import ValueLossOutput, ppo_value_loss
from lit_rlhf.rlhf.masking import ReduceFn, masked_whiten

__all__ = ["PPO"]


@dataclass(frozen=True, kw_only=True)
class PPO(Algorithm):
    """GAE(γ, λ) on the per-token rewards and the critic's values, whitened over every masked token of every
    process (unbiased variance); ``clip_low = clip_high = ε`` gives PPO's symmetric clip."""

    needs_critic: ClassVar[bool] = True

    gamma: float = 1.0
    """GAE discount (InstructGPT: no discount)."""
    lam: float = 0.95
    """GAE λ."""
    value_clip_range: float | None = 0.2
    """ε_v of the clipped value loss; ``None`` disables value clipping."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss ``L_policy + vf_coef · L_value``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"algorithm.gamma and lam must lie in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        if self.value_clip_range is not None and not self.value_clip_range > 0:
            raise ValueError(f"algorithm.value_clip_range must be > 0 or null, got {self.value_clip_range}")
        if self.vf_coef < 0:
            raise ValueError(f"algorithm.vf_coef must be >= 0, got {self.vf_coef}")

    def advantages(
        self,
        rewards: Tensor,
        mask: Tensor,
        values: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Whitened GAE advantages ``[B, T]`` and the λ-returns ``[B, T]`` (raw advantages + values); see
        :meth:`Algorithm.advantages`. ``values`` are required."""
        if values is None:
            raise ValueError("PPO needs the critic's values: use PPOModule (a critic or value_head).")
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        advantages = masked_whiten(advantages, mask, reduce_fn=reduce_fn).masked_fill(~mask, 0)
        return advantages, returns

    def value_loss(
        self, values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, num_tokens: Tensor | float | None
    ) -> ValueLossOutput:
        """Clipped value loss (:func:`lit_rlhf.rlhf.ppo_value_loss`); all tensors ``[B, T]``.

        Returns:
            :class:`~lit_rlhf.rlhf.ValueLossOutput`.
        """
        return ppo_value_loss(values, old_values, returns, mask, self.value_clip_range, num_tokens)
