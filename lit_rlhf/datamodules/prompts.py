"""Prompts for PPO rollouts: plain text or chat conversations, left-padded for generation."""

from __future__ import annotations

from typing import Any

from lit_rlhf.datamodules.base import RLHFDataModule, Row, require_str, warn_dropped
from lit_rlhf.errors import DataError
from lit_rlhf.hf.tokenization import tokenize_prompt
from lit_rlhf.rlhf.padding import pad_batch


class PromptDataModule(RLHFDataModule):
    """Prompts to sample PPO responses from.

    A row is chat-formatted when it has ``messages_column`` (a list of ``{"role", "content"}`` turns, ending
    with a non-assistant turn); otherwise it needs ``prompt_column``. Prompts longer than
    ``max_prompt_length`` tokens are dropped (truncating them would cut the question) and counted in a
    warning.

    Batches hold ``prompt_input_ids`` and ``prompt_attention_mask`` ``[B, P]``, **left**-padded so that
    generation continues every prompt from the same column, plus ``prompts`` (the prompt texts, for
    rule-based rewards) and ``prompt_messages`` (each chat row's conversation, ``None`` for plain prompts: a
    reward model with its own tokenizer renders it with its own chat template).

    Args:
        prompt_column: column holding a plain prompt.
        messages_column: column holding a chat conversation.
        max_prompt_length: longest prompt kept, in tokens.
        drop_last: drop the last incomplete batch (keeps every PPO iteration the same size).
        **kwargs: see :class:`~lit_rlhf.datamodules.base.RLHFDataModule`.
    """

    def __init__(
        self,
        train_data: str,
        prompt_column: str = "prompt",
        messages_column: str = "messages",
        max_prompt_length: int = 512,
        drop_last: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_data, **kwargs)
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
        self.prompt_column = prompt_column
        self.messages_column = messages_column
        self.max_prompt_length = max_prompt_length
        # a tiny final batch would whiten advantages over a handful of tokens
        self.drop_last = drop_last

    def tokenize_row(self, row: Row) -> tuple[str, list[int]]:
        """``(text, ids)`` of a row's prompt: chat ``messages`` rendered with the generation prompt, or the plain
        prompt tokenized exactly as in SFT data (:mod:`lit_rlhf.hf.tokenization`)."""
        if self.messages_column in row.data:
            return tokenize_prompt(self.tokenizer, row.data[self.messages_column], row.where, self.messages_column)
        return tokenize_prompt(self.tokenizer, require_str(row, self.prompt_column), row.where, self.prompt_column)

    def build_examples(self, rows: list[Row], name: str) -> list[dict[str, Any]]:
        examples, dropped = [], 0
        for row in rows:
            text, ids = self.tokenize_row(row)
            if len(ids) > self.max_prompt_length:
                dropped += 1
                continue
            if not ids:
                raise DataError(f"{row.where}: the prompt has no token")
            messages = row.data.get(self.messages_column)
            examples.append({"prompt": text, "input_ids": ids, "messages": messages})
        warn_dropped(dropped, len(rows), name, f"prompt longer than max_prompt_length={self.max_prompt_length}")
        return examples

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = pad_batch([e["input_ids"] for e in examples], self.tokenizer.pad_token_id, side="left")
        return {
            "prompt_input_ids": ids,
            "prompt_attention_mask": mask,
            "prompts": [e["prompt"] for e in examples],
            "prompt_messages": [e["messages"] for e in examples],
        }
