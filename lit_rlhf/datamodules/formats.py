"""The one place that recognises a row's dataset format from its columns (docs/data.md).

TRL's formats, standard (strings) or conversational (message lists ``[{"role", "content"}]``):

* language modelling: ``{"text": str}`` / ``{"messages": [msgs]}``;
* prompt-only: ``{"prompt": str}`` / ``{"prompt": [msgs]}``;
* prompt-completion: ``{"prompt", "completion"}``;
* preference, explicit prompt: ``{"prompt", "chosen", "rejected"}``;
* preference, implicit prompt: ``{"chosen", "rejected"}`` (the prompt is their common start: :func:`extract_prompt`);
* unpaired preference: ``{"prompt", "completion", "label": bool}`` (KTO-style);

plus the project's K-wise rankings ``{"prompt", "responses": [K], "ranking": [indices best→worst]}``.
Column names are configurable (:class:`Columns`); a row fitting no format is a one-line
:class:`~lit_rlhf.errors.DataError` naming its place and the formats accepted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from lit_rlhf.datamodules.base import Row
from lit_rlhf.errors import DataError
from lit_rlhf.hf.tokenization import Messages, is_messages, validate_messages

__all__ = [
    "Columns",
    "Format",
    "detect_format",
    "extract_prompt",
    "is_conversational",
    "prompt_of",
]


class Format(str, Enum):
    """A dataset format; its value reads as in error messages and docs/data.md."""

    TEXT = "language modelling {text}"
    MESSAGES = "conversational language modelling {messages}"
    PROMPT = "prompt-only {prompt}"
    PROMPT_COMPLETION = "prompt-completion {prompt, completion}"
    PREFERENCE = "preference {prompt, chosen, rejected}"
    IMPLICIT_PREFERENCE = "implicit-prompt preference {chosen, rejected}"
    UNPAIRED_PREFERENCE = "unpaired preference {prompt, completion, label}"
    RANKING = "K-wise ranking {prompt, responses, ranking}"


@dataclass(frozen=True)
class Columns:
    """Column names of the formats (the ``*_column`` arguments of the DataModules)."""

    text: str = "text"
    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    chosen: str = "chosen"
    rejected: str = "rejected"
    label: str = "label"
    responses: str = "responses"
    ranking: str = "ranking"

    def describe(self, fmt: Format) -> str:
        """``fmt`` with these column names, e.g. ``prompt-completion {question, answer}``."""
        name, _, fields = fmt.value.partition(" {")
        names = [getattr(self, f.strip()) for f in fields.rstrip("}").split(",")]
        return f"{name} {{{', '.join(names)}}}"


def is_conversational(value: Any) -> bool:
    """Whether a column value is a conversation (a non-empty list of ``{role, content}`` dicts)."""
    return is_messages(value)


def detect_format(row: Row, columns: Columns = Columns(), accepted: Iterable[Format] | None = None) -> Format:
    """The format of ``row``, from which of ``columns`` it holds (values are checked by the normalisers).

    Precedence: ranking, preference (explicit, then implicit prompt), unpaired preference, prompt-completion,
    language modelling (text, then messages), prompt-only. A ``messages`` column next to ``chosen``/``rejected``
    is the (conversational) prompt of a preference row.

    Args:
        row: the record and its place.
        columns: the column names.
        accepted: the formats the caller's stage takes; ``None`` accepts all.

    Raises:
        DataError: the row fits no format, or one that is not in ``accepted`` (one line, with ``row.where``, the
            accepted formats and the columns present).
    """
    keys = row.data.keys()

    def has(name: str) -> bool:
        return name in keys and row.data[name] is not None

    if has(columns.responses) or has(columns.ranking):
        fmt = Format.RANKING
    elif has(columns.chosen) or has(columns.rejected):
        fmt = Format.PREFERENCE if has(columns.prompt) or has(columns.messages) else Format.IMPLICIT_PREFERENCE
    elif has(columns.completion) and has(columns.label):
        fmt = Format.UNPAIRED_PREFERENCE
    elif has(columns.completion):
        fmt = Format.PROMPT_COMPLETION
    elif has(columns.text):
        fmt = Format.TEXT
    elif has(columns.messages):
        fmt = Format.MESSAGES
    elif has(columns.prompt):
        fmt = Format.PROMPT
    else:
        fmt = None
    allowed = list(Format) if accepted is None else list(accepted)
    if fmt is None or fmt not in allowed:
        what = "fits no dataset format" if fmt is None else f"is a {columns.describe(fmt)} row"
        raise DataError(
            f"{row.where}: row {what}; accepted here: {'; '.join(columns.describe(f) for f in allowed)} "
            f"(columns present: {sorted(keys)})"
        )
    return fmt


def extract_prompt(chosen: Any, rejected: Any, where: str = "", columns: Columns = Columns()) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of an implicit-prompt pair: the prompt is their common start.

    Text: the longest common prefix, cut before a space that precedes the first differing character (so
    ``"Q: hi A: yes"``/``"Q: hi A: no"`` give prompt ``"Q: hi A:"``, responses ``" yes"``/``" no"``), as TRL does.
    Conversations: the common leading messages; each response is the rest, which must hold an assistant turn.

    Raises:
        DataError: the two are of different kinds, or nothing is left of one of them after the prompt.
    """
    if is_conversational(chosen) or is_conversational(rejected):
        chosen = validate_messages(chosen, where, columns.chosen)
        rejected = validate_messages(rejected, where, columns.rejected)
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        for name, rest in ((columns.chosen, chosen), (columns.rejected, rejected)):
            if not any(m["role"] == "assistant" for m in rest):
                raise DataError(
                    f"{where}: column {name!r} has no assistant turn after the messages shared with the other"
                )
        return prompt, chosen, rejected
    for name, value in ((columns.chosen, chosen), (columns.rejected, rejected)):
        if not isinstance(value, str):
            raise DataError(f"{where}: column {name!r} must be a string or a message list, got {type(value).__name__}")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
        n -= 1  # the space opens the responses, as after a plain prompt
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for name, rest in ((columns.chosen, chosen), (columns.rejected, rejected)):
        if not rest.strip():
            raise DataError(f"{where}: column {name!r} has nothing left after the prefix shared with the other")
    return prompt, chosen, rejected


def prompt_of(row: Row, columns: Columns = Columns()) -> str | Messages:
    """The prompt of a row: ``prompt`` text or conversation (of any format that has one), else a ``messages``
    conversation (which must not end with an assistant turn; checked when it is tokenized).

    Raises:
        DataError: the row has no prompt (see :func:`detect_format`), or it is neither text nor a conversation.
    """
    if row.data.get(columns.prompt) is not None:
        column = columns.prompt  # also the prompt of a prompt-completion, preference or ranking row
    elif row.data.get(columns.messages) is not None:
        column = columns.messages
    else:
        detect_format(row, columns, accepted=(Format.PROMPT, Format.MESSAGES))  # raises: no prompt
        raise AssertionError  # pragma: no cover
    value = row.data[column]
    if isinstance(value, list):
        return validate_messages(value, row.where, column)
    if not isinstance(value, str):
        raise DataError(
            f"{row.where}: column {column!r} must be a string or a message list, got {type(value).__name__}"
        )
    if not value.strip():
        raise DataError(f"{row.where}: column {column!r} is empty")
    return value
