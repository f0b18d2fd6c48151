"""Critic-free policy optimisation (GRPO, Dr. GRPO, RLOO, REINFORCE++, GSPO, CISPO, DAPO, ...) as a thin subclass
of PPOModule; the advantages and the loss are the :class:`~lit_rlhf.rlhf.algorithms.Algorithm` object's
(docs/conventions.md#rl-algorithms).

What differs from PPO (everything else, sampling, forwards, scores, shaping, PTX, the update loop, KL control,
checkpointed state, is PPO's; docs/conventions.md#critic-free-rl):

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

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_rlhf.hf.engines import RolloutEngine
from lit_rlhf.hf.scoring import ScoringRows
from lit_rlhf.hf.specs import ModelSpec
from lit_rlhf.models.base import RLHFModule
from lit_rlhf.models.critic_free_config import CriticFreeConfig, UpdateConfig, as_algorithm
from lit_rlhf.models.ppo import PPOModule
from lit_rlhf.models.ppo_config import KLConfig, PTXConfig, RewardConfig, SamplingConfig, SharedBaseConfig
from lit_rlhf.rlhf import Rollout, logprobs_from_logits, per_token_rewards
from lit_rlhf.rlhf.algorithms import Algorithm
from lit_rlhf.rlhf.critic_free import zero_signal_groups

__all__ = ["CriticFreeConfig", "CriticFreeModule", "UpdateConfig"]


class CriticFreeModule(PPOModule):
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
        sampling, kl, reward, ptx, seed, sample_every_n_steps, engine: as :class:`~lit_rlhf.models.PPOModule`.
        shared_base: policy and reward model as LoRA adapters of one base, the reference = the base alone
            (:class:`~lit_rlhf.models.ppo_config.SharedBaseConfig`; no critic adapter, ``critic_init`` unused).
        optimizer, lr_scheduler, max_grad_norm: see :class:`~lit_rlhf.models.base.RLHFModule`.
    """

    uses_value_function = False

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
        self.algorithm = algorithm or CriticFreeConfig()
        if isinstance(self.algorithm, Algorithm):
            if self.algorithm.needs_critic:
                raise ValueError(
                    f"algorithm {type(self.algorithm).__name__} needs a critic: use PPOModule, or a critic-free one."
                )
        elif update is not None:
            raise ValueError("`update` goes with an algorithm given by class_path; the estimator form has its own.")
        super().__init__(
            policy=policy,
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
        # PPOModule's update loop and rollout chunking read these fields from `self.ppo`
        self.ppo = self.algorithm if isinstance(self.algorithm, CriticFreeConfig) else update or UpdateConfig()
        # dynamic sampling: (rollout rows, their prompt fields) with signal, drawn since the last update
        self._signal_buffer: list[tuple[Rollout, ScoringRows]] = []
        self._draws = 0
        self._zero_signal_total = torch.tensor(0.0)

    @property
    def algo(self) -> Algorithm:
        """The :class:`~lit_rlhf.rlhf.algorithms.Algorithm` object of :attr:`algorithm` (built from the estimator
        form when that is what it holds)."""
        return as_algorithm(self.algorithm)

    def trainable_parameters(self) -> list:
        return RLHFModule.trainable_parameters(self)

    def values(self, query_responses: Tensor, attention_mask: Tensor, length: int, from_policy: Tensor | None):
        """No value function: zeros ``[B, length]`` fill the Rollout's ``values`` (and ``returns``)."""
        return torch.zeros(query_responses.shape[0], length, device=query_responses.device)

    # ---- rollout -----------------------------------------------------------------------------------
    def grouped(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with every prompt repeated ``K`` times, a prompt's copies adjacent.

        Every per-prompt field is repeated, whatever its name: a tensor whose first dimension, or a list or
        tuple whose length, is the number of prompts ``G`` (ids, masks, texts, chat conversations, and any field
        a data module adds later). Other values are kept as they are.
        """
        k, size = self.algorithm.group_size, len(batch["prompt_input_ids"])
        out = {}
        for key, value in batch.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
                out[key] = value.repeat_interleave(k, 0)
            elif isinstance(value, (list, tuple)) and len(value) == size:
                out[key] = [v for v in value for _ in range(k)]
            else:
                out[key] = value
        return out

    @torch.no_grad()
    def collect_rollout(self, batch: dict[str, Any]) -> tuple[Rollout, dict[str, Tensor]]:
        """:meth:`~lit_rlhf.models.PPOModule.sample_and_score` on a :meth:`grouped` batch (K responses per prompt
        from one ``generate`` call), then critic-free rewards and advantages."""
        algo = self.algo
        k = algo.group_size
        s = self.sample_and_score(batch)
        mask = s.mask
        scores = algo.shape_scores(s.scores, mask.sum(1), self.sampling.max_new_tokens)
        beta = self.kl_ctl.value if algo.kl_in == "reward" else 0.0
        rewards, non_score = per_token_rewards(s.kl, scores, s.sequence_lengths, beta, mask)
        advantages, returns = algo.advantages(rewards, mask, reduce_fn=self._all_sum)
        no_signal = (
            zero_signal_groups(scores, k) if k > 1 else torch.zeros(len(scores), dtype=torch.bool, device=self.device)
        )
        keep = algo.keep_groups(scores)
        if keep is not None:
            # out of every loss term and every normaliser; the rows keep their place, so all processes still
            # take the same number of optimizer steps
            mask = mask & keep.repeat_interleave(k)[:, None]
            advantages = advantages.masked_fill(~mask, 0)
        rollout = s.rollout(rewards, advantages, returns, mask)
        # statistics of every sampled response, dropped groups included
        stats = self.rollout_stats(batch, s, non_score)
        stats["train/zero_signal_groups"] = self._all_sum(no_signal.float().sum())
        return rollout, stats

    # ---- update ------------------------------------------------------------------------------------
    def _loss_normalizer(self, minibatch: Rollout) -> tuple[Tensor, Tensor]:
        """Global tokens (``token_mean``) or responses (``sequence_mean``, ``fixed_length``) of the minibatch,
        divided by the number of processes, and the minibatch's own token count (for statistics)."""
        local_tokens = minibatch.mask.sum().float()
        if self.algo.loss_aggregation == "token_mean":
            local = local_tokens
        else:
            local = minibatch.mask.any(-1).sum().float()
        # an all-dropped minibatch has a zero loss; keep its normaliser finite
        return self._all_sum(local).clamp(min=1.0) / self._world_size, local_tokens.clamp(min=1.0)

    def _ppo_loss(self, mb: Rollout, denominator: Tensor, local_tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        algo = self.algo
        length = mb.responses.shape[1]
        logits, _ = self.policy_forward(mb.query_responses, mb.attention_mask, length)
        logprobs = logprobs_from_logits(logits, mb.responses, self.sampling.temperature)
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
            "policy/clipfrac_low": weighted(out.clipfrac_low),
            "policy/clipfrac_high": weighted(out.clipfrac_high),
            "policy/approx_kl": weighted(out.approx_kl),
            "policy/ratio": weighted(out.ratio_mean),
        }
        if algo.kl_in == "loss":
            stats["policy/kl_loss_term"] = weighted(out.kl)
        return out.loss, stats

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        if self.algo.dynamic_sampling:
            return self.dynamic_sampling_step(self.grouped(batch))
        return super().training_step(self.grouped(batch), batch_idx)

    # ---- DAPO's dynamic sampling ---------------------------------------------------------------------
    def dynamic_sampling_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """One draw of DAPO's dynamic sampling (§3.2; docs/conventions.md#dynamic-sampling).

        The groups of ``batch`` (``G·K`` rows) whose scores are not all equal join a buffer. Once every process
        holds ``G`` of them, the step trains on exactly ``G`` (the first ones; the extra are dropped, as in the
        paper) and the buffer empties; until then the step only samples (no optimizer step, so
        ``trainer.global_step`` counts updates) and the next batch is drawn. After ``algorithm.max_draws``
        draws the step trains on what it has, or is skipped when some process has no group at all. The buffer
        is saved in checkpoints, and the data module's position counts every batch drawn: a resumed run draws
        and trains exactly as an uninterrupted one.
        """
        algo, k = self.algo, self.algo.group_size
        wanted = len(batch["prompt_input_ids"]) // k
        rollout, stats = self.collect_rollout(batch)
        kept_rows = rollout.mask.any(1).nonzero().squeeze(1)  # dropped groups lost their whole mask
        kept = (rollout.select(kept_rows), ScoringRows.from_batch(batch).select(kept_rows.tolist()))
        self._signal_buffer.append(kept)
        self._draws += 1
        self._zero_signal_total = self._zero_signal_total + stats["train/zero_signal_groups"]
        have = sum(len(r.responses) for r, _ in self._signal_buffer) // k
        ready = self._all_sum(torch.tensor(float(have >= wanted), device=self.device)) == self._world_size
        if not ready and self._draws < algo.max_draws:
            self.iteration += 1  # the next draw samples with the next seed
            return {"kl": stats["objective/kl"].detach(), "score": stats["objective/score"].detach()}
        stats["train/draws"] = torch.tensor(float(self._draws))
        stats["train/zero_signal_groups"] = self._zero_signal_total
        rollouts, rows = zip(*self._signal_buffer, strict=True)
        self._signal_buffer, self._draws, self._zero_signal_total = [], 0, torch.tensor(0.0)
        if self._all_sum(torch.tensor(float(have == 0), device=self.device)) > 0:
            rank_zero_warn(
                f"dynamic sampling: a process found no group with signal in {algo.max_draws} draws; step skipped"
            )
            self.iteration += 1
            return {"kl": stats["objective/kl"].detach(), "score": stats["objective/score"].detach()}
        if have < wanted:
            rank_zero_warn(f"dynamic sampling: {have} of {wanted} groups with signal after {algo.max_draws} draws")
        take = min(have, wanted) * k
        merged = Rollout.concat(rollouts, self.tokenizer.pad_token_id).select(range(take)).trim()
        merged_rows = ScoringRows.concat(rows).select(slice(0, take))
        return self.learn(merged, stats, merged_rows)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dynamic_sampling"] = {
            "buffer": [(r._asdict(), vars(rows)) for r, rows in self._signal_buffer],
            "draws": self._draws,
            "zero_signal_groups": float(self._zero_signal_total),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("dynamic_sampling")
        if state is not None:
            device = self.device
            self._signal_buffer = [
                (Rollout(**{name: t.to(device) for name, t in fields.items()}), ScoringRows(**rows))
                for fields, rows in state["buffer"]
            ]
            self._draws = int(state["draws"])
            self._zero_signal_total = torch.tensor(state["zero_signal_groups"])
