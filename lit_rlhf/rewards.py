"""Reusable rule-based ("verifiable") rewards, for ``reward.fn`` and every other Python judge.

They follow TRL's keyword convention (docs/conventions.md#reward-functions): ``completions`` are strings for a
standard prompt and ``[{"role": "assistant", "content": text}]`` for a conversational one, and every other
column of the prompt's row comes as a keyword argument, a list aligned with the completions.
"""

from __future__ import annotations

from typing import Any

__all__ = ["completion_text", "exact_match"]


def completion_text(completion: str | list[dict[str, str]]) -> str:
    """The text of a completion: the string itself, or the content of a conversational completion's last turn."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def exact_match(completions: list[Any], answer: list[Any], **kwargs: Any) -> list[float]:
    """``1.0`` where a completion, stripped of surrounding whitespace, equals its row's ``answer`` column (also
    stripped; a number is compared as its text, so ``4`` matches ``"4"``), else ``0.0``.

    Args:
        completions: ``N`` completions, standard or conversational.
        answer: the ``answer`` column of each completion's prompt row.
        **kwargs: the other arguments and columns (unused).

    Raises:
        ValueError: naming the completion whose row has no ``answer``.
    """
    scores = []
    for i, (completion, expected) in enumerate(zip(completions, answer, strict=True)):
        if expected is None:
            raise ValueError(f"exact_match: the prompt row of completion {i} has no 'answer' column")
        scores.append(float(completion_text(completion).strip() == str(expected).strip()))
    return scores
