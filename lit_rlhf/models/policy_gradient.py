"""One policy-gradient stage from four parts (docs/conventions.md#the-policy-gradient-stage): the
:class:`~lit_rlhf.models.roles.Roles` it holds, the :class:`~lit_rlhf.hf.engines.RolloutEngine` it samples from,
the :class:`~lit_rlhf.hf.scoring.Scorer` that scores, and the :class:`~lit_rlhf.rlhf.algorithms.Algorithm` that
turns the rollout into advantages and a loss. PPO (:class:`~lit_rlhf.models.PPOModule`) and the critic-free
stages (:class:`~lit_rlhf.models.CriticFreeModule`) are presets of this module.

One ``training_step`` is one iteration: prompts (each repeated ``K = algorithm.group_size`` times) → experience
(engine → response masks → forwards → scores → KL) → advantages → update epochs → ``engine.sync_weights``. The
conventions of every step (sampling seeds, where a response ends, where the score lands, the token-mean losses
over all processes, KL control, PPO-ptx, checkpointed state) are PPO's and are listed in ``ppo.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lit_rlhf.datamodules.prompts import repeat_prompts
from lit_rlhf.datamodules.ptx import ptx_batch, ptx_examples
from lit_rlhf.hf.engines import Generation, RolloutEngine
from lit_rlhf.hf.export import save_pretrained_atomic
from lit_rlhf.hf.forwards import critic_values, response_logits
from lit_rlhf.hf.scorers import Scorer, ScoringRows
from lit_rlhf.hf.shared_base import AdapterRole, SharedBase, export_adapter_role
from lit_rlhf.hf.specs import ModelSpec
from lit_rlhf.models.base import RLHFModule, trim_padding
from lit_rlhf.models.critic_free_config import CriticFreeConfig
from lit_rlhf.models.dynamic_sampling import SignalBuffer
from lit_rlhf.models.ppo_config import (
    KLConfig,
    PPOConfig,
    PTXConfig,
    RewardConfig,
    RolloutCorrectionConfig,
    SamplingConfig,
    SharedBaseConfig,
    UpdateConfig,
    UpdateLoop,
    as_algorithm,
)
from lit_rlhf.models.role_models import build_role_models
from lit_rlhf.models.roles import Roles
from lit_rlhf.rlhf import (
    AdaptiveKLController,
    FixedKLController,
    Rollout,
    RolloutForwards,
    RunningMoments,
    ScoredSamples,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    logprobs_from_logits,
    padding_bounds,
    per_token_rewards,
    response_masks,
    rollout_statistics,
    sft_nll,
    shape_scores,
    zero_signal_groups,
)
from lit_rlhf.rlhf.algorithms import Algorithm
from lit_rlhf.rlhf.mismatch import ImportanceWeights, logprob_gap, truncated_is_weights

# Seed arithmetic. Every process and iteration samples with its own seed, and every process shuffles minibatches
# with the same one. The strides are distinct primes, so the seeds derived for different ranks, iterations and
# steps stay apart.
#: sampling seed offset between processes
RANK_SEED_STRIDE = 100003
#: sampling seed offset between iterations
ITERATION_SEED_STRIDE = 7919
#: minibatch-shuffling seed = ``seed · SHUFFLE_SEED_STRIDE + iteration`` (the same on every process)
SHUFFLE_SEED_STRIDE = 1_000_003
#: PTX batch seed = ``shuffling seed · PTX_SEED_STRIDE + optimizer step of the iteration``
PTX_SEED_STRIDE = 1009

__all__ = ["LossPart", "PolicyGradientModule"]


class LossPart(NamedTuple):
    """One backward pass of an optimizer step: a named loss on its data (``policy``: a micro-batch of the
    rollout; ``ptx``: a PPO-ptx language-modelling batch). ``compute()`` gives ``(loss, stats)``."""

    name: str
    compute: Callable[[], tuple[Tensor, dict[str, Tensor]]]


class PolicyGradientModule(RLHFModule):
    """A policy-gradient RL stage against a reward model, adapter, ``reward.fn`` or scorer, with a KL penalty to
    the reference; the algorithm object decides advantages and losses (PPO, GRPO, RLOO, REINFORCE++, GSPO,
    CISPO, DAPO, ... : :mod:`lit_rlhf.rlhf.algorithms`).

    A DataLoader batch of ``G`` prompts gives ``G·K`` responses per process (a prompt's ``K`` adjacent, on one
    process) and ``update.ppo_epochs × update.num_mini_batches`` optimizer steps: ``trainer.global_step`` counts
    optimizer steps, not iterations.

    Args:
        policy: the model to optimise (full or LoRA; 4-bit base with LoRA).
        algorithm: an :class:`~lit_rlhf.rlhf.algorithms.Algorithm` (YAML ``class_path``), or a form that builds
            one (:class:`~lit_rlhf.models.PPOConfig`, :class:`~lit_rlhf.models.CriticFreeConfig`).
        update: the update loop (:class:`~lit_rlhf.models.ppo_config.UpdateConfig`); ``None`` = the
            ``algorithm`` form's own fields when it has them, else the defaults.
        critic, value_head: the value function of an algorithm that ``needs_critic`` (exactly one; none for the
            others): a sequence classifier with the policy's tokenizer (normally the reward-model export), or a
            zero-initialised head on the policy's last hidden state.
        reward_model: frozen reward model (any tokenizer, 4-bit allowed); ``None`` with ``reward.fn`` / ``scorer``.
        reference: frozen reference policy; ``None``: a LoRA policy with its adapter disabled, else a copy.
        shared_base: every role on the policy's base as named LoRA adapters (:class:`SharedBaseConfig`).
        sampling, kl, reward, ptx: rollout sampling, the KL penalty and its controller, the score source and its
            shaping, PPO-ptx (optional).
        rollout_correction: truncated importance sampling for the engine-trainer mismatch, when the engine reports
            its log-probs (:class:`RolloutCorrectionConfig`; ``None`` = off; the gap is logged either way).
        seed: sampling and minibatch-shuffling seed.
        sample_every_n_steps: print a few prompts, responses and scores every N iterations (0 = never).
        engine: where responses come from (:class:`~lit_rlhf.hf.engines.RolloutEngine`; default
            :class:`~lit_rlhf.hf.engines.HFEngine`); its ``sync_weights`` is called after every update.
        optimizer, lr_scheduler, max_grad_norm: see :class:`~lit_rlhf.models.base.RLHFModule`.
    """

    hf_roles = ("policy", "reference", "critic", "reward_model")

    def __init__(
        self,
        policy: ModelSpec,
        algorithm: Algorithm | CriticFreeConfig | PPOConfig,
        update: UpdateConfig | None = None,
        critic: ModelSpec | None = None,
        value_head: bool = False,
        reward_model: ModelSpec | None = None,
        reference: ModelSpec | None = None,
        shared_base: SharedBaseConfig | None = None,
        sampling: SamplingConfig | None = None,
        kl: KLConfig | None = None,
        reward: RewardConfig | None = None,
        ptx: PTXConfig | None = None,
        rollout_correction: RolloutCorrectionConfig | None = None,
        seed: int = 0,
        sample_every_n_steps: int = 0,
        engine: RolloutEngine | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, max_grad_norm)
        self.algorithm = algorithm
        #: the update loop: ``update``, or the algorithm form's own fields (``ppo:``, the ``estimator:`` form)
        self.update: UpdateLoop = update or (algorithm if isinstance(algorithm, UpdateLoop) else UpdateConfig())
        self.sampling = sampling or SamplingConfig()
        self.kl = kl or KLConfig()
        self.reward = reward or RewardConfig()
        # a reward callable or scorer given from Python is code: keep it out of the (weights-only) checkpoint
        code = [] if isinstance(self.reward.fn, (str, type(None))) and self.reward.scorer is None else ["reward"]
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
            value_function=self.algo.needs_critic,
            stage=type(self).__name__,
        )
        if not self.algo.needs_critic and (critic is not None or value_head):
            raise ValueError(f"algorithm {type(self.algo).__name__} learns no value function: remove critic/value_head")
        if self.reward.normalize_on is not None and reward_model is None:
            raise ValueError(
                "`reward.normalize_on` normalises a separate `reward_model`; `reward.fn` scores and a shared-base "
                "reward adapter (normalised when it was exported) are used as they are."
            )
        self.specs: dict[str, ModelSpec] = self.roles.specs()
        self.ptx = ptx
        self.rollout_correction = rollout_correction
        self._ptx_examples: list | None = None
        self.seed = seed
        if engine is not None:
            self.engine = engine
        self.sample_every_n_steps = sample_every_n_steps
        self.policy = self.reference = self.critic = self.reward_model = None
        self._shared: SharedBase | None = None  # adapter switching when every role lives on one base
        self.value_head: nn.Linear | None = None
        #: the one :class:`~lit_rlhf.hf.scoring.Scorer` of this run, set by :meth:`build_models`
        self.scorer: Scorer | None = None
        self.score_moments = RunningMoments()
        self.kl_ctl = (
            FixedKLController(self.kl.coef)
            if self.kl.target is None
            else AdaptiveKLController(self.kl.coef, self.kl.target, self.kl.horizon)
        )
        self.iteration = 0
        #: DAPO's dynamic sampling: the groups with signal drawn since the last update
        self.signal_buffer = SignalBuffer()
        #: ``update.reuse_rollout_forward``: ``(logprobs, values)`` with their graphs, one per update micro-batch
        self._kept_forwards: list[tuple[Tensor, Tensor]] = []
        if self.update.reuse_rollout_forward and (self.algo.drop_zero_signal_groups or self.algo.dynamic_sampling):
            raise ValueError(
                "update.reuse_rollout_forward keeps the forwards of the sampled rows: it cannot go with "
                "drop_zero_signal_groups or dynamic_sampling, which change the rows and masks the update sees"
            )

    @property
    def algo(self) -> Algorithm:
        """The :class:`~lit_rlhf.rlhf.algorithms.Algorithm` object of :attr:`algorithm`."""
        return as_algorithm(self.algorithm)

    @property
    def ppo(self) -> UpdateLoop:
        """The update loop under the name PPO's YAML section has (an alias of :attr:`update`)."""
        return self.update

    @ppo.setter
    def ppo(self, loop: UpdateLoop) -> None:
        if self.algorithm is self.update:  # one form holds both (``ppo:``, the ``estimator:`` form)
            self.algorithm = loop
        self.update = loop

    # ---- models ------------------------------------------------------------------------------------
    def trainable_roles(self) -> tuple[str, ...]:
        return self.roles.trainable

    def model_specs(self) -> dict[str, ModelSpec]:
        return self.specs

    def build_models(self) -> None:
        models = build_role_models(self.roles, self.tokenizer, self.load_device, self.reward, self.shared_base)
        self.policy, self.reference, self.critic = models.policy, models.reference, models.critic
        self.value_head, self.reward_model, self.scorer, self._shared = (
            models.value_head,
            models.reward_model,
            models.scorer,
            models.shared,
        )
        if self.ptx is not None:
            p = self.ptx
            self._ptx_examples = ptx_examples(
                p.data, self.tokenizer, p.max_length, p.text_column, p.prompt_column, p.completion_column,
                p.messages_column,
            )  # fmt: skip

    def trainable_parameters(self) -> list:
        """Trainable parameters, as two param groups when the critic has its own learning rate."""
        params = super().trainable_parameters()
        critic_lr = getattr(self.update, "critic_lr", None)
        if critic_lr is None or not self.algo.needs_critic:
            return params
        critic_ids = {id(p) for p in (self.critic if self.critic is not None else self.value_head).parameters()}
        if isinstance(self.critic, AdapterRole):  # a shared base's critic: its head and its adapter
            critic_ids |= {id(p) for p in self.critic.adapter_parameters()}
        return [
            {"params": [p for p in params if id(p) not in critic_ids]},
            {"params": [p for p in params if id(p) in critic_ids], "lr": critic_lr},
        ]

    def total_optimizer_steps(self) -> int | None:
        iterations = super().total_optimizer_steps()
        return None if iterations is None else iterations * self.update.ppo_epochs * self.update.num_mini_batches

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
        """Values ``[B, length]``: the critic's, the value head's (``from_policy``), or zeros without either."""
        if self.critic is not None:
            return critic_values(self.critic, query_responses, attention_mask, length)
        if from_policy is not None:
            return from_policy
        return torch.zeros(query_responses.shape[0], length, device=query_responses.device)

    @property
    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _all_sum(self, tensor: Tensor) -> Tensor:
        """Sum over processes (identity on one process)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return tensor
        return trainer.strategy.reduce(tensor, reduce_op="sum")

    # ---- the iteration -----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        batch = self.grouped(batch)  # K responses per prompt (PPO: K = 1)
        if self.algo.dynamic_sampling:  # DAPO: draw until the step holds enough groups with signal
            return self.dynamic_sampling_step(batch)
        rollout, stats = self.collect_rollout(batch)  # engine → masks → forwards → scores → KL → advantages
        return self.learn(rollout, stats, ScoringRows.from_batch(batch))  # update epochs → engine.sync_weights

    def grouped(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with every prompt repeated ``K`` times, a prompt's copies adjacent
        (:func:`~lit_rlhf.datamodules.prompts.repeat_prompts`)."""
        return repeat_prompts(batch, self.algo.group_size)

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, seed: int) -> Generation:
        """The rollout :attr:`engine`'s responses ``[B, T]`` to left-padded prompts ``[B, P]`` (pad after the first
        EOS) and, when it reports them, its log-probs of the sampled tokens (docs/conventions.md#rollout-engines)."""
        return self.rollout_engine(self.policy).generate(prompt_ids, prompt_mask, self.sampling, seed)

    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, seed: int) -> Tensor:
        """The responses ``[B, T]`` of :meth:`generate`."""
        return self.generate(prompt_ids, prompt_mask, seed).responses

    @torch.no_grad()
    def sample_and_score(self, batch: dict[str, Any]) -> ScoredSamples:
        """The experience of an iteration: sample, response masks, forward passes, raw and shaped scores,
        per-token KL."""
        prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        rank = self._trainer.global_rank if self._trainer is not None else 0
        # distinct per process and per iteration, and restored with `iteration` on resume
        seed = self.seed + rank * RANK_SEED_STRIDE + self.iteration * ITERATION_SEED_STRIDE
        generation = self.generate(prompt_ids, prompt_mask, seed)
        responses = generation.responses
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
            engine_logprobs=generation.logprobs,
        )

    @torch.no_grad()
    def collect_rollout(self, batch: dict[str, Any]) -> tuple[Rollout, dict[str, Tensor]]:
        """:meth:`sample_and_score` on a :meth:`grouped` batch, then the algorithm's score shaping, the per-token
        rewards ``−β·KL_t·[kl_in = reward] + score·[t = last]``, its advantages and the groups it keeps."""
        algo = self.algo
        s = self.sample_and_score(batch)
        mask = s.mask
        scores = algo.shape_scores(s.scores, mask.sum(1), self.sampling.max_new_tokens)
        beta = self.kl_ctl.value if algo.kl_in == "reward" else 0.0
        rewards, non_score = per_token_rewards(s.kl, scores, s.sequence_lengths, beta, mask)
        values = s.values if algo.needs_critic else None
        advantages, returns = algo.advantages(rewards, mask, values, reduce_fn=self._all_sum)
        keep = algo.keep_groups(scores)
        if keep is not None:
            # out of every loss term and every normaliser; the rows keep their place, so all processes still
            # take the same number of optimizer steps
            mask = mask & keep.repeat_interleave(algo.group_size)[:, None]
            advantages = advantages.masked_fill(~mask, 0)
        correction, mismatch_stats = self._engine_mismatch(s, mask)
        if correction is not None:  # w ≥ 0, detached: w·surrogate(A) = surrogate(w·A) on every token
            advantages = advantages * correction.weights
        rollout = s.rollout(rewards, advantages, returns, None if keep is None else mask)
        stats = self.rollout_stats(batch, s, non_score)  # of every sampled response, dropped groups included
        stats.update(mismatch_stats)
        if algo.needs_critic:
            stats["value/explained_variance"] = explained_variance(s.values, returns, s.mask)
        if algo.group_size > 1 or not algo.needs_critic:
            no_signal = zero_signal_groups(scores, algo.group_size) if algo.group_size > 1 else mask.new_zeros(0)
            stats["train/zero_signal_groups"] = self._all_sum(no_signal.float().sum())
        return rollout, stats

    def _engine_mismatch(
        self, samples: ScoredSamples, mask: Tensor
    ) -> tuple[ImportanceWeights | None, dict[str, Tensor]]:
        """With :attr:`rollout_correction`, the importance weights ``[B, T]`` of the sampled tokens, and the
        statistics: the engine-vs-trainer log-prob gap (``rollout/engine_logprob_gap_{mean,max}``, over every
        process; docs/conventions.md#engine-mismatch). Neither when the engine reports no log-probs."""
        if samples.engine_logprobs is None:
            return None, {}
        mean, worst = logprob_gap(samples.engine_logprobs, samples.logprobs, samples.mask)
        tokens = samples.mask.sum().float()
        reduce_max = self._trainer.strategy.reduce if self._world_size > 1 else lambda x, reduce_op: x
        stats = {
            "rollout/engine_logprob_gap_mean": self._all_sum(mean * tokens) / self._all_sum(tokens).clamp(min=1),
            "rollout/engine_logprob_gap_max": reduce_max(worst, reduce_op="max"),
        }
        if self.rollout_correction is None:
            return None, stats
        c = self.rollout_correction
        weights = truncated_is_weights(samples.logprobs, samples.engine_logprobs, mask, c.level, c.mode, c.cap)
        stats["rollout/is_capped_fraction"] = self._all_sum(weights.capped_fraction) / self._world_size
        return weights, stats

    def _rollout_forwards(
        self, query_responses: Tensor, attention_mask: Tensor, mask: Tensor, batch: dict[str, Any]
    ) -> RolloutForwards:
        """Old/reference log-probs, values, entropies ``[B, T]`` and scores ``[B]``, in chunks of rows; ``batch``
        gives the prompts (texts, conversations, the rows' other columns) to the :attr:`scorer`, each chunk its
        own rows in order.

        Chunks of ``forward_batch_size`` rows, without gradients; with ``update.reuse_rollout_forward``, the
        update's own micro-batches (its shuffle, its trim), the policy's and the value function's forwards run
        with gradients and kept for :meth:`_ppo_loss`, which back-propagates through them instead of running them
        again."""
        rows = ScoringRows.from_batch(batch)
        size, temperature = len(query_responses), self.sampling.temperature
        reuse = self.update.reuse_rollout_forward
        if reuse:
            if self._world_size > 1:  # DDP prepares its gradient reduction in the forward, per micro-batch
                raise ValueError("update.reuse_rollout_forward runs on one process only")
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self._shuffle_seed()))
            order, step = order.to(mask.device), self.update.micro_batch_size or size
            chunks = [order[start : start + step] for start in range(0, size, step)]
        else:
            step = self.update.forward_batch_size or size
            chunks = [slice(start, start + step) for start in range(0, size, step)]
        fields = [torch.zeros(mask.shape, device=mask.device, dtype=torch.float32) for _ in range(4)]
        scores: Tensor | None = None
        self._kept_forwards = []
        for index in chunks:
            qr, am, m = query_responses[index], attention_mask[index], mask[index]
            context = qr.shape[1] - m.shape[1]
            lead, length = padding_bounds(am, m, context)  # = Rollout.trim of the chunk
            qr, am, m = qr[:, lead : context + length], am[:, lead : context + length], m[:, :length]
            tokens = qr[:, -length:]
            with torch.set_grad_enabled(reuse):
                logits, head_values = self.policy_forward(qr, am, length)
                logprobs = logprobs_from_logits(logits, tokens, temperature)
                values = self.values(qr, am, length, head_values)
            if reuse:
                self._kept_forwards.append((logprobs, values))
            entropy = entropy_from_logits(logits.detach(), temperature)
            ref_logits, _ = self.policy_forward(qr, am, length, reference=True)
            ref_logprobs = logprobs_from_logits(ref_logits, tokens, temperature)
            for field, t in zip(fields, (logprobs, ref_logprobs, values, entropy), strict=True):
                field[index, :length] = torch.where(m, t.detach().float(), 0)  # zeros outside the mask
            chunk_rows = rows.select(index if isinstance(index, slice) else index.tolist())
            chunk_scores = self.scorer.score(self.tokenizer, qr, am, m, chunk_rows)
            if scores is None:
                scores = chunk_scores.new_zeros(size)
            scores[index] = chunk_scores
        return RolloutForwards(*fields, scores)

    def _shuffle_seed(self) -> int:
        """The minibatch-shuffling seed of this iteration: one seed on every process."""
        return self.seed * SHUFFLE_SEED_STRIDE + self.iteration

    def _shape_scores(self, scores: Tensor, contains_eos: Tensor) -> Tensor:
        """Running normalisation, clipping, missing-EOS penalty (:func:`lit_rlhf.rlhf.shape_scores`)."""
        moments = self.score_moments if self.reward.normalize else None
        reward = self.reward
        return shape_scores(scores, contains_eos, moments, reward.clip, reward.missing_eos_penalty, self._all_sum)

    def rollout_stats(self, batch: dict[str, Any], samples: ScoredSamples, non_score: Tensor) -> dict[str, Tensor]:
        """:func:`lit_rlhf.rlhf.rollout_statistics` over every process's rows; prints a few samples every
        ``sample_every_n_steps`` iterations."""
        if self.sample_every_n_steps and self.iteration % self.sample_every_n_steps == 0:
            self._print_samples(batch, samples.responses, samples.mask, samples.scores)
        return rollout_statistics(samples, non_score, self.kl_ctl.value, self._all_sum)

    # ---- update ------------------------------------------------------------------------------------
    def learn(self, rollout: Rollout, stats: dict[str, Tensor], rows: ScoringRows) -> dict[str, Tensor]:
        """The update epochs on a collected rollout, the engine's weight sync, the KL controller, the logs; ``rows``
        holds the rollout's per-row prompts, conversations and other columns for the callbacks that read the step's
        outputs."""
        for name, value in (("reward", rollout.scores), ("advantage", rollout.advantages)):
            if not self.check_finite(name, value):  # a NaN score would poison every update of this rollout
                self._kept_forwards = []
                self.iteration += 1
                self.record_step(False)
                return {"kl": stats["objective/kl"].detach(), "score": stats["objective/score"].detach()}
        stats.update(self.ppo_update(rollout))
        self.engine.sync_weights(self.policy)  # the next rollout samples the updated policy
        for key, value in (("sync_s", self.engine.last_sync_seconds), ("sync_probe_gap", self.engine.last_sync_gap)):
            if value is not None:
                stats[f"rollout/engine_{key}"] = torch.tensor(float(value))
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

    def ppo_update(self, rollout: Rollout) -> dict[str, Tensor]:
        """``ppo_epochs × num_mini_batches`` optimizer steps on the frozen rollout; PPO-ptx joins each one."""
        size = len(rollout.responses)
        mini = math.ceil(size / self.update.num_mini_batches)
        micro_size = self.update.micro_batch_size or mini
        # One seed on every process: ranks walk their own data in the same pattern.
        shuffle_seed = self._shuffle_seed()
        generator = torch.Generator().manual_seed(shuffle_seed)
        totals: dict[str, Tensor] = {}
        steps = 0
        for _ in range(self.update.ppo_epochs):
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
        """The losses' normaliser: the minibatch's tokens (``token_mean``) or responses (``sequence_mean``,
        ``fixed_length``) over all processes, divided by the number of processes (DDP averages gradients, so this
        gives a global mean); and the minibatch's own token count (for statistics)."""
        local_tokens = minibatch.mask.sum().float()
        if self.algo.loss_aggregation == "token_mean":
            local = local_tokens
        else:
            local = minibatch.mask.any(-1).sum().float()
        # an all-dropped minibatch has a zero loss; keep its normaliser finite
        return self._all_sum(local).clamp(min=1.0) / self._world_size, local_tokens.clamp(min=1.0)

    def _ptx_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``γ_ptx ·`` token-mean NLL over the PTX batch of every process (InstructGPT Eq. 2)."""
        batch = trim_padding(batch)
        # no KV cache: an activation-checkpointing recompute would append to it a second time
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self.policy(input_ids=ids, attention_mask=mask, use_cache=False).logits
        nll_sum, tokens = sft_nll(logits, batch["labels"])
        denominator = self._all_sum(tokens.float()) / self._world_size
        return self.ptx.coef * nll_sum / denominator, {"ptx/loss": nll_sum / tokens}

    def _ppo_loss(self, mb: Rollout, denominator: Tensor, local_tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The algorithm's policy loss (plus ``vf_coef ·`` its value loss) on one micro-batch."""
        algo = self.algo
        length = mb.responses.shape[1]
        if self._kept_forwards:  # update.reuse_rollout_forward: this micro-batch's forwards ran in the rollout
            logprobs, kept_values = self._kept_forwards.pop(0)
        else:
            logits, head_values = self.policy_forward(mb.query_responses, mb.attention_mask, length)
            logprobs, kept_values = logprobs_from_logits(logits, mb.responses, self.sampling.temperature), None
        out = algo.policy_loss(
            logprobs,
            mb.logprobs,
            mb.advantages,
            mb.mask,
            num_tokens=denominator,
            num_sequences=denominator,
            max_length=self.sampling.max_new_tokens,
            ref_logprobs=mb.ref_logprobs if algo.kl_in == "loss" else None,
            kl_coef=self.kl_ctl.value,
        )
        weight = mb.mask.sum() / local_tokens  # per-token stats of this micro-batch → minibatch token means
        # a micro-batch of dropped groups only has no token: its means are nan, its weight 0
        weighted = lambda x: torch.nan_to_num(x) * weight  # noqa: E731
        stats = {
            "policy/loss": out.loss,
            "policy/clipfrac": weighted(out.clipfrac_low + out.clipfrac_high),
            "policy/clipfrac_low": weighted(out.clipfrac_low),
            "policy/clipfrac_high": weighted(out.clipfrac_high),
            "policy/approx_kl": weighted(out.approx_kl),
            "policy/ratio": weighted(out.ratio_mean),
        }
        if algo.kl_in == "loss":
            stats["policy/kl_loss_term"] = weighted(out.kl)
        if not algo.needs_critic:
            return out.loss, stats
        values = kept_values
        if values is None:
            values = self.values(mb.query_responses, mb.attention_mask, length, head_values)
        vf = algo.value_loss(values, mb.values, mb.returns, mb.mask, denominator)
        stats["value/loss"], stats["value/clipfrac"] = vf.loss, vf.clipfrac * weight
        return out.loss + algo.vf_coef * vf.loss, stats

    # ---- DAPO's dynamic sampling ---------------------------------------------------------------------
    def dynamic_sampling_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """One draw of DAPO's dynamic sampling (§3.2; docs/conventions.md#dynamic-sampling).

        The groups of ``batch`` (``G·K`` rows) whose scores are not all equal join :attr:`signal_buffer`. Once
        every process holds ``G`` of them, the step trains on exactly ``G`` and the buffer empties; until then the
        step only samples (no optimizer step, so ``trainer.global_step`` counts updates) and the next batch is
        drawn. After ``algorithm.max_draws`` draws the step trains on what it has, or is skipped when some process
        has no group at all. The buffer is checkpointed and the data module's position counts every batch drawn.
        """
        algo, buffer, k = self.algo, self.signal_buffer, self.algo.group_size
        wanted = len(batch["prompt_input_ids"]) // k
        rollout, stats = self.collect_rollout(batch)
        buffer.add(rollout, ScoringRows.from_batch(batch), stats["train/zero_signal_groups"])
        have = buffer.groups(k)
        ready = self._all_sum(torch.tensor(float(have >= wanted), device=self.device)) == self._world_size
        if not ready and buffer.draws < algo.max_draws:
            self.iteration += 1  # the next draw samples with the next seed
            return {"kl": stats["objective/kl"].detach(), "score": stats["objective/score"].detach()}
        stats["train/draws"] = torch.tensor(float(buffer.draws))
        stats["train/zero_signal_groups"] = buffer.zero_signal_groups
        if self._all_sum(torch.tensor(float(have == 0), device=self.device)) > 0:
            rank_zero_warn(
                f"dynamic sampling: a process found no group with signal in {algo.max_draws} draws; step skipped"
            )
            buffer.clear()
            self.iteration += 1
            return {"kl": stats["objective/kl"].detach(), "score": stats["objective/score"].detach()}
        if have < wanted:
            rank_zero_warn(f"dynamic sampling: {have} of {wanted} groups with signal after {algo.max_draws} draws")
        merged, merged_rows = buffer.take(min(have, wanted) * k, self.tokenizer.pad_token_id)
        return self.learn(merged, stats, merged_rows)

    # ---- validation, samples, checkpoints, export ---------------------------------------------------
    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Mean score (before shaping) of responses to held-out prompts."""
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
            rank_zero_info(f"[iteration {self.iteration}] {prompt!r} → {text!r} (score {score:+.3f})")
        if self._trainer is not None and hasattr(self.logger, "log_text"):
            self.logger.log_text(key="samples", columns=["prompt", "response", "score"], data=rows)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo_state"] = {"kl_controller": self.kl_ctl.state_dict(), "iteration": self.iteration}
        if self.algo.dynamic_sampling:
            checkpoint["dynamic_sampling"] = self.signal_buffer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("ppo_state")
        if state is not None:
            self.kl_ctl.load_state_dict(state["kl_controller"])
            self.iteration = int(state["iteration"])
        if checkpoint.get("dynamic_sampling") is not None:
            self.signal_buffer.load_state_dict(checkpoint["dynamic_sampling"], self.device)

    def export_hf(self, dirpath: str | os.PathLike, merge_adapters: bool = True) -> None:
        """Write the policy and tokenizer as a Hugging Face folder (LoRA merged unless asked otherwise)."""
        save_pretrained_atomic(self.policy, self.tokenizer, dirpath, self.specs["policy"], "causal_lm", merge_adapters)

    def export_critic_hf(self, dirpath: str | os.PathLike, merge_adapters: bool = True) -> None:
        """Write the critic (a sequence classifier, with the reward normalisation its values are read with), so a
        later PPO run can continue from it (``critic: {name_or_path: dirpath}``; iterated RLHF)."""
        if self.critic is None:
            raise ValueError(f"this {type(self).__name__} has no separate critic to export")
        if isinstance(self.critic, AdapterRole):
            export_adapter_role(self.critic, self.tokenizer, dirpath, self.specs["policy"], merge_adapters)
            return
        save_pretrained_atomic(
            self.critic, self.tokenizer, dirpath, self.specs["critic"], "sequence_classifier", merge_adapters
        )
