"""The one tokenization path: prompts, prompt→completion pairs, chat conversations and reward-model sequences.

One rule for special tokens (docs/conventions.md#tokenization): a plain-text **prompt** is tokenized with the
tokenizer's special tokens (``add_special_tokens=True``: a BOS where the model uses one), a **completion** without
them and followed by the EOS the policy must learn to emit; a **chat** conversation is rendered by the tokenizer's
chat template, which writes its own special tokens, so its text is tokenized with ``add_special_tokens=False``.
SFT data, PPO prompts, PTX text, reward-model data and every sampler build their ids here, so the policy is
trained, sampled and scored on exactly the same tokens.

Reward-model sequences follow the model's family (docs/conventions.md#reward-model-input): a tokenizer with an
EOS (a decoder) gets ``prompt + response + EOS``, the score being read at that EOS; a tokenizer without one
(an encoder: BERT, DeBERTa, MiniLM) gets the text pair it was pretrained on, ``[CLS] prompt [SEP] response
[SEP]`` (its own special tokens, ``tokenizer(prompt, response)``). A chat sequence (:func:`reward_chat_ids`, the
one definition every scoring path goes through) is cut where PPO cuts it: the prompt rendered with the
generation prompt and the answer tokenized apart (the ids a policy samples after :func:`chat_prompt`'s), the
answer ending at the EOS that closes it, whatever the template writes after that EOS.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lit_rlhf.errors import DataError
from lit_rlhf.rlhf.losses import IGNORE_INDEX

#: the roles a chat conversation may hold; a template would happily render any other name
CHAT_ROLES = ("system", "user", "assistant")

Messages = list[dict[str, str]]

__all__ = [
    "ASSISTANT_TURNS",
    "CHAT_ROLES",
    "IGNORE_INDEX",
    "Messages",
    "chat_prompt",
    "has_generation_markers",
    "is_messages",
    "plain_text",
    "prompt_ids",
    "appends_eos",
    "chat_answer_ids",
    "end_at_eos",
    "reward_chat_ids",
    "reward_ids",
    "reward_prompt_length",
    "reward_text_ids",
    "tokenize_messages",
    "tokenize_prompt",
    "tokenize_prompt_completion",
    "tokenize_text",
    "validate_messages",
]


def is_messages(value: Any) -> bool:
    """Whether ``value`` has the shape of a chat conversation: a non-empty list of ``{role, content}`` dicts."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value)
    )


def validate_messages(value: Any, where: str, column: str = "messages") -> Messages:
    """``value`` as a conversation, or a :class:`~lit_rlhf.errors.DataError` naming the place, column and turn.

    Every turn needs a ``role`` among :data:`CHAT_ROLES` and a string ``content``.
    """
    if not is_messages(value):
        raise DataError(f"{where}: column {column!r} must be a list of {{'role', 'content'}} objects")
    for i, message in enumerate(value):
        if message["role"] not in CHAT_ROLES:
            raise DataError(
                f"{where}: column {column!r}, turn {i}: unknown role {message['role']!r} "
                f"(expected one of {', '.join(CHAT_ROLES)})"
            )
        if not isinstance(message["content"], str):
            raise DataError(
                f"{where}: column {column!r}, turn {i}: 'content' must be a string, "
                f"got {type(message['content']).__name__}"
            )
    return value


