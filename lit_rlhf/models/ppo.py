"""Stage 3 of InstructGPT: PPO against a reward model (or a rule-based reward) with a per-token KL penalty, as a
preset of :class:`~lit_rlhf.models.PolicyGradientModule` (the :class:`~lit_rlhf.rlhf.algorithms.PPO` algorithm,
a critic or value head, one response per prompt).

Conventions (each explained, with its sources, in docs/conventions.md):

* **Sampling**: temperature 1.0, ``top_k=0``, ``top_p=1.0`` by default, through the rollout engine
  (:class:`~lit_rlhf.hf.engines.HFEngine` by default) that hides the checkpoint's ``generation_config``; every
  log-prob (old, new, reference) and the entropy come from ``log_softmax(logits / T)``. Each process samples
  with its own seed (``seed + rank·RANK_SEED_STRIDE + iteration·ITERATION_SEED_STRIDE``); the prompt order is
  shared (#sampling).
* **Responses**: a response ends at its first EOS, a trained action; tokens after it are padding and masked
  (#where-a-response-ends). Pad and EOS are distinct (``load_tokenizer`` adds a pad token).
* **Rewards**: ``r_t = -β·KL_t`` on every response token (k1 ``log π - log π_ref`` by default) plus the
  sequence score **once, on the EOS token** (the last token when there is none; the InstructGPT/OpenRLHF
  placement, #where-the-score-lands). The reward model's own normalisation (its config) is applied; optional
  running mean/std normalisation, clipping, and a missing-EOS penalty (subtracted) follow.
* **Truncation**: a response cut at ``max_new_tokens`` is treated as finished (no value bootstrap);
  ``reward.missing_eos_penalty`` makes such responses cost.
* **Advantages**: GAE with γ = 1, λ = 0.95; returns = raw advantages + values; advantages whitened over the
  masked tokens of the whole rollout batch **of all processes** (unbiased variance, #gae).
* **Updates**: old log-probs, values and advantages are frozen for the iteration. ``ppo_epochs`` ×
  ``num_mini_batches`` optimizer steps, each accumulated over micro-batches; the losses are token sums divided
  by the minibatch's token count over all processes (a global token mean, #ppo-updates). Clipped surrogate
  ε = 0.2, clipped value loss ε_v = 0.2, gradient-norm clipping 1.0.
* **KL control**: fixed β, or Ziegler's adaptive controller fed the mean per-sequence KL in nats (Σ over
  tokens) and ``n_steps`` = rollout prompts of all processes; updated once per iteration (#kl-penalty).
* **Forward passes**: position ids from the attention mask in every forward (not in ``generate``); response
  token ``t`` is scored by the logits at ``P - 1 + t`` and ``V[t] = V(s_t)`` (#index-alignment).
* **PPO-ptx** (optional): ``γ_ptx ×`` the token-mean NLL of a pretraining/SFT batch joins every optimizer
  step (InstructGPT Eq. 2); the critic gets no PTX gradient.
* **State**: β, the running score statistics and the iteration counter (which seeds sampling) are saved in
  checkpoints; :class:`~lit_rlhf.datamodules.PromptDataModule` saves the data position.
* **Models**: dropout 0 in all four roles (``ModelSpec.dropout``). A LoRA policy's reference is the same
  weights with the adapter disabled (no second copy); otherwise a frozen copy. The critic is a separate network
  initialised from the normalised reward model (#critic), or a zero-initialised value head on the policy.
"""

from __future__ import annotations

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lit_rlhf.hf.engines import RolloutEngine
from lit_rlhf.hf.specs import ModelSpec
from lit_rlhf.models.policy_gradient import PolicyGradientModule
from lit_rlhf.models.ppo_config import (
    KLConfig,
    PPOConfig,
    PTXConfig,
    RewardConfig,
    SamplingConfig,
    SharedBaseConfig,
)
from lit_rlhf.rlhf import ScoredSamples

__all__ = [
    "KLConfig",
    "PPOConfig",
    "PPOModule",
    "PTXConfig",
    "RewardConfig",
    "SamplingConfig",
    "ScoredSamples",
    "SharedBaseConfig",
]


class PPOModule(PolicyGradientModule):
    """PPO with a KL penalty to the SFT model (InstructGPT "PPO"), one ``training_step`` per PPO iteration: the
    :class:`~lit_rlhf.models.PolicyGradientModule` with ``algorithm`` = ``ppo`` (a
    :class:`~lit_rlhf.models.PPOConfig`, which builds the :class:`~lit_rlhf.rlhf.algorithms.PPO` object and holds
    the update loop).

    A DataLoader batch of prompts (from :class:`~lit_rlhf.datamodules.PromptDataModule`) is one iteration:
    sample, score, compute rewards and advantages, then ``ppo.ppo_epochs × ppo.num_mini_batches`` optimizer
    steps. ``trainer.global_step`` therefore counts optimizer steps, not iterations.

    Args:
        policy: the SFT model to optimise (full or LoRA; 4-bit base with LoRA).
        critic: a sequence classifier with the policy's tokenizer, normally the reward-model export
            (InstructGPT); ``None`` with ``value_head=True`` puts a zero-initialised value head on the policy.
        reward_model: frozen reward model (4-bit allowed) with its own tokenizer: the policy's tokens are scored
            as they are when the vocabularies match, else re-encoded (docs/conventions.md#reward-model-tokenizer);
            ``None`` when ``reward.fn`` is given.
        reference: frozen reference policy. ``None``: a LoRA policy's own weights with the adapter disabled
            (no second copy), else a frozen copy loaded from the policy's spec.
        value_head: use a value head on the policy's last hidden state instead of a separate critic.
        shared_base: all four roles on the policy's base as named LoRA adapters (policy, critic, reward model;
            the reference = every adapter disabled); needs ``policy.lora`` and no ``critic``, ``reward_model``,
            ``reference`` or ``value_head`` (see :class:`SharedBaseConfig`).
        sampling: rollout sampling. ppo: the algorithm and its optimisation loop. kl: the KL penalty and its
            controller.
        reward: score source (``reward.fn``, or any ``reward.scorer``) and shaping.
        ptx: PPO-ptx, a language-modelling loss on pretraining/SFT text in every optimizer step (optional).
        seed: sampling and minibatch-shuffling seed.
        sample_every_n_steps: print a few prompts, responses and scores every N iterations (0 = never).
        engine: where responses come from (:class:`~lit_rlhf.hf.engines.RolloutEngine`; YAML ``class_path``);
            default :class:`~lit_rlhf.hf.engines.HFEngine`, transformers' ``generate`` on the live policy. Its
            ``sync_weights`` is called after every iteration's updates.
        optimizer, lr_scheduler, max_grad_norm: see :class:`~lit_rlhf.models.base.RLHFModule`.
    """

    def __init__(
        self,
        policy: ModelSpec,
        critic: ModelSpec | None = None,
        reward_model: ModelSpec | None = None,
        reference: ModelSpec | None = None,
        value_head: bool = False,
        shared_base: SharedBaseConfig | None = None,
        sampling: SamplingConfig | None = None,
        ppo: PPOConfig | None = None,
        kl: KLConfig | None = None,
        reward: RewardConfig | None = None,
        ptx: PTXConfig | None = None,
        seed: int = 0,
        sample_every_n_steps: int = 0,
        engine: RolloutEngine | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        ppo = ppo or PPOConfig()
        super().__init__(
            policy=policy,
            algorithm=ppo,
            update=ppo,
            critic=critic,
            value_head=value_head,
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
