import math
from functools import partial

import pytest
import torch

from lit_rlhf.rlhf import entropy_from_logits, logprobs_from_logits

F64 = torch.float64
close = partial(torch.testing.assert_close, rtol=0, atol=1e-6)

T10_LOGITS = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]], dtype=F64)  # [B=1, T=1, V=4]
T10_TOKEN = torch.tensor([[1]])


@pytest.mark.parametrize(
    ("temperature", "logprob", "entropy"), [(1.0, -1.440190, 0.947537), (0.7, -1.699245, 0.702028)]
)
def test_t10_temperature_scaled_logprob_and_entropy(temperature, logprob, entropy):
    close(logprobs_from_logits(T10_LOGITS, T10_TOKEN, temperature), torch.tensor([[logprob]], dtype=F64))
    close(entropy_from_logits(T10_LOGITS, temperature), torch.tensor([[entropy]], dtype=F64))


def test_t10_forgetting_temperature_at_training_time_breaks_the_first_ratio():
    rollout = logprobs_from_logits(T10_LOGITS, T10_TOKEN, temperature=0.7)
    forgot = logprobs_from_logits(T10_LOGITS, T10_TOKEN)
    close(torch.exp(forgot - rollout), torch.tensor([[1.295706]], dtype=F64))
    matched = logprobs_from_logits(T10_LOGITS, T10_TOKEN, temperature=0.7)
    close(torch.exp(matched - rollout), torch.ones(1, 1, dtype=F64), atol=1e-12)


def _naive_logprobs(logits, tokens, temperature):
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_logprobs_match_full_log_softmax_in_value_and_gradient(dtype, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 50, generator=gen) * 4).to(dtype).requires_grad_()
    tokens = torch.randint(0, 50, (3, 5), generator=gen)
    weights = torch.randn(3, 5, generator=gen).to(dtype)

    ours = logprobs_from_logits(logits, tokens, temperature)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    naive = _naive_logprobs(logits, tokens, temperature)
    (grad_naive,) = torch.autograd.grad((naive * weights).sum(), logits)

    atol = 1e-12 if dtype == F64 else 1e-5
    assert ours.dtype == dtype and ours.shape == (3, 5)
    close(ours, naive, atol=atol)
    close(grad_ours, grad_naive, atol=atol)


def test_half_precision_logits_are_scored_in_float32():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 4, 1000, generator=gen) * 3).bfloat16()
    tokens = torch.randint(0, 1000, (2, 4), generator=gen)
    ours = logprobs_from_logits(logits, tokens, temperature=0.7)
    assert ours.dtype == torch.float32
    close(ours, _naive_logprobs(logits.double(), tokens, 0.7).float(), atol=1e-5)
    entropy = entropy_from_logits(logits)
    assert entropy.dtype == torch.float32


def test_entropy_matches_definition():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 7, generator=gen, dtype=F64)
    probs = torch.softmax(logits / 0.5, dim=-1)
    expected = -(probs * probs.log()).sum(-1)
    close(entropy_from_logits(logits, temperature=0.5), expected, atol=1e-12)
    # Uniform logits: entropy is log V whatever the temperature.
    close(entropy_from_logits(torch.zeros(1, 2, 7, dtype=F64), 0.3), torch.full((1, 2), math.log(7), dtype=F64))


def test_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(T10_LOGITS, T10_TOKEN, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(T10_LOGITS, temperature=-1.0)
