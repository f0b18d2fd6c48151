"""PPO-ptx data: pretraining or SFT text whose language-modelling loss joins every PPO optimizer step
(InstructGPT Eq. 2)."""

from __future__ import annotations

import torch

from lit_rlhf.datamodules.base import read_rows, require_str
from lit_rlhf.errors import DataError
from lit_rlhf.hf.tokenization import IGNORE_INDEX, tokenize_messages, tokenize_prompt_completion, tokenize_text
from lit_rlhf.rlhf.padding import pad_batch, pad_sequences

PTXExample = tuple[list[int], list[int]]


def ptx_examples(
    source: str,
    tokenizer,
    max_length: int,
    text_column: str = "text",
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    messages_column: str = "messages",
) -> list[PTXExample]:
    """``(input_ids, labels)`` of every usable row of ``source``; labels are ``-100`` where no loss is taken.

    A row with ``text_column`` is plain text, every token supervised (an EOS is appended); any other row is an
    SFT demonstration, tokenized and masked exactly as :class:`~lit_rlhf.datamodules.SFTDataModule` does
    (docs/conventions.md#ptx-data): a chat ``messages_column`` conversation (assistant turns supervised), a
    conversational prompt-completion pair (message lists: the conversation ``prompt + completion``), or a
    standard one (completion and EOS supervised). Rows are truncated to
    ``max_length`` tokens; rows left without a supervised token are skipped.
    """
    examples = []
    for row in read_rows(source):
        if text_column in row.data:
            ids, labels = tokenize_text(tokenizer, require_str(row, text_column))
        elif messages_column in row.data:
            ids, labels = tokenize_messages(tokenizer, row.data[messages_column], row.where, messages_column)
        elif isinstance(row.data.get(prompt_column), list) and isinstance(row.data.get(completion_column), list):
            conversation = row.data[prompt_column] + row.data[completion_column]
            ids, labels = tokenize_messages(tokenizer, conversation, row.where, f"{prompt_column}+{completion_column}")
        else:
            prompt = require_str(row, prompt_column, allow_empty=True)
            ids, labels = tokenize_prompt_completion(tokenizer, prompt, require_str(row, completion_column))
        ids, labels = ids[:max_length], labels[:max_length]
        if any(label != IGNORE_INDEX for label in labels[1:]):
            examples.append((ids, labels))
    if not examples:
        raise DataError(f"{source}: no PTX example with a supervised token")
    return examples


def ptx_batch(examples: list[PTXExample], size: int, pad_token_id: int, seed: int) -> dict[str, torch.Tensor]:
    """``size`` examples drawn with ``seed``, right-padded: ``input_ids``, ``attention_mask``, ``labels``
    (LongTensors ``[size, L]``)."""
    generator = torch.Generator().manual_seed(seed)
    picked = [examples[i] for i in torch.randint(len(examples), (size,), generator=generator).tolist()]
    input_ids, attention_mask = pad_batch([ids for ids, _ in picked], pad_token_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": pad_sequences([labels for _, labels in picked], IGNORE_INDEX),
    }
