"""Running mean and variance of scalar scores across processes, kept in checkpointed buffers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class RunningMoments(nn.Module):
    """Running mean and variance of scalar scores (Chan et al.'s parallel update), kept in buffers.

    The buffers are part of the module's ``state_dict``, so they are checkpointed and restored with it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: Tensor, reduce_fn: Callable[[Tensor], Tensor]) -> None:
        """Add the scores ``x`` ``[B]`` of every process (``reduce_fn`` sums across processes)."""
        x = x.detach().to(torch.float64)
        n, total = reduce_fn(
            torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), x.sum()])
        )
        batch_mean = total / n
        batch_m2 = reduce_fn(((x - batch_mean) ** 2).sum())
        delta = batch_mean - self.mean
        count = self.count + n
        m2 = self.var * self.count + batch_m2 + delta**2 * self.count * n / count
        self.mean.copy_(self.mean + delta * n / count)
        self.var.copy_(m2 / count)
        self.count.copy_(count)

    def normalize(self, x: Tensor, eps: float = 1e-8) -> Tensor:
        """``(x - mean) / sqrt(var + eps)`` in ``x``'s dtype, shape of ``x``."""
        return ((x.to(torch.float64) - self.mean) * torch.rsqrt(self.var + eps)).to(x.dtype)
