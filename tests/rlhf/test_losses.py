import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lit_rlhf.rlhf import (
    center_rewards_penalty,
    explained_variance,
    kwise_ranking_loss,
    pairwise_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sft_nll,
)

F64 = torch.float64
close = partial(torch.testing.assert_close, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# PPO


@pytest.fixture
def t5(t4, trl_rollout):
    """T5: one PPO step on the T4 (k1) batch with TRL masks (values on ``~padding_mask_p1``)."""
    out = trl_rollout("k1")
    return {
        "policy": {
            "logprobs": torch.tensor([[-0.3, -1.3, -0.3, 5.0, 5.0], [-0.2, -0.9, -1.5, -0.8, -0.1]], dtype=F64),
            "old_logprobs": t4.logprobs,
            "advantages": out.whitened,
            "mask": out.masks.mask,
        },
        "value": {
            "values": torch.tensor([[0.5, 0.1, 0.9, 0.7, 9.0], [0.0, 0.2, 0.6, 0.4, 0.2]], dtype=F64),
            "old_values": out.values,
            "returns": out.returns,
            "mask": out.value_mask,
        },
    }


def test_t5_ppo_losses(t5):
    pg = ppo_policy_loss(**t5["policy"], clip_range=0.2)
    vf = ppo_value_loss(**t5["value"], clip_range=0.2)
    close(pg.loss, torch.tensor(0.087262, dtype=F64))
    close(pg.clipfrac, torch.tensor(0.25, dtype=F64))  # TRL definition; CleanRL's |ρ−1|>ε would give 0.625
    close(pg.approx_kl, torch.tensor(0.037833, dtype=F64))
    # Masked ratios: exp of [0.2, -0.3, 0] and [0.2, 0, -0.4, 0, 0.5].
    ratios = [math.exp(x) for x in (0.2, -0.3, 0.0, 0.2, 0.0, -0.4, 0.0, 0.5)]
    close(pg.ratio_mean, torch.tensor(sum(ratios) / 8, dtype=F64))
    close(vf.loss, torch.tensor(0.231978, dtype=F64))
    close(vf.clipfrac, torch.tensor(0.333333, dtype=F64))
    total = pg.loss + 0.1 * vf.loss
    close(total, torch.tensor(0.110460, dtype=F64))
    # T13, PPO-ptx: L = L_PPO + γ_ptx · L_ptx.
    close(total + 27.8 * 2.5, torch.tensor(69.610460, dtype=F64))


def test_t5_matches_trl_invalid_logprob_filling(t5):
    """TRL fills padded log-probs with 1.0 and zeroes values past the p1 mask; masking must make that moot."""
    policy, value = dict(t5["policy"]), dict(t5["value"])
    padding = ~policy["mask"]
    reference = ppo_policy_loss(**policy)
    policy["logprobs"] = policy["logprobs"].masked_fill(padding, 1.0)
    policy["old_logprobs"] = policy["old_logprobs"].masked_fill(padding, 1.0)
    close(ppo_policy_loss(**policy).loss, reference.loss, atol=1e-12)
    value_reference = ppo_value_loss(**value)
    value["values"] = value["values"].masked_fill(~value["mask"], 0.0)
    close(ppo_value_loss(**value).loss, value_reference.loss, atol=1e-12)


@pytest.mark.parametrize(
    ("advantage", "ratio", "loss", "grad_wrt_ratio"),
    [
        (1.0, 1.5, -1.2, 0.0),  # clipped branch active: no incentive to push ρ further up
        (1.0, 0.5, -0.5, -1.0),
        (-1.0, 1.5, 1.5, 1.0),
        (-1.0, 0.5, 0.8, 0.0),  # clipped branch active
        (2.0, 1.1, -2.2, -2.0),
    ],
)
def test_t6_clipped_surrogate_sign_table(advantage, ratio, loss, grad_wrt_ratio):
    rho = torch.tensor([[ratio]], dtype=F64, requires_grad=True)
    out = ppo_policy_loss(
        rho.log(),
        torch.zeros(1, 1, dtype=F64),
        torch.tensor([[advantage]], dtype=F64),
        torch.ones(1, 1).bool(),
    )
    out.loss.backward()
    close(out.loss, torch.tensor(loss, dtype=F64))
    close(rho.grad, torch.tensor([[grad_wrt_ratio]], dtype=F64))
    assert out.clipfrac.item() == float(grad_wrt_ratio == 0.0)


def _random_ppo_batch(seed: int, batch: int = 8, length: int = 6):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length
    lengths[1] = 1  # very unequal lengths, so per-micro-batch means differ from the global mean
    return {
        "mask": torch.arange(length) < lengths.unsqueeze(-1),
        "logprobs": (-torch.rand(batch, length, generator=gen, dtype=F64) * 2).requires_grad_(),
        "old_logprobs": -torch.rand(batch, length, generator=gen, dtype=F64) * 2,
        "advantages": torch.randn(batch, length, generator=gen, dtype=F64),
        "values": torch.randn(batch, length, generator=gen, dtype=F64).requires_grad_(),
        "old_values": torch.randn(batch, length, generator=gen, dtype=F64),
        "returns": torch.randn(batch, length, generator=gen, dtype=F64),
    }


def _policy_and_value_loss(b, rows, num_tokens=None):
    pg = ppo_policy_loss(
        b["logprobs"][rows], b["old_logprobs"][rows], b["advantages"][rows], b["mask"][rows], 0.2, num_tokens
    )
    vf = ppo_value_loss(b["values"][rows], b["old_values"][rows], b["returns"][rows], b["mask"][rows], 0.2, num_tokens)
    return pg.loss, vf.loss


def test_micro_batch_accumulation_equals_one_big_batch():
    b = _random_ppo_batch(seed=0)
    leaves = (b["logprobs"], b["values"])
    whole_pg, whole_vf = _policy_and_value_loss(b, slice(None))
    whole_grads = torch.autograd.grad(whole_pg + whole_vf, leaves)

    num_tokens = b["mask"].sum()
    micro = [_policy_and_value_loss(b, slice(i, i + 2), num_tokens) for i in range(0, 8, 2)]
    acc_pg, acc_vf = sum(m[0] for m in micro), sum(m[1] for m in micro)
    acc_grads = torch.autograd.grad(acc_pg + acc_vf, leaves)

    close(acc_pg, whole_pg, atol=1e-12)
    close(acc_vf, whole_vf, atol=1e-12)
    for acc, whole in zip(acc_grads, whole_grads, strict=True):
        close(acc, whole, atol=1e-12)
    # Averaging per-micro-batch token means (TRL's accumulation) is a different estimator.
    mean_of_means = sum(_policy_and_value_loss(b, slice(i, i + 2))[0] for i in range(0, 8, 2)) / 4
    assert abs(mean_of_means.item() - whole_pg.item()) > 1e-3


def test_statistics_are_detached():
    b = _random_ppo_batch(seed=3)
    pg = ppo_policy_loss(b["logprobs"], b["old_logprobs"], b["advantages"], b["mask"])
    vf = ppo_value_loss(b["values"], b["old_values"], b["returns"], b["mask"])
    assert pg.loss.requires_grad and vf.loss.requires_grad
    assert not any(t.requires_grad for t in (pg.clipfrac, pg.approx_kl, pg.ratio_mean, vf.clipfrac))
    assert not explained_variance(b["values"], b["returns"], b["mask"]).requires_grad


def test_policy_loss_survives_garbage_at_padding():
    b = _random_ppo_batch(seed=1)
    logprobs = b["logprobs"].detach().masked_fill(~b["mask"], 1e4).requires_grad_()
    out = ppo_policy_loss(logprobs, b["old_logprobs"], b["advantages"], b["mask"])
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logprobs.grad).all()
    assert (logprobs.grad[~b["mask"]] == 0).all()
    close(
        out.loss,
        ppo_policy_loss(b["logprobs"], b["old_logprobs"], b["advantages"], b["mask"]).loss,
        atol=1e-12,
    )


