"""Every TRL format in every stage that takes it (docs/data.md): each newly accepted form gives the same examples
as its explicit equivalent, and each refusal is one line naming ``file:row``."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser

from lit_rlhf.callbacks.reward_normalization import RewardNormalization
from lit_rlhf.datamodules.base import write_jsonl
from lit_rlhf.datamodules.preference import PreferenceDataModule, read_scored_pairs
from lit_rlhf.datamodules.prompts import PromptDataModule, read_prompt_rows
from lit_rlhf.errors import DataError
from lit_rlhf.evaluation import evaluate
from lit_rlhf.hf import ModelSpec, load_tokenizer
from lit_rlhf.hf.tokenization import reward_chat_ids, reward_text_ids
from lit_rlhf.imports import call_reward_fn, resolve_reward_fn
from lit_rlhf.labelling import label_ranking_task, write_ranking_task
from lit_rlhf.models import RewardModule
from lit_rlhf.models.ppo_config import RewardConfig
from lit_rlhf.rewards import exact_match
from tests.test_readme_commands import ROOT, one_token_model, readme_command, run

U = {"role": "user", "content": "Rate the movie"}
A1 = {"role": "assistant", "content": "It was fine"}
U2 = {"role": "user", "content": "And the end?"}
GOOD = {"role": "assistant", "content": "great"}
BAD = {"role": "assistant", "content": "bad"}


def preference(tokenizer, path: Path, **kwargs) -> list[dict]:
    dm = PreferenceDataModule(str(path), **kwargs)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    return list(dm.train_dataset)


def prompts_module(tokenizer, path: Path) -> list[dict]:
    dm = PromptDataModule(str(path), batch_size=1)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    return list(dm.train_dataset)


# ---- RM and DPO data ------------------------------------------------------------------------------------------
def test_implicit_prompt_text_pairs_equal_the_explicit_pair(tiny_tokenizer, tmp_path):
    implicit = [{"chosen": "The movie was great fun.", "rejected": "The movie was dull.", "margin": 2.0}]
    explicit = [{"prompt": "The movie was", "chosen": " great fun.", "rejected": " dull.", "margin": 2.0}]
    (a,) = preference(tiny_tokenizer, write_jsonl(tmp_path / "i.jsonl", implicit))
    (b,) = preference(tiny_tokenizer, write_jsonl(tmp_path / "e.jsonl", explicit))
    assert a == b
    assert a["input_ids"][1] == reward_text_ids(tiny_tokenizer, "The movie was", " dull.")
    assert a["prompt_lengths"][0] == a["prompt_lengths"][1] > 0 and a["ranks"] == [0, 1] and a["margin"] == 2.0


def test_conversational_pairs_all_forms_equal_the_explicit_prompt(tiny_tokenizer, tmp_path):
    explicit = {"prompt": [U, A1, U2], "chosen": [GOOD], "rejected": [BAD]}
    forms = {
        "explicit": explicit,
        "messages prompt": {"messages": [U, A1, U2], "chosen": [GOOD], "rejected": [BAD]},
        "implicit": {"chosen": [U, A1, U2, GOOD], "rejected": [U, A1, U2, BAD]},
    }
    examples = {
        name: preference(tiny_tokenizer, write_jsonl(tmp_path / f"{i}.jsonl", [row]))[0]
        for i, (name, row) in enumerate(forms.items())
    }
    assert examples["messages prompt"] == examples["explicit"] == examples["implicit"]
    assert examples["explicit"]["input_ids"][0] == reward_chat_ids(tiny_tokenizer, [U, A1, U2], [GOOD])


def test_implicit_conversations_that_differ_earlier_keep_the_shared_turns_as_prompt(tiny_tokenizer, tmp_path):
    other = {"role": "assistant", "content": "It was long"}
    implicit = {"chosen": [U, A1, U2, GOOD], "rejected": [U, other, U2, BAD]}
    explicit = {"prompt": [U], "chosen": [A1, U2, GOOD], "rejected": [other, U2, BAD]}
    (a,) = preference(tiny_tokenizer, write_jsonl(tmp_path / "i.jsonl", [implicit]))
    (b,) = preference(tiny_tokenizer, write_jsonl(tmp_path / "e.jsonl", [explicit]))
    assert a == b and a["input_ids"][0] == reward_chat_ids(tiny_tokenizer, [U], [A1, U2, GOOD])


def test_a_messages_prompt_in_a_ranking_row_equals_a_prompt_list(tiny_tokenizer, tmp_path):
    responses = [[GOOD], [BAD], [{"role": "assistant", "content": "ok"}]]
    rows = [{"messages": [U], "responses": responses, "ranking": [0, 2, 1]}]
    (a,) = preference(tiny_tokenizer, write_jsonl(tmp_path / "m.jsonl", rows))
    (b,) = preference(tiny_tokenizer, write_jsonl(tmp_path / "p.jsonl", [{**rows[0], "prompt": [U]}]))
    assert a == b and a["ranks"] == [0, 2, 1] and len(a["input_ids"]) == 3


def test_configured_columns_apply_to_implicit_and_messages_forms(tiny_tokenizer, tmp_path):
    rows = [{"good": "Q: hi A: yes", "bad": "Q: hi A: no"}, {"chat": [U], "good": [GOOD], "bad": [BAD]}]
    a, b = preference(
        tiny_tokenizer,
        write_jsonl(tmp_path / "c.jsonl", rows),
        chosen_column="good",
        rejected_column="bad",
        messages_column="chat",
    )
    assert a["input_ids"][0] == reward_text_ids(tiny_tokenizer, "Q: hi A:", " yes")
    assert b["input_ids"][1] == reward_chat_ids(tiny_tokenizer, [U], [BAD])


REFUSED = {
    "unpaired (KTO)": (
        {"prompt": "p", "completion": " a.", "label": True},
        r"^{path}:2: row is an unpaired preference \{prompt, completion, label\} \(KTO\), not a pairwise format: "
        r"pair .* into \{prompt, chosen, rejected\} rows",
    ),
    "prompt-completion": (
        {"prompt": "p", "completion": " a."},
        r"^{path}:2: missing columns: a row here is one of: .*K-wise ranking .*; "
        r"this one is a prompt-completion \{prompt, completion\} row",
    ),
    "nothing left after the shared prefix": (
        {"chosen": "The movie was", "rejected": "The movie was dull."},
        r"^{path}:2: column 'chosen' has nothing left after the prefix shared with the other$",
    ),
    "identical implicit pair": (
        {"chosen": "same.", "rejected": "same."},
        r"^{path}:2: columns 'chosen' and 'rejected' are identical$",
    ),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_refused_preference_rows_are_one_line_naming_file_and_row(tiny_tokenizer, tmp_path, case):
    bad, pattern = REFUSED[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": " a.", "rejected": " b."}, bad])
    with pytest.raises(DataError) as err:
        preference(tiny_tokenizer, path)
    message = str(err.value)
    assert "\n" not in message and re.search(pattern.replace("{path}", re.escape(str(path))), message), message


# ---- RM predict -----------------------------------------------------------------------------------------------
def predict_batch(tokenizer, path: Path) -> dict:
    dm = PreferenceDataModule("unused.jsonl", predict_data=str(path), batch_size=8)
    dm.tokenizer = tokenizer
    dm.setup("predict")
    return next(iter(dm.predict_dataloader()))


def real_ids(batch: dict) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def test_predict_takes_the_training_chat_shapes_and_one_score_per_response(tiny_tokenizer, tmp_path):
    rows = [
        {"prompt": [U], "chosen": [GOOD], "rejected": [BAD], "id": 0},  # explicit conversational pair
        {"chosen": [U, GOOD], "rejected": [U, BAD]},  # implicit conversational pair
        {"messages": [U], "responses": [[GOOD], [BAD]], "ranking": []},  # a ranking task row
        {"prompt": [U], "completion": [GOOD]},  # conversational prompt-completion
        {"messages": [U, GOOD]},  # a conversation ending with the answer
        {"messages": [U], "response": [BAD]},  # {prompt, response}, the prompt as messages
        {"chosen": "The movie was great.", "rejected": "The movie was bad."},  # implicit text pair
    ]
    batch = predict_batch(tiny_tokenizer, write_jsonl(tmp_path / "pred.jsonl", rows))
    good, bad = (reward_chat_ids(tiny_tokenizer, [U], [m]) for m in (GOOD, BAD))
    text = [reward_text_ids(tiny_tokenizer, "The movie was", f" {w}.") for w in ("great", "bad")]
    assert real_ids(batch) == [good, bad, good, bad, good, bad, good, good, bad, *text]
    assert batch["score_groups"] == [2, 2, 2, None, None, None, 2]
    assert batch["rows"][0]["id"] == 0 and batch["rows"][4] == rows[4]


def test_reward_module_predict_returns_per_row_scores_of_pairs(tiny_tokenizer, tiny_classifier_dir, tmp_path):
    rows = [{"prompt": [U], "chosen": [GOOD], "rejected": [BAD]}, {"prompt": [U], "response": [GOOD]}]
    batch = predict_batch(tiny_tokenizer, write_jsonl(tmp_path / "pred.jsonl", rows))
    module = RewardModule(ModelSpec(str(tiny_classifier_dir)))
    module.configure_model()
    module.eval()
    with torch.no_grad():
        flat = module(batch["input_ids"], batch["attention_mask"]).tolist()
        out = module.predict_step(batch, 0)
    assert out == [[flat[0], flat[1]], flat[2]] and flat[0] == flat[2]  # the same sequence, the same score


# ---- prompts (PPO, critic-free, evaluation, labelling) ------------------------------------------------------
def test_implicit_pairs_give_their_prompt_and_keep_the_other_columns(tiny_tokenizer, tmp_path):
    implicit = [{"chosen": "The movie was great.", "rejected": "The movie was bad.", "answer": "x"}]
    (row,) = read_prompt_rows(str(write_jsonl(tmp_path / "i.jsonl", implicit)))
    assert row.prompt == "The movie was" and row.columns == implicit[0]
    (a,) = prompts_module(tiny_tokenizer, tmp_path / "i.jsonl")
    (b,) = prompts_module(tiny_tokenizer, write_jsonl(tmp_path / "e.jsonl", [{"prompt": "The movie was"}]))
    assert a["input_ids"] == b["input_ids"] and a["prompt"] == "The movie was" and a["columns"]["answer"] == "x"


def test_a_row_without_prompt_names_what_is_missing_and_what_it_is(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"completion": " a."}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: missing column 'prompt' \(columns present"):
        read_prompt_rows(str(path))


def answer_length(prompts, completions, answer, **kwargs):
    """A keyword reward that records what it got: the conversation of a chat prompt, the row's ``answer``."""
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts), prompts
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions), completions
    return [float(len(a)) for a in answer]


