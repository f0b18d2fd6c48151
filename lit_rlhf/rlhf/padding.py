"""Padding token lists into batches, and the positions and read-out indices that follow from the mask.

Notation for tensor shapes: ``B`` batch size, ``L`` sequence length.

Every batch in lit_rlhf is built by :func:`pad_batch` (ids and attention mask together), and every forward pass
takes its position ids from the mask (:func:`position_ids_from_mask`), so left- and right-padded inputs give the
same outputs (docs/conventions.md#padding-and-positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

PaddingSide = Literal["left", "right"]


def pad_sequences(sequences: Sequence[Sequence[int]], value: int, side: PaddingSide = "right") -> Tensor:
    """Stack variable-length integer sequences into one tensor padded with ``value``.

    Args:
        sequences: ``B`` lists of ints (an empty list becomes a row of padding).
        value: the padding value.
        side: where the padding goes.

    Returns:
        LongTensor ``[B, L]`` with ``L`` the longest sequence.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    length = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq) == 0:
            continue
        if side == "right":
            out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        else:
            out[i, length - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
    return out


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_token_id: int, side: PaddingSide = "right"
) -> tuple[Tensor, Tensor]:
    """Token id lists as ``(input_ids, attention_mask)``, both LongTensor ``[B, L]``.

    Args:
        sequences: ``B`` token id lists.
        pad_token_id: id written at padded positions (the mask is 0 there).
        side: ``left`` for prompts that are continued by ``generate``, ``right`` otherwise.

    Returns:
        ``input_ids`` and ``attention_mask`` (1 on real tokens).
    """
    input_ids = pad_sequences(sequences, pad_token_id, side)
    attention_mask = pad_sequences([[1] * len(s) for s in sequences], 0, side)
    return input_ids, attention_mask


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counting only real tokens: 0 at the first real token, whatever the padding side.

    Args:
        attention_mask: ``[B, L]``, 1 on real tokens.

    Returns:
        LongTensor ``[B, L]`` (0 on leading padding).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the rightmost real token of each row, where a scalar head reads a decoder's sequence score.

    Args:
        attention_mask: ``[B, L]``, 1 on real tokens.

    Returns:
        LongTensor ``[B]``.
    """
    length = attention_mask.shape[-1]
    positions = torch.arange(length, device=attention_mask.device).expand_as(attention_mask)
    return (positions * attention_mask.long()).argmax(-1)
