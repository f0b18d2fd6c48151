"""Ranking tasks for labellers: sample K responses per prompt from a policy, rank them by a judge or by hand.

A ranking task file is JSON Lines in the K-wise format :class:`~lit_rlhf.datamodules.PreferenceDataModule`
reads, with the ranking still empty::

    {"prompt": "The movie was", "responses": [" great.", " dull.", ...], "ranking": [],
     "sampling": {"policy": "runs/.../export", "seed": 0, "temperature": 1.0, "max_new_tokens": 32, "k": 4}}

``ranking`` lists response indices from best to worst; an element may be a list of tied indices
(``[2, [0, 3], 1]``). The prompts may be in any format that holds one (docs/data.md), text or conversation;
the prompt row's other columns (an ``answer``, ...) are kept in the task row, and a Python judge gets them as
keyword arguments (docs/conventions.md#reward-functions). A judge fills the ranking in
(:func:`label_ranking_task`: a reward-model export or a reward function), or people do and
:func:`read_rankings` checks their work, naming the ``file:line`` of a ranking of the wrong length or one
naming a response that is not there.

Command line::

    python -m lit_rlhf.labelling sample --policy runs/quickstart/sft/export \\
        --prompts runs/quickstart/data/prompts/train.jsonl --output task.jsonl --k 4 --seed 0
    python -m lit_rlhf.labelling label --task task.jsonl --output ranked.jsonl \\
        --reward_fn lit_rlhf.quickstart.task:gold_scores      # or --reward_model runs/quickstart/rm/export
    python -m lit_rlhf.labelling check --path ranked.jsonl  # validate rankings written by people
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lit_rlhf.datamodules.base import Row, read_rows, warn_dropped, write_jsonl
from lit_rlhf.datamodules.preference import parse_ranking
from lit_rlhf.datamodules.prompts import PromptRow, read_prompt_rows, row_prompt
from lit_rlhf.errors import DataError
from lit_rlhf.evaluation import as_prompt_row, load_frozen, sample
from lit_rlhf.hf.engines import RolloutEngine
from lit_rlhf.hf.scorers import load_scorer
from lit_rlhf.hf.tokenization import Messages
from lit_rlhf.imports import RewardFn

Ranking = list[int | list[int]]


#: columns of a task row that the task itself writes, and the response/label columns of a source row that a
#: ranking row must not carry (a ``margin`` or a ``chosen`` would change what the K-wise row means)
TASK_COLUMNS = ("prompt", "responses", "ranking", "sampling", "judge")
SOURCE_RESPONSE_COLUMNS = ("completion", "chosen", "rejected", "margin", "label", "responses", "ranking")


def read_prompts(source: str, limit: int | None = None) -> list[PromptRow]:
    """The prompts of a file, ``save_to_disk`` folder or hub dataset (the first ``limit`` rows), in any format
    that holds a prompt, with their rows' other columns (:func:`~lit_rlhf.datamodules.prompts.read_prompt_rows`)."""
    return read_prompt_rows(source, limit=limit)


def group_responses(prompts: Sequence[Any], responses: Sequence[str], k: int) -> list[tuple[Any, list[str]]]:
    """``(prompt, distinct non-empty responses)`` per prompt, from ``k`` consecutive samples of each prompt.

    Duplicates and blank responses are dropped because the K-wise format refuses them (an identical pair
    carries no comparison); prompts left with fewer than two responses are dropped entirely.
    """
    grouped = []
    for start in range(0, len(prompts), k):
        distinct = list(dict.fromkeys(r for r in responses[start : start + k] if r.strip()))
        if len(distinct) >= 2:
            grouped.append((prompts[start], distinct))
    return grouped


