"""Stage 3 of InstructGPT: PPO against a reward model (or a rule-based reward) with a per-token KL penalty.

Conventions (each explained, with its sources, in docs/conventions.md):

* **Sampling**: temperature 1.0, ``top_k=0``, ``top_p=1.0`` by default, through the one sampler
  (:func:`lit_rlhf.hf.generation.sample_responses`) that hides the checkpoint's ``generation_config``; every
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

import math
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lit_rlhf.datamodules.preference import read_scored_pairs
from lit_rlhf.datamodules.ptx import ptx_batch, ptx_examples
from lit_rlhf.hf.engines import RolloutEngine
from lit_rlhf.hf.export import save_pretrained_atomic
from lit_rlhf.hf.forwards import critic_values, response_logits
from lit_rlhf.hf.loading import load_model, load_tokenizer, unwrap_peft
from lit_rlhf.hf.reward import RewardScorer
from lit_rlhf.hf.scorers import Scorer, ScoringRows, load_scorer, require_policy_tokens
from lit_rlhf.hf.shared_base import AdapterRole, SharedBase, export_adapter_role, load_shared_base
from lit_rlhf.hf.specs import ModelSpec
from lit_rlhf.models.base import RLHFModule, trim_padding
from lit_rlhf.models.ppo_config import (
    KLConfig,
    PPOConfig,
    PTXConfig,
    RewardConfig,
    SamplingConfig,
    SharedBaseConfig,
)
from lit_rlhf.models.roles import Roles
from lit_rlhf.rlhf import (
    AdaptiveKLController,
    FixedKLController,
    Rollout,
    RunningMoments,
    apply_missing_eos_penalty,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_whiten,
    padding_bounds,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    response_masks,
    sft_nll,
)

# Seed arithmetic. Every process and iteration samples with its own seed, and every process shuffles minibatches
# with the same one. The strides are distinct primes, so the seeds derived for different ranks, iterations and
# steps stay apart.
#: sampling seed offset between processes
RANK_SEED_STRIDE = 100003
#: sampling seed offset between PPO iterations
ITERATION_SEED_STRIDE = 7919
#: minibatch-shuffling seed = ``seed · SHUFFLE_SEED_STRIDE + iteration`` (the same on every process)
SHUFFLE_SEED_STRIDE = 1_000_003
#: PTX batch seed = ``shuffling seed · PTX_SEED_STRIDE + optimizer step of the iteration``
PTX_SEED_STRIDE = 1009

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


class RolloutForwards(NamedTuple):
    """The no-grad forwards of a rollout (:meth:`PPOModule._rollout_forwards`): per-token fields ``[B, T]``, 0
    outside the response mask, and the raw scores ``[B]``."""

    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    entropy: Tensor
    scores: Tensor


class LossPart(NamedTuple):
    """One backward pass of an optimizer step: a named loss on its data (``policy``: a micro-batch of the
    rollout; ``ptx``: a PPO-ptx language-modelling batch). ``compute()`` gives ``(loss, stats)``."""

    name: str
    compute: Callable[[], tuple[Tensor, dict[str, Tensor]]]


class ScoredSamples(NamedTuple):
    """One iteration's responses with everything their rewards are computed from (:meth:`PPOModule.sample_and_score`):
    ``B`` rows, ``P`` prompt and ``T`` response columns; per-token fields are 0 outside ``mask``."""

    query_responses: Tensor
    """LongTensor ``[B, P + T]``: left-padded prompt, then the response (pad after the first EOS)."""
    attention_mask: Tensor
    """LongTensor ``[B, P + T]``: 1 on real prompt tokens and on response tokens up to and with the EOS."""
    responses: Tensor
    """LongTensor ``[B, T]``."""
    mask: Tensor
    """BoolTensor ``[B, T]``: response tokens up to and with the first EOS."""
    sequence_lengths: Tensor
    """LongTensor ``[B]``: index of each response's last token (its EOS, else ``T - 1``)."""
    contains_eos: Tensor
    """BoolTensor ``[B]``."""
    logprobs: Tensor
    """``[B, T]`` policy log-probs at sampling time."""
    ref_logprobs: Tensor
    """``[B, T]`` reference log-probs."""
    values: Tensor
    """``[B, T]`` value estimates (zeros without a value function)."""
    entropy: Tensor
    """``[B, T]`` policy entropy per token."""
    raw_scores: Tensor
    """``[B]`` reward-model or ``reward.fn`` scores before shaping."""
    scores: Tensor
    """``[B]`` shaped scores (running normalisation, clipping, missing-EOS penalty)."""
    kl: Tensor
    """``[B, T]`` per-token KL estimate ``kl.estimator`` of the policy from the reference."""

    def rollout(self, rewards: Tensor, advantages: Tensor, returns: Tensor, mask: Tensor | None = None) -> Rollout:
        """The frozen :class:`~lit_rlhf.rlhf.Rollout` of these samples with their ``[B, T]`` rewards, advantages
        and returns; ``mask`` ``[B, T]`` (a subset of :attr:`mask`) replaces the action mask and the response
        part of the attention mask."""
        attention_mask = self.attention_mask
        if mask is None:
            mask = self.mask
        else:
            prompt_mask = attention_mask[:, : -mask.shape[1]]
            attention_mask = torch.cat([prompt_mask, mask.long()], 1)
        return Rollout(
            query_responses=self.query_responses,
            attention_mask=attention_mask,
            responses=self.responses,
            mask=mask,
            logprobs=self.logprobs,
            ref_logprobs=self.ref_logprobs,
            values=self.values,
            scores=self.scores,
            rewards=rewards,
            advantages=advantages,
            returns=returns,
        )


