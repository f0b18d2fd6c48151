"""Prompts for PPO rollouts: plain text or chat conversations, left-padded for generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lit_rlhf.datamodules.base import RLHFDataModule, Row, read_rows, warn_dropped
from lit_rlhf.errors import DataError
from lit_rlhf.hf.tokenization import Messages, tokenize_prompt, validate_messages
from lit_rlhf.rlhf.padding import pad_batch


def row_prompt(
    row: Row, prompt_column: str = "prompt", messages_column: str = "messages"
) -> tuple[str, str | Messages]:
    """``(column, prompt)`` of a prompt-only row, detected from its columns (docs/conventions.md#prompt-formats).

    * ``messages_column``: a conversation ending with a non-assistant turn;
    * ``prompt_column``: a string (standard) or a message list (conversational). Any other column (a
      completion, ``chosen``/``rejected``, an ``answer``) is left to the caller: prompt-completion and
      preference files are prompt files too.

    Raises:
        DataError: naming the row's place, when it has neither column or holds no prompt.
    """
    if messages_column in row.data:
        return messages_column, validate_messages(row.data[messages_column], row.where, messages_column)
    if prompt_column in row.data:
        value = row.data[prompt_column]
        if isinstance(value, list):
            return prompt_column, validate_messages(value, row.where, prompt_column)
        if not isinstance(value, str):
            raise DataError(
                f"{row.where}: column {prompt_column!r} must be a string or a message list, got {type(value).__name__}"
            )
        return prompt_column, value
    raise DataError(
        f"{row.where}: missing column {prompt_column!r} (a text or a message list; or a {messages_column!r} "
        f"conversation; columns present: {sorted(row.data)})"
    )


@dataclass(frozen=True)
class PromptRow:
    """A prompt to sample from and the rest of its row (passed to reward functions as keyword arguments)."""

    prompt: str | Messages
    """The text (standard) or the conversation (conversational)."""
    columns: dict[str, Any] = field(default_factory=dict)
    """Every other column of the row."""
    where: str = ""


def read_prompt_rows(
    source: str, prompt_column: str = "prompt", messages_column: str = "messages", limit: int | None = None
) -> list[PromptRow]:
    """The prompts of a file or hub dataset (the first ``limit`` rows), in any prompt format (:func:`row_prompt`)."""
    rows = []
    for row in read_rows(source)[:limit]:
        column, prompt = row_prompt(row, prompt_column, messages_column)
        rows.append(PromptRow(prompt, {k: v for k, v in row.data.items() if k != column}, row.where))
    return rows


class PromptDataModule(RLHFDataModule):
    """Prompts to sample PPO responses from.

    The prompt format is detected per row from its columns (:func:`row_prompt`,
    docs/conventions.md#prompt-formats): ``{"prompt": str}``, ``{"prompt": [messages]}``, ``{"messages": [...]}``
    ending with a user turn, and prompt-completion or preference rows (their prompt). Prompts longer than
    ``max_prompt_length`` tokens are dropped (truncating them would cut the question) and counted in a
    warning.

    Batches hold ``prompt_input_ids`` and ``prompt_attention_mask`` ``[B, P]``, **left**-padded so that
    generation continues every prompt from the same column, plus ``prompts`` (the prompt texts, for
    rule-based rewards; a chat row's rendered template), ``prompt_messages`` (each chat row's conversation,
    ``None`` for plain prompts: a reward model with its own tokenizer renders it with its own chat template)
    and ``prompt_columns`` (per row, a dict of its other columns, e.g. an ``answer``, for reward functions;
    docs/conventions.md#reward-functions).

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
        """``(text, ids)`` of a row's prompt (:func:`row_prompt`): a conversation rendered with the generation
        prompt, or the plain prompt tokenized exactly as in SFT data (:mod:`lit_rlhf.hf.tokenization`)."""
        column, prompt = row_prompt(row, self.prompt_column, self.messages_column)
        return tokenize_prompt(self.tokenizer, prompt, row.where, column)

    def build_examples(self, rows: list[Row], name: str) -> list[dict[str, Any]]:
        examples, dropped = [], 0
        for row in rows:
            column, prompt = row_prompt(row, self.prompt_column, self.messages_column)
            text, ids = tokenize_prompt(self.tokenizer, prompt, row.where, column)
            if len(ids) > self.max_prompt_length:
                dropped += 1
                continue
            if not ids:
                raise DataError(f"{row.where}: the prompt has no token")
            examples.append(
                {
                    "prompt": prompt if isinstance(prompt, str) else text,
                    "input_ids": ids,
                    "messages": prompt if isinstance(prompt, list) else None,
                    "columns": {k: v for k, v in row.data.items() if k != column},
                }
            )
        warn_dropped(dropped, len(rows), name, f"prompt longer than max_prompt_length={self.max_prompt_length}")
        return examples

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = pad_batch([e["input_ids"] for e in examples], self.tokenizer.pad_token_id, side="left")
        return {
            "prompt_input_ids": ids,
            "prompt_attention_mask": mask,
            "prompts": [e["prompt"] for e in examples],
            "prompt_messages": [e["messages"] for e in examples],
            "prompt_columns": [e["columns"] for e in examples],
        }
