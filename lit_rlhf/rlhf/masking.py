"""Masked statistics and response-mask bookkeeping.

Notation for tensor shapes: ``B`` batch size, ``T`` response length.

Masks are ``True`` (or ``1``) on entries that take part in a statistic; a float mask acts as per-entry
weights. ``values`` and ``mask`` must have the same shape: a broadcast mask would make ``mask.sum()``
count the wrong number of entries.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

ReduceFn = Callable[[Tensor], Tensor]


def masked_sum(values: Tensor, mask: Tensor, reduce_fn: ReduceFn | None = None) -> Tensor:
    """Sum of ``values * mask`` over all entries.

    Masked-out entries are replaced by 0 rather than multiplied by it, so ``inf``/``nan`` garbage there (e.g.
    logits read at padding) neither poisons the sum nor its gradient.

    Args:
        values: Tensor of any shape.
        mask: Bool or float tensor, same shape as ``values``.
        reduce_fn: Optional cross-process sum (e.g. a wrapper around ``torch.distributed.all_reduce`` that
            returns the reduced tensor), applied to the local sum.

    Returns:
        Scalar tensor.
    """
    total = torch.where(mask.bool(), values * mask, 0).sum()
    return total if reduce_fn is None else reduce_fn(total)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``Σ values·mask / Σ mask``, over all entries or along ``dim``.

    Args:
        values: Tensor of any shape.
        mask: Bool or float tensor, same shape as ``values``.
        dim: Dimension to reduce; ``None`` reduces everything to a scalar.

    Returns:
        Scalar tensor, or ``values`` with ``dim`` removed. ``nan`` where the mask is empty.
    """
    if dim is None:
        return masked_sum(values, mask) / mask.sum()
    return torch.where(mask.bool(), values * mask, 0).sum(dim) / mask.sum(dim)


def _masked_moments(values: Tensor, mask: Tensor, unbiased: bool, reduce_fn: ReduceFn | None) -> tuple[Tensor, Tensor]:
    """Masked mean and variance in at least float32, optionally global across processes."""
    reduce = reduce_fn if reduce_fn is not None else (lambda t: t)
    v = values.to(torch.promote_types(values.dtype, torch.float32))
    # One collective for both first-pass sums; the second pass needs the global mean, so it cannot be fused.
    total, count = reduce(torch.stack([masked_sum(v, mask), mask.sum().to(v.dtype)])).unbind()
    n = float(count)
    if n == 0 or (unbiased and n == 1):
        raise ValueError(f"masked statistics need more masked-in entries (got {n:g}, unbiased={unbiased}).")
    mean = total / count
    sq_sum = reduce(masked_sum((v - mean) ** 2, mask))
    return mean, sq_sum / (count - 1 if unbiased else count)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True, reduce_fn: ReduceFn | None = None) -> Tensor:
    """Masked variance over all entries (TRL ``masked_var``).

    ``unbiased=True`` applies Bessel's ``n/(n-1)`` like TRL; ``unbiased=False`` is the population variance
    used by OpenAI's 2019 code, N+ and OpenRLHF.

    Args:
        values: Tensor of any shape.
        mask: Bool or float tensor, same shape as ``values``.
        unbiased: Divide the squared deviations by ``n - 1`` instead of ``n``.
        reduce_fn: Optional cross-process sum, see :func:`masked_whiten`.

    Returns:
        Scalar tensor in ``values.dtype``.

    Raises:
        ValueError: If the mask selects no entry (or a single one with ``unbiased=True``).
    """
    return _masked_moments(values, mask, unbiased, reduce_fn)[1].to(values.dtype)


