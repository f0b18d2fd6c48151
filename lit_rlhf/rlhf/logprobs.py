"""Temperature-scaled token log-probabilities and entropies from logits.

Notation for tensor shapes: ``B`` batch size, ``T`` response length, ``V`` vocabulary size.

Every log-prob that enters the PPO ratio or the KL penalty must come from the distribution the rollout was
sampled from, ``softmax(logits / temperature)`` (docs/conventions.md#temperature). Pass the same ``temperature`` that
was given to ``generate()``.

Both functions work one batch row at a time, so the only ``[T, V]``-sized temporaries are those of a single
row: no full ``[B, T, V]`` log-softmax copy is materialised in the forward pass. Half-precision logits are
upcast per row to float32 (the result is float32), because ``logsumexp`` over a large vocabulary is
inaccurate in bf16/fp16.
"""

import torch
from torch import Tensor


def _scaled_row(row_logits: Tensor, temperature: float) -> Tensor:
    """One row of logits in at least float32, divided by the temperature."""
    z = row_logits.to(torch.promote_types(row_logits.dtype, torch.float32))
    # Skipping the division at T=1 avoids a copy of a float32/64 row.
    return z if temperature == 1.0 else z / temperature


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``tokens``.

    Computed as ``z[token] - logsumexp(z)`` row by row (TRL ``selective_log_softmax``), which is exact and
    never builds the full log-softmax.

    Args:
        logits: ``[B, T, V]`` logits aligned with ``tokens`` (for a causal LM scoring a response after a
            context of length ``C``: ``logits[:, C - 1 : -1]``).
        tokens: LongTensor ``[B, T]`` of the tokens to score.
        temperature: Sampling temperature (> 0).

    Returns:
        ``[B, T]`` log-probabilities, float32 for half-precision logits, otherwise ``logits.dtype``.
    """
    _check_temperature(temperature)
    rows = []
    for row_logits, row_tokens in zip(logits, tokens, strict=True):
        z = _scaled_row(row_logits, temperature)
        picked = z.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - z.logsumexp(dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Categorical entropy ``logsumexp(z) - Σ softmax(z)·z`` with ``z = logits / temperature``.

    Args:
        logits: ``[B, T, V]`` logits.
        temperature: Sampling temperature (> 0).

    Returns:
        ``[B, T]`` entropies in nats, float32 for half-precision logits, otherwise ``logits.dtype``.
    """
    _check_temperature(temperature)
    rows = []
    for row_logits in logits:
        z = _scaled_row(row_logits, temperature)
        rows.append(z.logsumexp(dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1))
    return torch.stack(rows)


def sequence_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Per-row sum of the supervised tokens' log-probs, ``log π(y|x)``, and their count, with HF's shift.

    ``logits[:, t]`` predicts ``labels[:, t + 1]`` (as :func:`lit_rlhf.rlhf.sft_nll`); ``ignore_index`` marks
    the prompt and the padding. The logits may cover only the last ``L'`` positions of the sequences
    (``logits_to_keep``) when ``labels`` is sliced the same way (``labels[:, -L':]``).

    Args:
        logits: ``[N, L', V]`` causal-LM logits.
        labels: LongTensor ``[N, L']`` token ids, ``ignore_index`` where not scored.
        ignore_index: label of unscored positions.

    Returns:
        ``(logps, lengths)``: ``[N]`` summed log-probs (float32 for half-precision logits) and LongTensor ``[N]``
        scored-token counts.
    """
    shift_labels = labels[:, 1:]
    scored = shift_labels != ignore_index
    tokens = shift_labels.masked_fill(~scored, 0)
    logprobs = logprobs_from_logits(logits[:, :-1], tokens)
    return torch.where(scored, logprobs, 0).sum(-1), scored.sum(-1)