def test_evaluation_samples_conversational_prompts_and_passes_the_rows_columns(tiny_model_dir, tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "The movie was"}], "answer": "ab"},
        {"messages": [U], "answer": "abcd"},
    ]
    result = evaluate(
        policy=str(tiny_model_dir),
        prompts=str(write_jsonl(tmp_path / "p.jsonl", rows)),
        reward_fn=answer_length,
        max_new_tokens=3,
        num_samples=2,
    )
    assert result.summary["fn_score"] == pytest.approx((2 + 2 + 4 + 4) / 4)
    assert [r["policy_fn_score"] for r in result.rows] == [2.0, 2.0, 4.0, 4.0]
    assert result.rows[2]["prompt"] == [U]


def test_labelling_keeps_conversational_prompts_and_columns_for_the_judge(tiny_model_dir, tmp_path):
    rows = [{"prompt": [U], "answer": "abc", "chosen": "not copied"}]
    task = write_ranking_task(
        str(tiny_model_dir),
        str(write_jsonl(tmp_path / "p.jsonl", rows)),
        str(tmp_path / "task.jsonl"),
        k=3,
        max_new_tokens=4,
    )
    (task_row,) = [json.loads(line) for line in task.read_text().splitlines()]
    assert task_row["prompt"] == [U] and task_row["answer"] == "abc" and "chosen" not in task_row

    def by_length(completions, answer, **kwargs):  # longer first; the answer column must arrive
        assert answer == ["abc"] * len(completions)
        return [float(len(c[0]["content"])) for c in completions]

    labelled = label_ranking_task(str(task), str(tmp_path / "ranked.jsonl"), reward_fn=by_length)
    (ranked,) = [json.loads(line) for line in labelled.read_text().splitlines()]
    lengths = [len(r) for r in ranked["responses"]]
    best = ranked["ranking"][0]
    assert lengths[best[0] if isinstance(best, list) else best] == max(lengths)