def masked_whiten(
    values: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    reduce_fn: ReduceFn | None = None,
) -> Tensor:
    """Whiten with statistics taken over the masked entries of the whole tensor (TRL ``masked_whiten``).

    Computes ``(values - μ) · rsqrt(var + eps)``; ``shift_mean=False`` adds ``μ`` back, so only the spread is
    rescaled (TRL's reward whitening). Statistics are accumulated in at least float32.

    **Every** entry is transformed, masked-out ones included; callers zero-fill them afterwards
    (``out.masked_fill(~mask, 0)``) if they need to.

    Args:
        values: Tensor of any shape, e.g. advantages ``[B, T]``.
        mask: Bool or float tensor, same shape as ``values``.
        shift_mean: If True the output has mean 0 on the mask; if False it keeps mean ``μ``.
        unbiased: Bessel-corrected variance (TRL) vs population variance (N+, OpenRLHF with ``eps=0``).
        eps: Added to the variance inside the square root.
        reduce_fn: Optional function that returns the **sum of its argument over all processes** (e.g. wraps
            ``torch.distributed.all_reduce``). When given, ``Σm``, ``Σv·m`` and then ``Σ(v-μ)²·m`` are summed
            across processes, so ``μ`` and ``var`` are global; every process must call this function.

    Returns:
        Tensor shaped and typed like ``values``.

    Raises:
        ValueError: If the (global) mask selects no entry, or a single one with ``unbiased=True``.
    """
    mean, var = _masked_moments(values, mask, unbiased, reduce_fn)
    whitened = (values.to(mean.dtype) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened.to(values.dtype)


def first_true_indices(bools: Tensor) -> Tensor:
    """Index of the first True along the last dim, or its length when a row has none (TRL semantics).

    Args:
        bools: BoolTensor ``[..., T]``.

    Returns:
        LongTensor ``[...]`` with values in ``[0, T]``.
    """
    row_len = bools.size(-1)
    zero_or_index = row_len * (~bools).long() + torch.arange(row_len, device=bools.device)
    return zero_or_index.min(dim=-1).values


def truncate_after_eos(responses: Tensor, eos_token_id: int, pad_token_id: int) -> Tensor:
    """Replace every token after the first EOS by ``pad_token_id``; the EOS itself is kept.

    Args:
        responses: LongTensor ``[B, T]`` of sampled response tokens.
        eos_token_id: Stop token id.
        pad_token_id: Pad token id.

    Returns:
        LongTensor ``[B, T]`` (a new tensor; ``responses`` is left untouched).
    """
    eos_index = first_true_indices(responses == eos_token_id).unsqueeze(-1)
    idx = torch.arange(responses.size(-1), device=responses.device)
    return responses.masked_fill(idx > eos_index, pad_token_id)


class ResponseMasks(NamedTuple):
    """Where each response ends: the one rule every stage uses (docs/conventions.md#where-a-response-ends)."""

    sequence_lengths: Tensor
    """LongTensor ``[B]``: index of the last action, i.e. the first EOS, or ``T - 1`` when there is none."""
    mask: Tensor
    """BoolTensor ``[B, T]``: the actions, every token up to and including the first EOS."""
    contains_eos: Tensor
    """BoolTensor ``[B]``: the response emitted ``eos_token_id``."""


def response_masks(responses: Tensor, pad_token_id: int, eos_token_id: int) -> ResponseMasks:
    """Masks of sampled responses: a response ends at its **first EOS** (or runs to ``T`` without one).

    The EOS is a trained action, inside ``mask`` (policy loss, KL reward, whitening); TRL's value-loss mask
    with one extra slot is ``arange(T) <= sequence_lengths + 1``. Everything after the first EOS is outside
    the mask whatever it holds (:func:`truncate_after_eos` writes pads there). A pad id that the policy
    *sampled* before its EOS stays an action: it is a legal token of the vocabulary, and ending the response
    there would score and train on a prefix the policy did not stop at.

    Args:
        responses: LongTensor ``[B, T]`` of sampled tokens (truncated after the first EOS or not).
        pad_token_id: Pad token id; must differ from ``eos_token_id``.
        eos_token_id: EOS token id.

    Returns:
        :class:`ResponseMasks`.

    Raises:
        ValueError: If ``pad_token_id == eos_token_id``: the EOS would then count as padding, get no policy
            gradient, and every padded row would "contain" an EOS, so the policy never learns to stop.
    """
    if pad_token_id == eos_token_id:
        raise ValueError("pad_token_id must differ from eos_token_id; add a dedicated pad token.")
    length = responses.size(-1)
    eos_index = first_true_indices(responses == eos_token_id)
    contains_eos = eos_index < length
    sequence_lengths = eos_index.clamp(max=length - 1)
    mask = torch.arange(length, device=responses.device) <= sequence_lengths.unsqueeze(-1)
    return ResponseMasks(sequence_lengths, mask, contains_eos)
