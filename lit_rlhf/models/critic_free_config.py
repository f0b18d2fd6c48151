"""Configuration of the critic-free stage (:class:`~lit_rlhf.models.CriticFreeModule`): the YAML schema of
``model.init_args.algorithm`` by estimator name (:class:`CriticFreeConfig`, mapped onto the algorithm classes of
:mod:`lit_rlhf.rlhf.algorithms` here, in :data:`ESTIMATORS`) and of ``model.init_args.update`` (the update loop
beside an algorithm given by ``class_path``). Sampling, KL, reward and PTX share PPO's dataclasses
(``ppo_config.py``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

from lit_rlhf.models.ppo_config import UpdateConfig, as_algorithm, check_update_loop
from lit_rlhf.rlhf.algorithms import GRPO, REINFORCEPP, RLOO, Algorithm, DrGRPO
from lit_rlhf.rlhf.critic_free import LossAggregation

Estimator = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]
#: where each estimator's paper puts the KL penalty when ``kl_in`` is left ``null``
DEFAULT_KL_IN = {"grpo": "loss", "dr_grpo": "loss", "rloo": "reward", "reinforce_pp": "reward"}
#: the one place the ``estimator:`` names meet the algorithm classes
ESTIMATORS: dict[str, type[Algorithm]] = {"grpo": GRPO, "dr_grpo": DrGRPO, "rloo": RLOO, "reinforce_pp": REINFORCEPP}

__all__ = ["CriticFreeConfig", "Estimator", "UpdateConfig", "as_algorithm"]


@dataclass
class CriticFreeConfig:
    """Advantage estimator, KL placement, clipping and loss aggregation of a critic-free policy-gradient stage
    (docs/conventions.md#critic-free-rl)."""

    estimator: Estimator = "grpo"
    """``grpo``: ``(r − group mean) / (group std + eps)``; ``dr_grpo``: ``r − group mean``; ``rloo``: ``r − mean
    of the other K − 1``; ``reinforce_pp``: discounted reward-to-go (per-token KL in it) whitened over the
    global batch."""
    group_size: int = 4
    """K responses sampled per prompt, from one batched ``generate`` call; a prompt's K responses stay on one
    process. ``reinforce_pp`` accepts K = 1."""
    kl_in: Literal["reward", "loss"] | None = None
    """``reward``: ``−β·KL`` joins the reward (per token for ``reinforce_pp``, summed per response for the group
    estimators, ``kl.estimator``), as PPO; ``loss``: ``β·k3(π_θ, π_ref)`` per token in the loss, as GRPO.
    ``null`` = the estimator's paper (GRPO and Dr. GRPO: loss; RLOO and REINFORCE++: reward)."""
    clip_low: float = 0.2
    """ε_low: the ratio is clipped at ``1 − ε_low`` for negative advantages."""
    clip_high: float = 0.2
    """ε_high: the ratio is clipped at ``1 + ε_high`` for positive advantages (DAPO's clip-higher: 0.28)."""
    loss_aggregation: LossAggregation = "token_mean"
    """``token_mean`` over the optimizer step (DAPO, TRL ``dapo``), ``sequence_mean`` then over responses
    (GRPO paper, TRL ``grpo``), or ``fixed_length``: token sum / (responses · max_new_tokens) (Dr. GRPO)."""
    drop_zero_signal_groups: bool = False
    """Leave out of the loss the groups whose K scores are all equal (no signal; counted in
    ``train/zero_signal_groups`` either way). Their responses still count for the KL statistics."""
    std_eps: float = 1e-4
    """eps of GRPO's ``std + eps`` (TRL 1e-4; OpenRLHF 1e-9). REINFORCE++ adds 1e-8 to the variance."""
    gamma: float = 1.0
    """Discount of REINFORCE++'s reward-to-go."""
    ppo_epochs: int = 1
    """Passes over each rollout batch (TRL ``num_iterations``; 1 = on-policy, the ratio is 1 in every step)."""
    num_mini_batches: int = 1
    """Optimizer steps per epoch; the rollout's G·K responses are cut into this many minibatches."""
    micro_batch_size: int | None = None
    """Responses per forward/backward pass (gradient accumulation); ``None`` = the whole minibatch."""
    forward_batch_size: int | None = None
    """Responses per no-grad forward pass while collecting rollouts; ``None`` = all at once."""

    def __post_init__(self) -> None:
        if self.estimator not in DEFAULT_KL_IN:
            raise ValueError(f"algorithm.estimator must be one of {sorted(DEFAULT_KL_IN)}, got {self.estimator!r}")
        smallest = 1 if self.estimator == "reinforce_pp" else 2
        if self.group_size < smallest:
            raise ValueError(
                f"algorithm.group_size must be >= {smallest} for {self.estimator!r} (a group baseline needs two "
                f"responses per prompt), got {self.group_size}"
            )
        if self.kl_in is None:
            self.kl_in = DEFAULT_KL_IN[self.estimator]
        if self.kl_in not in ("reward", "loss"):
            raise ValueError(f"algorithm.kl_in must be 'reward', 'loss' or null, got {self.kl_in!r}")
        if not (0 < self.clip_low < 1):
            raise ValueError(f"algorithm.clip_low must lie in (0, 1), got {self.clip_low}")
        if not self.clip_high > 0:
            raise ValueError(f"algorithm.clip_high must be > 0, got {self.clip_high}")
        if self.loss_aggregation not in ("token_mean", "sequence_mean", "fixed_length"):
            raise ValueError(
                "algorithm.loss_aggregation must be token_mean, sequence_mean or fixed_length, "
                f"got {self.loss_aggregation!r}"
            )
        if not self.std_eps >= 0:
            raise ValueError(f"algorithm.std_eps must be >= 0, got {self.std_eps}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"algorithm.gamma must lie in [0, 1], got {self.gamma}")
        check_update_loop(self, "algorithm")

    def to_algorithm(self) -> Algorithm:
        """The :data:`ESTIMATORS` class of :attr:`estimator` with every field of this config that the class
        declares (group size, KL placement, clip ranges, aggregation, zero-signal groups, ``std_eps``,
        ``gamma``)."""
        cls = ESTIMATORS[self.estimator]
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls) if hasattr(self, f.name)})


# Saved in checkpoints' hyper-parameters; allow them in `torch.load(weights_only=True)`.
torch.serialization.add_safe_globals([CriticFreeConfig])
