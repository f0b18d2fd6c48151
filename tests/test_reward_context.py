"""Reward functions with context (docs/conventions.md#reward-functions): TRL's keyword convention, the row's other
columns aligned with the responses, and the older positional ``fn(prompts, responses)``."""

from __future__ import annotations

import pytest

from lit_rlhf.datamodules.base import write_jsonl
from lit_rlhf.datamodules.prompts import PromptDataModule
from lit_rlhf.imports import call_reward_fn, takes_reward_keywords

CHAT = [{"role": "user", "content": "2+2?"}]


def exact_match(completions, answer, **kwargs):
    text = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(t.strip() == a) for t, a in zip(text, answer, strict=True)]


def positional(prompts, responses):
    return [len(p) + 10 * len(r) for p, r in zip(prompts, responses, strict=True)]


def test_keyword_function_gets_messages_completions_and_aligned_columns():
    seen = {}

    def fn(prompts, completions, completion_ids, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, answer=answer, rest=kwargs)
        return [1.0, 2.0, 3.0]

    scores = call_reward_fn(
        fn,
        prompts=["rendered chat", "plain a", "plain b"],
        responses=["4", "x", "y"],
        messages=[CHAT, None, None],
        completion_ids=[[5, 2], [7, 2], [8, 2]],
        columns=[{"answer": "4", "level": 1}, {"answer": "x"}, {"answer": "z", "level": 3}],
    )
    assert scores == [1.0, 2.0, 3.0]
    assert seen["prompts"] == [CHAT, "plain a", "plain b"]
    assert seen["completions"] == [[{"role": "assistant", "content": "4"}], "x", "y"]
    assert seen["ids"] == [[5, 2], [7, 2], [8, 2]]
    assert seen["answer"] == ["4", "x", "z"]
    assert seen["rest"] == {"level": [1, None, 3]}  # a column a row lacks is None there


def test_function_without_kwargs_gets_only_the_columns_it_names():
    scores = call_reward_fn(
        lambda completions, answer: [float(c == a) for c, a in zip(completions, answer, strict=True)],
        prompts=["p", "q"],
        responses=["4", "5"],
        columns=[{"answer": "4", "other": 0}, {"answer": "4", "other": 1}],
    )
    assert scores == [1.0, 0.0]


def test_positional_functions_keep_working_and_wrong_counts_are_refused():
    assert not takes_reward_keywords(positional) and takes_reward_keywords(exact_match)
    assert call_reward_fn(positional, ["ab", "c"], ["x", "yz"]) == [12.0, 21.0]
    with pytest.raises(ValueError, match="returned 1 scores for 2 responses"):
        call_reward_fn(lambda prompts, responses: [0.0], ["a", "b"], ["x", "y"])


def test_prompt_batches_carry_conversational_prompts_and_other_columns(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": [{"role": "user", "content": "The phone was"}], "answer": "great"},
        {"prompt": "The film was", "answer": "bad"},
    ]
    data = PromptDataModule(str(write_jsonl(tmp_path / "p.jsonl", rows)), batch_size=2, val_fraction=0.0)
    data.tokenizer = tiny_tokenizer
    examples = data.build_examples(data.read_splits()[0], "p.jsonl")
    by_answer = {e["columns"]["answer"]: e for e in examples}
    chat_text = tiny_tokenizer.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert by_answer["great"]["messages"] == rows[0]["prompt"]
    assert by_answer["great"]["input_ids"] == tiny_tokenizer(chat_text, add_special_tokens=False)["input_ids"]
    assert by_answer["bad"]["messages"] is None and by_answer["bad"]["prompt"] == "The film was"
    batch = data.collate(examples)
    assert [c["answer"] for c in batch["prompt_columns"]] == [e["columns"]["answer"] for e in examples]
    scores = call_reward_fn(
        exact_match,
        batch["prompts"],
        ["great", "good"],
        messages=batch["prompt_messages"],
        columns=batch["prompt_columns"],
    )
    assert scores == [float(r == e["columns"]["answer"]) for r, e in zip(["great", "good"], examples, strict=True)]
