"""Critic-free advantages and losses against hand computations and against the formulas of TRL 1.16.0
(``GRPOTrainer`` advantages and ``_compute_loss`` with ``loss_type`` grpo/bnpo/dr_grpo, ``RLOOTrainer``'s
leave-one-out baseline) and OpenRLHF's REINFORCE++ (``compute_reward`` + ``get_cumulative_returns`` + global
advantage normalisation), evaluated on the inputs below in float64; the reference numbers are stored here."""

import math

import pytest
import torch

from lit_rlhf.rlhf import (
    aggregate_loss,
    clipped_policy_loss,
    group_advantages,
    kl_penalty,
    per_token_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_signal_groups,
)

F64 = torch.float64
SCORES = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 0.0, 2.0], dtype=F64)  # G=3, K=4
LOGP = torch.tensor(
    [
        [-2.4104, -0.4733, -1.1608, -1.0995, -0.12],
        [-0.3103, -0.2772, -0.9305, -0.3387, -0.8335],
        [-1.4219, -1.4148, -0.787, -1.5881, -0.5484],
        [-0.991, -0.7749, -1.1469, -0.2543, -0.8499],
    ],
    dtype=F64,
)
OLD = torch.tensor(
    [
        [-2.79, -0.8092, -0.8109, -0.8216, -0.4326],
        [-0.0182, -0.2995, -0.6709, -0.0403, -0.799],
        [-1.3785, -1.0925, -1.0161, -1.1906, -0.5309],
        [-1.2915, -0.5244, -1.2348, -0.4279, -1.8938],
    ],
    dtype=F64,
)
REF = torch.tensor(
    [
        [-2.3842, -0.7448, -1.1825, -1.0365, 0.1019],
        [-0.2552, -0.4147, -1.0455, -0.4571, -0.7096],
        [-1.7194, -1.1423, -0.3935, -1.5964, -0.8284],
        [-1.0384, -0.7335, -1.1704, -0.2578, -0.8985],
    ],
    dtype=F64,
)
MASK = torch.arange(5)[None] < torch.tensor([5, 3, 1, 4])[:, None]
ADV = torch.tensor([1.5, -0.7, 0.4, -1.2], dtype=F64)


def test_group_advantages_by_hand_and_as_trl():
    # group 0: mean 1, deviations (0, -1, 1, 0), unbiased std sqrt(2/3); group 1: all equal -> 0
    std0 = math.sqrt(2 / 3)
    grpo = group_advantages(SCORES, 4)
    assert grpo[:4].tolist() == pytest.approx([0, -1 / (std0 + 1e-4), 1 / (std0 + 1e-4), 0], abs=1e-12)
    assert grpo[4:8].tolist() == [0, 0, 0, 0]
    trl = [0.0, -1.2245948715148616, 1.2245948715148616, 0.0, 0.0, 0.0, 0.0, 0.0]
    trl += [1.0953851019748717, -1.0953851019748717, -0.5476925509874359, 0.5476925509874359]
    torch.testing.assert_close(grpo, torch.tensor(trl, dtype=F64), atol=1e-6, rtol=0)
    dr = group_advantages(SCORES, 4, scale=False)
    assert dr.tolist() == [0.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, -2.0, -1.0, 1.0]


