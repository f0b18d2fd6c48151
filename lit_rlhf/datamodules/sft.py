"""Demonstration data for supervised fine-tuning: prompt→completion pairs or chat conversations."""

from __future__ import annotations

from typing import Any

import torch

from lit_rlhf.datamodules.base import RLHFDataModule, Row, require_str, warn_dropped
from lit_rlhf.hf.tokenization import IGNORE_INDEX, tokenize_messages, tokenize_prompt, tokenize_prompt_completion
from lit_rlhf.rlhf.padding import pad_batch, pad_sequences


class SFTDataModule(RLHFDataModule):
    """Prompt→completion demonstrations, or chat ``messages`` (only assistant turns supervised).

    A row is chat-formatted when it has ``messages_column``; otherwise it needs ``prompt_column`` and
    ``completion_column``. Sequences are truncated to ``max_length`` keeping the start; examples left with
    no supervised token are dropped and counted in a warning. Batches are right-padded to their longest
    sequence, with labels ``-100`` on prompt and padding.

    Args:
        prompt_column: column holding the prompt text.
        completion_column: column holding the demonstration.
        messages_column: column holding a chat conversation.
        max_length: maximum tokens per example (prompt + completion).
        predict_data: prompts (``prompt`` or chat ``messages`` rows) that ``predict`` answers.
        **kwargs: see :class:`~lit_rlhf.datamodules.base.RLHFDataModule`.
    """

    def __init__(
        self,
        train_data: str,
        prompt_column: str = "prompt",
        completion_column: str = "completion",
        messages_column: str = "messages",
        max_length: int = 1024,
        predict_data: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_data, **kwargs)
        self.prompt_column = prompt_column
        self.completion_column = completion_column
        self.messages_column = messages_column
        self.max_length = max_length
        self.predict_data = predict_data

    def tokenize_row(self, row: Row) -> tuple[list[int], list[int]]:
        if self.messages_column in row.data:
            return tokenize_messages(self.tokenizer, row.data[self.messages_column], row.where, self.messages_column)
        prompt = require_str(row, self.prompt_column, allow_empty=True)
        completion = require_str(row, self.completion_column)
        return tokenize_prompt_completion(self.tokenizer, prompt, completion)

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
        if self.messages_column in row.data:
            _, ids = tokenize_prompt(self.tokenizer, row.data[self.messages_column], row.where, self.messages_column)
        else:
            _, ids = tokenize_prompt(self.tokenizer, require_str(row, self.prompt_column), row.where)
        return {"input_ids": ids, "row": row.data}

    def collate_predict(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = pad_batch([e["input_ids"] for e in examples], self.tokenizer.pad_token_id, side="left")
        return {"prompt_input_ids": ids, "prompt_attention_mask": mask, "rows": [e["row"] for e in examples]}
