from functools import partial

import pytest
import torch

from lit_rlhf.rlhf import (
    discounted_reverse_cumsum,
    gae,
    gae_reference,
    masked_whiten,
    per_token_rewards,
    response_masks,
    truncate_after_eos,
)

F64 = torch.float64
close = partial(torch.testing.assert_close, rtol=0, atol=1e-6)
BOTH_GAE = pytest.mark.parametrize("gae_fn", [gae, gae_reference], ids=["vectorised", "reference"])


@BOTH_GAE
@pytest.mark.parametrize(
    ("gamma", "lam", "advantages", "returns"),
    [
        (1.0, 0.95, [0.346750, 0.365000, 0.700000], [0.846750, 0.765000, 1.000000]),
        (0.99, 0.95, [0.330207, 0.355350, 0.700000], [0.830207, 0.755350, 1.000000]),
        (1.0, 1.0, [0.400000, 0.400000, 0.700000], [0.900000, 0.800000, 1.000000]),  # MC return − V
    ],
)
def test_t1_gae(gae_fn, gamma, lam, advantages, returns):
    rewards = torch.tensor([[0.1, -0.2, 1.0]], dtype=F64)
    values = torch.tensor([[0.5, 0.4, 0.3]], dtype=F64)
    adv, ret = gae_fn(rewards, values, gamma=gamma, lam=lam)
    close(adv, torch.tensor([advantages], dtype=F64))
    close(ret, torch.tensor([returns], dtype=F64))


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4, 53), (2, 160)])
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.0, 0.5)])
def test_vectorised_gae_matches_reference_loop(shape, gamma, lam):
    gen = torch.Generator().manual_seed(hash((shape, gamma, lam)) % 2**31)
    rewards = torch.randn(shape, generator=gen, dtype=F64)
    values = torch.randn(shape, generator=gen, dtype=F64)
    lengths = torch.randint(1, shape[1] + 1, (shape[0],), generator=gen)
    mask = torch.arange(shape[1]) < lengths.unsqueeze(-1)
    for m in (mask, None):
        adv, ret = gae(rewards, values, m, gamma, lam)
        adv_ref, ret_ref = gae_reference(rewards, values, m, gamma, lam)
        close(adv, adv_ref, atol=1e-9)
        close(ret, ret_ref, atol=1e-9)


def test_masked_tail_gets_zero_advantage_and_return():
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(2, 2, 6, generator=gen, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask)
    assert (adv[0, 3:] == 0).all() and (ret[0, 3:] == 0).all()
    # The last real token sees V_{t+1} = 0 even though the raw values continue.
    close(adv[0, 2], rewards[0, 2] - values[0, 2])
    # Garbage in the tail must not leak backwards.
    rewards2, values2 = rewards.clone(), values.clone()
    rewards2[0, 3:], values2[0, 3:] = 1e6, -1e6
    close(gae(rewards2, values2, mask)[0], adv, atol=1e-12)


def test_discounted_reverse_cumsum_special_discounts():
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    close(discounted_reverse_cumsum(x, 0.0), x)
    close(discounted_reverse_cumsum(x, 1.0), torch.tensor([[6.0, 5.0, 3.0]], dtype=F64))
    close(discounted_reverse_cumsum(x, 0.5), torch.tensor([[1 + 1 + 0.75, 2 + 1.5, 3.0]], dtype=F64))


def test_gae_float32_and_rejects_bad_discounts():
    adv, _ = gae(torch.ones(2, 4), torch.zeros(2, 4), gamma=1.0, lam=1.0)
    assert adv.dtype == torch.float32
    close(adv, torch.tensor([[4.0, 3.0, 2.0, 1.0]] * 2))
    with pytest.raises(ValueError, match="gamma"):
        gae(torch.ones(1, 2), torch.ones(1, 2), gamma=1.5)


