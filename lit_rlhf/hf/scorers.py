"""Scorers: the one way to "score these responses", and the one loader (docs/conventions.md#scorers).

A :class:`~lit_rlhf.hf.scoring.Scorer` has two methods, and every caller (PPO, critic-free, evaluation,
labelling, ``RolloutScorer``) uses them without asking which scorer it holds:

* ``score(tokenizer, query_responses [B, P+T], attention_mask [B, P+T], mask [B, T], rows) -> [B]``, the
  policy's sampled token ids with the rows' prompt texts, conversations and other columns
  (:class:`~lit_rlhf.hf.scoring.ScoringRows`);
* ``score_texts(prompts, responses, messages=None, columns=None) -> [N]``, response texts.

The scorers of lit_rlhf:

* :class:`~lit_rlhf.hf.reward.RewardScorer`: a frozen reward model with its own tokenizer (the policy's
  vocabulary: its token ids as they are; another: re-encoded; a shared base's reward adapter);
* :class:`FunctionScorer`: a Python reward function (``reward.fn``), called by
  :func:`~lit_rlhf.imports.call_reward_fn` (docs/conventions.md#reward-functions).

:func:`load_scorer` builds either from a reward-model spec or folder, or a reward function (an import path or
the callable); an object that already is a :class:`Scorer` is returned as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lit_rlhf.hf.loading import load_model, load_tokenizer
from lit_rlhf.hf.reward import RewardScorer
from lit_rlhf.hf.scoring import Prompt, Scorer, ScoringRows, scoring_prompts
from lit_rlhf.hf.specs import ModelSpec
from lit_rlhf.hf.tokenization import Messages, plain_text
from lit_rlhf.imports import RewardFn, call_reward_fn, resolve_reward_fn

__all__ = [
    "FunctionScorer",
    "RewardScorer",
    "Scorer",
    "ScoringRows",
    "load_scorer",
    "require_policy_tokens",
    "scoring_prompts",
]


class FunctionScorer(Scorer):
    """A Python reward function as a :class:`~lit_rlhf.hf.scoring.Scorer`.

    Args:
        fn: ``fn(prompts=, completions=, completion_ids=, **columns)`` or the older ``fn(prompts, responses)``
            (docs/conventions.md#reward-functions), or its ``"package.module:function"`` import path.
    """

    def __init__(self, fn: str | RewardFn) -> None:
        self.fn = resolve_reward_fn(fn)

    def score(
        self, tokenizer, query_responses: Tensor, attention_mask: Tensor, mask: Tensor, rows: ScoringRows
    ) -> Tensor:
        """Scores ``[B]`` on ``query_responses``' device: each response is its tokens under ``mask`` ``[B, T]``
        (the last ``T`` columns of ``query_responses`` ``[B, P + T]``), decoded without special tokens; the
        function also gets those token ids, the prompt texts, the conversations and the rows' other columns."""
        if rows.prompts is None:
            raise ValueError("reward.fn needs the prompt texts: the batch has no 'prompts' (use PromptDataModule).")
        responses = query_responses[:, -mask.shape[1] :]
        tokens = [r[m] for r, m in zip(responses, mask.bool(), strict=True)]
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        scores = call_reward_fn(
            self.fn,
            rows.prompts,
            texts,
            messages=rows.messages,
            completion_ids=[t.tolist() for t in tokens],
            columns=rows.columns,
        )
        return torch.tensor(scores, dtype=torch.float32, device=query_responses.device)

    def score_texts(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[str],
        messages: Sequence[Messages | None] | None = None,
        columns: Sequence[Mapping[str, Any]] | None = None,
    ) -> Tensor:
        """Scores ``[N]`` (on the CPU). A prompt given as a conversation, with no ``messages``, is passed as that
        conversation to a keyword-convention function and as its turns' text, one per line, to a positional
        ``fn(prompts, responses)``."""
        if messages is None and any(isinstance(p, list) for p in prompts):
            messages = [p if isinstance(p, list) else None for p in prompts]
            prompts = [p if isinstance(p, str) else plain_text(p) for p in prompts]
        scores = call_reward_fn(self.fn, prompts, responses, messages=messages, columns=columns)
        return torch.tensor(scores, dtype=torch.float32)


def load_scorer(
    reward_model: ModelSpec | str | None = None,
    reward_fn: str | RewardFn | Scorer | None = None,
    device: torch.device | str | None = None,
    normalize_on: tuple[Sequence[Prompt], Sequence[str]] | None = None,
    batch_size: int = 32,
) -> Scorer:
    """The :class:`~lit_rlhf.hf.scoring.Scorer` of exactly one judge.

    Args:
        reward_model: a reward model's spec, or its folder / hub id: any ``*ForSequenceClassification`` with one
            output, loaded frozen with **its own** tokenizer (a lit_rlhf export, or one trained elsewhere, whose
            scores are used raw unless ``normalize_on`` is given).
        reward_fn: a reward function (an import path or the callable), or a ready :class:`Scorer`.
        device: where the reward model goes (``None``: where ``load_model`` puts it).
        normalize_on: ``(prompts, responses)`` whose mean reward-model score becomes 0 (the stored
            ``reward_bias`` is replaced before the first score).
        batch_size: sequences per reward-model forward pass when re-encoding.

    Raises:
        ValueError: neither or both judges are given, or ``normalize_on`` without a reward model.
    """
    if (reward_model is None) == (reward_fn is None):
        raise ValueError("a scorer needs exactly one judge: `reward_model` or `reward_fn`.")
    if reward_model is None:
        if normalize_on is not None:
            raise ValueError("`normalize_on` normalises a reward model; a reward function is used as it is.")
        return reward_fn if isinstance(reward_fn, Scorer) else FunctionScorer(reward_fn)
    spec = reward_model if isinstance(reward_model, ModelSpec) else ModelSpec(name_or_path=reward_model)
    tokenizer = load_tokenizer(spec, role="reward_model")
    model = load_model(spec, tokenizer, "sequence_classifier", trainable=False, device=device)
    return RewardScorer(model, tokenizer, batch_size=batch_size, normalize_on=normalize_on)


def require_policy_tokens(spec: ModelSpec, policy_tokenizer) -> None:
    """Refuse a critic whose tokenizer is not the policy's: its values are read per policy token."""
    tokenizer = load_tokenizer(spec, role="critic")
    if tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise ValueError(
            f"critic {spec.name_or_path!r} has its own tokenizer, but a critic must share the policy's tokens: "
            "its values V(s_t) are read at every policy token. Keep this model as `reward_model` (it may have "
            "its own tokenizer) and start the critic from a model with the policy's tokenizer (e.g. an RM "
            "trained from the SFT export), or set `value_head: true` and drop `critic`."
        )