# ---- reward normalisation references and scored pairs -------------------------------------------------------
def test_reference_demonstrations_in_every_format_build_the_same_sequences(tiny_tokenizer, tmp_path):
    rows = [
        {"prompt": [U], "completion": [GOOD]},  # conversational prompt-completion
        {"messages": [U, GOOD]},
        {"prompt": "The movie was", "completion": " great."},
        {"prompt": "The movie was", "response": " great."},  # a reward.normalize_on pair
    ]
    callback = RewardNormalization(str(write_jsonl(tmp_path / "ref.jsonl", rows)))
    chat = reward_chat_ids(tiny_tokenizer, [U], [GOOD])
    assert callback.reference_sequences(tiny_tokenizer) == [
        chat,
        chat,
        reward_text_ids(tiny_tokenizer, "The movie was", " great."),
        reward_text_ids(tiny_tokenizer, "The movie was", " great."),
    ]
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"prompt": "p", "completion": " a.", "label": False}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}:2: row is a unpaired preference"):
        RewardNormalization(str(bad)).reference_sequences(tiny_tokenizer)


def test_scored_pairs_read_conversational_prompt_completion_like_messages(tmp_path):
    rows = [{"prompt": [U], "completion": [GOOD]}, {"messages": [U, BAD]}, {"prompt": "p", "response": " r."}]
    assert read_scored_pairs(str(write_jsonl(tmp_path / "s.jsonl", rows))) == ([[U], [U], "p"], ["great", "bad", " r."])


