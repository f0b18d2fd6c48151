"""The Algorithm objects (lit_rlhf.rlhf.algorithms): the six that existed as functions reproduce those functions
bit for bit, GSPO, CISPO and DAPO are pinned to their papers' formulas (reference numbers, loop implementations),
and every algorithm's first update (ratio 1) is the plain policy gradient."""

from __future__ import annotations

import math

import pytest
import torch

from lit_rlhf.models.critic_free_config import ESTIMATORS, CriticFreeConfig, as_algorithm
from lit_rlhf.rlhf import (
    aggregate_loss,
    clipped_policy_loss,
    gae,
    group_advantages,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    zero_signal_groups,
)
from lit_rlhf.rlhf.algorithms import (
    CISPO,
    DAPO,
    GRPO,
    GSPO,
    PPO,
    REINFORCEPP,
    RLOO,
    Algorithm,
    DrGRPO,
    GSPOToken,
    REINFORCEPPBaseline,
    cispo_policy_loss,
    overlong_penalty,
    sequence_logratio,
    signal_groups,
)

ALL = [PPO, GRPO, DrGRPO, RLOO, REINFORCEPP, REINFORCEPPBaseline, GSPO, GSPOToken, CISPO, DAPO]


def rollout_tensors(seed: int = 0, groups: int = 3, k: int = 4, length: int = 5):
    """Per-token KL, scores, a right-padded mask and its lengths, values, old and new log-probs."""
    g = torch.Generator().manual_seed(seed)
    b = groups * k
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    scores = torch.randint(0, 3, (b,), generator=g).float()
    scores[:k] = 1.0  # one group without signal
    kl = torch.randn(b, length, generator=g).abs().masked_fill(~mask, 0) * 0.1
    values = torch.randn(b, length, generator=g).masked_fill(~mask, 0)
    old = -torch.rand(b, length, generator=g) * 3
    new = old + 0.3 * torch.randn(b, length, generator=g)
    return kl, scores, mask, lengths, values, old, new


# ---- the six that were functions: bit-identical -------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.2])
def test_group_estimators_equal_the_functions_bit_for_bit(beta):
    kl, scores, mask, lengths, *_ = rollout_tensors()
    rewards, _ = per_token_rewards(kl, scores, lengths - 1, beta, mask)
    sequence = rewards.sum(1)
    expected = {
        GRPO(std_eps=1e-3): group_advantages(sequence, 4, True, 1e-3),
        DrGRPO(): group_advantages(sequence, 4, scale=False),
        RLOO(): rloo_advantages(sequence, 4),
    }
    for algorithm, per_response in expected.items():
        advantages, returns = algorithm.advantages(rewards, mask)
        want = per_response[:, None].expand_as(mask).masked_fill(~mask, 0).contiguous()
        assert torch.equal(advantages, want), algorithm
        assert torch.equal(returns, torch.where(mask, sequence[:, None], 0)), algorithm


def test_reinforce_pp_and_its_baseline_equal_the_functions_bit_for_bit():
    kl, scores, mask, lengths, *_ = rollout_tensors(1)
    sums = lambda t: t * 2  # noqa: E731  (a stand-in for the sum over two identical processes)
    rewards, _ = per_token_rewards(kl, scores, lengths - 1, 0.1, mask)
    for reduce_fn in (None, sums):
        got = REINFORCEPP(gamma=0.9).advantages(rewards, mask, reduce_fn=reduce_fn)
        want = reinforce_pp_advantages(rewards, mask, 0.9, reduce_fn=reduce_fn)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # the baseline: the group's mean score subtracted before the returns (OpenRLHF reinforce_baseline)
    baseline = REINFORCEPPBaseline(group_size=4)
    shaped = baseline.shape_scores(scores, lengths, 5)
    assert torch.equal(shaped, (scores.view(-1, 4) - scores.view(-1, 4).mean(1, keepdim=True)).reshape(-1))
    assert shaped.tolist()[:4] == [0.0] * 4
    rewards, _ = per_token_rewards(kl, shaped, lengths - 1, 0.1, mask)
    got = baseline.advantages(rewards, mask)
    want = reinforce_pp_advantages(rewards, mask, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_ppo_equals_gae_whitening_and_the_ppo_losses_bit_for_bit():
    kl, scores, mask, lengths, values, old, new = rollout_tensors(2)
    rewards, _ = per_token_rewards(kl, scores, lengths - 1, 0.05, mask)
    algorithm = PPO(lam=0.9)
    advantages, returns = algorithm.advantages(rewards, mask, values)
    raw, want_returns = gae(rewards, values, mask, 1.0, 0.9)
    assert torch.equal(advantages, masked_whiten(raw, mask).masked_fill(~mask, 0))
    assert torch.equal(returns, want_returns)
    new = new.requires_grad_()
    got = algorithm.policy_loss(new, old, advantages, mask, num_tokens=7.0)
    want = ppo_policy_loss(new, old, advantages, mask, 0.2, 7.0)
    assert torch.equal(got.loss, want.loss) and torch.equal(got.ratio_mean, want.ratio_mean)
    assert torch.equal(got.approx_kl, want.approx_kl)
    # PPO's clipfrac (either branch clipped) is the two one-sided fractions together
    assert float(got.clipfrac_low + got.clipfrac_high) == pytest.approx(float(want.clipfrac), abs=1e-7)
    assert float(want.clipfrac) > 0
    grads = [torch.autograd.grad(x.loss, new)[0] for x in (got, want)]
    assert torch.equal(*grads)
    v = values + 0.5
    want_value = ppo_value_loss(v, values, returns, mask, 0.2, 7.0).loss
    assert torch.equal(algorithm.value_loss(v, values, returns, mask, 7.0).loss, want_value)
    with pytest.raises(ValueError, match="PPO needs the critic's values"):
        algorithm.advantages(rewards, mask)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "fixed_length"])