def appends_eos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` ends with the EOS by itself: the tokenizer of a reward-model export does
    (docs/conventions.md#reward-model-export), so that plain ``transformers`` scores what lit_rlhf scores.

    Probed once per tokenizer and remembered on it.
    """
    cached = getattr(tokenizer, "_lit_rlhf_appends_eos", None)
    if cached is None:
        eos = tokenizer.eos_token_id
        probe = "a"
        with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
        without = tokenizer(probe, add_special_tokens=False)["input_ids"]
        cached = eos is not None and bool(with_special) and with_special[-1] == eos and without[-1:] != [eos]
        tokenizer._lit_rlhf_appends_eos = cached
    return cached


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a plain-text prompt, with the tokenizer's special tokens (a BOS where it uses one).

    An EOS that the tokenizer appends by itself (:func:`appends_eos`) is left out: a prompt is continued, not
    ended, and lit_rlhf appends the EOS of a response itself.
    """
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if ids and appends_eos(tokenizer) and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


def tokenize_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of plain text + EOS (pretraining-style data) and labels equal to them: every token supervised."""
    ids = prompt_ids(tokenizer, text) + [tokenizer.eos_token_id]
    return ids, list(ids)


def _completion_ids(tokenizer, completion: str) -> list[int]:
    return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + completion + EOS`` and labels that are ``-100`` on the prompt.

    Prompt and completion are tokenized separately, exactly as a policy later sees them (it generates after
    the prompt's tokens), and the EOS is supervised so the model learns to stop.
    """
    ids = prompt_ids(tokenizer, prompt)
    completion = _completion_ids(tokenizer, completion)
    return ids + completion, [IGNORE_INDEX] * len(ids) + completion


def _render(tokenizer, messages: Messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


#: which assistant turns of a conversation :func:`tokenize_messages` supervises: every one, or the final one only
ASSISTANT_TURNS = ("all", "last")

#: a ``{% generation %}`` tag (TRL's assistant-mask markers), matched as transformers detects it
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks assistant text with ``{% generation %}`` ...
    ``{% endgeneration %}`` blocks, from which transformers computes an assistant-token mask."""
    try:
        template = tokenizer.get_chat_template()
    except (AttributeError, ValueError):  # no template, or several without a default: rendering fails anyway
        return False
    return bool(_GENERATION_TAG.search(template))


def _remedies(tokenizer) -> str:
    fast = "" if getattr(tokenizer, "is_fast", False) else " and a fast tokenizer (transformers needs one for it)"
    return (
        "use a chat template with {% generation %} ... {% endgeneration %} around each assistant answer, as TRL's "
        f"training templates have{fast} (save the tokenizer with it and point the model's `tokenizer:` at that "
        "folder), or supervise the final assistant turn only (`assistant_turns: last` of the SFT data); "
        "see docs/conventions.md#assistant-masks"
    )


def _generation_mask(tokenizer, messages: Messages, input_ids: list[int], where: str) -> list[bool]:
    """The assistant mask transformers computes from the template's ``{% generation %}`` blocks (one flag per
    token of ``input_ids``: a token overlapping a block is an assistant token).

    transformers tokenizes the rendered text with ``add_special_tokens=False``, as :func:`_chat_ids` does, so its
    ids are the ones every stage uses; they are compared anyway, since the mask is only valid for those ids.
    """
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, add_generation_prompt=False
    )
    if list(out["input_ids"]) != input_ids:
        raise DataError(
            f"{where}: transformers' assistant mask is for other token ids than the rendered conversation "
            "tokenized without special tokens; cannot use the template's {% generation %} markers"
        )
    return [bool(flag) for flag in out["assistant_masks"]]


def _last_run(mask: list[bool]) -> list[bool]:
    """``mask`` with only its last run of ``True`` kept: the final assistant block, since a template separates
    two answers by tokens of its own (a turn header) that no ``{% generation %}`` block covers."""
    end = max((i + 1 for i, flag in enumerate(mask) if flag), default=0)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [start <= i < end for i in range(len(mask))]


def _span_mask(
    tokenizer, messages: Messages, text: str, input_ids: list[int], turns: list[int], where: str, column: str
) -> list[bool]:
    """Assistant flags of ``input_ids`` (the ids of ``text``, the whole conversation rendered) by the span rule:
    turn ``i`` is the tokens between the rendering of ``messages[:i]`` with the generation prompt and that of
    ``messages[:i + 1]``.

    The rule holds only if both renderings are prefixes of ``text``, in characters and in tokens; a template
    that rewrites earlier turns (Qwen3 and DeepSeek-R1 drop the reasoning of answers before the last user turn)
    breaks it, and the span would cover other turns' tokens, so that is checked for every turn.
    """
    mask = [False] * len(input_ids)
    for i in turns:
        place = f"{where}: column {column!r}, turn {i} (assistant)"
        if i == 0:
            raise DataError(
                f"{place}: the conversation starts with an assistant turn, which has no prompt to answer; "
                f"its span cannot be found by rendering the turns before it: {_remedies(tokenizer)}"
            )
        prefix = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[: i + 1], False)
        if not text.startswith(upto):
            raise DataError(
                f"{place}: the chat template rewrites earlier turns: the conversation rendered up to this turn is "
                "not the start of the whole conversation rendered, so the span of this turn would cover tokens of "
                f"other turns: {_remedies(tokenizer)}"
            )
        if not upto.startswith(prefix):
            raise DataError(
                f"{place}: the chat template renders the turns before this one, with the generation prompt, as "
                "something other than the start of this turn (it rewrites earlier turns, or its generation prompt "
                f"is not how it opens an assistant turn), so the span of this turn is unknown: {_remedies(tokenizer)}"
            )
        start_ids, upto_ids = _chat_ids(tokenizer, prefix), _chat_ids(tokenizer, upto)
        start, end = len(start_ids), len(upto_ids)
        if input_ids[:start] != start_ids or input_ids[:end] != upto_ids:
            raise DataError(
                f"{place}: the rendered text is a prefix but its tokens are not: the tokenizer merges characters "
                f"across the boundary of this turn, so its span is not a whole number of tokens: {_remedies(tokenizer)}"
            )
        if end <= start:
            raise DataError(f"{place}: the chat template writes no token for this assistant turn")
        mask[start:end] = [True] * (end - start)
    return mask


def tokenize_messages(
    tokenizer, messages: Any, where: str, column: str = "messages", assistant_turns: str = "all"
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation rendered with the chat template, and labels equal to them on the assistant
    turns' tokens, ``-100`` elsewhere (docs/conventions.md#assistant-masks).

    * A template with ``{% generation %}`` markers (TRL's convention) and a fast tokenizer: the assistant mask
      transformers computes from them (``return_assistant_tokens_mask``). This is the only way for a template
      that rewrites earlier turns.
    * Any other template: the span rule, each assistant turn being the tokens between the conversation before it
      rendered with the generation prompt and the conversation up to it rendered. Every span is checked to be a
      prefix of the whole rendering; a :class:`~lit_rlhf.errors.DataError` naming ``where``, the column and the
      turn says when it is not, instead of supervising other turns.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        messages: the conversation (validated by :func:`validate_messages`).
        where: ``file:row`` of the conversation, for errors.
        column: its column, for errors.
        assistant_turns: ``all`` supervises every assistant turn; ``last`` the final one only (the right
            target for a template that rewrites earlier turns: they are not rendered as the model wrote them).
    """
    if assistant_turns not in ASSISTANT_TURNS:
        raise ValueError(f"assistant_turns must be one of {', '.join(ASSISTANT_TURNS)}, got {assistant_turns!r}")
    messages = validate_messages(messages, where, column)
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not turns:
        raise DataError(f"{where}: conversation has no assistant turn to learn from")
    text = _render(tokenizer, messages, False)
    input_ids = _chat_ids(tokenizer, text)
    if has_generation_markers(tokenizer) and getattr(tokenizer, "is_fast", False):
        mask = _generation_mask(tokenizer, messages, input_ids, where)
        if assistant_turns == "last":
            mask = _last_run(mask)
        if not any(mask):
            raise DataError(
                f"{where}: column {column!r}: the chat template's {{% generation %}} blocks mark no token of this "
                "conversation"
            )
    else:
        supervised = turns[-1:] if assistant_turns == "last" else turns
        mask = _span_mask(tokenizer, messages, text, input_ids, supervised, where, column)
    labels = [token if flag else IGNORE_INDEX for token, flag in zip(input_ids, mask)]
    return input_ids, labels


def chat_prompt(tokenizer, messages: Any, where: str, column: str = "messages") -> tuple[str, list[int]]:
    """``(text, ids)`` of a conversation to be answered: rendered with the generation prompt (the opening of an
    assistant turn), so the policy answers as the assistant. It must not end with an assistant turn."""
    messages = validate_messages(messages, where, column)
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: the conversation ends with an assistant turn; a prompt must not")
    text = _render(tokenizer, messages, True)
    return text, _chat_ids(tokenizer, text)


def tokenize_prompt(tokenizer, prompt: str | Messages, where: str, column: str = "prompt") -> tuple[str, list[int]]:
    """``(text, ids)`` of a prompt to sample from: plain text exactly as in SFT data, or a chat conversation
    (:func:`chat_prompt`)."""
    if isinstance(prompt, list):
        return chat_prompt(tokenizer, prompt, where, column)
    if not isinstance(prompt, str):
        raise DataError(f"{where}: column {column!r} must be a string or a message list, got {type(prompt).__name__}")
    return prompt, prompt_ids(tokenizer, prompt)


def reward_text_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """Token ids of a prompt/response pair as the reward model reads them.

    * Tokenizer with an EOS (decoder RM): ``prompt + response + EOS``, the same ids SFT trains on and PPO
      samples, so the score is read at the same EOS in training and in PPO.
    * Tokenizer without an EOS (encoder RM): the text pair with the tokenizer's own special tokens,
      ``tokenizer(prompt, response)``, e.g. ``[CLS] prompt [SEP] response [SEP]`` (what BERT-like models are
      pretrained on; the score is their pooled sequence-classification output).
    """
    if tokenizer.eos_token_id is None:
        return tokenizer(prompt, response, add_special_tokens=True)["input_ids"]
    return tokenize_prompt_completion(tokenizer, prompt, response)[0]


def plain_text(messages: Messages) -> str:
    """A conversation as its turns' text, one per line: what a reader without a chat template (an encoder reward
    model, a positional ``fn(prompts, responses)``) gets."""
    return "\n".join(m["content"] for m in messages)


def chat_answer_ids(
    tokenizer, prompt_messages: Messages, answer_messages: Messages
) -> tuple[list[int], list[int]] | None:
    """``(prompt ids, answer ids)`` of a conversation cut where a policy starts answering, or ``None`` when the
    template has no such place.

    The prompt is ``prompt_messages`` rendered with the generation prompt, tokenized on its own: exactly the
    ids :func:`chat_prompt` gives PPO to sample from. The answer is the rest of the rendering of the whole
    conversation, tokenized on its own: the ids a policy writes after those prompt ids (with what the template
    puts after the answer's EOS, which :func:`reward_chat_ids` cuts). Tokenizing the whole rendering at once
    would not do: a BPE may merge across the boundary (a prompt ending ``"\\n\\n"`` is one token on its own
    but ``"\\n", "\\n"`` before the answer's first word), and its prefix would not be the ids PPO samples after.

    ``None``: the rendering of the conversation does not begin with the rendering of its prompt (a template
    that closes a conversation otherwise than it opens an answer, e.g. one EOS after the last turn whoever
    wrote it): no policy sampling after that prompt writes this sequence.
    """
    prompt_text = _render(tokenizer, prompt_messages, True)
    full = _render(tokenizer, prompt_messages + answer_messages, False)
    if not full.startswith(prompt_text):
        return None
    return _chat_ids(tokenizer, prompt_text), _chat_ids(tokenizer, full[len(prompt_text) :])


def end_at_eos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` up to and including their last EOS (what a template writes after the EOS closing the final
    answer, ChatML's ``"\\n"``, is cut), or with an EOS appended when they hold none; unchanged for a tokenizer
    without EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        return list(ids)
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == eos:
            return list(ids[: i + 1])
    return list(ids) + [eos]


def reward_chat_ids(tokenizer, prompt_messages: Messages, response_messages: Messages) -> list[int]:
    """Token ids of a conversation as the reward model reads it: **the** definition of a chat RM sequence
    (docs/conventions.md#reward-model-input), used by RM training, ``predict``, normalisation, PPO's
    re-encoding path, evaluation and the export's model card.

    With a chat template: ``prompt ids + answer ids`` of :func:`chat_answer_ids`, the answer ending at the EOS
    that closes it (:func:`end_at_eos`). These are the ids a policy samples after :func:`chat_prompt`'s ids, up
    to its first EOS, so a reward model sharing the policy's vocabulary and template scores PPO's sequences as
    they are, at the token it was trained on, whatever the template writes after its EOS. A template without
    such a place (``chat_answer_ids`` is ``None``) can only belong to a reward model that re-encodes what it
    scores (:meth:`~lit_rlhf.hf.reward.RewardScorer.shares_tokens` compares templates): its sequence is the
    whole rendering, tokenized at once, without trailing whitespace and ending with EOS. Without a template
    (most encoders): the turns' contents joined by newlines, prompt and response as a pair
    (:func:`reward_text_ids`).
    """
    if not getattr(tokenizer, "chat_template", None):
        return reward_text_ids(tokenizer, plain_text(prompt_messages), plain_text(response_messages))
    split = chat_answer_ids(tokenizer, prompt_messages, response_messages)
    if split is None:
        # only layout (whitespace) may follow the final EOS here: an EOS the answer does not end with is appended
        ids = _chat_ids(tokenizer, _render(tokenizer, prompt_messages + response_messages, False).rstrip())
        eos = tokenizer.eos_token_id
        return ids if eos is None or ids[-1:] == [eos] else ids + [eos]
    prompt, answer = split
    return prompt + end_at_eos(tokenizer, answer)


def reward_ids(tokenizer, prompt: str | Messages, response: str) -> list[int]:
    """Reward-model ids of a response to a plain-text prompt or to a chat conversation (whose answer is one
    assistant turn): :func:`reward_text_ids` or :func:`reward_chat_ids`."""
    if isinstance(prompt, list):
        return reward_chat_ids(tokenizer, prompt, [{"role": "assistant", "content": response}])
    return reward_text_ids(tokenizer, prompt, response)


def reward_prompt_length(tokenizer, prompt: str | Messages) -> int:
    """Number ``P`` of leading prompt tokens of :func:`reward_text_ids` / :func:`reward_chat_ids` (the response,
    EOS included, is ``ids[P:]``): a plain prompt's :func:`prompt_ids`; a conversation rendered with the
    generation prompt, as the policy sees it before answering (the span rule of :func:`tokenize_messages`).
    For a tokenizer without EOS (an encoder, whose input is a text pair) the first segment of the pair."""
    if tokenizer.eos_token_id is None:
        text = plain_text(prompt) if isinstance(prompt, list) else prompt
        return len(tokenizer(text, add_special_tokens=True)["input_ids"])
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            return len(prompt_ids(tokenizer, plain_text(prompt)))
        return len(_chat_ids(tokenizer, _render(tokenizer, prompt, True)))
    return len(prompt_ids(tokenizer, prompt))


def batch_prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """:func:`prompt_ids` of every plain-text prompt."""
    return [prompt_ids(tokenizer, p) for p in prompts]
