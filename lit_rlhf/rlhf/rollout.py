"""The records of one policy-gradient iteration's experience (the forwards of a rollout, the scored samples, the
frozen :class:`Rollout`), and the padding they can drop.

Notation for tensor shapes: ``B`` rows, ``P`` prompt length (left-padded), ``T`` response length,
``L = P + T``. The logits that score response token ``t`` sit at sequence index ``P - 1 + t``, and values use
the same slice, so ``V[t] = V(s_t)``, the state before emitting ``y_t`` (docs/conventions.md#index-alignment).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lit_rlhf.rlhf.masking import first_true_indices


class Rollout(NamedTuple):
    """One PPO iteration's experience, frozen for all PPO epochs of the iteration
    (docs/conventions.md#ppo-updates).

    Every field is a tensor whose first dimension is ``B``; ``select`` and ``trim`` keep the record
    consistent when rows or padding columns are dropped.
    """

    query_responses: Tensor
    """LongTensor ``[B, L]``: left-padded prompt, then the response (pad after the first EOS)."""
    attention_mask: Tensor
    """LongTensor ``[B, L]``: 1 on real prompt tokens and on response tokens up to and with the EOS."""
    responses: Tensor
    """LongTensor ``[B, T]``: response tokens, pad after the first EOS."""
    mask: Tensor
    """BoolTensor ``[B, T]``: response tokens that are actions (up to and with the first EOS)."""
    logprobs: Tensor
    """``[B, T]`` behaviour log-probs ``log_softmax(logits / T)`` at rollout time; 0 outside ``mask``."""
    ref_logprobs: Tensor
    """``[B, T]`` the same under the reference policy; 0 outside ``mask``."""
    values: Tensor
    """``[B, T]`` critic values at rollout time; 0 outside ``mask``."""
    scores: Tensor
    """``[B]`` sequence scores after shaping (normalisation, clipping, missing-EOS penalty)."""
    rewards: Tensor
    """``[B, T]`` per-token rewards ``-β·KL_t`` plus the score once, on the EOS (or last) token."""
    advantages: Tensor
    """``[B, T]`` GAE advantages, whitened over the rollout batch of all processes; 0 outside ``mask``."""
    returns: Tensor
    """``[B, T]`` value targets: raw (un-whitened) advantages + values (docs/conventions.md#gae)."""

    @property
    def context_length(self) -> int:
        """``P``: the prompt part of ``query_responses``."""
        return self.query_responses.shape[1] - self.responses.shape[1]

    def select(self, index: Tensor | Sequence[int]) -> Rollout:
        """The rows ``index`` (a minibatch or micro-batch)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.responses.device)
        return Rollout(*(field[index] for field in self))

    def trim(self) -> Rollout:
        """Drop columns that are padding in every row: leading prompt pads and the tail after the longest
        response, so no forward pass runs over padding that no row needs."""
        lead, length = padding_bounds(self.attention_mask, self.mask, self.context_length)
        end = self.context_length + length
        fields = self._asdict()
        fields["query_responses"] = self.query_responses[:, lead:end]
        fields["attention_mask"] = self.attention_mask[:, lead:end]
        for name in ("responses", "mask", "logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
            fields[name] = fields[name][:, :length]
        return Rollout(**fields)

    @staticmethod
    def concat(rollouts: Sequence[Rollout], pad_token_id: int) -> Rollout:
        """The rows of several rollouts in one record: prompts left-padded to the longest ``P``, responses
        right-padded to the longest ``T`` (pad ids, mask 0, every other field 0 there), so each row's tokens,
        positions and values are unchanged (DAPO's dynamic sampling gathers groups from several draws)."""
        context = max(r.context_length for r in rollouts)
        length = max(r.responses.shape[1] for r in rollouts)
        parts: dict[str, list[Tensor]] = {name: [] for name in Rollout._fields}
        for r in rollouts:
            left, right = context - r.context_length, length - r.responses.shape[1]
            parts["query_responses"].append(
                torch.nn.functional.pad(r.query_responses, (left, right), value=pad_token_id)
            )
            parts["attention_mask"].append(torch.nn.functional.pad(r.attention_mask, (left, right)))
            parts["responses"].append(torch.nn.functional.pad(r.responses, (0, right), value=pad_token_id))
            parts["scores"].append(r.scores)
            for name in ("mask", "logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
                parts[name].append(torch.nn.functional.pad(getattr(r, name), (0, right)))
        return Rollout(**{name: torch.cat(tensors) for name, tensors in parts.items()})


class RolloutForwards(NamedTuple):
    """The no-grad forwards of a rollout: per-token fields ``[B, T]``, 0 outside the response mask, and the raw
    scores ``[B]``."""

    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    entropy: Tensor
    scores: Tensor


class ScoredSamples(NamedTuple):
    """One iteration's responses with everything their rewards are computed from: ``B`` rows, ``P`` prompt and
    ``T`` response columns; per-token fields are 0 outside ``mask``."""

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
    engine_logprobs: Tensor | None = None
    """``[B, T]`` the rollout engine's own log-probs of the sampled tokens, when it reports them."""

    def rollout(self, rewards: Tensor, advantages: Tensor, returns: Tensor, mask: Tensor | None = None) -> Rollout:
        """The frozen :class:`Rollout` of these samples with their ``[B, T]`` rewards, advantages and returns;
        ``mask`` ``[B, T]`` (a subset of :attr:`mask`) replaces the action mask and the response part of the
        attention mask."""
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


def padding_bounds(attention_mask: Tensor, mask: Tensor, context_length: int) -> tuple[int, int]:
    """``(lead, length)``: leading prompt columns that are padding in every row, and the longest response.

    Dropping all-padding columns changes nothing: position ids come from the mask and padded keys are
    masked out of attention.

    Args:
        attention_mask: ``[B, P + T]``.
        mask: BoolTensor ``[B, T]`` of response actions.
        context_length: ``P``.

    Returns:
        Two ints: ``lead`` in ``[0, P - 1]`` and ``length`` in ``[1, T]``.
    """
    prompt_has_token = attention_mask[:, :context_length].bool().any(0)
    lead = int(first_true_indices(prompt_has_token[None])[0])
    return min(lead, context_length - 1), max(int(mask.sum(-1).max()), 1)


def rollout_statistics(
    samples: ScoredSamples, non_score: Tensor, beta: float, reduce_fn: Callable[[Tensor], Tensor] | None = None
) -> dict[str, Tensor]:
    """The ``objective/*`` and ``rollout/*`` statistics of an iteration: means over every process's rows
    (``reduce_fn``: a sum over processes; ``None`` = this process), the entropy a mean over response tokens.

    Args:
        samples: the iteration's :class:`ScoredSamples` (``B`` rows).
        non_score: ``[B, T]`` the KL part of the rewards.
        beta: the KL coefficient the rewards used.

    Returns:
        Name → scalar tensor: ``objective/{kl,score,raw_score,non_score_reward,entropy,beta,rlhf_reward}``
        and ``rollout/{response_length,eos_rate}`` (KL in nats per sequence).
    """
    reduce_fn = reduce_fn or (lambda x: x)
    n = reduce_fn(torch.tensor(float(len(samples.responses)), device=samples.mask.device))
    mean = lambda x: reduce_fn(x.float().sum()) / n  # noqa: E731  (mean over every process's rows)
    mask = samples.mask
    stats = {
        "objective/kl": mean(samples.kl.sum(1)),
        "objective/score": mean(samples.scores),
        "objective/raw_score": mean(samples.raw_scores),
        "objective/non_score_reward": mean(non_score.sum(1)),
        "objective/entropy": reduce_fn((samples.entropy * mask).sum()) / reduce_fn(mask.sum().float()),
        "objective/beta": torch.tensor(beta),
        "rollout/response_length": mean(mask.sum(1)),
        "rollout/eos_rate": mean(samples.contains_eos),
    }
    stats["objective/rlhf_reward"] = stats["objective/score"] + stats["objective/non_score_reward"]
    return stats
