"""Tests of the quickstart's synthetic review task and its VADER gold judge."""

from __future__ import annotations

import json
import random
import re
import statistics

import pytest

from lit_rlhf.quickstart import task


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z\s]", " ", text.lower()).split()


def _vocab(texts: list[str]) -> set[str]:
    return {word for text in texts for word in _words(text)}


# ---------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: task.make_prompts(50, seed),
        lambda seed: task.sft_examples(50, seed),
        lambda seed: task.ranking_examples(30, seed),
        lambda seed: task.prompt_examples(50, seed),
        lambda seed: task.corpus(seed, n=50),
    ],
    ids=["make_prompts", "sft_examples", "ranking_examples", "prompt_examples", "corpus"],
)
def test_generators_are_deterministic(make):
    assert make(0) == make(0)
    assert make(0) != make(1)


def test_make_response_is_deterministic_given_rng():
    a = [task.make_response(random.Random(7), s) for s in task.SENTIMENTS]
    b = [task.make_response(random.Random(7), s) for s in task.SENTIMENTS]
    assert a == b


def test_write_quickstart_data_is_deterministic(tmp_path):
    kwargs = dict(n_sft_train=20, n_sft_val=5, n_rank_train=10, n_rank_val=5, n_prompts_train=8, n_prompts_eval=4)
    first = task.write_quickstart_data(tmp_path / "a", seed=3, **kwargs)
    second = task.write_quickstart_data(tmp_path / "b", seed=3, **kwargs)
    other = task.write_quickstart_data(tmp_path / "c", seed=4, **kwargs)
    assert all(first[k].read_bytes() == second[k].read_bytes() for k in first)
    assert any(first[k].read_bytes() != other[k].read_bytes() for k in first)


# ------------------------------------------------------------------------------------------------ language


@pytest.mark.parametrize("sentiment", task.SENTIMENTS)
def test_responses_are_short_sentences_with_leading_space(sentiment):
    rng = random.Random(0)
    for _ in range(200):
        response = task.make_response(rng, sentiment)
        assert response.startswith(" ") and not response.startswith("  ")
        assert response.endswith(".")
        assert 4 <= len(response.split()) <= 12, response


def test_make_response_rejects_unknown_sentiment():
    with pytest.raises(ValueError):
        task.make_response(random.Random(0), "sarcastic")  # type: ignore[arg-type]


def test_vocabulary_is_small_and_corpus_covers_the_task():
    vocab = _vocab(task.corpus(seed=0))
    assert len(vocab) <= 400
    generated = [row["prompt"] + row["completion"] for row in task.sft_examples(600, seed=11)]
    for row in task.ranking_examples(200, seed=12):
        generated.extend(row["prompt"] + response for response in row["responses"])
    assert _vocab(generated) <= vocab


def test_prompts_carry_no_sentiment():
    prompts = task.all_prompts()
    assert max(abs(s) for s in task.gold_scores(prompts, prompts)) == 0.0


# -------------------------------------------------------------------------------------------------- gold


def test_gold_scores_separate_the_sentiment_classes():
    rng = random.Random(0)
    means = {}
    for sentiment in task.SENTIMENTS:
        responses = [task.make_response(rng, sentiment) for _ in range(300)]
        means[sentiment] = statistics.mean(task.gold_scores(["The movie was"] * 300, responses))
    assert means["positive"] > 0.5
    assert means["negative"] < -0.5
    assert -0.2 < means["neutral"] < 0.2


def test_gold_scores_use_the_response_only():
    response = " absolutely wonderful and the ending was great."
    scores = task.gold_scores(["The movie was", "I thought the book was"], [response, response])
    assert scores[0] == scores[1] > 0.5
    with pytest.raises(ValueError):
        task.gold_scores(["The movie was"], [response, response])


# ---------------------------------------------------------------------------------------------- examples


def test_sft_examples_mix_sentiments():
    rows = task.sft_examples(300, seed=0)
    assert len(rows) == 300 and all(set(row) == {"prompt", "completion"} for row in rows)
    scores = task.gold_scores([r["prompt"] for r in rows], [r["completion"] for r in rows])
    positive = sum(s > 0.05 for s in scores) / len(scores)
    negative = sum(s < -0.05 for s in scores) / len(scores)
    assert 0.25 < positive < 0.42 and 0.25 < negative < 0.42


def test_ranking_rows_are_well_formed_and_mostly_agree_with_gold():
    k = 4
    rows = task.ranking_examples(300, seed=0, k=k, noise=0.1)
    best_beats_worst = 0
    for row in rows:
        assert set(row) == {"prompt", "responses", "ranking"}
        assert len(row["responses"]) == k and len(set(row["responses"])) == k
        assert all(isinstance(i, int) for i in row["ranking"])
        assert sorted(row["ranking"]) == list(range(k))
        scores = task.gold_scores([row["prompt"]] * k, row["responses"])
        assert max(scores) - min(scores) > 0.1  # responses span at least two sentiments
        best_beats_worst += scores[row["ranking"][0]] > scores[row["ranking"][-1]]
    assert best_beats_worst / len(rows) >= 0.9