class PPOModule(RLHFModule):
    """PPO with a KL penalty to the SFT model (InstructGPT "PPO"), one ``training_step`` per PPO iteration.

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
        sampling: rollout sampling. ppo: the optimisation loop. kl: the KL penalty and its controller.
        reward: score source (``reward.fn``, or any ``reward.scorer``) and shaping.
        ptx: PPO-ptx, a language-modelling loss on pretraining/SFT text in every optimizer step (optional).
        seed: sampling and minibatch-shuffling seed.
        sample_every_n_steps: print a few prompts, responses and scores every N iterations (0 = never).
        engine: where responses come from (:class:`~lit_rlhf.hf.engines.RolloutEngine`; YAML ``class_path``);
            default :class:`~lit_rlhf.hf.engines.HFEngine`, transformers' ``generate`` on the live policy. Its
            ``sync_weights`` is called after every iteration's updates.
        optimizer, lr_scheduler, max_grad_norm: see :class:`~lit_rlhf.models.base.RLHFModule`.
    """

    hf_roles = ("policy", "reference", "critic", "reward_model")
    #: False in critic-free subclasses (:class:`~lit_rlhf.models.CriticFreeModule`): no critic, no value head.
    uses_value_function: bool = True

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
        super().__init__(optimizer, lr_scheduler, max_grad_norm)
        self.sampling = sampling or SamplingConfig()
        self.ppo = ppo or PPOConfig()
        self.kl = kl or KLConfig()
        self.reward = reward or RewardConfig()
        # a reward callable or scorer given from Python is code: keep it out of the (weights-only) checkpoint
        code = (
            []
            if (self.reward.fn is None or isinstance(self.reward.fn, str)) and self.reward.scorer is None
            else ["reward"]
        )
        # the engine holds the policy it serves once bound: it is configuration, not checkpointed state
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "engine", *code])
        self.shared_base = shared_base
        #: which models this run holds (lit_rlhf.models.roles): build_models and the planner read it
        self.roles = Roles.policy_gradient(
            policy,
            critic=critic,
            reward_model=reward_model,
            reference=reference,
            value_head=value_head,
            shared_base=shared_base is not None,
            reward_adapter=shared_base.reward_adapter if shared_base is not None else None,
            reward_fn=self.reward.fn is not None or self.reward.scorer is not None,
            value_function=self.uses_value_function,
            stage=type(self).__name__,
        )
        if self.reward.normalize_on is not None and reward_model is None:
            raise ValueError(
                "`reward.normalize_on` normalises a separate `reward_model`; `reward.fn` scores and a shared-base "
                "reward adapter (normalised when it was exported) are used as they are."
            )
        self.specs: dict[str, ModelSpec] = self.roles.specs()
        self.ptx = ptx
        self._ptx_examples: list | None = None
        self.seed = seed
        if engine is not None:
            self.engine = engine
        self.sample_every_n_steps = sample_every_n_steps
        self.policy = self.reference = self.critic = self.reward_model = None
        self._shared: SharedBase | None = None  # adapter switching when every role lives on one base
        self.value_head: nn.Linear | None = None
        self.score_moments = RunningMoments()
        self.kl_ctl = (
            FixedKLController(self.kl.coef)
            if self.kl.target is None
            else AdaptiveKLController(self.kl.coef, self.kl.target, self.kl.horizon)
        )
        self.iteration = 0
        #: the one :class:`~lit_rlhf.hf.scoring.Scorer` of this run (reward model, adapter, ``reward.fn`` or
        #: ``reward.scorer``), set by :meth:`build_models`
        self.scorer: Scorer | None = None

    # ---- models ------------------------------------------------------------------------------------
    @property
    def trainable_roles(self) -> tuple[str, ...]:
        return self.roles.trainable

    def model_specs(self) -> dict[str, ModelSpec]:
        return self.specs

    def build_models(self) -> None:
        tok, device = self.tokenizer, self.load_device
        if self.shared_base is not None:
            self._build_shared_base()
            return
        self.policy = load_model(self.specs["policy"], tok, "causal_lm", trainable=True, device=device)
        # a LoRA policy with its adapter disabled *is* the reference, unless another one is given explicitly
        if self.roles.loads_reference:
            self.reference = load_model(self.specs["reference"], tok, "causal_lm", trainable=False, device=device)
        if self.roles.value_source == "critic":
            require_policy_tokens(self.specs["critic"], tok)
            self.critic = load_model(self.specs["critic"], tok, "sequence_classifier", trainable=True, device=device)
        elif self.roles.value_source == "value_head":
            hidden = unwrap_peft(self.policy).config.hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)  # V ≡ 0 at start (OpenAI 2019) instead of random values
            nn.init.zeros_(self.value_head.bias)
        self._build_reward_fn_and_ptx()

    def _build_shared_base(self) -> None:
        """Policy, critic and reward model as adapters of one base; the reference is the base alone."""
        shared = self.shared_base
        if self.specs["policy"].lora is None:  # checked here: LoRAQuantization may set it after __init__
            raise ValueError(
                "shared_base needs a LoRA policy (policy.lora, or a LoRAQuantization callback): the base itself "
                "is the frozen reference."
            )
        adapter = shared.reward_adapter
        tokenizer_saved = adapter is not None and (Path(adapter) / "tokenizer_config.json").exists()
        if tokenizer_saved and load_tokenizer(str(adapter)).get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"reward adapter {adapter!r} must share the policy's tokenizer.")
        self._shared, self.critic, self.reward_model = load_shared_base(
            self.specs["policy"],
            self.tokenizer,
            shared.reward_adapter,
            shared.critic_init if self.uses_value_function else None,
            shared.critic_lora,
            self.load_device,
        )
        self.policy = self._shared.model
        if self.reward_model is not None:  # the reward adapter reads the policy's own tokens
            self.scorer = RewardScorer(self.reward_model, self.tokenizer)
        self._build_reward_fn_and_ptx()

    def _build_reward_fn_and_ptx(self) -> None:
        """The scorer (unless a shared base's reward adapter already is one), then the PTX data."""
        if self.scorer is None:
            # a reward model keeps its own tokenizer: scored on the policy's tokens when the vocabularies match,
            # else decoded and re-encoded (lit_rlhf.hf.reward)
            spec = self.specs.get("reward_model")
            path = self.reward.normalize_on
            pairs = None if path is None else read_scored_pairs(path)
            if pairs is not None:
                rank_zero_info(
                    f"reward.normalize_on: {len(pairs[0])} pairs of {path} will score mean 0 under {spec.name_or_path}"
                )
            self.scorer = load_scorer(spec, self.reward.scorer or self.reward.fn, self.load_device, pairs)
            self.reward_model = self.scorer.model  # the frozen nn.Module it runs (None for a function)
        if self.ptx is not None:
            ptx = self.ptx
            self._ptx_examples = ptx_examples(
                ptx.data,
                self.tokenizer,
                ptx.max_length,
                ptx.text_column,
                ptx.prompt_column,
                ptx.completion_column,
                ptx.messages_column,
            )

    def trainable_parameters(self) -> list:
        """Trainable parameters, as two param groups when the critic has its own learning rate."""
        params = super().trainable_parameters()
        if self.ppo.critic_lr is None:
            return params
        critic_ids = {id(p) for p in self._value_module().parameters()}
        if isinstance(self.critic, AdapterRole):  # a shared base's critic: its head and its adapter
            critic_ids |= {id(p) for p in self.critic.adapter_parameters()}
        return [
            {"params": [p for p in params if id(p) not in critic_ids]},
            {"params": [p for p in params if id(p) in critic_ids], "lr": self.ppo.critic_lr},
        ]

    def _value_module(self) -> nn.Module:
        return self.critic if self.critic is not None else self.value_head

    def total_optimizer_steps(self) -> int | None:
        iterations = super().total_optimizer_steps()
        return None if iterations is None else iterations * self.ppo.ppo_epochs * self.ppo.num_mini_batches

    # ---- forward passes ----------------------------------------------------------------------------
    def policy_forward(self, query_responses: Tensor, attention_mask: Tensor, length: int, reference: bool = False):
        """``(logits [B, T, V], values [B, T] | None)`` of the policy (or reference) on response tokens."""
        with_head = self.value_head is not None and not reference
        if reference and self.reference is None:
            with self.policy.disable_adapter() if self._shared is None else self._shared.no_adapter():
                return response_logits(self.policy, query_responses, attention_mask, length)[0], None
        model = self.reference if reference else self.policy
        logits, hidden = response_logits(model, query_responses, attention_mask, length, hidden=with_head)
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float() if with_head else None
        return logits, values

    def values(self, query_responses: Tensor, attention_mask: Tensor, length: int, from_policy: Tensor | None):
        return (
            from_policy if self.critic is None else critic_values(self.critic, query_responses, attention_mask, length)
        )

    @property
    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _all_sum(self, tensor: Tensor) -> Tensor:
        """Sum over processes (identity on one process)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return tensor
        return trainer.strategy.reduce(tensor, reduce_op="sum")

    # ---- rollout -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_and_score(self, batch: dict[str, Any]) -> ScoredSamples:
        """Steps 1-3 of an iteration, shared by every policy-gradient module: sample, response masks, forward
        passes, raw and shaped scores, per-token KL. Rewards and advantages are the caller's."""
        prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        rank = self._trainer.global_rank if self._trainer is not None else 0
        # distinct per process and per iteration, and restored with `iteration` on resume
        seed = self.seed + rank * RANK_SEED_STRIDE + self.iteration * ITERATION_SEED_STRIDE
        responses = self.sample(prompt_ids, prompt_mask, seed)
        tok = self.tokenizer
        sequence_lengths, mask, contains_eos = response_masks(responses, tok.pad_token_id, tok.eos_token_id)
        query_responses = torch.cat([prompt_ids, responses], 1)
        attention_mask = torch.cat([prompt_mask, mask.long()], 1)
        forwards = self._rollout_forwards(query_responses, attention_mask, mask, batch)
        scores = self._shape_scores(forwards.scores, contains_eos)
        kl = kl_penalty(forwards.logprobs, forwards.ref_logprobs, self.kl.estimator).masked_fill(~mask, 0)
        return ScoredSamples(
            query_responses=query_responses,
            attention_mask=attention_mask,
            responses=responses,
            mask=mask,
            sequence_lengths=sequence_lengths,
            contains_eos=contains_eos,
            logprobs=forwards.logprobs,
            ref_logprobs=forwards.ref_logprobs,
            values=forwards.values,
            entropy=forwards.entropy,
            raw_scores=forwards.scores,
            scores=scores,
            kl=kl,
        )

    def rollout_stats(self, batch: dict[str, Any], samples: ScoredSamples, non_score: Tensor) -> dict[str, Tensor]:
        """The ``objective/*`` and ``rollout/*`` statistics of an iteration, means over every process's rows
        (``non_score``: ``[B, T]`` the KL part of the rewards); prints a few samples every
        ``sample_every_n_steps`` iterations."""
        n = self._all_sum(torch.tensor(float(len(samples.responses)), device=self.device))
        mean = lambda x: self._all_sum(x.float().sum()) / n  # noqa: E731  (mean over every process's rows)
        mask = samples.mask
        stats = {
            "objective/kl": mean(samples.kl.sum(1)),
            "objective/score": mean(samples.scores),
            "objective/raw_score": mean(samples.raw_scores),
            "objective/non_score_reward": mean(non_score.sum(1)),
            "objective/entropy": self._all_sum((samples.entropy * mask).sum()) / self._all_sum(mask.sum().float()),
            "objective/beta": torch.tensor(self.kl_ctl.value),
            "rollout/response_length": mean(mask.sum(1)),
            "rollout/eos_rate": mean(samples.contains_eos),
        }
        stats["objective/rlhf_reward"] = stats["objective/score"] + stats["objective/non_score_reward"]
        if self.sample_every_n_steps and self.iteration % self.sample_every_n_steps == 0:
            self._print_samples(batch, samples.responses, mask, samples.scores)
        return stats

    @torch.no_grad()
    def collect_rollout(self, batch: dict[str, Any]) -> tuple[Rollout, dict[str, Tensor]]:
        """Steps 1-5 of an iteration: :meth:`sample_and_score`, then rewards and GAE advantages."""
        s = self.sample_and_score(batch)
        rewards, non_score = per_token_rewards(s.kl, s.scores, s.sequence_lengths, self.kl_ctl.value, s.mask)
        advantages, returns = gae(rewards, s.values, s.mask, self.ppo.gamma, self.ppo.lam)
        advantages = masked_whiten(advantages, s.mask, reduce_fn=self._all_sum).masked_fill(~s.mask, 0)
        rollout = s.rollout(rewards, advantages, returns)
        stats = self.rollout_stats(batch, s, non_score)
        stats["value/explained_variance"] = explained_variance(s.values, returns, s.mask)
        return rollout, stats

    def _rollout_forwards(
        self, query_responses: Tensor, attention_mask: Tensor, mask: Tensor, batch: dict[str, Any]
    ) -> RolloutForwards:
        """Old/reference log-probs, values, entropies ``[B, T]`` and scores ``[B]``, in chunks of rows; ``batch``
        gives the prompts (texts, conversations, the rows' other columns) to the :attr:`scorer`, each chunk its
        own rows in order."""
        rows = ScoringRows.from_batch(batch)
        size = len(query_responses)
        chunk = self.ppo.forward_batch_size or size
        temperature = self.sampling.temperature
        parts: list[RolloutForwards] = []
        for start in range(0, size, chunk):
            qr, am, m = (t[start : start + chunk] for t in (query_responses, attention_mask, mask))
            context = qr.shape[1] - m.shape[1]
            lead, length = padding_bounds(am, m, context)
            qr, am, m = qr[:, lead : context + length], am[:, lead : context + length], m[:, :length]
            logits, head_values = self.policy_forward(qr, am, length)
            tokens = qr[:, -length:]
            logprobs = logprobs_from_logits(logits, tokens, temperature)
            entropy = entropy_from_logits(logits, temperature)
            ref_logits, _ = self.policy_forward(qr, am, length, reference=True)
            ref_logprobs = logprobs_from_logits(ref_logits, tokens, temperature)
            values = self.values(qr, am, length, head_values)
            pad = mask.shape[1] - length  # back to the batch's response length, zeros outside the mask
            per_token = (logprobs, ref_logprobs, values, entropy)
            logprobs, ref_logprobs, values, entropy = (
                nn.functional.pad(torch.where(m, t.float(), 0), (0, pad)) for t in per_token
            )
            scores = self.scorer.score(self.tokenizer, qr, am, m, rows.select(slice(start, start + chunk)))
            parts.append(RolloutForwards(logprobs, ref_logprobs, values, entropy, scores))
        return RolloutForwards(*(torch.cat(field) for field in zip(*parts, strict=True)))

    def _shape_scores(self, scores: Tensor, contains_eos: Tensor) -> Tensor:
        """Running normalisation, then clipping, then the missing-EOS penalty (in normalised units)."""
        if self.reward.normalize:
            self.score_moments.update(scores, self._all_sum)
            scores = self.score_moments.normalize(scores)
        if self.reward.clip is not None:
            scores = scores.clamp(-self.reward.clip, self.reward.clip)
        return apply_missing_eos_penalty(scores, contains_eos, self.reward.missing_eos_penalty)

    # ---- update ------------------------------------------------------------------------------------
    def ppo_update(self, rollout: Rollout) -> dict[str, Tensor]:
        """Step 6: ``ppo_epochs × num_mini_batches`` optimizer steps on the frozen rollout."""
        size = len(rollout.responses)
        mini = math.ceil(size / self.ppo.num_mini_batches)
        micro_size = self.ppo.micro_batch_size or mini
        # One seed on every process: ranks walk their own data in the same pattern.
        shuffle_seed = self.seed * SHUFFLE_SEED_STRIDE + self.iteration
        generator = torch.Generator().manual_seed(shuffle_seed)
        totals: dict[str, Tensor] = {}
        steps = 0
        for _ in range(self.ppo.ppo_epochs):
            order = torch.randperm(size, generator=generator)
            for start in range(0, size, mini):
                minibatch = rollout.select(order[start : start + mini])
                denominator, local_tokens = self._loss_normalizer(minibatch)
                parts = [
                    LossPart("policy", partial(self._ppo_loss, micro, denominator, local_tokens))
                    for micro in (
                        minibatch.select(range(i, min(i + micro_size, len(minibatch.mask)))).trim()
                        for i in range(0, len(minibatch.mask), micro_size)
                    )
                ]
                if self.ptx is not None:  # PPO-ptx: the LM loss joins the same optimizer step
                    seed = shuffle_seed * PTX_SEED_STRIDE + steps
                    batch = ptx_batch(self._ptx_examples, self.ptx.batch_size, self.tokenizer.pad_token_id, seed)
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    # First, not last: DDP all-reduces the accumulated gradients during the last backward only,
                    # which must then reach every trained parameter; the PTX loss leaves the critic out.
                    parts.insert(0, LossPart("ptx", partial(self._ptx_loss, batch)))
                stats = self.accumulate_step(parts, lambda part: part.compute())
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value
                steps += 1
        return {key: value / steps for key, value in totals.items()}

    def _loss_normalizer(self, minibatch: Rollout) -> tuple[Tensor, Tensor]:
        """``(denominator, local_tokens)`` of a minibatch's losses: its token count over all processes divided by
        the number of processes (DDP averages gradients, so this gives a global token mean), and its own count."""
        local_tokens = minibatch.mask.sum().float()
        return self._all_sum(local_tokens) / self._world_size, local_tokens

    def _ptx_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``γ_ptx ·`` token-mean NLL over the PTX batch of every process (InstructGPT Eq. 2)."""
        batch = trim_padding(batch)
        logits = self.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll_sum, tokens = sft_nll(logits, batch["labels"])
        denominator = self._all_sum(tokens.float()) / self._world_size
        return self.ptx.coef * nll_sum / denominator, {"ptx/loss": nll_sum / tokens}

    def _ppo_loss(self, mb: Rollout, denominator: Tensor, local_tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        length = mb.responses.shape[1]
        logits, head_values = self.policy_forward(mb.query_responses, mb.attention_mask, length)
        logprobs = logprobs_from_logits(logits, mb.responses, self.sampling.temperature)
        values = self.values(mb.query_responses, mb.attention_mask, length, head_values)
        pg = ppo_policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask, self.ppo.clip_range, denominator)
        vf = ppo_value_loss(values, mb.values, mb.returns, mb.mask, self.ppo.value_clip_range, denominator)
        weight = mb.mask.sum() / local_tokens  # per-token stats of this micro-batch → minibatch token means
        stats = {
            "policy/loss": pg.loss,
            "value/loss": vf.loss,
            "policy/clipfrac": pg.clipfrac * weight,
            "policy/approx_kl": pg.approx_kl * weight,
            "policy/ratio": pg.ratio_mean * weight,
            "value/clipfrac": vf.clipfrac * weight,
        }
        return pg.loss + self.ppo.vf_coef * vf.loss, stats

    # ---- Lightning hooks ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        rollout, stats = self.collect_rollout(batch)
        return self.learn(rollout, stats, ScoringRows.from_batch(batch))

    def learn(self, rollout: Rollout, stats: dict[str, Tensor], rows: ScoringRows) -> dict[str, Tensor]:
        """The update epochs on a collected rollout, the engine's weight sync, the KL controller, the logs; ``rows``
        holds the rollout's per-row prompts, conversations and other columns for the callbacks that read the step's
        outputs."""
        for name, value in (("reward", rollout.scores), ("advantage", rollout.advantages)):
            if not self.check_finite(name, value):  # a NaN score would poison every update of this rollout
                self.iteration += 1
                self.record_step(False)
                return {"kl": stats["objective/kl"].detach(), "score": stats["objective/score"].detach()}
        stats.update(self.ppo_update(rollout))
        self.engine.sync_weights(self.policy)  # the next rollout samples the updated policy
        # Controller update after the epochs, with this iteration's KL; its rewards already used the old β.
        n_global = int(self._all_sum(torch.tensor(float(len(rollout.responses)), device=self.device)))
        self.kl_ctl.update(float(stats["objective/kl"]), n_steps=n_global)
        self.iteration += 1
        stats.pop("loss", None)
        stats["train/skipped_fraction"] = stats.pop("skipped")
        stats["train/lr"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        size = len(rollout.responses)
        self.log_dict({k: v.float() for k, v in stats.items()}, batch_size=size)
        self.log("objective/kl_prog", stats["objective/kl"], prog_bar=True, batch_size=size, logger=False)
        self.log("objective/score_prog", stats["objective/score"], prog_bar=True, batch_size=size, logger=False)
        # texts for callbacks (e.g. RolloutScorer: a held-out judge's score of the same rollouts)
        responses = self.tokenizer.batch_decode(rollout.responses, skip_special_tokens=True)
        return {
            "kl": stats["objective/kl"].detach(),
            "score": stats["objective/score"].detach(),
            "prompts": rows.prompts,
            "responses": responses,
            "prompt_messages": rows.messages,
            "prompt_columns": rows.columns,
        }

    @torch.no_grad()
    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, seed: int) -> Tensor:
        """Responses ``[B, T]`` of the policy to left-padded prompts ``[B, P]``, pad after the first EOS, from the
        rollout :attr:`engine` (docs/conventions.md#rollout-engines)."""
        return self.rollout_engine(self.policy).generate(prompt_ids, prompt_mask, self.sampling, seed).responses

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Mean score (reward model or ``reward.fn``, before shaping) of responses to held-out prompts."""
        prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        responses = self.sample(prompt_ids, prompt_mask, self.seed + batch_idx)
        _, mask, contains_eos = response_masks(responses, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        qr, am = torch.cat([prompt_ids, responses], 1), torch.cat([prompt_mask, mask.long()], 1)
        scores = self.scorer.score(self.tokenizer, qr, am, mask, ScoringRows.from_batch(batch))
        size = len(responses)
        self.log("val/score", scores.mean(), batch_size=size, prog_bar=True, sync_dist=True)
        self.log("val/eos_rate", contains_eos.float().mean(), batch_size=size, sync_dist=True)

    def _print_samples(self, batch: dict[str, Any], responses: Tensor, mask: Tensor, scores: Tensor) -> None:
        """A few prompts, responses and scores: printed, and as a table for loggers that have one (W&B)."""
        if self._trainer is not None and not self.trainer.is_global_zero:
            return
        tok = self.tokenizer
        texts = tok.batch_decode([r[m] for r, m in zip(responses[:3], mask[:3], strict=True)])
        prompts = batch.get("prompts") or tok.batch_decode(batch["prompt_input_ids"][:3], skip_special_tokens=True)
        rows = [[p, t, s] for p, t, s in zip(prompts, texts, scores[:3].tolist(), strict=False)]
        for prompt, text, score in rows:
            rank_zero_info(f"[ppo iteration {self.iteration}] {prompt!r} → {text!r} (score {score:+.3f})")
        if self._trainer is not None and hasattr(self.logger, "log_text"):
            self.logger.log_text(key="samples", columns=["prompt", "response", "score"], data=rows)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo_state"] = {"kl_controller": self.kl_ctl.state_dict(), "iteration": self.iteration}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("ppo_state")
        if state is not None:
            self.kl_ctl.load_state_dict(state["kl_controller"])
            self.iteration = int(state["iteration"])

    def export_hf(self, dirpath: str | os.PathLike, merge_adapters: bool = True) -> None:
        """Write the policy and tokenizer as a Hugging Face folder (LoRA merged unless asked otherwise)."""
        save_pretrained_atomic(self.policy, self.tokenizer, dirpath, self.specs["policy"], "causal_lm", merge_adapters)

    def export_critic_hf(self, dirpath: str | os.PathLike, merge_adapters: bool = True) -> None:
        """Write the critic (a sequence classifier, with the reward normalisation its values are read with), so a
        later PPO run can continue from it (``critic: {name_or_path: dirpath}``; iterated RLHF)."""
        if self.critic is None:
            raise ValueError("this PPOModule has no separate critic to export (value_head: true)")
        if isinstance(self.critic, AdapterRole):
            export_adapter_role(self.critic, self.tokenizer, dirpath, self.specs["policy"], merge_adapters)
            return
        save_pretrained_atomic(
            self.critic, self.tokenizer, dirpath, self.specs["critic"], "sequence_classifier", merge_adapters
        )