def test_rloo_leave_one_out_baseline_by_hand_and_as_trl():
    rloo = rloo_advantages(SCORES, 4)
    # r_i - mean of the other three, e.g. 3 - (-1 + 0 + 2) / 3 = 8/3
    assert rloo[8].item() == pytest.approx(8 / 3)
    trl = [0.0, -4 / 3, 4 / 3, 0.0, 0.0, 0.0, 0.0, 0.0, 8 / 3, -8 / 3, -4 / 3, 4 / 3]
    torch.testing.assert_close(rloo, torch.tensor(trl, dtype=F64), atol=1e-6, rtol=0)
    # vectorised equals the loop over responses
    loop = [SCORES[i] - (SCORES[4 * (i // 4) : 4 * (i // 4) + 4].sum() - SCORES[i]) / 3 for i in range(12)]
    torch.testing.assert_close(rloo, torch.stack(loop), atol=1e-12, rtol=0)


def test_zero_signal_groups_and_bad_group_shapes():
    assert zero_signal_groups(SCORES, 4).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(SCORES, 1)
    with pytest.raises(ValueError, match="K = 5 adjacent"):
        rloo_advantages(SCORES, 5)


@pytest.mark.parametrize(
    ("aggregation", "trl_loss_type", "trl_value", "trl_value_beta0"),
    [
        ("sequence_mean", "grpo", -0.007441486302452671, -0.008031115790147703),
        ("token_mean", "bnpo", -0.09054932015537277, -0.09092551354114434),
        ("fixed_length", "dr_grpo", -0.049047548417493585, -0.04925131983478651),
    ],
)
def test_clipped_loss_with_kl_term_equals_trl_grpo(aggregation, trl_loss_type, trl_value, trl_value_beta0):
    """TRL GRPOTrainer: beta 0.04 (k3 in the loss), epsilon_low 0.2, epsilon_high 0.28, max_completion_length 6."""
    kwargs = dict(clip_low=0.2, clip_high=0.28, aggregation=aggregation, max_length=6)
    out = clipped_policy_loss(LOGP, OLD, ADV[:, None], MASK, ref_logprobs=REF, kl_coef=0.04, **kwargs)
    assert out.loss.item() == pytest.approx(trl_value, abs=1e-6)
    assert clipped_policy_loss(LOGP, OLD, ADV[:, None], MASK, **kwargs).loss.item() == pytest.approx(
        trl_value_beta0, abs=1e-6
    )


def test_clipped_loss_by_hand_and_clip_higher():
    # one token, A = +1: ratio e^{0.3} = 1.35 is clipped at 1.2 by PPO's symmetric range, at 1.28 by clip-higher
    logp, old, mask = torch.tensor([[0.3]], dtype=F64), torch.zeros(1, 1, dtype=F64), torch.ones(1, 1, dtype=torch.bool)
    adv = torch.ones(1, 1, dtype=F64)
    assert clipped_policy_loss(logp, old, adv, mask, 0.2, 0.2).loss.item() == pytest.approx(-1.2)
    out = clipped_policy_loss(logp, old, adv, mask, 0.2, 0.28)
    assert out.loss.item() == pytest.approx(-1.28) and out.clipfrac_high.item() == 1.0
    # A = -1 and ratio e^{-0.3} = 0.741 < 0.8: the low clip applies (loss = max(0.741, 0.8) = 0.8)
    out = clipped_policy_loss(-logp, old, -adv, mask, 0.2, 0.28)
    assert out.loss.item() == pytest.approx(0.8) and out.clipfrac_low.item() == 1.0
    # inside the range the gradient of the surrogate is -A·ratio
    logp = torch.tensor([[0.1]], dtype=F64, requires_grad=True)
    clipped_policy_loss(logp, old, adv, mask, 0.2, 0.28).loss.backward()
    assert logp.grad.item() == pytest.approx(-math.exp(0.1))


def test_loss_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert aggregate_loss(loss, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "sequence_mean").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert aggregate_loss(loss, mask, "fixed_length", max_length=8).item() == pytest.approx(10 / 16)
    # caller-supplied normalisers of the whole step: two halves sum to the whole
    for aggregation in ("token_mean", "sequence_mean", "fixed_length"):
        kwargs = dict(num_tokens=4, num_sequences=2, max_length=8)
        halves = sum(aggregate_loss(loss[i : i + 1], mask[i : i + 1], aggregation, **kwargs) for i in range(2))
        assert halves.item() == pytest.approx(aggregate_loss(loss, mask, aggregation, max_length=8).item())
    with pytest.raises(ValueError, match="max_length"):
        aggregate_loss(loss, mask, "fixed_length")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(loss, mask, "mean")


def test_first_update_ratio_is_one_and_kl_term_is_zero_at_the_reference():
    out = clipped_policy_loss(LOGP, LOGP, ADV[:, None], MASK, ref_logprobs=LOGP, kl_coef=0.1)
    assert out.ratio_mean.item() == 1.0 and out.kl.item() == 0.0
    # on-policy, the surrogate's value is -mean(A) over tokens
    assert out.loss.item() == pytest.approx(-(ADV[:, None].expand_as(LOGP)[MASK]).mean().item())


@pytest.mark.parametrize(
    ("gamma", "openrlhf"),
    [
        (
            1.0,
            [
                [0.06466507125761146, 0.0632315862810847, 0.07808621113326049, 0.0792734868580937, 0.07582655733438441],
                [-1.5885096848968887, -1.5915243804009582, -1.5840013199325451, 0.0, 0.0],
                [-0.22615729684277577, 0.0, 0.0, 0.0, 0.0],
                [1.156143511915217, 1.1587369160330554, 1.156471790917475, 1.1577575503429856, 0.0],
            ],
        ),
        (
            0.9,
            [
                [
                    -0.04726958733440395,
                    -0.0042180708844047465,
                    0.06410754633648491,
                    0.12283124204905255,
                    0.1822499180323239,
                ],
                [-1.4645231475089053, -1.5809334269194117, -1.6970215833771005, 0.0, 0.0],
                [-0.15965881769476675, 0.0, 0.0, 0.0, 0.0],
                [0.9018461743498009, 1.0554208628944908, 1.2199473291812848, 1.4072215608755547, 0.0],
            ],
        ),
    ],
)
def test_reinforce_pp_equals_openrlhf(gamma, openrlhf):
    """OpenRLHF: k1 KL with kl_coef 0.1 in the reward, score on the last action, discounted returns, then
    (G − mean) / std over every action of the batch (population variance)."""
    kl = kl_penalty(LOGP, REF, "k1").masked_fill(~MASK, 0)
    lengths = MASK.sum(1) - 1
    rewards, _ = per_token_rewards(kl, torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64), lengths, 0.1, MASK)
    advantages, returns = reinforce_pp_advantages(rewards, MASK, gamma)
    torch.testing.assert_close(advantages, torch.tensor(openrlhf, dtype=F64), atol=1e-6, rtol=0)
    # by hand: the return of the first token of row 2 (one action) is its score minus its KL penalty
    assert returns[2, 0].item() == pytest.approx(0.5 - 0.1 * (LOGP[2, 0] - REF[2, 0]).item())


def test_reinforce_pp_normalises_over_all_processes():
    """Two halves with a summing reduce_fn equal the whole batch (the statistic DDP needs)."""
    kl = kl_penalty(LOGP, REF).masked_fill(~MASK, 0)
    rewards, _ = per_token_rewards(kl, torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64), MASK.sum(1) - 1, 0.1, MASK)
    whole, _ = reinforce_pp_advantages(rewards, MASK)
    parts = [(rewards[:2], MASK[:2]), (rewards[2:], MASK[2:])]

    # emulate the all-reduce: each half's collectives return the sums over both halves (γ = 1 returns)
    counts = sum(m.sum() for _, m in parts)
    total = sum(
        torch.where(m, discounted, 0).sum() for (r, m) in parts for discounted in [r.flip(-1).cumsum(-1).flip(-1)]
    )
    mean = total / counts
    sq = sum(torch.where(m, (r.flip(-1).cumsum(-1).flip(-1) - mean) ** 2, 0).sum() for r, m in parts)
    calls = iter([torch.stack([total, counts.to(F64)]), sq] * 2)
    halves = [reinforce_pp_advantages(r, m, reduce_fn=lambda t: next(calls))[0] for r, m in parts]
    torch.testing.assert_close(torch.cat(halves), whole, atol=1e-12, rtol=0)
