"""Human comparisons for reward-model training: pairwise preferences and K-wise rankings, text or chat.

One example is one **prompt with its K ranked responses** (InstructGPT §3.5): all ``C(K, 2)`` comparisons
of a prompt stay together and its K sequences are scored in one forward pass. Pairwise data is K = 2.

Row shapes (column names are configurable; detected by :func:`~lit_rlhf.datamodules.formats.comparison_of`,
one example row each in docs/data.md):

* pairwise: ``{"prompt": str, "chosen": str, "rejected": str, "margin": float (optional)}`` (Llama 2 margin);
  with an implicit prompt ``{"chosen": str, "rejected": str}``, the prompt is their common start (TRL's
  ``extract_prompt``);
* K-wise: ``{"prompt": str, "responses": [str] * K, "ranking": [indices best→worst]}``, where an element of
  ``ranking`` may be a list, a tie group: ``[2, [0, 3], 1]``. Tied responses are not compared (InstructGPT
  C.2: "ties were dropped");
* chat: ``chosen``/``rejected`` (or each of ``responses``) are message lists ``[{"role", "content"}]``
  appended to an explicit ``prompt`` (or ``messages``) message list, or whole conversations whose shared
  leading messages are the prompt (every message but the last assistant turn, for ``responses``).

An unpaired ``{"prompt", "completion", "label"}`` row (KTO) is refused: it compares nothing.

Each sequence is built by :func:`~lit_rlhf.hf.tokenization.reward_text_ids`
(docs/conventions.md#reward-model-input): for a decoder ``prompt + response + EOS`` tokenized exactly as SFT
and PPO build it (prompt with special tokens, response without, then EOS), so the score is read at the EOS in
training and in PPO scoring alike; for an encoder (a tokenizer without EOS, e.g. BERT) the text pair
``[CLS] prompt [SEP] response [SEP]``. Chat sequences are rendered with the chat template and end with EOS
(appended when the template does not); an encoder without a template reads the turns' text as a pair.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_rlhf.datamodules.base import RLHFDataModule, Row, read_rows, require_str, warn_dropped
from lit_rlhf.datamodules.formats import (
    COMPARISON_FORMATS,
    Columns,
    Comparison,
    Format,
    comparison_of,
    demonstration_of,
    detect_format,
)
from lit_rlhf.errors import DataError
from lit_rlhf.hf.tokenization import (
    IGNORE_INDEX,
    is_messages,
    reward_chat_ids,
    reward_prompt_length,
    reward_text_ids,
    validate_messages,
)
from lit_rlhf.rlhf.padding import pad_batch, pad_sequences


def parse_ranking(ranking: Any, k: int, where: str, column: str) -> list[int]:
    """Ranks ``[K]`` (0 = best, equal = tie) from a best→worst list of indices or tie groups."""
    if not isinstance(ranking, list):
        raise DataError(f"{where}: column {column!r} must be a list of response indices, got {type(ranking).__name__}")
    groups = [g if isinstance(g, list) else [g] for g in ranking]
    listed = sum(len(g) for g in groups)
    if listed != k:
        raise DataError(f"{where}: column {column!r} ranks {listed} responses but there are {k}")
    ranks: list[int | None] = [None] * k
    for position, group in enumerate(groups):
        if not group:
            raise DataError(f"{where}: column {column!r} holds an empty tie group")
        for index in group:
            if not isinstance(index, int) or isinstance(index, bool):
                raise DataError(f"{where}: column {column!r} holds {index!r}, not a response index")
            if not 0 <= index < k:
                raise DataError(f"{where}: column {column!r} holds index {index}, out of range for {k} responses")
            if ranks[index] is not None:
                raise DataError(f"{where}: column {column!r} lists response {index} twice")
            ranks[index] = position
    return [int(r) for r in ranks]  # all set: k distinct in-range indices were listed


class PreferenceDataModule(RLHFDataModule):
    """Pairwise or K-wise (ties allowed) comparisons, text or chat, one prompt per batch element.

    Examples longer than ``max_length`` tokens are **dropped** (counted in a warning), not truncated: a cut
    response would lose its EOS and be scored at another token than in PPO. Prompts whose responses are all
    tied are dropped too (no comparison to learn from). ``K`` may differ between prompts of a batch.

    Batches (``Kmax`` = most responses of a prompt in the batch; row ``b * Kmax + k`` is response ``k`` of
    prompt ``b``):

    * ``input_ids``, ``attention_mask``: ``[B * Kmax, L]``; padded response slots are all padding;
    * ``labels``: ``[B * Kmax, L]``, the token ids of each response (its EOS included) and ``-100`` on the
      prompt and the padding: what DPO scores as ``log π(y|x)`` (:class:`~lit_rlhf.models.DPOModule`);
    * ``ranks``: LongTensor ``[B, Kmax]``, lower is better, equal is a tie;
    * ``response_mask``: BoolTensor ``[B, Kmax]``, False on padded slots;
    * ``margin``: ``[B, Kmax, Kmax]`` (``margin[b, w, l]`` for "w better than l"), only when a row of the
      dataset has a margin.

    Prediction (``trainer.predict``, docs/data.md): a ``predict_data`` row is scored once when it is
    ``{"prompt", "response"}`` (text, or message lists: a prompt conversation, in ``prompt`` or ``messages``,
    and the answer's messages; or a ``response`` conversation alone, whose last assistant turn is scored), a
    prompt-completion row (standard or conversational) or a ``{"messages"}`` conversation ending with the
    answer; a row of a training format (pair, explicit or implicit prompt, or ``responses``, with or without a
    ranking) gets one score per response, in their order (``chosen`` then ``rejected``). Batches hold
    ``input_ids``/``attention_mask`` ``[N, L]`` (N sequences), ``rows`` (the input records, for writers) and
    ``score_groups`` (:meth:`collate_predict`).

    Args:
        prompt_column: prompt text (or message list, chat).
        chosen_column: preferred response (pairwise).
        rejected_column: dispreferred response (pairwise).
        margin_column: optional Llama 2 margin of a pairwise row (``m(r)`` in ``−log σ(r_c − r_r − m)``). A
            margin is meant to be ≥ 0 (how much better the chosen response is); a negative one lets the chosen
            response score below the rejected one at no cost, usually a sign flipped in the data, so the first
            negative margin of a file is reported in a warning with its ``file:line``.
        responses_column: the K responses of a ranked row.
        ranking_column: response indices from best to worst; an element may be a list of tied indices.
        response_column: the response of a ``predict_data`` row.
        messages_column: a conversational prompt (TRL's ``messages``) of a preference or ranking row, the same
            as a ``prompt`` message list; in ``predict_data``, a whole conversation ending with the answer scored.
        predict_data: file of prompt/response pairs to score with ``predict``.
        max_length: most tokens of one sequence (prompt + response + EOS).
        padding_side: ``right`` (default) or ``left``; scores do not depend on it (read at the last real
            token, position ids from the mask).
        **kwargs: see :class:`~lit_rlhf.datamodules.base.RLHFDataModule`.
    """

    tokenizer_role = "reward_model"

    def __init__(
        self,
        train_data: str,
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        margin_column: str = "margin",
        responses_column: str = "responses",
        ranking_column: str = "ranking",
        response_column: str = "response",
        messages_column: str = "messages",
        predict_data: str | None = None,
        max_length: int = 1024,
        padding_side: Literal["right", "left"] = "right",
        **kwargs: Any,
    ) -> None:
        super().__init__(train_data, **kwargs)
        self.prompt_column = prompt_column
        self.chosen_column = chosen_column
        self.rejected_column = rejected_column
        self.margin_column = margin_column
        self.responses_column = responses_column
        self.ranking_column = ranking_column
        self.response_column = response_column
        self.messages_column = messages_column
        self.predict_data = predict_data
        self.max_length = max_length
        self.padding_side = padding_side
        self._warned_negative_margin = False

    # ---- rows → token ids ---------------------------------------------------------------------------
    def sequences(self, row: Row, responses: list[Any], columns: list[str]) -> list[list[int]]:
        """Reward-model token ids of each of ``responses`` (all text or all chat) to the row's prompt."""
        return [ids for ids, _ in self.sequences_with_prompt_lengths(row, responses, columns)]

    def sequences_with_prompt_lengths(
        self, row: Row, responses: list[Any], columns: list[str]
    ) -> list[tuple[list[int], int]]:
        """``(ids, P)`` per response: the ids of :meth:`sequences` and the number ``P`` of leading prompt tokens
        (the response, EOS included, is ``ids[P:]``)."""
        if any(isinstance(r, list) for r in responses):
            return self._chat_sequences(row, responses, columns)
        prompt = require_str(row, self.prompt_column, allow_empty=True)
        out = []
        for response, column in zip(responses, columns):
            if not isinstance(response, str):
                raise DataError(f"{row.where}: column {column!r} must be a string, got {type(response).__name__}")
            if not response.strip():
                raise DataError(f"{row.where}: column {column!r} is empty")
            ids = reward_text_ids(self.tokenizer, prompt, response)
            out.append((ids, reward_prompt_length(self.tokenizer, prompt)))
        return out

    def _chat_sequences(self, row: Row, responses: list[Any], columns: list[str]) -> list[tuple[list[int], int]]:
        explicit = row.data.get(self.prompt_column)
        if explicit is not None:
            if not is_messages(explicit):
                raise DataError(f"{row.where}: column {self.prompt_column!r} must be a message list for chat responses")
            validate_messages(explicit, row.where, self.prompt_column)
        splits = []
        for response, column in zip(responses, columns):
            validate_messages(response, row.where, column)
            if explicit is not None:
                splits.append((explicit, response))
                continue
            if response[-1]["role"] != "assistant" or not str(response[-1]["content"]).strip():
                raise DataError(f"{row.where}: column {column!r} must end with a non-empty assistant turn")
            splits.append((response[:-1], response[-1:]))
        if any(prompt != splits[0][0] for prompt, _ in splits):
            raise DataError(f"{row.where}: columns {columns} differ before their last assistant turn (the prompt)")
        return [
            (reward_chat_ids(self.tokenizer, prompt, response), reward_prompt_length(self.tokenizer, prompt))
            for prompt, response in splits
        ]

    @property
    def columns(self) -> Columns:
        """The column names of the formats (:mod:`lit_rlhf.datamodules.formats`)."""
        return Columns(
            prompt=self.prompt_column,
            messages=self.messages_column,
            chosen=self.chosen_column,
            rejected=self.rejected_column,
            responses=self.responses_column,
            ranking=self.ranking_column,
        )

    def comparison(self, row: Row, accepted: tuple[Format, ...] = COMPARISON_FORMATS) -> tuple[Row, Comparison]:
        """The row's :class:`~lit_rlhf.datamodules.formats.Comparison` and the row in explicit form (its prompt,
        implicit or in a ``messages`` column, under ``prompt_column``), which :meth:`sequences` reads.

        Raises:
            DataError: one line with the row's place: an unpaired (KTO) row, which is no comparison, or a row
                of a format not in ``accepted``.
        """
        columns = self.columns
        fmt = detect_format(row, columns)
        if fmt is Format.UNPAIRED_PREFERENCE:
            raise DataError(
                f"{row.where}: row is an unpaired preference {{prompt, completion, label}} (KTO), not a pairwise "
                f"format: pair a prompt's liked and disliked completions into {{{self.prompt_column}, "
                f"{self.chosen_column}, {self.rejected_column}}} rows (docs/data.md)"
            )
        if fmt not in accepted:
            formats = [columns.describe(f) for f in accepted]
            if accepted == PREDICT_FORMATS:
                formats.append(f"scored pair {{{self.prompt_column}, {self.response_column}}}")
            raise DataError(
                f"{row.where}: missing columns: a row here is one of: {' | '.join(formats)}; this one is a "
                f"{columns.describe(fmt)} row (columns present: {sorted(row.data)})"
            )
        comparison = comparison_of(row, columns, accepted)
        data = {k: v for k, v in row.data.items() if k != self.messages_column}
        if comparison.prompt is not None:
            data[self.prompt_column] = comparison.prompt
        return Row(data, row.where), comparison

    def parse_row(self, row: Row) -> dict[str, Any]:
        """One example: ``input_ids`` (K lists), ``prompt_lengths`` (K ints), ``ranks`` (K ints), ``margin``
        (float or None). Every comparison format is read (:meth:`comparison`, docs/data.md)."""
        row, comparison = self.comparison(row)
        data, responses, columns = row.data, comparison.responses, comparison.names
        margin = None
        if comparison.fmt is Format.RANKING:
            if len(responses) < 2:
                raise DataError(
                    f"{row.where}: column {self.responses_column!r} needs K >= 2 responses, got {len(responses)}"
                )
            if self.ranking_column not in data:
                raise DataError(
                    f"{row.where}: missing column {self.ranking_column!r} (columns present: {sorted(data)})"
                )
            ranks = parse_ranking(data[self.ranking_column], len(responses), row.where, self.ranking_column)
            if data.get(self.margin_column) is not None:
                raise DataError(f"{row.where}: column {self.margin_column!r} is only supported for pairwise rows")
        else:
            ranks = [0, 1]
            margin = self._margin(row)
        for i in range(len(responses)):
            for j in range(i):
                if responses[i] == responses[j]:
                    raise DataError(f"{row.where}: columns {columns[j]!r} and {columns[i]!r} are identical")
        sequences = self.sequences_with_prompt_lengths(row, responses, columns)
        return {
            "input_ids": [ids for ids, _ in sequences],
            "prompt_lengths": [length for _, length in sequences],
            "ranks": ranks,
            "margin": margin,
        }

    def _margin(self, row: Row) -> float | None:
        value = row.data.get(self.margin_column)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise DataError(f"{row.where}: column {self.margin_column!r} must be a finite number, got {value!r}")
        if value < 0 and not self._warned_negative_margin:
            self._warned_negative_margin = True  # once: a flipped sign usually affects every row of a file
            rank_zero_warn(
                f"{row.where}: column {self.margin_column!r} is negative ({value}): the loss then lets the chosen "
                "response score below the rejected one at no cost. Margins should be >= 0 (is the sign flipped?); "
                "further negative margins are not reported."
            )
        return float(value)

    def build_examples(self, rows: list[Row], name: str) -> list[dict[str, Any]]:
        examples, too_long, all_tied = [], 0, 0
        for row in rows:
            example = self.parse_row(row)
            if max(len(ids) for ids in example["input_ids"]) > self.max_length:
                too_long += 1
            elif len(set(example["ranks"])) < 2:
                all_tied += 1
            else:
                examples.append(example)
        warn_dropped(too_long, len(rows), name, f"a response would be cut by max_length={self.max_length}")
        warn_dropped(all_tied, len(rows), name, "all responses tied, nothing to compare")
        return examples

    # ---- batches ------------------------------------------------------------------------------------
    def _pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_batch(sequences, self.tokenizer.pad_token_id, self.padding_side)

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        k_max = max(len(e["ranks"]) for e in examples)
        sequences = [e["input_ids"][k] if k < len(e["ranks"]) else [] for e in examples for k in range(k_max)]
        input_ids, attention_mask = self._pad(sequences)
        prompt_lengths = [e["prompt_lengths"][k] if k < len(e["ranks"]) else 0 for e in examples for k in range(k_max)]
        labels = pad_sequences(
            [[IGNORE_INDEX] * p + ids[p:] for p, ids in zip(prompt_lengths, sequences)], IGNORE_INDEX, self.padding_side
        )
        ranks = torch.full((len(examples), k_max), k_max, dtype=torch.long)
        response_mask = torch.zeros(len(examples), k_max, dtype=torch.bool)
        for b, e in enumerate(examples):
            ranks[b, : len(e["ranks"])] = torch.tensor(e["ranks"])
            response_mask[b, : len(e["ranks"])] = True
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "ranks": ranks,
            "response_mask": response_mask,
        }
        if any(e["margin"] is not None for e in examples):
            margin = torch.zeros(len(examples), k_max, k_max)
            for b, e in enumerate(examples):
                margin[b, 0, 1] = e["margin"] or 0.0  # pairwise rows: response 0 (chosen) beats 1 (rejected)
            batch["margin"] = margin
        return batch

    # ---- prediction ---------------------------------------------------------------------------------
    def build_predict_example(self, row: Row) -> dict[str, Any]:
        """The sequences to score of a ``predict_data`` row: its one response, or each of a pair or ranking."""
        if self.response_column in row.data:  # lit_rlhf's scoring pair {prompt, response}
            data = dict(row.data)
            if data.get(self.prompt_column) is None and data.get(self.messages_column) is not None:
                data[self.prompt_column] = data.pop(self.messages_column)  # a conversational prompt
            explicit = Row(data, row.where)
            responses, names, group = [row.data[self.response_column]], [self.response_column], False
        else:
            explicit, comparison = self.comparison(row, PREDICT_FORMATS)
            responses, names = comparison.responses, comparison.names
            group = comparison.fmt in COMPARISON_FORMATS
        sequences = self.sequences(explicit, responses, names)
        for ids in sequences:
            if len(ids) > self.max_length:
                # every row must get a score, so a too-long row is an error here rather than a silent drop
                raise DataError(f"{row.where}: {len(ids)} tokens exceed max_length={self.max_length}")
        return {"input_ids": sequences, "group": group, "row": row.data}

    def collate_predict(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """``input_ids``/``attention_mask`` ``[N, L]`` (every row's sequences in turn), ``rows`` ``[B]`` and
        ``score_groups`` ``[B]``: per row, its number of responses, or ``None`` for a row scored once."""
        input_ids, attention_mask = self._pad([ids for e in examples for ids in e["input_ids"]])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "rows": [e["row"] for e in examples],
            "score_groups": [len(e["input_ids"]) if e["group"] else None for e in examples],
        }


#: the ``predict_data`` formats besides ``{prompt, response}``: every comparison, a prompt-completion row and a
#: conversation ending with the answer to score
PREDICT_FORMATS = (*COMPARISON_FORMATS, Format.PROMPT_COMPLETION, Format.MESSAGES)


def read_scored_pairs(
    source: str, prompt_column: str = "prompt", response_columns: tuple[str, ...] = ("response", "completion")
) -> tuple[list[str | list[dict[str, str]]], list[str]]:
    """``(prompts, responses)`` of a file of prompt/response pairs, e.g. for PPO's ``reward.normalize_on``.

    A row is ``{"prompt", "response"}``, a prompt-completion row (standard, or conversational with one
    assistant message), or chat ``{"messages"}`` ending with the assistant's answer (the conversation before
    it is the prompt): :func:`~lit_rlhf.datamodules.formats.demonstration_of`, as the reward normalisation's
    reference rows. A conversation's answer is returned as its text.
    """
    columns = Columns(prompt=prompt_column)
    prompts: list[str | list[dict[str, str]]] = []
    responses: list[str] = []
    for row in read_rows(source):
        column = next((c for c in response_columns if c in row.data), None)  # else a conversation
        prompt, response = demonstration_of(row, columns, column)
        if isinstance(response, list):
            if len(response) != 1:
                raise DataError(
                    f"{row.where}: a scored pair's answer must be one assistant message, got {len(response)}"
                )
            response = response[0]["content"]
        prompts.append(prompt)
        responses.append(response)
    return prompts, responses
