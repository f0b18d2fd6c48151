"""Scalar heads on Hugging Face models: reward scores and per-token values, normalised as the RM says.

A reward model or critic is a ``*ForSequenceClassification`` model with ``num_labels=1``. For decoder
backbones the score is read at the **last real token** (rightmost ``attention_mask == 1``) with position ids
computed from the mask, so left- and right-padded inputs give the same scores
(docs/conventions.md#reward-model-read-out). The normalisation fitted after RM training (InstructGPT: a bias so
that demonstrations score mean 0) is stored in the model's config as ``reward_bias`` / ``reward_scale``; it
therefore travels with checkpoints and exports, and every caller of :func:`sequence_scores` gets normalised
scores without extra code.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_rlhf.hf.loading import unwrap_peft
from lit_rlhf.rlhf.padding import last_token_index, position_ids_from_mask


def score_head(model: nn.Module) -> nn.Module | None:
    """The scalar head of a decoder classifier (``score``), or ``None`` for encoders that pool themselves."""
    base = unwrap_peft(model)
    head = getattr(base, "score", None)
    return head if isinstance(head, nn.Module) else None


def reward_normalization(model: nn.Module) -> tuple[float, float]:
    """``(bias, scale)`` stored in the model's config; normalised score = ``(raw - bias) / scale``."""
    config = unwrap_peft(model).config
    return float(getattr(config, "reward_bias", 0.0)), float(getattr(config, "reward_scale", 1.0))


def set_reward_normalization(model: nn.Module, bias: float, scale: float = 1.0) -> None:
    """Store the normalisation in the model's config (saved by ``save_pretrained`` and in checkpoints)."""
    if scale <= 0:
        raise ValueError(f"reward_scale must be positive, got {scale}")
    config = unwrap_peft(model).config
    config.reward_bias = float(bias)
    config.reward_scale = float(scale)


def token_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Raw head output at every position, ``[B, L]`` (a critic's values). Decoder classifiers only."""
    head = score_head(model)
    if head is None:
        raise TypeError(f"{type(unwrap_peft(model)).__name__} has no per-token score head (decoder classifier needed)")
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=True,
        use_cache=False,  # a scoring pass never continues: building a KV cache would only cost time
    )
    hidden = out.hidden_states[-1]
    return head(hidden.to(head.weight.dtype) if hasattr(head, "weight") else hidden).squeeze(-1).float()


def sequence_scores(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """One score per sequence, ``[B]``: decoders read it at the last real token; encoders use their pooler.

    Args:
        model: reward model (``*ForSequenceClassification``, ``num_labels=1``), optionally peft-wrapped.
        input_ids: ``[B, L]``, left- or right-padded.
        attention_mask: ``[B, L]``, 1 on real tokens.
        normalize: apply the stored ``(raw - reward_bias) / reward_scale``.
    """
    if score_head(model) is not None:
        # HF pools at the last non-pad *token id*; reading from the mask instead keeps the read-out position
        # right under left padding and when the pad id also occurs inside the text.
        per_token = token_scores(model, input_ids, attention_mask)
        raw = per_token.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)
    else:
        raw = model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()
    if not normalize:
        return raw
    bias, scale = reward_normalization(model)
    return (raw - bias) / scale
