"""Scalar heads on Hugging Face models: reward scores and per-token values, normalised as the RM says.

A reward model or critic is a ``*ForSequenceClassification`` model with ``num_labels=1``. One read-out rule,
chosen from the model (docs/conventions.md#reward-model-read-out):

* **decoders** (a ``score`` head on every position: Llama, Qwen, GPT-2, Mistral...): the score is read at the
  **last real token** (rightmost ``attention_mask == 1``) with position ids computed from the mask, so left-
  and right-padded inputs give the same scores;
* **encoders** (no ``score`` head: BERT, DeBERTa, RoBERTa, MiniLM... pool and classify themselves): the
  score is the model's own sequence-classification output (pooled ``[CLS]``), on right-aligned rows with the
  segment ids of the text pair ``[CLS] prompt [SEP] response [SEP]`` (:func:`encoder_inputs`), exactly as
  ``model(**tokenizer(prompt, response, return_tensors="pt"))`` computes it.

The normalisation fitted after RM training (InstructGPT: a bias so that demonstrations score mean 0) is stored
in the model's config as ``reward_bias`` / ``reward_scale``; it therefore travels with checkpoints and exports,
and every caller of :func:`sequence_scores` gets normalised scores without extra code.

:class:`Scorer` is the one protocol for "score these responses" (docs/conventions.md#scorers): a reward model of
any kind (:class:`~lit_rlhf.hf.reward.RewardScorer`) or a Python reward function
(:class:`~lit_rlhf.hf.scorers.FunctionScorer`), built by :func:`~lit_rlhf.hf.scorers.load_scorer`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lit_rlhf.hf.loading import unwrap_peft
from lit_rlhf.hf.tokenization import Messages
from lit_rlhf.rlhf.padding import last_token_index, position_ids_from_mask


def score_head(model: nn.Module) -> nn.Module | None:
    """The scalar head of a decoder classifier (``score``), or ``None`` for encoders that pool themselves."""
    base = unwrap_peft(model)
    head = getattr(base, "score", None)
    return head if isinstance(head, nn.Module) else None


def is_encoder(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder classifier (scored by its own pooled output) rather than a decoder."""
    return score_head(model) is None