def test_the_shared_surrogate_is_clipped_policy_loss_bit_for_bit(aggregation):
    *_, mask, _, _, old, new = rollout_tensors(3)
    ref = old - 0.1
    advantages = torch.linspace(-1, 1, len(mask))[:, None].expand_as(mask)
    new = new.requires_grad_()
    for algorithm in (GRPO, DrGRPO, RLOO, REINFORCEPP, REINFORCEPPBaseline, DAPO):
        a = algorithm(loss_aggregation=aggregation, clip_low=0.1, clip_high=0.3)
        got = a.policy_loss(new, old, advantages, mask, max_length=5, ref_logprobs=ref, kl_coef=0.05)
        want = clipped_policy_loss(new, old, advantages, mask, 0.1, 0.3, aggregation, None, None, 5, ref, 0.05)
        assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True)), algorithm


def test_the_estimator_names_map_onto_the_classes_with_their_fields():
    assert {name: cls.__name__ for name, cls in ESTIMATORS.items()} == {
        "grpo": "GRPO",
        "dr_grpo": "DrGRPO",
        "rloo": "RLOO",
        "reinforce_pp": "REINFORCEPP",
    }
    config = CriticFreeConfig("grpo", 3, "reward", 0.1, 0.3, "sequence_mean", True, 1e-6)
    assert as_algorithm(config) == GRPO(
        group_size=3,
        kl_in="reward",
        clip_low=0.1,
        clip_high=0.3,
        loss_aggregation="sequence_mean",
        drop_zero_signal_groups=True,
        std_eps=1e-6,
    )
    assert as_algorithm(CriticFreeConfig("reinforce_pp", 1, gamma=0.5)) == REINFORCEPP(gamma=0.5, group_size=1)
    assert as_algorithm(CriticFreeConfig("dr_grpo")).loss_aggregation == "token_mean"  # the config's, kept
    gspo = GSPO()
    assert as_algorithm(gspo) is gspo


# ---- GSPO ----------------------------------------------------------------------------------------------------------
def small():
    """Two groups of two responses, lengths 3, 2, 1, 3."""
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0], [-2.0, 0.0, 0.0], [-0.7, -0.9, -1.1]])
    delta = torch.tensor([[0.1, -0.2, 0.4], [-0.5, 0.05, 0.0], [0.3, 0.0, 0.0], [0.02, 0.01, -0.02]])
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    return mask, old, old + delta, advantages


def gspo_loop(new, old, mask, advantages, low, high):
    """Eq. 5 of the GSPO paper, one response at a time."""
    terms = []
    for i in range(len(mask)):
        n = int(mask[i].sum())
        s = torch.exp(sum(new[i, t] - old[i, t] for t in range(n)) / n)
        terms.append(-torch.min(s * advantages[i], torch.clamp(s, 1 - low, 1 + high) * advantages[i]))
    return sum(terms) / len(terms)


