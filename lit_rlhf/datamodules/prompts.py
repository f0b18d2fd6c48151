"""Prompts for PPO rollouts: plain text or chat conversations, left-padded for generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lit_rlhf.datamodules.base import RLHFDataModule, Row, read_rows, warn_dropped
from lit_rlhf.datamodules.formats import Columns, prompt_source
from lit_rlhf.errors import DataError
from lit_rlhf.hf.tokenization import Messages, tokenize_prompt
from lit_rlhf.rlhf.padding import pad_batch


def row_prompt(
    row: Row, prompt_column: str = "prompt", messages_column: str = "messages"
) -> tuple[str | None, str | Messages]:
    """``(column, prompt)`` of a row of any format that holds a prompt, detected from its columns by
    :func:`~lit_rlhf.datamodules.formats.prompt_source` (docs/data.md):

    * ``prompt_column``: a string (standard) or a message list (conversational), also the prompt of a
      prompt-completion, preference or ranking row;
    * ``messages_column``: a conversation ending with a non-assistant turn;
    * an implicit-prompt pair ``{chosen, rejected}``: their common start (``column`` is then ``None``).

    Any other column (a completion, ``chosen``/``rejected``, an ``answer``) is left to the caller.

    Raises:
        DataError: naming the row's place, when it holds no prompt.
    """
    return prompt_source(row, Columns(prompt=prompt_column, messages=messages_column))


@dataclass(frozen=True)
class PromptRow:
    """A prompt to sample from and the rest of its row (passed to reward functions as keyword arguments)."""

    prompt: str | Messages
    """The text (standard) or the conversation (conversational)."""
    columns: dict[str, Any] = field(default_factory=dict)
    """Every other column of the row."""
    where: str = ""


def prompt_row(row: Row, prompt_column: str = "prompt", messages_column: str = "messages") -> PromptRow:
    """The :class:`PromptRow` of a row (:func:`row_prompt`): its prompt and every other column."""
    column, prompt = row_prompt(row, prompt_column, messages_column)
    return PromptRow(prompt, {k: v for k, v in row.data.items() if k != column}, row.where)


def read_prompt_rows(
    source: str,
    prompt_column: str = "prompt",
    messages_column: str = "messages",
    limit: int | None = None,
    split: str = "train",
) -> list[PromptRow]:
    """The prompts of a file, ``save_to_disk`` folder or hub dataset (the first ``limit`` rows), in any format
    that holds a prompt (:func:`row_prompt`), with their rows' other columns (for reward functions)."""
    return [prompt_row(row, prompt_column, messages_column) for row in read_rows(source, split)[:limit]]


class PromptDataModule(RLHFDataModule):
    """Prompts to sample PPO responses from.

    The prompt format is detected per row from its columns (:func:`row_prompt`,
    docs/data.md): ``{"prompt": str}``, ``{"prompt": [messages]}``, ``{"messages": [...]}`` ending with a user
    turn, and prompt-completion, preference (explicit or implicit prompt) or ranking rows (their prompt).
    Prompts longer than ``max_prompt_length`` tokens are dropped (truncating them would cut the question) and
    counted in a warning.

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
        return tokenize_prompt(self.tokenizer, prompt, row.where, column or self.prompt_column)

    def build_examples(self, rows: list[Row], name: str) -> list[dict[str, Any]]:
        examples, dropped = [], 0
        for row in rows:
            column, prompt = row_prompt(row, self.prompt_column, self.messages_column)
            text, ids = tokenize_prompt(self.tokenizer, prompt, row.where, column or self.prompt_column)
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


def repeat_prompts(batch: dict[str, Any], k: int) -> dict[str, Any]:
    """The batch with every prompt repeated ``k`` times, a prompt's copies adjacent (``k = 1``: the batch itself).

    Every per-prompt field is repeated, whatever its name: a tensor whose first dimension, or a list or tuple whose
    length, is the number of prompts ``G`` (ids ``[G, P]`` → ``[G·k, P]``, masks, texts, chat conversations, and
    any field a data module adds later). Other values are kept as they are.
    """
    if k == 1:
        return batch
    size = len(batch["prompt_input_ids"])
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
            out[key] = value.repeat_interleave(k, 0)
        elif isinstance(value, (list, tuple)) and len(value) == size:
            out[key] = [v for v in value for _ in range(k)]
        else:
            out[key] = value
    return out
