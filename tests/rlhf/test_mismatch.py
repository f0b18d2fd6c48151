"""Engine-vs-trainer log-prob gap and truncated/masked importance sampling (lit_rlhf.rlhf.mismatch), checked
against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lit_rlhf.rlhf.mismatch import logprob_gap, truncated_is_weights

# two responses of lengths 3 and 2 (T = 3): trainer - engine = [[0.5, -1.0, 1.0], [0.2, 0.9, (pad)]]
TRAINER = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.1, 0.0]])
ENGINE = torch.tensor([[-1.5, -1.0, -1.5], [-0.5, -1.0, float("nan")]])  # garbage at the pad
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_logprob_gap_mean_and_max_over_response_tokens():
    mean, worst = logprob_gap(ENGINE, TRAINER, MASK)
    # |gaps| = 0.5, 1.0, 1.0, 0.2, 0.9 → mean 3.6 / 5 = 0.72, max 1.0; the nan at the pad is ignored
    assert mean.item() == pytest.approx(0.72, abs=1e-6)
    assert worst.item() == pytest.approx(1.0, abs=1e-6)
    mean, worst = logprob_gap(ENGINE, TRAINER, torch.zeros_like(MASK))
    assert mean.item() == 0.0 and worst.item() == 0.0
    with pytest.raises(ValueError, match="same"):
        logprob_gap(ENGINE, TRAINER[:, :2], MASK)


def test_token_level_truncate_and_mask():
    cap = 2.0
    out = truncated_is_weights(TRAINER, ENGINE, MASK, level="token", mode="truncate", cap=cap)
    # ρ = exp([0.5, -1.0, 1.0, 0.2, 0.9]) = [1.6487, 0.3679, 2.7183, 1.2214, 2.4596]; min(ρ, 2)
    expected = torch.tensor([[math.exp(0.5), math.exp(-1.0), 2.0], [math.exp(0.2), 2.0, 0.0]])
    torch.testing.assert_close(out.weights, expected)
    assert out.capped_fraction.item() == pytest.approx(2 / 5)
    masked = truncated_is_weights(TRAINER, ENGINE, MASK, level="token", mode="mask", cap=cap)
    expected = torch.tensor([[math.exp(0.5), math.exp(-1.0), 0.0], [math.exp(0.2), 0.0, 0.0]])
    torch.testing.assert_close(masked.weights, expected)
    assert masked.capped_fraction.item() == pytest.approx(2 / 5)
    assert not out.weights.requires_grad


def test_sequence_level_truncate_and_mask():
    # Σ log ρ: row 0 = 0.5 - 1.0 + 1.0 = 0.5 → ρ 1.6487 (under the cap 3); row 1 = 0.2 + 0.9 = 1.1 → ρ 3.0042
    out = truncated_is_weights(TRAINER, ENGINE, MASK, level="sequence", mode="truncate", cap=3.0)
    expected = torch.tensor([[math.exp(0.5)] * 3, [3.0, 3.0, 0.0]])
    torch.testing.assert_close(out.weights, expected)
    assert out.capped_fraction.item() == pytest.approx(1 / 2)
    masked = truncated_is_weights(TRAINER, ENGINE, MASK, level="sequence", mode="mask", cap=3.0)
    torch.testing.assert_close(masked.weights, torch.tensor([[math.exp(0.5)] * 3, [0.0, 0.0, 0.0]]))


def test_equal_log_probs_give_weight_one_and_huge_ratios_do_not_overflow():
    ones = truncated_is_weights(TRAINER, TRAINER, MASK, level="sequence")
    torch.testing.assert_close(ones.weights, MASK.float())
    assert ones.capped_fraction.item() == 0.0
    far = truncated_is_weights(torch.zeros(1, 2), torch.full((1, 2), -500.0), torch.ones(1, 2), level="sequence")
    assert torch.isfinite(far.weights).all() and far.weights.tolist() == [[2.0, 2.0]]


def test_vectorised_weights_equal_a_loop():
    gen = torch.Generator().manual_seed(0)
    trainer, engine = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5, [0] * 6])
    for mode in ("truncate", "mask"):
        got = truncated_is_weights(trainer, engine, mask, level="sequence", mode=mode, cap=1.5).weights
        for b in range(4):
            n = int(mask[b].sum())
            rho = math.exp(sum(trainer[b, t].item() - engine[b, t].item() for t in range(n)))
            w = min(rho, 1.5) if mode == "truncate" else (rho if rho <= 1.5 else 0.0)
            assert got[b, :n].tolist() == pytest.approx([w] * n, rel=1e-5)
            assert got[b, n:].eq(0).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"level": "batch"}, "level"), ({"mode": "clip"}, "mode"), ({"cap": 0.0}, "cap")],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        truncated_is_weights(TRAINER, ENGINE, MASK, **kwargs)