def test_gspo_is_the_papers_sequence_level_objective():
    mask, old, new, advantages = small()
    # s_i = exp(mean_t Δ): exp(0.1), exp(-0.225), exp(0.3), exp(0.00333..)
    s = sequence_logratio(new, old, mask).exp()
    assert s.tolist() == pytest.approx([math.exp(0.1), math.exp(-0.225), math.exp(0.3), math.exp(0.01 / 3)], abs=1e-6)
    for algorithm in (GSPO(), GSPO(clip_low=0.2, clip_high=0.2), GSPOToken()):
        leaf = new.clone().requires_grad_()
        out = algorithm.policy_loss(leaf, old, advantages[:, None], mask)
        loop_leaf = new.clone().requires_grad_()
        want = gspo_loop(loop_leaf, old, mask, advantages, algorithm.clip_low, algorithm.clip_high)
        torch.testing.assert_close(out.loss, want, atol=1e-6, rtol=0)
        (grad,) = torch.autograd.grad(out.loss, leaf)
        (want_grad,) = torch.autograd.grad(want, loop_leaf)
        torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=0)
    # by hand, the paper's clip (3e-4, 4e-4): responses 0-2 take their clipped branch; response 3 (s = 1.00334,
    # A < 0) keeps its unclipped one, the larger loss: −(−0.5)·1.00334 > −(−0.5)·1.0004
    out = GSPO().policy_loss(new, old, advantages[:, None], mask)
    hand = (-1.0004 * 1.0 + 0.9997 * 1.0 - 1.0004 * 0.5 + 0.5 * math.exp(0.01 / 3)) / 4
    assert float(out.loss) == pytest.approx(hand, abs=1e-6)
    assert float(out.loss) == pytest.approx(0.0001924, abs=1e-7)


# ---- CISPO ---------------------------------------------------------------------------------------------------------
def cispo_loop(new, old, mask, advantages, low, high):
    """MiniMax-M1 Eq. 4: Σ_i Σ_t sg(clip(r)) · A_i · log π / Σ_i |o_i|, negated, one token at a time."""
    total, tokens = 0.0, 0
    for i in range(len(mask)):
        for t in range(int(mask[i].sum())):
            r = torch.exp(new[i, t] - old[i, t]).detach()
            total = total - torch.clamp(r, 1 - low, 1 + high) * advantages[i] * new[i, t]
            tokens += 1
    return total / tokens


def test_cispo_is_the_papers_clipped_is_weight_on_every_token():
    mask, old, new, advantages = small()
    for algorithm in (CISPO(), CISPO(clip_low=0.1, clip_high=0.05)):
        leaf = new.clone().requires_grad_()
        out = algorithm.policy_loss(leaf, old, advantages[:, None], mask)
        loop_leaf = new.clone().requires_grad_()
        want = cispo_loop(loop_leaf, old, mask, advantages, algorithm.clip_low, algorithm.clip_high)
        torch.testing.assert_close(out.loss, want, atol=1e-6, rtol=0)
        (grad,) = torch.autograd.grad(out.loss, leaf)
        (want_grad,) = torch.autograd.grad(want, loop_leaf)
        torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=0)
        # no token is dropped: every response token has a gradient, where PPO's clip zeroes some
        assert bool((grad[mask] != 0).all())
    # by hand, token (0, 2): r = e^0.4 = 1.49 -> weight 1.28, A = 1, 9 tokens: d loss / d log π = −1.28 / 9
    assert float(grad[0, 2]) == pytest.approx(-1.05 / 9, abs=1e-7)  # the last one, clip_high 0.05
    leaf = new.clone().requires_grad_()
    (grad,) = torch.autograd.grad(CISPO().policy_loss(leaf, old, advantages[:, None], mask).loss, leaf)
    assert float(grad[0, 2]) == pytest.approx(-1.28 / 9, abs=1e-7)
    clipped = clipped_policy_loss(leaf, old, advantages[:, None], mask, 0.2, 0.28).loss
    assert float(torch.autograd.grad(clipped, leaf)[0][0, 2]) == 0.0
    out = cispo_policy_loss(new, old, advantages[:, None], mask, 1.0, 0.28)
    # tokens (0, 2) and (2, 0) have a weight above 1.28; nothing is clipped from below
    assert float(out.clipfrac_high) == pytest.approx(2 / 9) and float(out.clipfrac_low) == 0.0