def write_ranking_task(
    policy: str,
    prompts: str | list[str | Messages | PromptRow],
    output: str,
    k: int = 4,
    num_prompts: int | None = None,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    engine: RolloutEngine | None = None,
) -> Path:
    """Sample ``k`` responses per prompt from ``policy`` and write them as a ranking task (ranking empty).

    Args:
        policy: Hugging Face folder or hub id of the policy to sample from.
        prompts: a list of prompts (texts, conversations or rows), or a file/dataset in any format that holds
            a prompt (docs/data.md); a row's other columns are kept in its task row (except a source row's own
            responses and labels: ``completion``, ``chosen``, ``rejected``, ``margin``, ``label``).
        output: the ``.jsonl`` task file to (over)write.
        k: responses sampled per prompt (duplicates are dropped, so a row holds 2..k responses).
        num_prompts: use only the first ``num_prompts`` prompts (``None``: all).
        max_new_tokens: response length cap.
        temperature: sampling temperature (pure ancestral sampling, as in PPO).
        batch_size: sequences per ``generate`` call.
        seed: sampling seed; recorded in every row with the other settings.
        engine: where responses come from (:class:`~lit_rlhf.hf.engines.RolloutEngine`); default
            :class:`~lit_rlhf.hf.engines.HFEngine`. Closed at the end.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2 to rank anything, got {k}")
    if isinstance(prompts, str):
        prompts = read_prompts(prompts, num_prompts)
    else:
        prompts = [as_prompt_row(p) for p in list(prompts)[:num_prompts]]
    model, tokenizer = load_frozen(policy)
    repeated = [p.prompt for p in prompts for _ in range(k)]
    # one random stream over the batches, as labelling has always sampled (its tasks stay reproducible)
    samples = sample(
        model, tokenizer, repeated, max_new_tokens, temperature, batch_size, seed, engine, seed_each_batch=False
    )
    if engine is not None:
        engine.close()
    settings = {"policy": policy, "seed": seed, "temperature": temperature, "max_new_tokens": max_new_tokens, "k": k}
    grouped = group_responses(range(len(repeated)), samples.responses, k)
    rows = []
    for start, responses in grouped:
        source = prompts[start // k]
        kept = {c: v for c, v in source.columns.items() if c not in (*TASK_COLUMNS, *SOURCE_RESPONSE_COLUMNS)}
        rows.append({"prompt": source.prompt, **kept, "responses": responses, "ranking": [], "sampling": settings})
    if not rows:
        raise ValueError(f"{policy}: no prompt got two distinct non-empty responses out of {k}")
    warn_dropped(len(prompts) - len(rows), len(prompts), output, f"fewer than 2 distinct responses out of {k}")
    return write_jsonl(output, rows)


def ranking_from_scores(scores: Sequence[float]) -> Ranking:
    """Response indices best to worst; equal scores form a tie group (an arbitrary order would be a false label)."""
    ranking: Ranking = []
    for score in sorted(set(scores), reverse=True):
        group = [i for i, s in enumerate(scores) if s == score]
        ranking.append(group[0] if len(group) == 1 else group)
    return ranking


def judge_scores(
    prompts: list[str | Messages],
    responses: list[str],
    reward_model: str | None,
    reward_fn: str | RewardFn | None,
    batch_size: int = 32,
    columns: list[dict[str, Any]] | None = None,
) -> list[float]:
    """Scores of ``prompt + response`` pairs by exactly one judge (:func:`~lit_rlhf.hf.scorers.load_scorer`): a
    reward-model export, tokenized as in its training with its own tokenizer (an encoder's text pair included),
    or a ``reward_fn``, called as in PPO (:func:`~lit_rlhf.imports.call_reward_fn`, with each prompt row's other
    ``columns``; a positional ``fn(prompts, responses)`` gets a conversation as its turns' text, one per line)."""
    if (reward_model is None) == (reward_fn is None):
        raise ValueError("label with exactly one judge: `reward_model` (an export) or `reward_fn` (an import path)")
    scorer = load_scorer(reward_model, reward_fn, batch_size=batch_size)
    return scorer.score_texts(prompts, responses, columns=columns).cpu().tolist()


def label_ranking_task(
    task: str,
    output: str,
    reward_model: str | None = None,
    reward_fn: str | RewardFn | None = None,
    batch_size: int = 32,
) -> Path:
    """Rank every row of a task file by a judge and write the labelled copy (``judge`` field added).

    Args:
        task: a ranking task file (:func:`write_ranking_task`).
        output: the labelled ``.jsonl`` to (over)write.
        reward_model: reward-model export to rank by (normalised scores; higher is better).
        reward_fn: or ``package.module:function`` (or a callable), called with the task row's other columns
            (docs/conventions.md#reward-functions).
        batch_size: sequences per reward-model forward pass.
    """
    rows, prompts, columns = [], [], []
    for row in read_rows(task):
        _, prompt = _task_prompt(row)
        responses = _responses(row)
        others = {c: v for c, v in row.data.items() if c not in TASK_COLUMNS}
        prompts += [prompt] * len(responses)
        columns += [others] * len(responses)
        rows.append(row.data)
    flat = [response for row in rows for response in row["responses"]]
    scores = iter(judge_scores(prompts, flat, reward_model, reward_fn, batch_size, columns))
    judge = reward_model or (
        reward_fn if isinstance(reward_fn, str) else getattr(reward_fn, "__qualname__", "reward_fn")
    )
    labelled = [
        {**row, "ranking": ranking_from_scores([next(scores) for _ in row["responses"]]), "judge": judge}
        for row in rows
    ]
    return write_jsonl(output, labelled)


def _task_prompt(row: Row) -> tuple[str | None, str | Messages]:
    """The prompt of a task row (a ``prompt`` text or conversation, or a ``messages`` conversation)."""
    return row_prompt(row)


def _responses(row: Row) -> list[Any]:
    responses = row.data.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f"{row.where}: column 'responses' must be a list of at least 2 responses")
    return responses


def read_rankings(path: str) -> list[dict[str, Any]]:
    """Read a ranked task file (by a judge or by people) and validate every ranking.

    Raises:
        DataError: naming ``file:line`` for a row still unranked, a ranking of the wrong length, an index
            that is not a response of the row, a response listed twice or a malformed row.
    """
    rows = read_rows(path)
    for row in rows:
        _task_prompt(row)
        responses = _responses(row)
        if row.data.get("ranking") in (None, []):
            raise DataError(f"{row.where}: not ranked yet (column 'ranking' is empty)")
        parse_ranking(row.data["ranking"], len(responses), row.where, "ranking")  # the datamodule's own check
    return [row.data for row in rows]


def check(path: str) -> None:
    """Validate a ranked file and print how many rows and comparisons it holds."""
    rows = read_rankings(path)
    print(f"{path}: {len(rows)} ranked prompts, {sum(len(r['responses']) for r in rows)} responses, all valid")


def main(args: list[str] | None = None) -> None:
    """``python -m lit_rlhf.labelling {sample,label,check}``: the arguments of each function."""
    from jsonargparse import auto_cli

    commands = {"sample": write_ranking_task, "label": label_ranking_task, "check": check}
    auto_cli(commands, args=args, as_positional=False)


if __name__ == "__main__":
    from lit_rlhf.errors import run_command

    run_command(main)