def test_ratio_is_one_and_policy_loss_is_minus_mean_advantage_on_policy():
    b = _random_ppo_batch(seed=2)
    out = ppo_policy_loss(b["old_logprobs"], b["old_logprobs"], b["advantages"], b["mask"])
    expected = -(b["advantages"] * b["mask"]).sum() / b["mask"].sum()
    close(out.loss, expected, atol=1e-12)
    assert out.ratio_mean.item() == 1.0 and out.clipfrac.item() == 0.0 and out.approx_kl.item() == 0.0


def test_value_loss_by_hand_and_without_clipping():
    values = torch.tensor([[1.0, 0.0, 2.0]], dtype=F64)
    old_values = torch.tensor([[0.5, 0.0, 0.0]], dtype=F64)
    returns = torch.tensor([[0.0, 1.0, 2.0]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    # Token 0: unclipped (1-0)²=1, clipped V=0.7 → 0.49, max 1. Token 1: 1 both ways. Token 2 masked.
    out = ppo_value_loss(values, old_values, returns, mask, clip_range=0.2)
    close(out.loss, torch.tensor(0.5 * (1.0 + 1.0) / 2, dtype=F64))
    close(out.clipfrac, torch.tensor(0.0, dtype=F64))
    # Token 0 with V_old = 1.5: clipped V=1.3 → 1.69 > 1, so the clipped branch wins.
    out = ppo_value_loss(values, old_values + torch.tensor([[1.0, 0, 0]], dtype=F64), returns, mask, 0.2)
    close(out.loss, torch.tensor(0.5 * (1.69 + 1.0) / 2, dtype=F64))
    close(out.clipfrac, torch.tensor(0.5, dtype=F64))
    close(ppo_value_loss(values, old_values, returns, mask, clip_range=None).loss, torch.tensor(0.5, dtype=F64))


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    close(explained_variance(returns, returns, mask), torch.tensor(1.0, dtype=F64))
    close(explained_variance(torch.full_like(returns, 5.0), returns, mask), torch.tensor(0.0, dtype=F64))
    # Residuals [1, 0, -1] (var 2/3) vs returns var 2/3 → 0; residuals [0.5, 0, 0.5] (var 1/18) → 1 − 1/12.
    close(
        explained_variance(returns - torch.tensor([[0.5, 0, 0.5, 0]]), returns, mask),
        torch.tensor(11 / 12, dtype=F64),
    )


# --------------------------------------------------------------------------------------------------------
# Reward model

T7_CHOSEN = torch.tensor([2.0, 0.5, -1.0], dtype=F64)
T7_REJECTED = torch.tensor([1.0, 1.0, -3.0], dtype=F64)
T7_MARGIN = torch.tensor([0.5, 0.0, 1.0], dtype=F64)


def test_t7_pairwise_loss_margin_and_centering():
    per_pair = pairwise_loss(T7_CHOSEN, T7_REJECTED)
    close(per_pair, torch.tensor([0.313262, 0.974077, 0.126928], dtype=F64))
    close(per_pair.mean(), torch.tensor(0.471422, dtype=F64))
    close(pairwise_loss(T7_CHOSEN, T7_REJECTED, T7_MARGIN).mean(), torch.tensor(0.587139, dtype=F64))
    center = 0.01 * center_rewards_penalty(T7_CHOSEN, T7_REJECTED)
    close(center, torch.tensor(0.090833, dtype=F64))
    close(per_pair.mean() + center, torch.tensor(0.562256, dtype=F64))


def _as_k2(chosen, rejected):
    rewards = torch.stack([chosen, rejected], dim=-1)
    ranks = torch.tensor([[0, 1]]).expand_as(rewards)
    return rewards, ranks, torch.ones_like(ranks, dtype=torch.bool)


def test_t7_metrics_from_kwise_stats_at_k2():
    out = kwise_ranking_loss(*_as_k2(T7_CHOSEN, T7_REJECTED))
    num_pairs = out.num_pairs.sum()
    assert num_pairs.item() == 3
    close(out.pair_correct.sum() / num_pairs, torch.tensor(2 / 3))  # accuracy 0.666667
    close(out.pair_margin_sum.sum() / num_pairs, torch.tensor(0.833333, dtype=F64))


def test_kwise_accuracy_is_strict():
    # Rewards tied across different ranks count as wrong (TRL: mean(r_c > r_r)).
    rewards = torch.tensor([[0.5, 0.5, 0.1]], dtype=F64)
    out = kwise_ranking_loss(rewards, torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.bool))
    assert out.num_pairs.tolist() == [3] and out.pair_correct.tolist() == [2]
    close(out.pair_margin_sum, torch.tensor([0.8], dtype=F64))


def test_kwise_at_k2_equals_pairwise_in_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    chosen = torch.randn(5, generator=gen, dtype=F64, requires_grad=True)
    rejected = torch.randn(5, generator=gen, dtype=F64, requires_grad=True)
    margin = torch.rand(5, generator=gen, dtype=F64)
    kw_margin = torch.zeros(5, 2, 2, dtype=F64)
    kw_margin[:, 0, 1] = margin
    out = kwise_ranking_loss(*_as_k2(chosen, rejected), margin=kw_margin)
    expected = pairwise_loss(chosen, rejected, margin)
    close(out.per_prompt_loss, expected.detach(), atol=1e-12)
    grads = torch.autograd.grad(out.loss, (chosen, rejected))
    expected_grads = torch.autograd.grad(expected.mean(), (chosen, rejected))
    for got, want in zip(grads, expected_grads, strict=True):
        close(got, want, atol=1e-12)


def test_t7_kwise_k4():
    rewards = torch.tensor([[1.5, 0.3, 0.0, -0.7]], dtype=F64)
    out = kwise_ranking_loss(rewards, torch.tensor([[0, 1, 2, 3]]), torch.ones(1, 4, dtype=torch.bool))
    close(out.per_prompt_loss, torch.tensor([0.306764], dtype=F64))
    close(out.loss, torch.tensor(0.306764, dtype=F64))
    close(out.per_prompt_loss * out.num_pairs, torch.tensor([1.840582], dtype=F64))
    assert out.num_pairs.tolist() == [6] and out.pair_correct.tolist() == [6]
    # The slot order is irrelevant: only ranks say who is better.
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = kwise_ranking_loss(rewards[:, perm], torch.tensor([[0, 1, 2, 3]])[:, perm], torch.ones(1, 4).bool())
    close(shuffled.loss, out.loss, atol=1e-12)


def test_kwise_drops_ties_and_prompts_with_only_ties():
    rewards = torch.tensor([[1.0, 0.2, -0.4, -1.0], [0.3, 0.1, -0.2, 0.9]], dtype=F64)
    ranks = torch.tensor([[0, 1, 1, 2], [0, 0, 0, 0]])
    out = kwise_ranking_loss(rewards, ranks, torch.ones(2, 4, dtype=torch.bool))
    r = rewards[0]
    non_tie_pairs = [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]  # (1, 2) is a tie
    expected = torch.stack([pairwise_loss(r[w], r[lo]) for w, lo in non_tie_pairs]).mean()
    assert out.num_pairs.tolist() == [5, 0]
    close(out.per_prompt_loss, torch.stack([expected, torch.tensor(0.0, dtype=F64)]), atol=1e-12)
    close(out.loss, expected, atol=1e-12)  # the all-ties prompt does not dilute the mean


def test_kwise_padded_responses_are_ignored_even_if_nan():
    rewards = torch.tensor([[0.4, -0.1, 0.7, 0.2], [1.0, -0.5, float("nan"), float("nan")]], dtype=F64)
    rewards.requires_grad_()
    ranks = torch.tensor([[1, 3, 0, 2], [0, 1, 0, 0]])
    response_mask = torch.tensor([[True] * 4, [True, True, False, False]])
    out = kwise_ranking_loss(rewards, ranks, response_mask)
    out.loss.backward()
    full = kwise_ranking_loss(rewards[:1].detach(), ranks[:1], response_mask[:1]).loss
    pair = pairwise_loss(rewards[1, 0].detach(), rewards[1, 1].detach())
    assert out.num_pairs.tolist() == [6, 1]
    close(out.loss, (full + pair) / 2, atol=1e-12)
    assert torch.isfinite(rewards.grad).all() and (rewards.grad[1, 2:] == 0).all()


def test_kwise_without_any_pair_is_zero_but_connected():
    rewards = torch.randn(2, 3, dtype=F64, requires_grad=True)
    out = kwise_ranking_loss(rewards, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert (rewards.grad == 0).all()


# --------------------------------------------------------------------------------------------------------
# SFT

T11_LOGITS = torch.tensor(
    [
        [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0], [0.0, 2.0, 0.0]],
        [[0.5, 0.5, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.3, 0.2, 0.1]],
    ],
    dtype=F64,
)
T11_LABELS = torch.tensor([[-100, -100, 2, 0, 1], [-100, -100, -100, 2, -100]])


def test_t11_sft_token_mean_vs_mean_of_means():
    nll_sum, num_tokens = sft_nll(T11_LOGITS, T11_LABELS)
    assert num_tokens.item() == 4
    close(nll_sum, torch.tensor(1.551445 + 3.094923 + 1.098612 + 1.551445, dtype=F64))
    close(nll_sum / num_tokens, torch.tensor(1.824106, dtype=F64))
    per_sequence = [sft_nll(T11_LOGITS[i : i + 1], T11_LABELS[i : i + 1]) for i in range(2)]
    mean_of_means = sum(s / n for s, n in per_sequence) / 2
    close(mean_of_means, torch.tensor(1.733219, dtype=F64))  # the grad-accumulation bug, transformers#34242


def test_sft_nll_micro_batch_split_invariance_and_hf_parity():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, 17, generator=gen, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 17, (6, 9), generator=gen)
    labels[:, :3] = -100  # prompt
    labels[torch.rand(6, 9, generator=gen) < 0.3] = -100  # padding and friends
    nll_sum, num_tokens = sft_nll(logits, labels)
    (whole_grad,) = torch.autograd.grad(nll_sum / num_tokens, logits)
    hf = F.cross_entropy(logits[:, :-1].reshape(-1, 17), labels[:, 1:].reshape(-1), reduction="mean")
    close(nll_sum / num_tokens, hf, atol=1e-12)

    splits = [slice(0, 1), slice(1, 4), slice(4, 6)]
    parts = [sft_nll(logits[s], labels[s]) for s in splits]
    total_tokens = sum(n for _, n in parts)
    assert total_tokens.item() == num_tokens.item()
    (split_grad,) = torch.autograd.grad(sum(s / total_tokens for s, _ in parts), logits)
    close(sum(s for s, _ in parts), nll_sum, atol=1e-12)
    close(split_grad, whole_grad, atol=1e-12)