# ---- DAPO ----------------------------------------------------------------------------------------------------------
def test_dapo_overlong_penalty_by_hand():
    lengths = torch.tensor([3, 6, 7, 8, 10, 12])
    # L_max = 10, L_cache = 4: 0 up to 6 tokens, then (6 − |y|) / 4, −1 beyond 10
    assert overlong_penalty(lengths, 10, 4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert overlong_penalty(lengths, 10, 0).tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    scores = torch.ones(6)
    # defaults: L_max = the sampling's max_new_tokens (10), L_cache = L_max // 5 = 2 -> 0 up to 8 tokens
    assert DAPO(group_size=2).shape_scores(scores, lengths, 10).tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    dapo = DAPO(group_size=2, overlong_max_length=10, overlong_cache=4, overlong_coef=0.5)
    assert dapo.shape_scores(scores, lengths, 99).tolist() == [1.0, 1.0, 0.875, 0.75, 0.5, 0.5]
    assert torch.equal(DAPO(group_size=2, overlong_coef=0).shape_scores(scores, lengths, 10), scores)
    with pytest.raises(ValueError, match="L_cache <= L_max"):
        overlong_penalty(lengths, 10, 11)


def test_dapo_dynamic_sampling_filter_keeps_groups_with_signal():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 1.0])
    assert signal_groups(scores, 3).tolist() == [False, True, False, True]
    assert torch.equal(signal_groups(scores, 3), ~zero_signal_groups(scores, 3))
    assert DAPO(group_size=3).keep_groups(scores).tolist() == [False, True, False, True]
    assert DAPO(group_size=3, drop_zero_signal_groups=False, dynamic_sampling=False).keep_groups(scores) is None
    assert GRPO(group_size=3).keep_groups(scores) is None
    assert GRPO(group_size=3, drop_zero_signal_groups=True).keep_groups(scores).tolist() == [False, True, False, True]


def test_dapo_loss_is_the_token_mean_clip_higher_surrogate():
    mask, old, new, advantages = small()
    dapo = DAPO(group_size=2)
    assert (dapo.clip_low, dapo.clip_high, dapo.loss_aggregation, dapo.kl_in) == (0.2, 0.28, "token_mean", "none")
    out = dapo.policy_loss(new, old, advantages[:, None], mask)
    # by hand over the 9 tokens: max(−A·ρ, −A·clip(ρ, 0.8, 1.28)) with ρ = e^Δ; tokens (0, 2) (ρ = 1.49) and
    # (2, 0) (ρ = 1.35) have A > 0 and are clipped at 1.28, token (1, 0) (ρ = 0.61) has A < 0 and is clipped at 0.8
    rho = (new - old).exp()
    hand = (-(rho[0, 0] + rho[0, 1] + 1.28) + (0.8 + rho[1, 1]) - 0.5 * 1.28 + 0.5 * rho[3].sum()) / 9
    assert float(out.loss) == pytest.approx(float(hand), abs=1e-6)
    assert float(out.loss) == pytest.approx(-0.0541562, abs=1e-7)


# ---- every algorithm ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_first_ratio_is_one_and_gives_the_plain_policy_gradient(cls):
    """With π_θ = π_old the ratio is 1, the surrogate is −A per token and its gradient −A·∇log π, aggregated as
    the algorithm aggregates (CISPO's value is −A·log π, its gradient the same)."""
    *_, mask, _, _, old, _ = rollout_tensors(4)
    advantages = torch.linspace(-1.5, 1.0, len(mask))[:, None].expand_as(mask)
    algorithm = cls(group_size=4) if cls.min_group_size > 1 else cls()
    leaf = old.clone().requires_grad_()
    out = algorithm.policy_loss(leaf, old, advantages, mask, max_length=5)
    assert float(out.ratio_mean) == pytest.approx(1.0, abs=1e-5)
    assert float(out.clipfrac_low) == float(out.clipfrac_high) == 0.0
    plain_leaf = old.clone().requires_grad_()
    plain = aggregate_loss(-advantages * plain_leaf, mask, algorithm.loss_aggregation, max_length=5)
    value = plain if cls is CISPO else aggregate_loss(-advantages, mask, algorithm.loss_aggregation, max_length=5)
    assert float(out.loss.detach()) == pytest.approx(float(value.detach()), abs=1e-5)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    (want,) = torch.autograd.grad(plain, plain_leaf)
    torch.testing.assert_close(grad, want, atol=1e-5, rtol=0)
    assert float(want.abs().max()) > 0.01


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_algorithms_are_pure_objects_with_validated_fields(cls):
    assert issubclass(cls, Algorithm) and not issubclass(cls, torch.nn.Module)
    assert cls.needs_critic == (cls is PPO)
    if cls.min_group_size > 1:
        with pytest.raises(ValueError, match=f"group_size must be >= 2 for {cls.__name__}"):
            cls(group_size=1)
    with pytest.raises(ValueError, match="algorithm.kl_in"):
        cls(kl_in="both")
    with pytest.raises(ValueError, match="algorithm.loss_aggregation"):
        cls(loss_aggregation="seq")
    with pytest.raises(ValueError, match="algorithm.clip_high"):
        cls(clip_high=0)


def test_dapo_and_grpo_fields_are_checked():
    with pytest.raises(ValueError, match="algorithm.overlong_cache"):
        DAPO(overlong_cache=-1)
    with pytest.raises(ValueError, match="algorithm.std_eps"):
        GRPO(std_eps=-1.0)
    with pytest.raises(ValueError, match="algorithm.gamma"):
        REINFORCEPP(gamma=2.0)
