"""Shared inputs of the test vectors T1–T13 (docs/conventions.md#test-vectors) for the ``lit_rlhf.rlhf`` tests."""

from types import SimpleNamespace

import pytest
import torch

from lit_rlhf.rlhf import (
    apply_missing_eos_penalty,
    gae,
    kl_penalty,
    masked_whiten,
    per_token_rewards,
    response_masks,
    truncate_after_eos,
)

F64 = torch.float64


@pytest.fixture
def t4() -> SimpleNamespace:
    """T4 inputs: B=2, T=5, row 0 stops at index 2 (junk after EOS), row 1 never emits EOS."""
    return SimpleNamespace(
        pad=0,
        eos=2,
        kl_coef=0.05,
        gamma=1.0,
        lam=0.95,
        missing_eos_penalty=1.0,
        responses=torch.tensor([[5, 7, 2, 9, 9], [5, 6, 7, 8, 9]]),
        scores=torch.tensor([1.0, 0.5], dtype=F64),
        logprobs=torch.tensor([[-0.5, -1.0, -0.3, -2.0, -2.0], [-0.4, -0.9, -1.1, -0.8, -0.6]], dtype=F64),
        ref_logprobs=torch.tensor([[-0.6, -0.8, -0.3, -1.0, -1.0], [-0.5, -1.0, -1.0, -0.9, -0.9]], dtype=F64),
        values=torch.tensor([[0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.2, 0.3, 0.4, 0.5]], dtype=F64),
    )


def _trl_pipeline(t4: SimpleNamespace, estimator: str) -> SimpleNamespace:
    """TRL's rollout post-processing with the library: score at EOS+1, values on ``~padding_mask_p1``."""
    post = truncate_after_eos(t4.responses, t4.eos, t4.pad)
    masks = response_masks(post, t4.pad, t4.eos)
    length = post.size(1)
    value_mask = torch.arange(length) <= (masks.sequence_lengths + 1).unsqueeze(-1)
    scores = apply_missing_eos_penalty(t4.scores, masks.contains_eos, t4.missing_eos_penalty)
    kl = kl_penalty(t4.logprobs, t4.ref_logprobs, estimator)
    actual_end = (masks.sequence_lengths + 1).clamp(max=length - 1)
    rewards, non_score_rewards = per_token_rewards(kl, scores, actual_end, t4.kl_coef, masks.mask)
    values = t4.values.masked_fill(~value_mask, 0.0)
    advantages, returns = gae(rewards, values, value_mask, t4.gamma, t4.lam)
    whitened = masked_whiten(advantages, masks.mask).masked_fill(~masks.mask, 0.0)
    return SimpleNamespace(
        post=post,
        masks=masks,
        value_mask=value_mask,
        scores=scores,
        kl=kl * masks.mask,
        actual_end=actual_end,
        rewards=rewards,
        non_score_rewards=non_score_rewards,
        values=values,
        advantages=advantages,
        returns=returns,
        whitened=whitened,
    )


@pytest.fixture
def trl_rollout(t4):
    """Factory ``estimator -> namespace`` of the T4 pipeline with TRL's conventions."""
    return lambda estimator: _trl_pipeline(t4, estimator)
