"""Pure tensor math for InstructGPT-style RLHF (no Lightning, no transformers).

Notation for tensor shapes used throughout: ``B`` batch size, ``T`` response length, ``K`` responses per
prompt, ``V`` vocabulary size.
"""

from lit_rlhf.rlhf.advantages import discounted_reverse_cumsum, gae, gae_reference
from lit_rlhf.rlhf.kl import AdaptiveKLController, FixedKLController, KLEstimator, kl_penalty
from lit_rlhf.rlhf.logprobs import entropy_from_logits, logprobs_from_logits
from lit_rlhf.rlhf.losses import (
    KwiseLossOutput,
    PolicyLossOutput,
    ValueLossOutput,
    center_rewards_penalty,
    explained_variance,
    kwise_ranking_loss,
    pairwise_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sft_nll,
)
from lit_rlhf.rlhf.masking import (
    ResponseMasks,
    first_true_indices,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    response_masks,
    truncate_after_eos,
)
from lit_rlhf.rlhf.rewards import apply_missing_eos_penalty, per_token_rewards

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLEstimator",
    "KwiseLossOutput",
    "PolicyLossOutput",
    "ResponseMasks",
    "ValueLossOutput",
    "apply_missing_eos_penalty",
    "center_rewards_penalty",
    "discounted_reverse_cumsum",
    "entropy_from_logits",
    "explained_variance",
    "first_true_indices",
    "gae",
    "gae_reference",
    "kl_penalty",
    "kwise_ranking_loss",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_loss",
    "per_token_rewards",
    "ppo_policy_loss",
    "ppo_value_loss",
    "response_masks",
    "sft_nll",
    "truncate_after_eos",
]
