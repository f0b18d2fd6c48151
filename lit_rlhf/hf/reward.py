"""A frozen reward model scoring a policy's responses, whatever tokenizer each of them has.

:class:`RewardScorer` wraps a reward model and **its own** tokenizer (docs/conventions.md#reward-model-tokenizer):

* **same vocabulary as the policy** (the usual InstructGPT set-up: the RM starts from the SFT export): the
  policy's ``prompt + response`` token ids are scored as they are, the token-level fast path;
* **another vocabulary** (an encoder RM, an off-the-shelf hub RM): prompt and response are decoded to text
  with the policy's tokenizer and re-encoded with the reward model's
  (:func:`~lit_rlhf.hf.tokenization.reward_ids`: the RM's chat template for chat prompts when it has one, the
  text pair for encoders, ``+ EOS`` for decoders), in right-padded batches on the reward model's device.

Either way the score is :func:`~lit_rlhf.hf.scoring.sequence_scores`, the one read-out, normalised with the
``reward_bias``/``reward_scale`` of the model's config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_rlhf.hf.loading import unwrap_peft
from lit_rlhf.hf.scoring import (
    Prompt,
    Scorer,
    ScoringRows,
    is_encoder,
    reward_normalization,
    scoring_prompts,
    sequence_scores,
    set_reward_normalization,
)
from lit_rlhf.hf.tokenization import Messages, reward_ids
from lit_rlhf.rlhf.padding import pad_batch

__all__ = ["RewardScorer", "reward_model_card", "scoring_prompts"]


class RewardScorer(Scorer):
    """Scores prompt/response pairs with a reward model, re-encoding them when its tokenizer is not the policy's.

    The :class:`~lit_rlhf.hf.scoring.Scorer` of every reward model: one with the policy's vocabulary, one with
    its own (encoder or decoder), and a shared base's reward adapter (the policy's tokens).

    Args:
        model: a frozen reward model (``*ForSequenceClassification``, ``num_labels=1``), decoder or encoder.
        tokenizer: the reward model's own tokenizer (``load_tokenizer(spec, role="reward_model")``).
        batch_size: sequences per forward pass when re-encoding.
        normalize_on: ``(prompts, responses)`` whose mean raw score becomes the stored ``reward_bias`` (the
            stored ``reward_scale`` is kept), applied before the first score, on the model's device
            (PPO's ``reward.normalize_on`` for a reward model that was never normalised).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        batch_size: int = 32,
        normalize_on: tuple[Sequence[Prompt], Sequence[str]] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._pending_normalization = normalize_on
        self._shares: dict[int, bool] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def shares_tokens(self, policy_tokenizer) -> bool:
        """Whether the policy's token ids can be scored as they are: same vocabulary, same chat template (a
        conversation is then rendered, and its answer sampled, as the reward model was trained on it:
        :func:`~lit_rlhf.hf.tokenization.reward_chat_ids`), and a decoder RM."""
        key = id(policy_tokenizer)
        if key not in self._shares:
            own = self.tokenizer
            self._shares[key] = (
                policy_tokenizer is own
                or (
                    policy_tokenizer.get_vocab() == own.get_vocab()
                    and getattr(policy_tokenizer, "chat_template", None) == getattr(own, "chat_template", None)
                )
            ) and not is_encoder(self.model)
        return self._shares[key]

    # ---- normalisation ----------------------------------------------------------------------------------
    def _normalize_if_pending(self) -> None:
        if self._pending_normalization is None:
            return
        prompts, responses = self._pending_normalization
        self._pending_normalization = None
        raw = self.score_texts(prompts, responses, normalize=False)
        _, scale = reward_normalization(self.model)
        set_reward_normalization(self.model, float(raw.double().mean()), scale)

    # ---- scoring ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _score_ids(self, sequences: Sequence[Sequence[int]], normalize: bool) -> Tensor:
        device, pad = self.device, self.tokenizer.pad_token_id
        was_training = self.model.training
        self.model.eval()
        try:
            scores = []
            for start in range(0, len(sequences), self.batch_size):
                input_ids, mask = pad_batch(sequences[start : start + self.batch_size], pad)
                scores.append(sequence_scores(self.model, input_ids.to(device), mask.to(device), normalize).float())
        finally:
            self.model.train(was_training)
        return torch.cat(scores) if scores else torch.zeros(0, device=device)

    def score_texts(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[str],
        messages: Sequence[Messages | None] | None = None,
        columns: Sequence[Mapping[str, Any]] | None = None,
        normalize: bool = True,
    ) -> Tensor:
        """Scores ``[N]`` (on the model's device) of responses to plain-text or chat prompts, tokenized with the
        reward model's own tokenizer exactly as in RM training; a row's conversation in ``messages`` replaces
        its prompt text. ``columns`` are not read (a reward model sees the prompt and the response only)."""
        if messages is not None:
            prompts = scoring_prompts(prompts, messages)
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        if normalize:
            self._normalize_if_pending()
        sequences = [reward_ids(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        return self._score_ids(sequences, normalize)

    def score_sequences(
        self,
        policy_tokenizer,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        prompts: Sequence[Prompt] | None = None,
    ) -> Tensor:
        """Scores ``[N]`` of ``prompt + response`` given as the policy's token ids (responses up to and including
        their EOS): as they are when :meth:`shares_tokens`, else decoded and re-encoded (``prompts`` replaces
        the decoded prompt text when given: the original text, or the conversation)."""
        self._normalize_if_pending()
        if self.shares_tokens(policy_tokenizer):
            return self._score_ids([list(p) + list(r) for p, r in zip(prompt_ids, response_ids)], normalize=True)
        decoded_prompts, responses = decode_responses(policy_tokenizer, prompt_ids, response_ids)
        return self.score_texts(decoded_prompts if prompts is None else prompts, responses)

    def score(
        self, tokenizer, query_responses: Tensor, attention_mask: Tensor, mask: Tensor, rows: ScoringRows
    ) -> Tensor:
        """:meth:`score_rollout` with each row's conversation, else its prompt text
        (:meth:`~lit_rlhf.hf.scoring.ScoringRows.reward_model_prompts`)."""
        return self.score_rollout(tokenizer, query_responses, attention_mask, mask, rows.reward_model_prompts())

    @torch.no_grad()
    def score_rollout(
        self,
        policy_tokenizer,
        query_responses: Tensor,
        attention_mask: Tensor,
        response_mask: Tensor,
        prompts: Sequence[Prompt] | None = None,
    ) -> Tensor:
        """Scores ``[B]`` of a PPO batch, on ``query_responses``' device.

        Args:
            policy_tokenizer: the tokenizer the ids are in.
            query_responses: ``[B, P + T]``, left-padded prompts then responses.
            attention_mask: ``[B, P + T]``.
            response_mask: ``[B, T]``, True on response tokens (up to and including the first EOS).
            prompts: per row, the prompt text or conversation (re-encoding only; decoded from the ids if absent).
        """
        self._normalize_if_pending()
        if self.shares_tokens(policy_tokenizer):
            device = self.device
            scores = sequence_scores(self.model, query_responses.to(device), attention_mask.to(device))
            return scores.float().to(query_responses.device)
        length = response_mask.shape[1]
        prompt_part, prompt_mask = query_responses[:, :-length], attention_mask[:, :-length].bool()
        prompt_ids = [row[m].tolist() for row, m in zip(prompt_part, prompt_mask, strict=True)]
        response_ids = [
            row[m].tolist() for row, m in zip(query_responses[:, -length:], response_mask.bool(), strict=True)
        ]
        scores = self.score_sequences(policy_tokenizer, prompt_ids, response_ids, prompts)
        return scores.to(query_responses.device)


def decode_responses(
    tokenizer, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
) -> tuple[list[str], list[str]]:
    """``(prompt texts, response texts)`` of token ids, for a reward model that re-encodes them.

    A prompt is decoded without special tokens (a plain-text prompt is re-tokenized with the reward model's
    own BOS). A response is the text the policy wrote before its EOS: the EOS that ends it is left out (the
    reward model's template or tokenizer writes its own), every other token is kept, special ones included,
    so a token such as a reasoning model's ``<think>`` is rendered and read back as the same token rather
    than silently dropped. It is the decoded ``prompt + response`` minus the decoded prompt, so a tokenizer
    that drops a leading space when a sequence starts mid-text (SentencePiece) still gives it back.
    """
    eos = tokenizer.eos_token_id
    prompts = tokenizer.batch_decode([list(p) for p in prompt_ids], skip_special_tokens=True)
    responses = []
    for p, r in zip(prompt_ids, response_ids, strict=True):
        r = list(r)
        if r and r[-1] == eos:
            r = r[:-1]
        head = tokenizer.decode(list(p), skip_special_tokens=False)
        full = tokenizer.decode(list(p) + r, skip_special_tokens=False)
        responses.append(full[len(head) :] if full.startswith(head) else tokenizer.decode(r, skip_special_tokens=False))
    return prompts, responses


def reward_model_card(model: nn.Module, tokenizer, base: str, training: str) -> str:
    """The ``README.md`` of a reward-model export: how it was trained and how to score with plain transformers.

    Args:
        model: the reward model being exported (its config holds the normalisation).
        tokenizer: its tokenizer (decides the input format).
        base: what it was initialised from.
        training: one paragraph on the data and the loss.
    """
    bias, scale = reward_normalization(model)
    name = type(unwrap_peft(model)).__name__
    if tokenizer.eos_token_id is None:
        read = "the model's own pooled sequence-classification output (an encoder: `[CLS] prompt [SEP] response [SEP]`)"
        encode = "tokenizer(prompt, response, return_tensors='pt')"
    else:
        read = "the head's output at the last token, the EOS that the exported tokenizer appends (a decoder)"
        encode = "tokenizer(prompt + response, return_tensors='pt')"
    chat = ""
    if getattr(tokenizer, "chat_template", None) and tokenizer.eos_token_id is not None:
        chat = """
# a chat: the prompt is the conversation rendered with the generation prompt, the answer is the rest of the
# rendering of the whole conversation; each is tokenized on its own (the ids a policy samples after the
# prompt's) and the answer ends at its EOS (what the template writes after it is cut)
messages = [{"role": "user", "content": "How was the phone?"}]
answer = [{"role": "assistant", "content": "It was great."}]
prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
full = tokenizer.apply_chat_template(messages + answer, tokenize=False)
eos = tokenizer.eos_token_id
if full.startswith(prompt):
    tail = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    tail = tail[: len(tail) - tail[::-1].index(eos)] if eos in tail else tail + [eos]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + tail
else:  # a template with no place where an answer starts: the whole rendering, ending with EOS
    ids = tokenizer(full.rstrip(), add_special_tokens=False)["input_ids"]
    ids = ids if ids[-1] == eos else ids + [eos]
with torch.no_grad():
    logit = model(input_ids=torch.tensor([ids])).logits[0, 0]
print((logit.item() - model.config.reward_bias) / model.config.reward_scale)
"""
    return f"""---
library_name: transformers
tags: [reward-model, lit_rlhf, rlhf]
---
# Reward model (lit_rlhf)

A `{name}` with one output (`num_labels=1`) trained with lit_rlhf's `RewardModule`.

- **Initialised from:** `{base}`
- **Training:** {training}
- **Score:** {read}.
- **Normalisation:** `reward_bias = {bias:.6g}`, `reward_scale = {scale:.6g}` (in `config.json`); the normalised
  score `(logit - reward_bias) / reward_scale` is what lit_rlhf's PPO optimises.

## Score with plain transformers

```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import sys

path = sys.argv[1] if len(sys.argv) > 1 else "."  # this folder
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path).eval()
prompt, response = "The phone was", " great, I loved it."
with torch.no_grad():
    logit = model(**{encode}).logits[0, 0].item()
score = (logit - model.config.reward_bias) / model.config.reward_scale
print(score)
{chat}```

`logit` equals lit_rlhf's raw score when the response starts with a space or punctuation (lit_rlhf tokenizes
prompt and response separately; a word split across them would tokenize differently). Batches must be
right-padded (`tokenizer.padding_side = "right"`).

## Score with lit_rlhf

`reward_model: {{name_or_path: <this folder>}}` in a PPO config, `python -m lit_rlhf.evaluation --reward_model
<this folder>`, or `predict` with `RewardModule` (README, "2. Reward model").
"""
