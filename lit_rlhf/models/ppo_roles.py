"""Loading PPO's scoring roles with their own tokenizers: the reward model (any tokenizer) and the critic
(the policy's tokenizer only). See docs/conventions.md#reward-model-tokenizer."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_rlhf.datamodules.preference import read_scored_pairs
from lit_rlhf.hf.loading import load_model, load_tokenizer
from lit_rlhf.hf.reward import RewardScorer
from lit_rlhf.hf.specs import ModelSpec


def load_reward_scorer(
    spec: ModelSpec, device: torch.device | str | None, normalize_on: str | None = None, batch_size: int = 32
) -> RewardScorer:
    """The frozen reward model of ``spec`` with its own tokenizer, as a :class:`~lit_rlhf.hf.reward.RewardScorer`.

    Any ``*ForSequenceClassification`` with one output loads: a lit_rlhf export, or one trained elsewhere (no
    lit_rlhf keys in its config: its scores are used raw unless ``normalize_on`` names prompt/response pairs
    whose mean score is to become 0).
    """
    tokenizer = load_tokenizer(spec, role="reward_model")
    model = load_model(spec, tokenizer, "sequence_classifier", trainable=False, device=device)
    pairs = None
    if normalize_on is not None:
        pairs = read_scored_pairs(normalize_on)
        rank_zero_info(
            f"reward.normalize_on: {len(pairs[0])} pairs of {normalize_on} will score mean 0 under {spec.name_or_path}"
        )
    return RewardScorer(model, tokenizer, batch_size=batch_size, normalize_on=pairs)


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
