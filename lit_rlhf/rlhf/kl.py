"""Per-token KL estimators and KL-coefficient (β) controllers.

Notation for tensor shapes: ``B`` batch size, ``T`` response length.
"""

from typing import Any, Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of ``KL(π_θ || π_ref)`` at the sampled tokens (Schulman, "Approximating KL").

    With ``logr = ref_logprobs - logprobs`` (TRL's sign convention):

    * ``k1 = -logr``: unbiased, can be negative per token (expected, not a bug);
    * ``k2 = ½ logr²``: biased, ≥ 0;
    * ``k3 = exp(logr) - 1 - logr``: unbiased, ≥ 0, heavy-tailed when ``logr ≫ 0``.

    No masking: callers mask the padded tail (see :func:`lit_rlhf.rlhf.rewards.per_token_rewards`).

    Args:
        logprobs: ``[B, T]`` temperature-scaled log-probs of the sampled tokens under the policy.
        ref_logprobs: ``[B, T]`` the same under the frozen reference policy.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``[B, T]`` per-token KL estimates in nats.
    """
    logr = ref_logprobs - logprobs
    if estimator == "k1":
        return -logr
    if estimator == "k2":
        return 0.5 * logr**2
    if estimator == "k3":
        return torch.expm1(logr) - logr
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'.")


class FixedKLController:
    """Constant KL coefficient β (TRL's ``kl_coef``; InstructGPT used β = 0.02).

    Args:
        value: The coefficient β.
    """

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; present so both controllers are interchangeable."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.value = float(state_dict["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019) log-space proportional controller that steers the KL towards ``target``.

    After each PPO iteration: ``e = clip(current_kl / target - 1, -0.2, 0.2)`` and
    ``value *= 1 + e · n_steps / horizon`` (OpenAI lm-human-preferences, TRL ≤ 0.11, OpenRLHF).

    Units matter (docs/conventions.md#kl-units): ``target`` and ``current_kl`` are **nats per sequence**, i.e. the
    per-token KL summed over the response and averaged over the batch (TRL's ``objective/kl``). Feeding a
    per-token mean against a per-sequence target such as 6 drives β towards 0. ``horizon`` and ``n_steps`` are
    in episodes (sampled responses).

    Args:
        init_value: Initial β.
        target: Target KL in nats per sequence.
        horizon: Time constant in episodes: while the KL stays ≥ 20% off target, β changes by a factor of
            about ``e^{±0.2}`` every ``horizon`` episodes.
    """

    def __init__(self, init_value: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}.")
        self.value = float(init_value)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adjust β once per PPO iteration, after its optimisation epochs.

        Args:
            current_kl: Measured KL of this iteration's rollouts, nats per sequence (float or 0-d tensor).
            n_steps: Number of episodes in this iteration (the rollout batch size, all processes together).
        """
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """Only β is state; ``target`` and ``horizon`` are hyper-parameters that come from the config."""
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.value = float(state_dict["value"])
