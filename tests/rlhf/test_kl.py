from functools import partial

import pytest
import torch

from lit_rlhf.rlhf import AdaptiveKLController, FixedKLController, kl_penalty

F64 = torch.float64
close = partial(torch.testing.assert_close, rtol=0, atol=1e-6)

T3_LOGPROBS = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=F64)
T3_REF = torch.tensor([-1.2, -1.5, -0.5, -1.0], dtype=F64)


@pytest.mark.parametrize(
    ("estimator", "expected", "total"),
    [
        ("k1", [0.2, -0.5, 0.0, -2.0], -2.3),
        ("k2", [0.02, 0.125, 0.0, 2.0], 2.145),
        ("k3", [0.018731, 0.148721, 0.0, 4.389056], 4.556508),
    ],
)
def test_t3_kl_estimators(estimator, expected, total):
    kl = kl_penalty(T3_LOGPROBS, T3_REF, estimator)
    close(kl, torch.tensor(expected, dtype=F64))
    close(kl.sum(), torch.tensor(total, dtype=F64))


def test_estimators_are_exact_in_expectation_under_the_policy():
    # E_{x~π}[k1] = E_{x~π}[k3] = KL(π || π_ref): summing p(x)·k(x) over the whole vocabulary checks signs.
    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(11, generator=gen, dtype=F64), -1)
    logq = torch.log_softmax(torch.randn(11, generator=gen, dtype=F64), -1)
    exact = (logp.exp() * (logp - logq)).sum()
    assert exact > 0.05
    for estimator in ("k1", "k3"):
        close((logp.exp() * kl_penalty(logp, logq, estimator)).sum(), exact, atol=1e-12)
    # k2 and k3 are non-negative per token, k1 is not.
    assert (kl_penalty(logp, logq, "k2") >= 0).all() and (kl_penalty(logp, logq, "k3") >= 0).all()
    assert (kl_penalty(logp, logq, "k1") < 0).any()


def test_unknown_estimator_raises():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(T3_LOGPROBS, T3_REF, "k4")


def test_t8_adaptive_controller():
    ctl = AdaptiveKLController(init_value=0.2, target=6.0, horizon=10000)
    betas = []
    for current_kl in [10.0, 3.0, 6.6, 0.0, torch.tensor(6.0)]:
        ctl.update(current_kl, n_steps=512)
        betas.append(ctl.value)
    close(
        torch.tensor(betas, dtype=F64),
        torch.tensor([0.202048, 0.199979, 0.201003, 0.198945, 0.198945], dtype=F64),
    )


def test_adaptive_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(init_value=0.2, target=6.0, horizon=10000)
    ctl.update(10.0, n_steps=512)
    state = ctl.state_dict()
    resumed = AdaptiveKLController(init_value=0.2, target=6.0, horizon=10000)
    assert resumed.value == 0.2
    resumed.load_state_dict(state)
    assert resumed.value == ctl.value != 0.2
    ctl.update(3.0, n_steps=512)
    resumed.update(3.0, n_steps=512)
    assert resumed.value == ctl.value


def test_adaptive_controller_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_fixed_controller_is_constant_and_checkpointable():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=512)
    assert ctl.value == 0.05
    resumed = FixedKLController(0.5)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == 0.05