# ---- reward functions -----------------------------------------------------------------------------------------
def test_reward_fn_is_a_dotted_path_or_a_callable_through_jsonargparse():
    parser = ArgumentParser()
    parser.add_argument("--reward", type=RewardConfig)
    from_yaml = parser.parse_args(["--reward.fn", "lit_rlhf.rewards.exact_match"])
    from_python = parser.parse_object({"reward": {"fn": exact_match}})
    for config in (from_yaml, from_python):
        reward = parser.instantiate(config).reward
        assert isinstance(reward, RewardConfig) and resolve_reward_fn(reward.fn) is exact_match
    assert "fn: lit_rlhf.rewards.exact_match" in parser.dump(from_python)  # a saved config reloads


def test_exact_match_on_the_answer_column_standard_and_conversational(tiny_tokenizer, tmp_path):
    rows = [{"prompt": [U], "answer": "4"}, {"prompt": "2 + 2 =", "answer": 4}, {"prompt": "1 + 1 =", "answer": "2"}]
    dm = PromptDataModule(str(write_jsonl(tmp_path / "p.jsonl", rows)), batch_size=3)
    dm.tokenizer = tiny_tokenizer
    dm.setup("fit")
    batch = dm.collate(list(dm.train_dataset))
    scores = call_reward_fn(
        exact_match,
        batch["prompts"],
        [" 4\n", "4", "3"],
        messages=batch["prompt_messages"],
        columns=batch["prompt_columns"],
    )
    assert scores == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="completion 1 has no 'answer' column"):
        exact_match(["a", "b"], ["a", None])


def readme_block(language: str, marker: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return next(b for b in blocks if marker in b)


def test_the_readme_exact_match_is_the_librarys():
    namespace: dict = {}
    exec(readme_block("python", "def exact_match"), namespace)  # noqa: S102 - the README's own code
    completions = ["4", [{"role": "assistant", "content": " 4 "}], "5", [{"role": "assistant", "content": "x"}]]
    answers = ["4", 4, "4", "y"]
    assert namespace["exact_match"](completions, answers) == exact_match(completions, answers) == [1.0, 1.0, 0.0, 0.0]


def test_the_readme_verifiable_reward_command_trains_grpo_on_the_answer_column(tiny_model_dir, sft_jsonl, tmp_path):
    shutil.copytree(ROOT / "configs" / "quickstart", tmp_path / "configs" / "quickstart")  # run from the "repository"
    quickstart = tmp_path / "runs" / "quickstart"
    (token_id,) = load_tokenizer(str(tiny_model_dir))("4", add_special_tokens=False)["input_ids"]
    one_token_model(tiny_model_dir, quickstart / "sft" / "export", token_id)  # answers "4" to anything
    shutil.copy(sft_jsonl[0], write_jsonl(quickstart / "data" / "sft" / "train.jsonl", []))  # grpo.yaml's PTX data
    readme_row = json.loads(readme_block("json", '"answer"'))  # answered right ("4"), and one answered wrong
    write_jsonl(tmp_path / "arithmetic.jsonl", [readme_row, {"prompt": [U], "answer": "5"}])
    command = readme_command("--model.init_args.reward.fn=lit_rlhf.rewards.exact_match")
    overrides = [
        "--trainer.limit_train_batches=1",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.sampling.max_new_tokens=1",
        "--data.init_args.batch_size=2",
    ]
    run(command + overrides, tmp_path)
    with (tmp_path / "runs" / "arithmetic" / "logs" / "metrics.csv").open() as f:
        scores = [float(r["objective/score"]) for r in csv.DictReader(f) if r.get("objective/score")]
    # every response is "4" without EOS (4 per prompt): the README's row scores 1, the other 0, and grpo.yaml's
    # missing_eos_penalty of 1 applies to all: (1 + 0) / 2 - 1
    assert scores == [pytest.approx(-0.5)]