def _agreement_with_gold(rows: list[dict]) -> float:
    """Fraction of rows whose ranking orders every pair of unequal gold scores correctly."""
    agree = 0
    for row in rows:
        scores = task.gold_scores([row["prompt"]] * len(row["responses"]), row["responses"])
        position = {}
        for place, entry in enumerate(row["ranking"]):
            for i in entry if isinstance(entry, list) else [entry]:
                position[i] = place
        agree += all(
            (position[i] < position[j]) == (scores[i] > scores[j])
            for i in range(len(scores))
            for j in range(len(scores))
            if scores[i] != scores[j]
        )
    return agree / len(rows)


def test_noiseless_rankings_group_exact_ties():
    rows = task.ranking_examples(200, seed=5, noise=0.0)
    tied = [r for r in rows if any(isinstance(e, list) for e in r["ranking"])]
    assert tied, "neutral responses all score 0, so some rows must hold a tie group"
    for row in tied:
        scores = task.gold_scores([row["prompt"]] * len(row["responses"]), row["responses"])
        for group in (e for e in row["ranking"] if isinstance(e, list)):
            assert len({scores[i] for i in group}) == 1


def test_ranking_noise_is_applied():
    noiseless = task.ranking_examples(200, seed=5, noise=0.0)
    noisy = task.ranking_examples(200, seed=5, noise=1.0)
    assert _agreement_with_gold(noiseless) == 1.0
    assert _agreement_with_gold(noisy) < 0.8
    # The noise has its own generator: only the rankings change.
    assert [r["responses"] for r in noisy] == [r["responses"] for r in noiseless]


def test_ranking_examples_other_k_and_validation():
    rows = task.ranking_examples(20, seed=1, k=2)
    assert all(len(r["responses"]) == 2 and sorted(r["ranking"]) == [0, 1] for r in rows)
    with pytest.raises(ValueError):
        task.ranking_examples(1, seed=0, k=1)


def test_prompt_splits_are_disjoint_and_cover_the_space():
    train, held_out = set(task.all_prompts("train")), set(task.all_prompts("eval"))
    assert train and held_out and not train & held_out
    assert train | held_out == set(task.all_prompts())
    assert len(set(task.make_prompts(len(held_out), seed=0, split="eval"))) == len(held_out)


# ------------------------------------------------------------------------------------------------- files


def test_write_quickstart_data(tmp_path):
    counts = dict(n_sft_train=40, n_sft_val=10, n_rank_train=30, n_rank_val=10, n_prompts_train=64, n_prompts_eval=16)
    paths = task.write_quickstart_data(tmp_path / "data", seed=0, **counts)
    expected = {
        "sft_train": ("sft/train.jsonl", 40, {"prompt", "completion"}),
        "sft_val": ("sft/val.jsonl", 10, {"prompt", "completion"}),
        "rm_train": ("rm/train.jsonl", 30, {"prompt", "responses", "ranking"}),
        "rm_val": ("rm/val.jsonl", 10, {"prompt", "responses", "ranking"}),
        "prompts_train": ("prompts/train.jsonl", 64, {"prompt"}),
        "prompts_eval": ("prompts/eval.jsonl", 16, {"prompt"}),
    }
    assert set(paths) == set(expected)
    rows = {}
    for key, (rel, n, keys) in expected.items():
        assert paths[key] == tmp_path / "data" / rel and paths[key].is_file()
        lines = paths[key].read_text(encoding="utf-8").splitlines()
        assert len(lines) == n
        rows[key] = [json.loads(line) for line in lines]
        assert all(set(row) == keys for row in rows[key])

    train_prompts = [r["prompt"] for r in rows["prompts_train"]]
    eval_prompts = [r["prompt"] for r in rows["prompts_eval"]]
    assert eval_prompts != train_prompts[: len(eval_prompts)]
    # Held-out prompts: no eval prompt appears in any training file.
    seen = {r["prompt"] for key in ("sft_train", "rm_train", "prompts_train") for r in rows[key]}
    assert not seen & set(eval_prompts)
    # Train and validation splits are drawn with different seeds.
    assert rows["sft_val"] != rows["sft_train"][: len(rows["sft_val"])]


def test_write_jsonl_creates_dirs_and_writes_utf8(tmp_path):
    path = task.write_jsonl(tmp_path / "a" / "b" / "rows.jsonl", [{"prompt": "café"}, {"prompt": "x"}])
    assert path.read_text(encoding="utf-8") == '{"prompt": "café"}\n{"prompt": "x"}\n'
