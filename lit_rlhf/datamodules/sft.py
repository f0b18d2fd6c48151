"""Demonstration data for supervised fine-tuning: prompt→completion pairs or chat conversations."""

from __future__ import annotations

from typing import Any, Literal

import torch

from lit_rlhf.datamodules.base import RLHFDataModule, Row, require_str, warn_dropped
from lit_rlhf.datamodules.formats import Columns, Format, detect_format, is_conversational, prompt_of
from lit_rlhf.errors import DataError
from lit_rlhf.hf.tokenization import (
    ASSISTANT_TURNS,
    IGNORE_INDEX,
    chat_prompt,
    tokenize_messages,
    tokenize_prompt,
    tokenize_prompt_completion,
    tokenize_text,
    validate_messages,
)
from lit_rlhf.rlhf.padding import pad_batch, pad_sequences

#: the formats SFT trains on (docs/data.md)
SFT_FORMATS = (Format.PROMPT_COMPLETION, Format.TEXT, Format.MESSAGES)


class SFTDataModule(RLHFDataModule):
    """Prompt→completion demonstrations (text or conversational), language-modelling ``text`` or chat ``messages``.

    The format of a row is detected from its columns (:func:`~lit_rlhf.datamodules.formats.detect_format`,
    docs/data.md): ``{prompt, completion}`` supervises the completion only (for a conversational pair: the
    completion's assistant turns); ``{text}`` supervises every token (EOS appended); ``{messages}`` supervises
    the assistant turns (docs/conventions.md#assistant-masks). Sequences are truncated to ``max_length``
    keeping the start; examples left with no supervised token are dropped and counted in a warning. Batches are
    right-padded to their longest sequence, with labels ``-100`` on prompt and padding.

    Args:
        prompt_column: column holding the prompt text.
        completion_column: column holding the demonstration.
        messages_column: column holding a chat conversation.
        text_column: column holding language-modelling text.
        max_length: maximum tokens per example (prompt + completion).
        assistant_turns: which assistant turns of a chat conversation are supervised: ``all`` (default) or
            ``last``, the final one only. ``last`` is for chat templates that rewrite earlier turns (Qwen3,
            DeepSeek-R1: the reasoning of answers before the last user turn is dropped), where the earlier
            answers are not rendered as the model wrote them; to learn those too, give each as its own row
            (the conversation up to it), or use a template with ``{% generation %}`` markers.
        predict_data: prompts (``prompt`` or chat ``messages`` rows) that ``predict`` answers.
        **kwargs: see :class:`~lit_rlhf.datamodules.base.RLHFDataModule`.
    """

    def __init__(
        self,
        train_data: str,
        prompt_column: str = "prompt",
        completion_column: str = "completion",
        messages_column: str = "messages",
        text_column: str = "text",
        max_length: int = 1024,
        assistant_turns: Literal["all", "last"] = "all",
        predict_data: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_data, **kwargs)
        self.prompt_column = prompt_column
        self.completion_column = completion_column
        self.messages_column = messages_column
        self.text_column = text_column
        self.max_length = max_length
        if assistant_turns not in ASSISTANT_TURNS:
            raise ValueError(f"assistant_turns must be one of {', '.join(ASSISTANT_TURNS)}, got {assistant_turns!r}")
        self.assistant_turns = assistant_turns
        self.predict_data = predict_data

    @property
    def columns(self) -> Columns:
        return Columns(
            text=self.text_column,
            messages=self.messages_column,
            prompt=self.prompt_column,
            completion=self.completion_column,
        )

    def tokenize_row(self, row: Row) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of a row, ``-100`` where no loss is taken."""
        if (
            not {self.text_column, self.messages_column, self.completion_column} & row.data.keys()
            and self.prompt_column in row.data
        ):
            require_str(row, self.completion_column)  # a prompt alone: say which column is missing
        fmt = detect_format(row, self.columns, accepted=SFT_FORMATS)
        if fmt is Format.TEXT:
            return tokenize_text(self.tokenizer, require_str(row, self.text_column))
        if fmt is Format.MESSAGES:
            return tokenize_messages(
                self.tokenizer, row.data[self.messages_column], row.where, self.messages_column, self.assistant_turns
            )
        completion = row.data[self.completion_column]
        if is_conversational(completion) or is_conversational(row.data.get(self.prompt_column)):
            return self._tokenize_chat_pair(row)
        prompt = require_str(row, self.prompt_column, allow_empty=True)
        completion = require_str(row, self.completion_column)
        return tokenize_prompt_completion(self.tokenizer, prompt, completion)

    def _tokenize_chat_pair(self, row: Row) -> tuple[list[int], list[int]]:
        prompt = validate_messages(row.data.get(self.prompt_column), row.where, self.prompt_column)
        completion = validate_messages(row.data[self.completion_column], row.where, self.completion_column)
        if not any(m["role"] == "assistant" for m in completion):
            raise DataError(f"{row.where}: column {self.completion_column!r} has no assistant turn to learn from")
        input_ids, labels = tokenize_messages(
            self.tokenizer, prompt + completion, row.where, self.completion_column, self.assistant_turns
        )
        # only the completion is learnt: the prompt, rendered with the generation prompt, is what a policy sees
        _, prompt_ids = chat_prompt(self.tokenizer, prompt, row.where, self.prompt_column)
        if input_ids[: len(prompt_ids)] != prompt_ids:
            raise DataError(f"{row.where}: the chat template renders the prompt differently inside the conversation")
        labels[: len(prompt_ids)] = [IGNORE_INDEX] * len(prompt_ids)
        return input_ids, labels

    def build_examples(self, rows: list[Row], name: str) -> list[dict[str, Any]]:
        examples, dropped = [], 0
        for row in rows:
            input_ids, labels = self.tokenize_row(row)
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
            # after the causal shift the first label is never predicted, so it does not count
            if all(label == IGNORE_INDEX for label in labels[1:]):
                dropped += 1
                continue
            examples.append({"input_ids": input_ids, "labels": labels})
        warn_dropped(dropped, len(rows), name, f"no supervised token left after truncation to {self.max_length}")
        return examples

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_batch([e["input_ids"] for e in examples], self.tokenizer.pad_token_id)
        labels = pad_sequences([e["labels"] for e in examples], IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def build_predict_example(self, row: Row) -> dict[str, Any]:
        prompt = prompt_of(row, self.columns)
        column = self.prompt_column if self.prompt_column in row.data else self.messages_column
        _, ids = tokenize_prompt(self.tokenizer, prompt, row.where, column)
        return {"input_ids": ids, "row": row.data}

    def collate_predict(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = pad_batch([e["input_ids"] for e in examples], self.tokenizer.pad_token_id, side="left")
        return {"prompt_input_ids": ids, "prompt_attention_mask": mask, "rows": [e["row"] for e in examples]}
