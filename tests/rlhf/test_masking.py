import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import torch

from lit_rlhf.rlhf import (
    first_true_indices,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    response_masks,
    truncate_after_eos,
)

F64 = torch.float64
close = partial(torch.testing.assert_close, rtol=0, atol=1e-6)

# T2 inputs.
T2_VALUES = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]], dtype=F64)
T2_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)


def test_masked_sum_and_mean_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    close(masked_sum(values, mask), torch.tensor(7.0, dtype=F64))
    close(masked_mean(values, mask), torch.tensor(7.0 / 3.0, dtype=F64))
    close(masked_mean(values, mask, dim=1), torch.tensor([1.5, 4.0], dtype=F64))
    close(masked_mean(values, mask, dim=0), torch.tensor([2.5, 2.0, float("nan")], dtype=F64), equal_nan=True)
    # A float mask acts as weights: (1·1 + 2·0.5) / 1.5.
    close(masked_mean(values[:1, :2], torch.tensor([[1.0, 0.5]], dtype=F64)), torch.tensor(4.0 / 3, dtype=F64))


def test_masked_sum_ignores_non_finite_padding_in_value_and_gradient():
    values = torch.tensor([1.0, float("inf"), float("nan")], dtype=F64, requires_grad=True)
    mask = torch.tensor([True, False, False])
    total = masked_sum(values, mask)
    total.backward()
    close(total, torch.tensor(1.0, dtype=F64))
    close(values.grad, torch.tensor([1.0, 0.0, 0.0], dtype=F64))


def test_masked_sum_applies_reduce_fn():
    out = masked_sum(torch.ones(3), torch.ones(3, dtype=torch.bool), reduce_fn=lambda t: t * 4)
    close(out, torch.tensor(12.0))


def test_t2_masked_mean_and_var():
    close(masked_mean(T2_VALUES, T2_MASK), torch.tensor(3.5, dtype=F64))
    close(masked_var(T2_VALUES, T2_MASK), torch.tensor(3.5, dtype=F64))
    close(masked_var(T2_VALUES, T2_MASK, unbiased=False), torch.tensor(2.916667, dtype=F64))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # TRL masked_whiten(shift_mean=True).
        ({}, [[-1.336306, -0.801784, -0.267261, 0.267261], [0.801784, 1.336306, -1.870829, -1.870829]]),
        # TRL masked_whiten(shift_mean=False): rescale only, mean kept.
        (
            {"shift_mean": False},
            [[2.163694, 2.698216, 3.232739, 3.767261], [4.301784, 4.836306, 1.629171, 1.629171]],
        ),
        # N+ (biased variance, +1e-8) and OpenRLHF (biased variance, no eps) agree to 1e-6.
        (
            {"unbiased": False},
            [[-1.463850, -0.878310, -0.292770, 0.292770], [0.878310, 1.463850, -2.049390, -2.049390]],
        ),
        (
            {"unbiased": False, "eps": 0.0},
            [[-1.463850, -0.878310, -0.292770, 0.292770], [0.878310, 1.463850, -2.049390, -2.049390]],
        ),
    ],
)
def test_t2_masked_whiten(kwargs, expected):
    # Masked-out entries (row 1, last two) are transformed too; callers zero-fill them.
    close(masked_whiten(T2_VALUES, T2_MASK, **kwargs), torch.tensor(expected, dtype=F64))


def test_t2_legacy_unmasked_whiten_is_an_all_ones_mask():
    expected = [[-0.717805, -0.276079, 0.165647, 0.607373], [1.049099, 1.490826, -1.159531, -1.159531]]
    ones = torch.ones_like(T2_MASK)
    close(masked_whiten(T2_VALUES, ones), torch.tensor(expected, dtype=F64))


def test_masked_whiten_keeps_dtype_and_normalises_the_mask():
    values = torch.randn(4, 9, generator=torch.Generator().manual_seed(0)) * 3 + 7
    mask = torch.rand(4, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    out = masked_whiten(values, mask)
    assert out.dtype == torch.float32
    close(masked_mean(out, mask), torch.tensor(0.0), atol=1e-5, rtol=0)
    close(masked_var(out, mask), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert masked_whiten(values.bfloat16(), mask).dtype == torch.bfloat16


def test_masked_whiten_eps_keeps_constant_values_finite():
    constant = torch.full((2, 3), 4.0, dtype=F64)
    close(masked_whiten(constant, torch.ones(2, 3, dtype=torch.bool)), torch.zeros(2, 3, dtype=F64), atol=0)
    # A spread comparable to eps: var = 5e-9 (unbiased), so rsqrt(var + 1e-8) differs from rsqrt(var) by 42%.
    tiny = torch.tensor([0.0, 1e-4], dtype=F64)
    expected = torch.tensor([-5e-5, 5e-5], dtype=F64) / (5e-9 + 1e-8) ** 0.5
    close(masked_whiten(tiny, torch.ones(2, dtype=torch.bool)), expected, atol=1e-9)


def test_masked_var_rejects_too_few_entries():
    values = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="masked"):
        masked_var(values, torch.tensor([False, False]))
    with pytest.raises(ValueError, match="masked"):
        masked_whiten(values, torch.tensor([True, False]))
    # A single entry has a well-defined population variance.
    close(masked_var(values, torch.tensor([True, False]), unbiased=False), torch.tensor(0.0))


class FakeAllReduce:
    """``world_size`` threads stand in for processes; ``reduce_fn`` sums a tensor over all of them."""

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size, timeout=10)
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.calls = [0] * world_size

    def reduce_fn(self, rank: int):
        def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.slots)
            # Nobody may overwrite a slot before every rank has read it.
            self.barrier.wait()
            return total

        return all_reduce_sum


