"""The :class:`Algorithm` interface: what one policy-gradient step asks of an RL algorithm, in pure tensors
(docs/conventions.md#rl-algorithms).

A LightningModule samples, scores and runs the forwards; the algorithm object turns those tensors into
advantages and a loss. It holds no model and no state beyond its hyper-parameters, so the same object gives the
same numbers on every process and after a resume.

Notation for tensor shapes: ``B`` responses (``B = G·K``: ``G`` prompts, ``K = group_size`` responses per
prompt, a prompt's responses adjacent), ``T`` response length.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from lit_rlhf.rlhf.critic_free import ClippedLossOutput, LossAggregation, clipped_policy_loss, zero_signal_groups
from lit_rlhf.rlhf.masking import ReduceFn

KLPlacement = Literal["reward", "loss", "none"]

__all__ = ["Algorithm", "GroupAlgorithm", "KLPlacement"]


@dataclass(frozen=True, kw_only=True)
class Algorithm(ABC):
    """One RL algorithm of a policy-gradient step; subclass it in one file (docs/conventions.md#rl-algorithms).

    A step calls, in this order: :meth:`shape_scores` (``[B]`` → ``[B]``), the module builds the per-token
    rewards ``r_t = −β·KL_t·[kl_in == "reward"] + score·[t = last]``, :meth:`advantages` (``[B, T]`` →
    ``[B, T]``), :meth:`keep_groups` (which groups enter the loss), then per micro-batch :meth:`policy_loss`
    (and :meth:`value_loss` when :attr:`needs_critic`). Every subclass is a dataclass whose fields are its YAML
    ``init_args``; its ``__post_init__`` calls ``super().__post_init__()`` and checks its own fields.
    """

    needs_critic: ClassVar[bool] = False
    """Whether :meth:`advantages` reads ``values`` (a critic or value head must be trained alongside)."""
    min_group_size: ClassVar[int] = 1
    """The smallest ``group_size`` the advantage is defined for (2 for a group baseline)."""

    group_size: int = 1
    """``K`` responses sampled per prompt, from one batched ``generate`` call."""
    kl_in: KLPlacement = "reward"
    """``reward``: ``−β·KL`` joins the reward (the module's ``kl`` section); ``loss``: ``β·k3(π_θ, π_ref)`` per
    token in the loss (GRPO); ``none``: no KL to the reference (DAPO; the KL is still logged)."""
    clip_low: float = 0.2
    """ε_low: the ratio is clipped at ``1 − ε_low`` (for negative advantages)."""
    clip_high: float = 0.2
    """ε_high: the ratio is clipped at ``1 + ε_high`` (for positive advantages; DAPO clip-higher 0.28)."""
    loss_aggregation: LossAggregation = "token_mean"
    """How the per-token loss is averaged (:func:`lit_rlhf.rlhf.aggregate_loss`)."""
    drop_zero_signal_groups: bool = False
    """Leave out of the loss the groups whose ``K`` scores are all equal (:meth:`keep_groups`)."""
    dynamic_sampling: bool = False
    """Draw more prompt batches until a step holds as many groups with signal as one batch has prompts (DAPO
    §3.2), then train on exactly that many (the extra ones are dropped); needs ``drop_zero_signal_groups``."""
    max_draws: int = 8
    """Batches drawn at most for one step under ``dynamic_sampling``; after that the step trains on the groups
    it has (with a warning), or is skipped when it has none."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.group_size < self.min_group_size:
            raise ValueError(
                f"algorithm.group_size must be >= {self.min_group_size} for {name} (a group baseline needs two "
                f"responses per prompt), got {self.group_size}"
            )
        if self.kl_in not in ("reward", "loss", "none"):
            raise ValueError(f"algorithm.kl_in must be 'reward', 'loss' or 'none', got {self.kl_in!r}")
        if not (0 < self.clip_low <= 1):
            raise ValueError(f"algorithm.clip_low must lie in (0, 1], got {self.clip_low}")
        if not self.clip_high > 0:
            raise ValueError(f"algorithm.clip_high must be > 0, got {self.clip_high}")
        if self.loss_aggregation not in ("token_mean", "sequence_mean", "fixed_length"):
            raise ValueError(
                "algorithm.loss_aggregation must be token_mean, sequence_mean or fixed_length, "
                f"got {self.loss_aggregation!r}"
            )
        if self.dynamic_sampling and not (self.drop_zero_signal_groups and self.group_size >= 2):
            raise ValueError(
                "algorithm.dynamic_sampling refills the groups that drop_zero_signal_groups leaves out: it needs "
                f"drop_zero_signal_groups: true and group_size >= 2 (got {self.drop_zero_signal_groups}, "
                f"{self.group_size})"
            )
        if self.max_draws < 1:
            raise ValueError(f"algorithm.max_draws must be >= 1, got {self.max_draws}")

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # module hyper-parameters hold the object: allow it in `torch.load(weights_only=True)` checkpoints
        torch.serialization.add_safe_globals([cls])

    # ---- scores ------------------------------------------------------------------------------------
    def shape_scores(self, scores: Tensor, lengths: Tensor, max_length: int) -> Tensor:
        """The algorithm's own score shaping, after the module's (normalisation, clipping, missing-EOS
        penalty); identity by default (DAPO: overlong penalty; REINFORCE++-baseline: group mean subtracted).

        Args:
            scores: ``[B]`` shaped scores of the responses.
            lengths: LongTensor ``[B]`` response tokens of each row (its EOS included).
            max_length: the sampling's ``max_new_tokens``.

        Returns:
            ``[B]`` scores that enter the rewards.
        """
        return scores

    # ---- advantages --------------------------------------------------------------------------------
    @abstractmethod
    def advantages(
        self,
        rewards: Tensor,
        mask: Tensor,
        values: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Advantages and returns of a rollout.

        Args:
            rewards: ``[B, T]`` per-token rewards: ``−β·KL_t`` (when ``kl_in == "reward"``) plus the score on the
                response's last token (:func:`lit_rlhf.rlhf.per_token_rewards`).
            mask: BoolTensor ``[B, T]`` of response tokens.
            values: ``[B, T]`` value estimates at rollout time (only when :attr:`needs_critic`).
            reduce_fn: sum over processes for batch statistics; ``None`` = this process.

        Returns:
            ``(advantages, returns)``, both ``[B, T]``, 0 outside ``mask``; ``returns`` are the value targets
            (for a critic-free algorithm: what the advantage was computed from, for logging).
        """

    def keep_groups(self, scores: Tensor) -> Tensor | None:
        """Which groups enter the loss (DAPO's dynamic-sampling filter); ``None`` = all of them.

        Args:
            scores: ``[G·K]`` the scores the advantages were computed from (after :meth:`shape_scores`).

        Returns:
            BoolTensor ``[G]`` (True = keep), or ``None``.
        """
        if not self.drop_zero_signal_groups or self.group_size < 2:
            return None
        return ~zero_signal_groups(scores, self.group_size)

    # ---- losses ------------------------------------------------------------------------------------
    def importance_logratio(self, logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor | None:
        """``log ρ`` ``[B, T]`` that the surrogate clips, 0 outside ``mask``; ``None`` = the per-token
        ``log π_θ(y_t) − log π_old(y_t)`` (PPO, GRPO). GSPO returns its sequence-level ratio on every token."""
        return None

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
        """The clipped surrogate shared by every algorithm, ``max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high))``
        with ``ρ = exp(`` :meth:`importance_logratio` ``)``, plus ``β·k3`` when ``ref_logprobs`` are given,
        aggregated by :attr:`loss_aggregation` (:func:`lit_rlhf.rlhf.clipped_policy_loss`).

        Args:
            logprobs: ``[B, T]`` log-probs of the sampled tokens under the current policy (with gradient).
            old_logprobs: ``[B, T]`` the same at rollout time.
            advantages: ``[B, T]`` advantages, detached.
            mask: BoolTensor ``[B, T]`` of response tokens.
            num_tokens, num_sequences, max_length: normalisers of :func:`lit_rlhf.rlhf.aggregate_loss` (pass the
                whole optimizer step's so that gradient accumulation equals one big batch).
            ref_logprobs: ``[B, T]`` reference log-probs for the KL loss term; ``None`` = no term.
            kl_coef: β of the KL loss term.

        Returns:
            :class:`~lit_rlhf.rlhf.ClippedLossOutput`.
        """
        return clipped_policy_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            self.clip_low,
            self.clip_high,
            self.loss_aggregation,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
            max_length=max_length,
            ref_logprobs=ref_logprobs,
            kl_coef=kl_coef,
            logratio=self.importance_logratio(logprobs, old_logprobs, mask.bool()),
        )


@dataclass(frozen=True, kw_only=True)
class GroupAlgorithm(Algorithm):
    """An algorithm whose baseline is the other responses to the same prompt: one advantage per response, from
    the ``K`` sequence rewards of its group, on every token of it. Subclasses implement
    :meth:`sequence_advantages`."""

    min_group_size: ClassVar[int] = 2

    group_size: int = 4
    kl_in: KLPlacement = "loss"

    @abstractmethod
    def sequence_advantages(self, scores: Tensor) -> Tensor:
        """One advantage per response.

        Args:
            scores: ``[G·K]`` sequence rewards (the score minus ``β·Σ_t KL_t`` when the KL is in the reward).

        Returns:
            ``[G·K]`` advantages.
        """

    def advantages(
        self,
        rewards: Tensor,
        mask: Tensor,
        values: Tensor | None = None,
        reduce_fn: ReduceFn | None = None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`sequence_advantages` of ``Σ_t r_t`` on every response token; ``returns`` hold ``Σ_t r_t``.
        Shapes as :meth:`Algorithm.advantages`."""
        sequence_rewards = rewards.sum(1)  # the score minus β·Σ_t KL_t when the KL is in the reward
        per_response = self.sequence_advantages(sequence_rewards)
        advantages = per_response[:, None].expand_as(mask).masked_fill(~mask, 0).contiguous()
        return advantages, torch.where(mask, sequence_rewards[:, None], 0)
