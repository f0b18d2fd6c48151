"""Demonstration data for supervised fine-tuning: prompt→completion pairs or chat conversations."""

from __future__ import annotations

from typing import Any

import torch

from lit_rlhf.datamodules.base import DataError, RLHFDataModule, Row, pad_sequences, require_str, warn_dropped

IGNORE_INDEX = -100


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + completion + EOS`` and labels that are ``-100`` on the prompt.

    Prompt and completion are tokenized separately, exactly as a policy later sees them (it generates
    after the prompt's tokens), and the EOS is supervised so the model learns to stop.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def tokenize_messages(tokenizer, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[int]]:
    """Token ids of a conversation rendered with the chat template; only assistant turns are supervised.

    Each assistant turn's span is found by rendering the conversation up to that turn with and without it
    (``add_generation_prompt=True`` for the prefix), which works for any template without
    ``{% generation %}`` markers.
    """
    if not messages or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
        raise DataError(f"{where}: column 'messages' must be a list of {{'role', 'content'}} objects")

    def render(turns: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    input_ids = render(messages, False)
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(messages[:i], True))
        end = len(render(messages[: i + 1], False))
        labels[start:end] = input_ids[start:end]
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(f"{where}: conversation has no assistant turn to learn from")
    return input_ids, labels


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
        val_data: str | None = None,
        val_fraction: float = 0.0,
        prompt_column: str = "prompt",
        completion_column: str = "completion",
        messages_column: str = "messages",
        max_length: int = 1024,
        predict_data: str | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        tokenizer: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            train_data,
            val_data,
            val_fraction,
            train_split,
            val_split,
            tokenizer,
            batch_size,
            num_workers,
            seed,
        )
        self.prompt_column = prompt_column
        self.completion_column = completion_column
        self.messages_column = messages_column
        self.max_length = max_length
        self.predict_data = predict_data

    def tokenize_row(self, row: Row) -> tuple[list[int], list[int]]:
        if self.messages_column in row.data:
            return tokenize_messages(self.tokenizer, row.data[self.messages_column], row.where)
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
        input_ids = pad_sequences([e["input_ids"] for e in examples], self.tokenizer.pad_token_id)
        labels = pad_sequences([e["labels"] for e in examples], IGNORE_INDEX)
        attention_mask = pad_sequences([[1] * len(e["input_ids"]) for e in examples], 0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def build_predict_example(self, row: Row) -> dict[str, Any]:
        from lit_rlhf.datamodules.prompts import tokenize_prompt

        _, ids = tokenize_prompt(self.tokenizer, row, self.prompt_column, self.messages_column)
        return {"input_ids": ids, "row": row.data}

    def collate_predict(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [e["input_ids"] for e in examples]
        return {
            "prompt_input_ids": pad_sequences(ids, self.tokenizer.pad_token_id, side="left"),
            "prompt_attention_mask": pad_sequences([[1] * len(x) for x in ids], 0, side="left"),
            "rows": [e["row"] for e in examples],
        }
