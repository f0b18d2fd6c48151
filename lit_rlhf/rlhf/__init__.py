"""Pure tensor code for InstructGPT-style RLHF (no Lightning, no transformers): the losses (the DPO family
included), GAE, KL, whitening and masks, and the records they work on (the PPO rollout, padded batches, running
moments).

Notation for tensor shapes used throughout: ``B`` batch size, ``T`` response length, ``K`` responses per
prompt, ``V`` vocabulary size.
"""

from lit_rlhf.rlhf.advantages import discounted_reverse_cumsum, gae, gae_reference
from lit_rlhf.rlhf.critic_free import (
    ClippedLossOutput,
    LossAggregation,
    add_kl_loss_term,
    aggregate_loss,
    clipped_policy_loss,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_signal_groups,
)
from lit_rlhf.rlhf.kl import AdaptiveKLController, FixedKLController, KLEstimator, kl_penalty
from lit_rlhf.rlhf.logprobs import entropy_from_logits, logprobs_from_logits, sequence_logprobs
from lit_rlhf.rlhf.losses import (
    IGNORE_INDEX,
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
from lit_rlhf.rlhf.moments import RunningMoments
from lit_rlhf.rlhf.padding import last_token_index, pad_batch, pad_sequences, position_ids_from_mask
from lit_rlhf.rlhf.preference_losses import (
    KwisePreferenceOutput,
    PreferenceLossOutput,
    dpo_loss,
    ipo_loss,
    kwise_preference_loss,
    preference_pair_losses,
    ranked_pairs,
    simpo_loss,
    top_ranked_nll,
)
from lit_rlhf.rlhf.rewards import apply_missing_eos_penalty, per_token_rewards, shape_scores
from lit_rlhf.rlhf.rollout import Rollout, RolloutForwards, ScoredSamples, padding_bounds, rollout_statistics

__all__ = [
    "AdaptiveKLController",
    "ClippedLossOutput",
    "FixedKLController",
    "IGNORE_INDEX",
    "KLEstimator",
    "KwiseLossOutput",
    "KwisePreferenceOutput",
    "LossAggregation",
    "PolicyLossOutput",
    "PreferenceLossOutput",
    "ResponseMasks",
    "Rollout",
    "RolloutForwards",
    "RunningMoments",
    "ScoredSamples",
    "ValueLossOutput",
    "add_kl_loss_term",
    "aggregate_loss",
    "apply_missing_eos_penalty",
    "center_rewards_penalty",
    "clipped_policy_loss",
    "discounted_reverse_cumsum",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "first_true_indices",
    "gae",
    "gae_reference",
    "group_advantages",
    "ipo_loss",
    "kl_penalty",
    "kwise_preference_loss",
    "kwise_ranking_loss",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pad_batch",
    "pad_sequences",
    "padding_bounds",
    "pairwise_loss",
    "per_token_rewards",
    "position_ids_from_mask",
    "ppo_policy_loss",
    "ppo_value_loss",
    "preference_pair_losses",
    "ranked_pairs",
    "reinforce_pp_advantages",
    "response_masks",
    "rloo_advantages",
    "rollout_statistics",
    "sequence_logprobs",
    "sft_nll",
    "shape_scores",
    "simpo_loss",
    "top_ranked_nll",
    "truncate_after_eos",
    "zero_signal_groups",
]
