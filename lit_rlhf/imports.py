"""Importing a Python callable named in YAML or on the command line (e.g. a rule-based reward function)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

#: a rule-based score: ``fn(prompts=, completions=, completion_ids=, **columns)`` or the older
#: ``fn(prompts, responses)``, one score per response (a list or a tensor ``[N]``); see :func:`call_reward_fn`
RewardFn = Callable[..., "Sequence[float] | torch.Tensor"]


def import_callable(path: str) -> Callable:
    """Import ``"package.module:function"`` (or ``"package.module.function"``).

    Raises:
        ValueError: the path is malformed, cannot be imported, or does not name a callable.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path!r} must look like 'package.module:function' or 'package.module.function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {path!r}: {err}") from err
    if not callable(fn):
        raise ValueError(f"{path!r} is not callable")
    return fn


def resolve_reward_fn(fn: str | RewardFn) -> RewardFn:
    """A reward function given as ``"package.module:function"`` (YAML, command line) or as the callable itself
    (Python; jsonargparse passes either, and dumps a callable back to its import path)."""
    return import_callable(fn) if isinstance(fn, str) else fn


#: the argument names of the keyword convention that a dataset column cannot override
RESERVED_REWARD_ARGS = ("prompts", "completions", "completion_ids")


def takes_reward_keywords(fn: Callable) -> bool:
    """Whether ``fn`` follows the keyword convention (``fn(prompts=, completions=, completion_ids=, **columns)``,
    docs/conventions.md#reward-functions): it accepts ``**kwargs`` or a parameter named ``completions``.
    Otherwise it is called positionally as ``fn(prompts, responses)``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the old positional call
        return False
    return any(p.kind is p.VAR_KEYWORD or p.name == "completions" for p in params)


def call_reward_fn(
    fn: Callable,
    prompts: Sequence[str],
    responses: Sequence[str],
    messages: Sequence[list[dict] | None] | None = None,
    completion_ids: Sequence[Sequence[int]] | None = None,
    columns: Sequence[Mapping[str, Any]] | None = None,
) -> list[float]:
    """Scores ``[N]`` of ``N`` responses by a rule-based reward function, called the one way every caller uses
    (PPO, critic-free, evaluation, labelling, RolloutScorer; docs/conventions.md#reward-functions).

    Args:
        fn: the reward function.
        prompts: the ``N`` prompt texts (plain prompts as written in the data).
        responses: the ``N`` decoded responses (special tokens removed, cut after the first EOS).
        messages: per response, its prompt's chat conversation, or ``None`` for a plain prompt.
        completion_ids: per response, its token ids (up to and with the EOS).
        columns: per response, the other columns of its prompt's row (``{name: value}``).

    A keyword-convention function (:func:`takes_reward_keywords`) gets ``prompts`` (the message list of a chat
    row, else the text), ``completions`` (``[{"role": "assistant", "content": text}]`` for a chat row, else
    the text), ``completion_ids`` and every other column as a list aligned with the responses (``None`` where
    a row lacks it); a function without ``**kwargs`` gets only the columns it names. An older function gets
    ``fn(prompts, responses)``.

    Raises:
        ValueError: the function did not return one score per response.
    """
    n = len(responses)
    if not takes_reward_keywords(fn):
        scores = fn(list(prompts), list(responses))
    else:
        chats = list(messages) if messages is not None else [None] * n
        kwargs: dict[str, Any] = {
            "prompts": [m if m is not None else p for p, m in zip(prompts, chats, strict=True)],
            "completions": [
                [{"role": "assistant", "content": r}] if m is not None else r
                for r, m in zip(responses, chats, strict=True)
            ],
            "completion_ids": [list(ids) for ids in completion_ids] if completion_ids is not None else None,
        }
        rows = list(columns) if columns is not None else [{}] * n
        names = dict.fromkeys(name for row in rows for name in row if name not in RESERVED_REWARD_ARGS)
        params = inspect.signature(fn).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            names = {name: None for name in names if name in params}
            kwargs = {k: v for k, v in kwargs.items() if k in params}
        kwargs.update({name: [row.get(name) for row in rows] for name in names})
        scores = fn(**kwargs)
    scores = torch.as_tensor(scores, dtype=torch.float32).flatten().tolist()
    if len(scores) != n:
        raise ValueError(f"the reward function returned {len(scores)} scores for {n} responses")
    return scores