def encoder_inputs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(input_ids, attention_mask, token_type_ids | None)`` ``[B, L]`` for an encoder's forward pass.

    Rows are right-aligned (absolute position embeddings count from the first column, so a left-padded row
    would be read at other positions than the tokenizer's own right-padded encoding). For models with
    segment embeddings (``type_vocab_size > 1``, BERT) the segment ids of a text pair are rebuilt from the
    ids: 1 after the first separator (``config.sep_token_id``, written by :func:`~lit_rlhf.hf.load_model`),
    0 before it and on padding, as ``tokenizer(prompt, response)`` returns them.
    """
    config = unwrap_peft(model).config
    mask = attention_mask.long()
    lead = (mask.cumsum(-1) == 0).sum(-1)  # leading padding of each row
    if bool(lead.any()):
        length = input_ids.shape[1]
        columns = torch.arange(length, device=input_ids.device)
        index = (columns[None] + lead[:, None]).clamp(max=length - 1)
        mask = (columns[None] < mask.sum(-1, keepdim=True)).long()
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        input_ids = torch.where(mask.bool(), input_ids.gather(1, index), pad)
    token_type_ids = None
    sep = getattr(config, "sep_token_id", None)
    if getattr(config, "type_vocab_size", 0) > 1 and sep is not None:
        is_sep = (input_ids == sep).long()
        token_type_ids = (((is_sep.cumsum(-1) - is_sep) > 0).long()) * mask
    return input_ids, mask, token_type_ids


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

    This is the one read-out of lit_rlhf: RM training, normalisation, ``predict``, evaluation, labelling and
    PPO scoring all call it.

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
        input_ids, attention_mask, token_type_ids = encoder_inputs(model, input_ids, attention_mask)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        raw = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.squeeze(-1).float()
    if not normalize:
        return raw
    bias, scale = reward_normalization(model)
    return (raw - bias) / scale


Prompt = str | Messages


def scoring_prompts(texts: Sequence[str] | None, messages: Sequence[Messages | None] | None) -> list[Prompt] | None:
    """Per row, the prompt a reward model should read: the chat conversation when there is one (so it is
    rendered with the RM's own template), else the prompt text."""
    if texts is None:
        return None
    if messages is None:
        return list(texts)
    return [m if m is not None else t for t, m in zip(texts, messages, strict=True)]


@dataclass(frozen=True)
class ScoringRows:
    """What a batch of ``B`` responses knows about each row's prompt, for a :class:`Scorer`; every field is
    ``None`` or one entry per row, in the rows' order.

    Attributes:
        prompts: the prompt texts (a chat row's rendered template), as ``PromptDataModule`` batches hold them.
        messages: per row, its chat conversation, or ``None`` for a plain-text prompt.
        columns: per row, the other columns of its prompt row (``{name: value}``, e.g. an ``answer``).
    """

    prompts: Sequence[str] | None = None
    messages: Sequence[Messages | None] | None = None
    columns: Sequence[Mapping[str, Any]] | None = None

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any]) -> ScoringRows:
        """The rows of a ``PromptDataModule`` batch (its ``prompts``, ``prompt_messages``, ``prompt_columns``)."""
        return cls(batch.get("prompts"), batch.get("prompt_messages"), batch.get("prompt_columns"))

    def select(self, rows: slice | Sequence[int]) -> ScoringRows:
        """The same fields for ``rows`` only (a forward chunk, or the indices of kept rows), in that order. Every
        selected row names every column of the whole batch (``None`` where it lacks one), so a reward function
        called per chunk gets the same keyword arguments as one called on the whole batch."""

        def cut(values):
            if values is None:
                return None
            values = list(values)
            return values[rows] if isinstance(rows, slice) else [values[i] for i in rows]

        columns = None
        if self.columns is not None:
            names = dict.fromkeys(name for row in self.columns for name in row)
            columns = [{name: row.get(name) for name in names} for row in cut(self.columns)]
        return ScoringRows(cut(self.prompts), cut(self.messages), columns)

    @staticmethod
    def concat(parts: Sequence[ScoringRows]) -> ScoringRows:
        """The rows of ``parts`` one after the other; a field is ``None`` when a part lacks it."""

        def join(name: str):
            fields = [getattr(part, name) for part in parts]
            return None if any(f is None for f in fields) else [v for f in fields for v in f]

        return ScoringRows(join("prompts"), join("messages"), join("columns"))

    def reward_model_prompts(self) -> list[Prompt] | None:
        """Per row, the conversation when there is one, else the text (:func:`scoring_prompts`)."""
        return scoring_prompts(self.prompts, self.messages)


class Scorer(ABC):
    """Scores responses to prompts: one number per response, higher is better (docs/conventions.md#scorers).

    Every caller (PPO, critic-free, evaluation, labelling, ``RolloutScorer``) goes through these two methods,
    whatever the scorer is. To add a kind of scorer, subclass this and implement both; pass an instance as the
    ``reward.scorer`` of :class:`~lit_rlhf.models.PPOModule` (or as the judge of ``RolloutScorer``,
    evaluation, labelling).
    """

    #: the frozen ``nn.Module`` this scorer runs, if any (PPO holds it as ``reward_model``: placed on the device,
    #: counted as frozen); ``None`` for a scorer without one
    model: nn.Module | None = None

    @abstractmethod
    def score(
        self,
        tokenizer,
        query_responses: torch.Tensor,
        attention_mask: torch.Tensor,
        mask: torch.Tensor,
        rows: ScoringRows,
    ) -> torch.Tensor:
        """Scores ``[B]`` (float, on ``query_responses``' device) of a batch of sampled responses.

        Args:
            tokenizer: the policy's tokenizer, the one the ids are in.
            query_responses: LongTensor ``[B, P + T]``: left-padded prompts, then the responses.
            attention_mask: ``[B, P + T]``: 1 on real prompt tokens and on response tokens up to and with the EOS.
            mask: BoolTensor ``[B, T]``: True on response tokens (up to and including the first EOS).
            rows: the rows' prompt texts, conversations and other columns.
        """

    @abstractmethod
    def score_texts(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[str],
        messages: Sequence[Messages | None] | None = None,
        columns: Sequence[Mapping[str, Any]] | None = None,
    ) -> torch.Tensor:
        """Scores ``[N]`` of ``N`` response texts.

        Args:
            prompts: per response, its prompt: a text or a chat conversation.
            responses: the response texts (no EOS, no special tokens).
            messages: per response, its prompt's conversation (``None`` for a text prompt), when ``prompts``
                holds texts (a chat prompt's rendered template).
            columns: per response, the other columns of its prompt's row.
        """
