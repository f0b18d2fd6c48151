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

What each stage reads of a row goes through one function here: :func:`prompt_source` (the prompt, for PPO,
the critic-free stages, evaluation and labelling), :func:`comparison_of` (a prompt and the responses compared,
for RM and DPO data and RM ``predict``) and :func:`demonstration_of` (one prompt and its answer, for reward
normalisation and scored pairs).
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
    "COMPARISON_FORMATS",
    "DEMONSTRATION_FORMATS",
    "Columns",
    "Comparison",
    "Format",
    "comparison_of",
    "demonstration_of",
    "detect_format",
    "extract_prompt",
    "is_conversational",
    "prompt_of",
    "prompt_source",
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


def prompt_source(row: Row, columns: Columns = Columns()) -> tuple[str | None, str | Messages]:
    """``(column, prompt)`` of a row of any format that has a prompt (docs/data.md): the ``prompt`` text or
    conversation (of a prompt-only, prompt-completion, preference or ranking row), else a ``messages``
    conversation (which must not end with an assistant turn; checked when it is tokenized), else the common
    start of an implicit-prompt pair (:func:`extract_prompt`; ``column`` is then ``None``: no column holds it).

    Raises:
        DataError: the row has no prompt (see :func:`detect_format`), or it is neither text nor a conversation.
    """
    if row.data.get(columns.prompt) is not None:
        column = columns.prompt  # also the prompt of a prompt-completion, preference or ranking row
    elif row.data.get(columns.messages) is not None:
        column = columns.messages
    else:
        try:
            fmt = detect_format(row, columns, accepted=_PROMPT_FORMATS)
        except DataError as err:  # say first what is missing, then what the row is
            reason = str(err).removeprefix(f"{row.where}: ")
            raise DataError(f"{row.where}: missing column {columns.prompt!r}; {reason}") from None
        if fmt is not Format.IMPLICIT_PREFERENCE:  # a prompt-completion or ranking row without its prompt
            raise DataError(f"{row.where}: missing column {columns.prompt!r} (columns present: {sorted(row.data)})")
        return None, extract_prompt(*_pair(row, columns), row.where, columns)[0]
    value = row.data[column]
    if isinstance(value, list):
        return column, validate_messages(value, row.where, column)
    if not isinstance(value, str):
        raise DataError(
            f"{row.where}: column {column!r} must be a string or a message list, got {type(value).__name__}"
        )
    if not value.strip():
        raise DataError(f"{row.where}: column {column!r} is empty")
    return column, value


def prompt_of(row: Row, columns: Columns = Columns()) -> str | Messages:
    """The prompt of a row (:func:`prompt_source`)."""
    return prompt_source(row, columns)[1]


#: the formats that hold a prompt (what prompt-reading stages take: PPO, evaluation, labelling)
_PROMPT_FORMATS = (
    Format.PROMPT,
    Format.MESSAGES,
    Format.PROMPT_COMPLETION,
    Format.PREFERENCE,
    Format.IMPLICIT_PREFERENCE,
    Format.RANKING,
)

#: the formats that compare responses to one prompt (RM and DPO training)
COMPARISON_FORMATS = (Format.PREFERENCE, Format.IMPLICIT_PREFERENCE, Format.RANKING)


@dataclass(frozen=True)
class Comparison:
    """A prompt and responses to it, in the explicit form every scorer takes (docs/data.md).

    ``prompt`` is the text or conversation the responses answer; ``None`` when each response is a whole
    conversation whose prompt is everything before its last assistant turn (a K-wise ranking of
    conversations). ``names`` labels each response in errors (``chosen``, ``responses[2]``, ...).
    """

    prompt: str | Messages | None
    responses: list[Any]
    names: list[str]
    fmt: Format


def _pair(row: Row, columns: Columns) -> tuple[Any, Any]:
    for column in (columns.chosen, columns.rejected):
        if row.data.get(column) is None:
            raise DataError(f"{row.where}: missing column {column!r} (columns present: {sorted(row.data)})")
    chosen, rejected = row.data[columns.chosen], row.data[columns.rejected]
    if chosen == rejected:
        raise DataError(f"{row.where}: columns {columns.chosen!r} and {columns.rejected!r} are identical")
    return chosen, rejected


