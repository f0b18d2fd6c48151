from functools import partial

import pytest
import torch

from lit_rlhf.rlhf import (
    apply_missing_eos_penalty,
    kl_penalty,
    per_token_rewards,
    response_masks,
    truncate_after_eos,
)

F64 = torch.float64
close = partial(torch.testing.assert_close, rtol=0, atol=1e-6)


def test_t4_missing_eos_penalty(trl_rollout, t4):
    out = trl_rollout("k1")
    close(out.scores, torch.tensor([1.0, -0.5], dtype=F64))
    assert apply_missing_eos_penalty(t4.scores, out.masks.contains_eos, None) is t4.scores


@pytest.mark.parametrize(
    ("estimator", "kl", "rewards", "objective_kl"),
    [
        (
            "k1",
            [[0.1, -0.2, 0, 0, 0], [0.1, 0.1, -0.1, 0.1, 0.3]],
            [[-0.005, 0.010, 0.0, 1.0, 0.0], [-0.005, -0.005, 0.005, -0.005, -0.515]],
            0.2,
        ),
        (
            "k3",
            [[0.004837, 0.021403, 0, 0, 0], [0.004837, 0.004837, 0.005171, 0.004837, 0.040818]],
            [[-0.000242, -0.001070, 0.0, 1.0, 0.0], [-0.000242, -0.000242, -0.000259, -0.000242, -0.502041]],
            0.043371,
        ),
    ],
)
def test_t4_trl_rewards_score_after_eos(trl_rollout, estimator, kl, rewards, objective_kl):
    out = trl_rollout(estimator)
    assert out.actual_end.tolist() == [3, 4]
    close(out.kl, torch.tensor(kl, dtype=F64))
    close(out.rewards, torch.tensor(rewards, dtype=F64))
    # TRL's logged metrics: KL in nats per sequence, and the RLHF reward.
    close(out.kl.sum(1).mean(), torch.tensor(objective_kl, dtype=F64))
    non_score = out.non_score_rewards.sum(1).mean()
    close(non_score, torch.tensor(-0.05 * objective_kl, dtype=F64))
    if estimator == "k1":
        close(non_score + out.scores.mean(), torch.tensor(0.24, dtype=F64))


def test_t4_rewards_score_on_eos(t4):
    masks = response_masks(truncate_after_eos(t4.responses, t4.eos, t4.pad), t4.pad, t4.eos)
    kl = kl_penalty(t4.logprobs, t4.ref_logprobs, "k1")
    scores = torch.tensor([1.0, -0.5], dtype=F64)
    rewards, non_score = per_token_rewards(kl, scores, masks.sequence_lengths, t4.kl_coef, masks.mask)
    expected = [[-0.005, 0.010, 1.000, 0, 0], [-0.005, -0.005, 0.005, -0.005, -0.515]]
    close(rewards, torch.tensor(expected, dtype=F64))
    # KL after the EOS is masked even though the raw log-probs there differ.
    assert (non_score[0, 3:] == 0).all() and (kl[0, 3:] != 0).all()


def test_score_is_added_exactly_once_even_where_the_kl_is_masked():
    kl = torch.zeros(3, 4, dtype=F64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    scores = torch.tensor([2.0, -1.0, 0.5], dtype=F64)
    rewards, _ = per_token_rewards(kl, scores, torch.tensor([2, 3, 0]), 0.1, mask)
    expected = torch.zeros(3, 4, dtype=F64)
    expected[0, 2], expected[1, 3], expected[2, 0] = 2.0, -1.0, 0.5
    close(rewards, expected, atol=0)
