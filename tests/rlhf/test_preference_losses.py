"""DPO-family losses: hand computations, TRL 1.x reference numbers, K-wise vs a loop over pairs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lit_rlhf.rlhf import (
    dpo_loss,
    ipo_loss,
    kwise_preference_loss,
    preference_pair_losses,
    ranked_pairs,
    sequence_logprobs,
    simpo_loss,
    top_ranked_nll,
)

# Four pairs of summed response log-probs (per-token values summed over 3/5/2/4 and 2/3/5/4 tokens).
CHOSEN = [-2.5, -4.375, -1.0, -3.0]
REJECTED = [-3.5, -3.0, -3.1, -3.8]
REF_CHOSEN = [-3.0, -4.75, -1.5, -2.5]
REF_REJECTED = [-3.25, -2.5, -3.5, -4.5]
CHOSEN_LEN = [3, 5, 2, 4]
REJECTED_LEN = [2, 3, 5, 4]

# Reference numbers from TRL 1.16 on the inputs above (float64): `DPOTrainer._compute_loss` with
# `precompute_ref_log_probs` and per-token log-probs whose sums are the inputs (one call per pair for the per-pair
# losses, one call with all four for the logged metrics); `CPOTrainer.cpo_loss` for cDPO (its label-smoothed
# sigmoid, fed the DPO log-ratios) and SimPO (fed the length-averaged log-probs, `cpo_alpha=0`).
TRL_DPO = {
    ("sigmoid", 0.1): [0.6563501408267951, 0.6503539066627487, 0.6881596805078622, 0.7549461015956135],
    ("sigmoid", 0.5): [0.5231232641398401, 0.49813454751437536, 0.6684596480132863, 1.0374879504858856],
    ("ipo", 0.1): [22.168402777777775, 22.641736111111115, 23.3289, 28.09],
    ("ipo", 0.5): [0.5017361111111112, 0.5750694444444444, 0.6889, 1.6900000000000002],
}
TRL_DPO_METRICS = {  # beta 0.1; sigmoid and ipo log the same rewards
    "rewards/chosen": 0.021875000000000002,
    "rewards/rejected": 0.00875,
    "rewards/accuracies": 0.75,
    "rewards/margins": 0.013125000000000005,
}
TRL_CDPO = {  # beta 0.1
    0.1: [0.6638501408267952, 0.6591039066627488, 0.6891596805078624, 0.7429461015956136],
    0.3: [0.6788501408267951, 0.6766039066627487, 0.6911596805078623, 0.7189461015956136],
}
TRL_SIMPO = {  # (beta, gamma, label_smoothing): (losses, chosen_rewards, rejected_rewards)
    (2.0, 0.5, 0.0): (
        [0.23396252507754828, 0.8259394198788436, 0.8315734864417375, 0.7443966600735706],
        [-1.6666666666666667, -1.75, -1.0, -1.5],
        [-3.5, -2.0, -1.24, -1.9000000000000004],
    ),
    (2.5, 1.0, 0.0): (
        [0.24279901528003672, 1.0948510472537265, 1.103186048885458, 0.9740769841801065],
        [-2.0833333333333335, -2.1875, -1.25, -1.875],
        [-4.375, -2.5, -1.55, -2.3750000000000004],
    ),
    (2.0, 0.5, 0.2): (
        [0.5006291917442149, 0.7759394198788436, 0.7795734864417375, 0.7243966600735707],
        [-1.6666666666666667, -1.75, -1.0, -1.5],
        [-3.5, -2.0, -1.24, -1.9000000000000004],
    ),
}


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, t(expected), atol=1e-6, rtol=0)


# ---- hand computations ----------------------------------------------------------------------------------
def test_dpo_hand_computed():
    # log-ratios +0.5 (chosen) and -0.5 (rejected), beta 1: -log sigma(1) = log(1 + e^-1)
    out = dpo_loss(t([0.5]), t([-0.5]), t([0.0]), t([0.0]), beta=1.0)
    close(out.losses, [math.log(1 + math.exp(-1))])
    close(out.chosen_rewards, [0.5])
    close(out.rejected_rewards, [-0.5])
    # policy == reference: every pair costs log 2 whatever the log-probs
    same = dpo_loss(t([-3.0, -1.0]), t([-2.0, -7.0]), t([-3.0, -1.0]), t([-2.0, -7.0]), beta=0.3)
    close(same.losses, [math.log(2)] * 2)
    # cDPO, eps 0.25, beta 2, delta 1: 0.75 * log(1 + e^-2) + 0.25 * log(1 + e^2)
    smooth = dpo_loss(t([1.0]), t([0.0]), t([0.0]), t([0.0]), beta=2.0, label_smoothing=0.25)
    close(smooth.losses, [0.75 * math.log(1 + math.exp(-2)) + 0.25 * math.log(1 + math.exp(2))])


def test_ipo_hand_computed():
    # averaged log-ratios 1/2 - (-1)/4 = 0.75; beta 0.5 -> target 1: (0.75 - 1)^2
    out = ipo_loss(t([1.0]), t([-1.0]), t([0.0]), t([0.0]), t([2]), t([4]), beta=0.5)
    close(out.losses, [0.0625])
    close(out.chosen_rewards, [0.5])  # beta * summed log-ratio, as TRL logs it


def test_simpo_hand_computed():
    # averages -1/2 and -3/3: beta 2 -> 2 * 0.5 - gamma 0.5 = 0.5; loss -log sigma(0.5)
    out = simpo_loss(t([-1.0]), t([-3.0]), t([2]), t([3]), beta=2.0, gamma=0.5)
    close(out.losses, [math.log(1 + math.exp(-0.5))])
    close(out.chosen_rewards, [-1.0])
    close(out.rejected_rewards, [-2.0])


def test_label_smoothing_is_validated():
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(t([0.0]), t([0.0]), t([0.0]), t([0.0]), label_smoothing=0.5)
    with pytest.raises(ValueError, match="not to ipo"):
        preference_pair_losses("ipo", *[t([0.0])] * 6, label_smoothing=0.1)
    with pytest.raises(ValueError, match="reference"):
        preference_pair_losses("sigmoid", *[t([0.0])] * 4)


# ---- TRL 1.x --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("loss_type", "beta"), list(TRL_DPO))
def test_dpo_and_ipo_match_trl(loss_type, beta):
    out = preference_pair_losses(
        loss_type, t(CHOSEN), t(REJECTED), t(CHOSEN_LEN), t(REJECTED_LEN), t(REF_CHOSEN), t(REF_REJECTED), beta=beta
    )
    close(out.losses, TRL_DPO[(loss_type, beta)])
    if beta == 0.1:
        margins = out.chosen_rewards - out.rejected_rewards
        close(out.chosen_rewards.mean(), TRL_DPO_METRICS["rewards/chosen"])
        close(out.rejected_rewards.mean(), TRL_DPO_METRICS["rewards/rejected"])
        close((margins > 0).double().mean(), TRL_DPO_METRICS["rewards/accuracies"])
        close(margins.mean(), TRL_DPO_METRICS["rewards/margins"])


@pytest.mark.parametrize("label_smoothing", list(TRL_CDPO))
def test_conservative_dpo_matches_trl(label_smoothing):
    out = dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), 0.1, label_smoothing)
    close(out.losses, TRL_CDPO[label_smoothing])


@pytest.mark.parametrize(("beta", "gamma", "label_smoothing"), list(TRL_SIMPO))
def test_simpo_matches_trl_cpo_trainer(beta, gamma, label_smoothing):
    out = simpo_loss(t(CHOSEN), t(REJECTED), t(CHOSEN_LEN), t(REJECTED_LEN), beta, gamma, label_smoothing)
    losses, chosen, rejected = TRL_SIMPO[(beta, gamma, label_smoothing)]
    close(out.losses, losses)
    close(out.chosen_rewards, chosen)
    close(out.rejected_rewards, rejected)


# ---- K-wise ---------------------------------------------------------------------------------------------
def _loop_kwise(loss_type, logps, lengths, ranks, mask, ref, **kw):
    """Per-prompt mean of pairwise losses over every non-tied pair, one pair at a time."""
    per_prompt, pairs = [], []
    for b in range(ranks.shape[0]):
        losses = []
        for w in range(ranks.shape[1]):
            for lo in range(ranks.shape[1]):
                if mask[b, w] and mask[b, lo] and ranks[b, w] < ranks[b, lo]:
                    args = [logps[b, w : w + 1], logps[b, lo : lo + 1], lengths[b, w : w + 1], lengths[b, lo : lo + 1]]
                    refs = (None, None) if ref is None else (ref[b, w : w + 1], ref[b, lo : lo + 1])
                    losses.append(preference_pair_losses(loss_type, *args, *refs, **kw).losses[0])
        pairs.append(len(losses))
        per_prompt.append(torch.stack(losses).mean() if losses else torch.tensor(0.0, dtype=torch.float64))
    return torch.stack(per_prompt), pairs


@pytest.mark.parametrize(
    ("loss_type", "kw"),
    [
        ("sigmoid", dict(beta=0.1)),
        ("sigmoid", dict(beta=0.5, label_smoothing=0.2)),
        ("ipo", dict(beta=0.3)),
        ("simpo", dict(beta=2.0, gamma=0.7)),
    ],
)
def test_kwise_equals_a_loop_over_pairs(loss_type, kw):
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(4, 4, generator=g, dtype=torch.float64) * 10
    ref = None if loss_type == "simpo" else -torch.rand(4, 4, generator=g, dtype=torch.float64) * 10
    lengths = torch.randint(1, 9, (4, 4), generator=g)
    # prompt 0: strict order; 1: a tie; 2: three responses (one padded slot); 3: all tied but one
    ranks = torch.tensor([[2, 0, 3, 1], [0, 1, 1, 2], [1, 0, 2, 3], [0, 0, 0, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    logps_nan = logps.masked_fill(~mask, float("nan"))  # padded slots must not leak
    logps_nan.requires_grad_(True)
    out = kwise_preference_loss(loss_type, logps_nan, lengths, ranks, mask, ref, **kw)
    expected, pairs = _loop_kwise(loss_type, logps, lengths, ranks, mask, ref, **kw)
    assert out.num_pairs.tolist() == pairs == [6, 5, 3, 3]
    torch.testing.assert_close(out.per_prompt_loss, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.loss_sum, expected.sum(), atol=1e-12, rtol=0)
    out.loss_sum.backward()
    assert torch.isfinite(logps_nan.grad).all() and (logps_nan.grad[~mask] == 0).all()


def test_kwise_at_k2_is_the_pairwise_loss():
    logps = torch.stack([t(CHOSEN), t(REJECTED)], dim=1)
    ref = torch.stack([t(REF_CHOSEN), t(REF_REJECTED)], dim=1)
    lengths = torch.stack([t(CHOSEN_LEN), t(REJECTED_LEN)], dim=1)
    ranks, mask = torch.tensor([[0, 1]] * 4), torch.ones(4, 2, dtype=torch.bool)
    out = kwise_preference_loss("sigmoid", logps, lengths, ranks, mask, ref, beta=0.5)
    close(out.loss_sum / 4, sum(TRL_DPO[("sigmoid", 0.5)]) / 4)


def test_ranked_pairs_drop_ties_and_padding():
    prompt, winner, loser = ranked_pairs(torch.tensor([[1, 0, 1], [0, 1, 2]]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert list(zip(prompt.tolist(), winner.tolist(), loser.tolist())) == [(0, 1, 0), (0, 1, 2), (1, 0, 1)]


def test_kwise_without_pairs_is_a_zero_with_a_graph():
    logps = torch.zeros(1, 2, requires_grad=True)
    out = kwise_preference_loss("simpo", logps, torch.ones(1, 2), torch.tensor([[0, 0]]), torch.ones(1, 2).bool())
    out.loss_sum.backward()
    assert out.loss_sum.item() == 0.0 and out.num_pairs.tolist() == [0]


# ---- sequence log-probs ---------------------------------------------------------------------------------
def test_sequence_logprobs_sum_the_labelled_tokens_after_the_shift():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 1, 6], [-100, -100, 5, 4, -100]])
    logps, lengths = sequence_logprobs(logits, labels)
    logsm = F.log_softmax(logits, -1)
    expected = [
        logsm[0, 1, 3] + logsm[0, 2, 1] + logsm[0, 3, 6],
        logsm[1, 1, 5] + logsm[1, 2, 4],
    ]
    torch.testing.assert_close(logps, torch.stack(expected), atol=1e-12, rtol=0)
    assert lengths.tolist() == [3, 2]
    # from one position before the earliest label on (logits_to_keep), labels sliced the same way: same result
    tail_logps, _ = sequence_logprobs(logits[:, 1:], labels[:, 1:])
    torch.testing.assert_close(tail_logps, logps, atol=1e-12, rtol=0)


def test_top_ranked_nll_hand_computed_with_a_tie_and_padding():
    logps = torch.tensor([[-6.0, -2.0, -9.0], [-4.0, -3.0, -8.0], [-1.0, -1.0, -1.0]])
    lengths = torch.tensor([[3, 4, 2], [2, 3, 5], [1, 1, 1]])
    ranks = torch.tensor([[1, 0, 2], [0, 0, 1], [0, 1, 2]])
    mask = torch.tensor([[True, True, True], [True, True, True], [False, True, True]])
    # prompt 0: response 1 (2/4); prompt 1: the tie at rank 0 (4/2, 3/3); prompt 2: slot 0 is padding -> slot 1
    expected = torch.tensor([0.5, (2.0 + 1.0) / 2, 1.0])
    torch.testing.assert_close(top_ranked_nll(logps, lengths, ranks, mask), expected, atol=1e-7, rtol=0)