def comparison_of(
    row: Row, columns: Columns = Columns(), accepted: Iterable[Format] = COMPARISON_FORMATS
) -> Comparison:
    """The prompt and responses of a row, whatever its format, with the prompt made explicit.

    * preference, explicit prompt: ``prompt`` (text or conversation; a ``messages`` column is a conversational
      prompt too) and ``[chosen, rejected]``;
    * preference, implicit prompt: the common start of ``chosen``/``rejected`` and the rest of each
      (:func:`extract_prompt`), text or conversation alike;
    * K-wise ranking: ``prompt`` (or ``messages``, or ``None``) and the ``responses``;
    * prompt-completion: ``prompt`` and ``[completion]``; conversational language modelling: the conversation
      before its last turn, which must be the assistant's, and ``[that turn]`` (scoring one demonstration).

    Values are checked by the scorers that tokenize them (strings, message lists, emptiness).

    Raises:
        DataError: one line naming ``row.where``: a format not in ``accepted``, a missing half of a pair,
            identical responses, or nothing left of one after the shared prompt.
    """
    fmt = detect_format(row, columns, accepted)
    data = row.data
    if fmt is Format.IMPLICIT_PREFERENCE:
        prompt, chosen, rejected = extract_prompt(*_pair(row, columns), row.where, columns)
        return Comparison(prompt, [chosen, rejected], [columns.chosen, columns.rejected], fmt)
    if fmt is Format.MESSAGES:
        messages = validate_messages(data[columns.messages], row.where, columns.messages)
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise DataError(f"{row.where}: column {columns.messages!r} must end with an assistant turn after a prompt")
        return Comparison(messages[:-1], [messages[-1:]], [columns.messages], fmt)
    prompt = next((data[c] for c in (columns.prompt, columns.messages) if data.get(c) is not None), None)
    if fmt is Format.PREFERENCE:
        return Comparison(prompt, list(_pair(row, columns)), [columns.chosen, columns.rejected], fmt)
    if fmt is Format.PROMPT_COMPLETION:
        return Comparison(prompt, [data[columns.completion]], [columns.completion], fmt)
    if fmt is Format.RANKING:
        responses = data.get(columns.responses)
        if not isinstance(responses, list):
            raise DataError(f"{row.where}: column {columns.responses!r} must be a list of responses")
        return Comparison(prompt, list(responses), [f"{columns.responses}[{i}]" for i in range(len(responses))], fmt)
    raise DataError(f"{row.where}: a {columns.describe(fmt)} row holds no response to score")


#: the formats that hold one demonstration (a prompt and its answer)
DEMONSTRATION_FORMATS = (Format.PROMPT_COMPLETION, Format.MESSAGES)


def demonstration_of(
    row: Row, columns: Columns = Columns(), response_column: str | None = None
) -> tuple[str | Messages, str | Messages]:
    """``(prompt, response)`` of a demonstration row, checked: prompt-completion, standard (two strings) or
    conversational (two message lists), a ``messages`` conversation ending with the assistant's answer (the
    conversation before it is the prompt), or, when ``response_column`` is given and present, the pair
    ``{prompt, <response_column>}`` (lit_rlhf's scored pairs).

    Raises:
        DataError: one line naming ``row.where``: another format, a missing or empty prompt or response, or a
            standard prompt with a conversational response (or the reverse).
    """
    if response_column is not None and response_column in row.data:
        prompt = row.data.get(columns.prompt, row.data.get(columns.messages))
        response, prompt_name, response_name = row.data[response_column], columns.prompt, response_column
    else:
        pair = comparison_of(row, columns, DEMONSTRATION_FORMATS)
        (response,) = pair.responses
        prompt, response_name = pair.prompt, pair.names[0]
        prompt_name = columns.messages if pair.fmt is Format.MESSAGES else columns.prompt
    if prompt is None:
        raise DataError(f"{row.where}: missing column {columns.prompt!r} (columns present: {sorted(row.data)})")
    if isinstance(prompt, list) or isinstance(response, list):
        prompt = validate_messages(prompt, row.where, prompt_name)
        response = validate_messages(response, row.where, response_name)
        if not any(m["role"] == "assistant" for m in response):
            raise DataError(f"{row.where}: column {response_name!r} has no assistant turn")
        return prompt, response
    for name, value in ((prompt_name, prompt), (response_name, response)):
        if not isinstance(value, str):
            raise DataError(f"{row.where}: column {name!r} must be a string, got {type(value).__name__}")
    if not response.strip():
        raise DataError(f"{row.where}: column {response_name!r} is empty")
    return prompt, response