def _run_on_two_ranks(fn, halves_values, halves_mask, **kwargs):
    fake = FakeAllReduce(world_size=2)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(fn, halves_values[rank], halves_mask[rank], reduce_fn=fake.reduce_fn(rank), **kwargs)
            for rank in range(2)
        ]
        return [f.result() for f in futures], fake.calls


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_whiten_reduce_fn_gives_global_statistics(shift_mean, unbiased):
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(6, 7, generator=gen, dtype=F64)
    values[:3] += 2.0  # rank 0 and rank 1 have different local statistics
    lengths = torch.randint(1, 8, (6,), generator=gen)
    mask = torch.arange(7) < lengths.unsqueeze(-1)
    kwargs = {"shift_mean": shift_mean, "unbiased": unbiased}

    (out_a, out_b), calls = _run_on_two_ranks(masked_whiten, values.split(3), mask.split(3), **kwargs)

    close(torch.cat([out_a, out_b]), masked_whiten(values, mask, **kwargs), atol=1e-12)
    assert calls == [2, 2]  # fused (Σm, Σv·m), then Σ(v-μ)²·m
    # Local statistics would give a different answer, so the comparison above has teeth.
    assert not torch.allclose(out_a, masked_whiten(values[:3], mask[:3], **kwargs), atol=1e-3)


def test_masked_var_reduce_fn_gives_global_variance():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(4, 5, generator=gen, dtype=F64)
    mask = torch.rand(4, 5, generator=gen) > 0.4
    (var_a, var_b), _ = _run_on_two_ranks(masked_var, values.split(2), mask.split(2))
    close(var_a, masked_var(values, mask), atol=1e-12)
    close(var_b, masked_var(values, mask), atol=1e-12)


def test_first_true_indices():
    bools = torch.tensor([[False, True, True], [False, False, False], [True, False, True]])
    assert first_true_indices(bools).tolist() == [1, 3, 0]


def test_t4_truncation_and_masks(t4):
    post = truncate_after_eos(t4.responses, t4.eos, t4.pad)
    assert post.tolist() == [[5, 7, 2, 0, 0], [5, 6, 7, 8, 9]]
    assert t4.responses.tolist()[0] == [5, 7, 2, 9, 9], "input must not be modified"
    masks = response_masks(post, t4.pad, t4.eos)
    assert masks.sequence_lengths.tolist() == [2, 4]
    assert masks.contains_eos.tolist() == [True, False]
    padding_mask = [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    assert (~masks.mask).long().tolist() == padding_mask
    # TRL's value mask keeps one extra slot after the EOS.
    padding_mask_p1 = torch.arange(5) > (masks.sequence_lengths + 1).unsqueeze(-1)
    assert padding_mask_p1.long().tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]


def test_truncation_edge_cases():
    responses = torch.tensor([[2, 5, 2, 6], [7, 2, 2, 2], [3, 4, 5, 6], [3, 4, 5, 2]])
    post = truncate_after_eos(responses, eos_token_id=2, pad_token_id=0)
    assert post.tolist() == [[2, 0, 0, 0], [7, 2, 0, 0], [3, 4, 5, 6], [3, 4, 5, 2]]
    masks = response_masks(post, pad_token_id=0, eos_token_id=2)
    assert masks.sequence_lengths.tolist() == [0, 1, 3, 3]
    assert masks.mask.long().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    # The last row ends exactly on its EOS: no pad, yet it stopped.
    assert masks.contains_eos.tolist() == [True, True, False, True]


def test_response_masks_refuses_pad_equal_to_eos():
    with pytest.raises(ValueError, match="pad_token_id"):
        response_masks(torch.tensor([[5, 2, 2]]), pad_token_id=2, eos_token_id=2)


def test_t9_reward_normalisation_statistics():
    demo = torch.tensor([0.8, 1.4, -0.2, 2.0], dtype=F64)
    everything = torch.ones_like(demo, dtype=torch.bool)
    # InstructGPT / N+: subtract the mean RM score of the demonstrations.
    bias = masked_mean(demo, everything)
    close(bias, torch.tensor(1.0, dtype=F64))
    close(demo - bias, torch.tensor([-0.2, 0.4, -1.2, 1.0], dtype=F64))
    # Ziegler / OpenAI 2019: gain and bias to N(0, 1) with the population std.
    std = masked_var(demo, everything, unbiased=False).sqrt()
    close(std, torch.tensor(0.812404, dtype=F64))
    gain = 1.0 / std
    close(gain, torch.tensor(1.230915, dtype=F64))
    close(gain * demo - gain * bias, torch.tensor([-0.246183, 0.492366, -1.477098, 1.230915], dtype=F64))
    close(masked_whiten(demo, everything, unbiased=False, eps=0.0), gain * demo - gain * bias, atol=1e-12)