@pytest.mark.parametrize(
    ("estimator", "advantages", "returns", "whitened"),
    [
        (
            "k1",
            [
                [0.7184375, 0.656250, 0.575000, 0.500000, 0.0],
                [-0.465261, -0.589748, -0.720787, -0.869250, -1.015],
            ],
            [
                [0.918438, 0.956250, 0.975000, 1.000000, 0.0],
                [-0.365261, -0.389748, -0.420787, -0.469250, -0.515],
            ],
            [
                [1.268372, 1.183762, 1.073215, 0.0, 0.0],
                [-0.342138, -0.511513, -0.689802, -0.891796, -1.090100],
            ],
        ),
        (
            "k3",
            [
                [0.712679, 0.645180, 0.575000, 0.500000, 0.0],
                [-0.446093, -0.574581, -0.709830, -0.852181, -1.002041],
            ],
            [
                [0.912679, 0.945180, 0.975000, 1.000000, 0.0],
                [-0.346093, -0.374581, -0.409830, -0.452181, -0.502041],
            ],
            [
                [1.268218, 1.175086, 1.078255, 0.0, 0.0],
                [-0.330603, -0.507884, -0.694495, -0.890903, -1.097674],
            ],
        ),
    ],
)
def test_t4_trl_gae_and_whitening(trl_rollout, estimator, advantages, returns, whitened):
    out = trl_rollout(estimator)
    close(out.values, torch.tensor([[0.2, 0.3, 0.4, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5]], dtype=F64))
    close(out.advantages, torch.tensor(advantages, dtype=F64))
    close(out.returns, torch.tensor(returns, dtype=F64))
    close(out.whitened, torch.tensor(whitened, dtype=F64))


def test_t4_eos_placement_gae_openrlhf_numbers(t4):
    """Our convention: score on the EOS token itself, values and rewards masked by the response mask."""
    post = truncate_after_eos(t4.responses, t4.eos, t4.pad)
    masks = response_masks(post, t4.pad, t4.eos)
    kl = t4.logprobs - t4.ref_logprobs
    scores = torch.tensor([1.0, -0.5], dtype=F64)
    rewards, _ = per_token_rewards(kl, scores, masks.sequence_lengths, t4.kl_coef, masks.mask)
    adv, ret = gae(rewards, t4.values, masks.mask, gamma=1.0, lam=0.95)
    close(
        adv,
        torch.tensor([[0.741, 0.68, 0.6, 0, 0], [-0.465261, -0.589748, -0.720787, -0.86925, -1.015]], dtype=F64),
    )
    close(ret[0], torch.tensor([0.941, 0.98, 1.0, 0, 0], dtype=F64))
    close(ret[1], torch.tensor([-0.365261, -0.389748, -0.420787, -0.469250, -0.515000], dtype=F64))
    # OpenRLHF normalisation: global, biased variance, no eps, not zero-filled.
    normalized = masked_whiten(adv, masks.mask, unbiased=False, eps=0.0)
    expected = [
        [1.353799, 1.266493, 1.151992, 0.293237, 0.293237],
        [-0.372671, -0.550844, -0.738396, -0.950884, -1.15949],
    ]
    close(normalized, torch.tensor(expected, dtype=F64))


def test_t12_trl_reward_whitening(trl_rollout):
    out = trl_rollout("k1")
    whitened = masked_whiten(out.rewards, out.value_mask, shift_mean=False).masked_fill(~out.value_mask, 0.0)
    expected_rewards = [
        [-0.094842, -0.056740, -0.082142, 2.458014, 0.0],
        [-0.094842, -0.094842, -0.069441, -0.094842, -1.390322],
    ]
    close(whitened, torch.tensor(expected_rewards, dtype=F64))
    adv, _ = gae(whitened, out.values, out.value_mask, gamma=1.0, lam=0.95)
    expected_adv = [
        [1.741124, 1.827333, 1.877972, 1.958014, 0.0],
        [-1.497620, -1.581871, -1.670557, -1.790648, -1.890322],
    ]
    close(adv, torch.tensor(expected_adv, dtype=F64))
