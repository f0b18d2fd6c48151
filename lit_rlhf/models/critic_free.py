"""Critic-free policy optimisation (GRPO, Dr. GRPO, RLOO, REINFORCE++, GSPO, CISPO, DAPO, ...) as a preset of
:class:`~lit_rlhf.models.PolicyGradientModule`; the advantages and the loss are the
:class:`~lit_rlhf.rlhf.algorithms.Algorithm` object's (docs/conventions.md#rl-algorithms).

What differs from PPO (everything else, sampling, forwards, scores, shaping, PTX, the update loop, KL control,
checkpointed state, is the policy-gradient module's; docs/conventions.md#critic-free-rl):

* **Groups**: each prompt of a batch is repeated ``K = algorithm.group_size`` times, adjacent, and the
  ``G·K`` rows are sampled by **one** batched ``generate`` call (one seed per process and iteration). A
  prompt's group never leaves its process, so under DDP a group baseline needs no communication.
* **No critic, no value head**: the advantage comes from the other responses to the same prompt
  (``grpo``/``dr_grpo``/``rloo``: one number per response, on every token of it) or from the reward-to-go
  whitened over the global batch (``reinforce_pp``).
* **KL**: in the reward (``−β·KL``: per token for REINFORCE++, summed per response for the group estimators)
  or as a per-token ``β·k3`` loss term (GRPO); β fixed or adaptive as in PPO.
* **Loss**: clipped surrogate with ``clip_low``/``clip_high`` (DAPO clip-higher), aggregated by
  ``loss_aggregation`` (token mean, sequence mean, fixed length) over the whole optimizer step of all processes.
* **Zero-signal groups** (all K scores equal) are counted (``train/zero_signal_groups``); the algorithm's
  :meth:`~lit_rlhf.rlhf.algorithms.Algorithm.keep_groups` says which groups enter the loss.
"""

from __future__ import annotations

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lit_rlhf.hf.engines import RolloutEngine
from lit_rlhf.hf.specs import ModelSpec
from lit_rlhf.models.critic_free_config import CriticFreeConfig, UpdateConfig
from lit_rlhf.models.policy_gradient import PolicyGradientModule
from lit_rlhf.models.ppo_config import KLConfig, PTXConfig, RewardConfig, SamplingConfig, SharedBaseConfig
from lit_rlhf.rlhf.algorithms import Algorithm

__all__ = ["CriticFreeConfig", "CriticFreeModule", "UpdateConfig"]


class CriticFreeModule(PolicyGradientModule):
    """GRPO, Dr. GRPO, RLOO or REINFORCE++ against a reward model or ``reward.fn``; one ``training_step`` per
    iteration: sample K responses per prompt, score, advantages without a critic, then
    ``algorithm.ppo_epochs × algorithm.num_mini_batches`` optimizer steps.

    A DataLoader batch of ``G`` prompts gives ``G·K`` responses per process.

    Args:
        policy: the SFT model to optimise (full or LoRA; 4-bit base with LoRA).
        reward_model: frozen reward-model export (4-bit allowed); ``None`` when ``reward.fn`` is given.
        reference: frozen reference policy; ``None``: the LoRA policy with its adapter disabled, else a copy.
        algorithm: an :class:`~lit_rlhf.rlhf.algorithms.Algorithm` (YAML: ``class_path``/``init_args``), or the
            estimator form :class:`CriticFreeConfig` (estimator name, group size, KL placement, clip ranges, loss
            aggregation and the update loop).
        update: the update loop beside an ``algorithm`` object (:class:`UpdateConfig`); with the estimator form
            the loop is in ``algorithm`` and ``update`` must stay unset.
        sampling, kl, reward, ptx, seed, sample_every_n_steps, engine: as
            :class:`~lit_rlhf.models.PolicyGradientModule`.
        shared_base: policy and reward model as LoRA adapters of one base, the reference = the base alone
            (:class:`~lit_rlhf.models.ppo_config.SharedBaseConfig`; no critic adapter, ``critic_init`` unused).
        optimizer, lr_scheduler, max_grad_norm: see :class:`~lit_rlhf.models.base.RLHFModule`.
    """

    def __init__(
        self,
        policy: ModelSpec,
        reward_model: ModelSpec | None = None,
        reference: ModelSpec | None = None,
        algorithm: CriticFreeConfig | Algorithm | None = None,
        update: UpdateConfig | None = None,
        sampling: SamplingConfig | None = None,
        kl: KLConfig | None = None,
        reward: RewardConfig | None = None,
        ptx: PTXConfig | None = None,
        shared_base: SharedBaseConfig | None = None,
        seed: int = 0,
        sample_every_n_steps: int = 0,
        engine: RolloutEngine | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        algorithm = algorithm or CriticFreeConfig()
        if isinstance(algorithm, Algorithm):
            if algorithm.needs_critic:
                raise ValueError(
                    f"algorithm {type(algorithm).__name__} needs a critic: use PPOModule, or a critic-free one."
                )
        elif update is not None:
            raise ValueError("`update` goes with an algorithm given by class_path; the estimator form has its own.")
        super().__init__(
            policy=policy,
            algorithm=algorithm,
            update=update,
            reward_model=reward_model,
            reference=reference,
            shared_base=shared_base,
            sampling=sampling,
            kl=kl,
            reward=reward,
            ptx=ptx,
            seed=seed,
            sample_every_n_steps=sample_every_n_steps,
            engine=engine,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            max_grad_norm=max_grad_norm,
        )
