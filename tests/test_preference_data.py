"""PreferenceDataModule: pairwise, K-wise (ties, mixed K) and chat rows → one prompt per batch element."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from lit_rlhf.datamodules.preference import PreferenceDataModule, parse_ranking
from lit_rlhf.errors import DataError
from lit_rlhf.hf.tokenization import reward_chat_ids, tokenize_prompt_completion


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def data_module(tokenizer, path: Path, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(str(path), **kwargs)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    return dm


PAIRS = [
    {"prompt": "The movie was", "chosen": " great fun.", "rejected": " dull.", "margin": 1.5},
    {"prompt": "The book was", "chosen": " lovely.", "rejected": " awful and boring."},
]
RANKED = [
    {"prompt": "The hotel was", "responses": [" fine.", " awful.", " great.", " okay."], "ranking": [2, [0, 3], 1]},
    {"prompt": "The cafe was", "responses": [" nice.", " bad."], "ranking": [0, 1]},
]


def test_pairwise_batch_layout_tokens_and_margin(tiny_tokenizer, tmp_path):
    dm = data_module(tiny_tokenizer, jsonl(tmp_path / "p.jsonl", PAIRS))
    batch = dm.collate(dm.train_dataset)
    assert batch["input_ids"].shape[0] == 4 and batch["ranks"].tolist() == [[0, 1], [0, 1]]
    assert batch["response_mask"].all()
    # row b * K + k is response k of prompt b, tokenized exactly like SFT/PPO: prompt, response, EOS
    expected = tokenize_prompt_completion(tiny_tokenizer, "The book was", " awful and boring.")[0]
    row = batch["input_ids"][3][batch["attention_mask"][3].bool()].tolist()
    assert row == expected and row[-1] == tiny_tokenizer.eos_token_id
    # margin[b, w, l] for "w better than l": only the chosen→rejected slot, 0 for the row without a margin
    assert batch["margin"].shape == (2, 2, 2)
    assert batch["margin"][0].tolist() == [[0.0, 1.5], [0.0, 0.0]] and batch["margin"][1].abs().sum() == 0


def test_kwise_ties_and_mixed_k_in_one_batch(tiny_tokenizer, tmp_path):
    dm = data_module(tiny_tokenizer, jsonl(tmp_path / "k.jsonl", RANKED))
    batch = dm.collate(dm.train_dataset)
    assert batch["input_ids"].shape[0] == 2 * 4
    assert batch["ranks"][0].tolist() == [1, 2, 0, 1]  # [2, [0, 3], 1]: 2 best, 0 and 3 tied, 1 worst
    assert batch["ranks"][1, :2].tolist() == [0, 1]
    assert batch["response_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert batch["attention_mask"][6:].sum() == 0, "padded response slots are all padding"
    assert "margin" not in batch


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_real_token_is_eos_on_either_padding_side(tiny_tokenizer, tmp_path, side):
    dm = data_module(tiny_tokenizer, jsonl(tmp_path / "k.jsonl", RANKED), padding_side=side)
    batch = dm.collate(dm.train_dataset[:1])
    mask = batch["attention_mask"]
    assert mask[:, -1 if side == "right" else 0].tolist() != mask[:, 0 if side == "right" else -1].tolist()
    last = (torch.arange(mask.shape[1]) * mask).argmax(-1)
    assert (batch["input_ids"].gather(1, last[:, None]) == tiny_tokenizer.eos_token_id).all()


def test_chat_rows_pairwise_and_explicit_prompt(tiny_tokenizer, tmp_path):
    user = [{"role": "user", "content": "Rate the movie"}]
    rows = [
        {
            "chosen": user + [{"role": "assistant", "content": "great"}],
            "rejected": user + [{"role": "assistant", "content": "bad"}],
        },
        {
            "prompt": user,
            "responses": [
                [{"role": "assistant", "content": "good"}],
                [{"role": "assistant", "content": "meh"}],
                [{"role": "assistant", "content": "awful"}],
            ],
            "ranking": [0, 1, 2],
        },
    ]
    dm = data_module(tiny_tokenizer, jsonl(tmp_path / "c.jsonl", rows))
    first, second = dm.train_dataset
    assert first["input_ids"][1] == reward_chat_ids(tiny_tokenizer, user, [{"role": "assistant", "content": "bad"}])
    text = tiny_tokenizer.decode(first["input_ids"][0])
    assert text == "<|user|>Rate the movie<|eos|><|assistant|>great<|eos|>"
    assert len(second["input_ids"]) == 3 and second["ranks"] == [0, 1, 2]
    assert all(ids[-1] == tiny_tokenizer.eos_token_id for ids in second["input_ids"])


def test_column_names_are_configurable(tiny_tokenizer, tmp_path):
    rows = [{"q": "The show was", "good": " fun.", "bad": " dull."}]
    dm = data_module(
        tiny_tokenizer,
        jsonl(tmp_path / "r.jsonl", rows),
        prompt_column="q",
        chosen_column="good",
        rejected_column="bad",
    )
    assert dm.train_dataset[0]["input_ids"][0] == tokenize_prompt_completion(tiny_tokenizer, "The show was", " fun.")[0]


BAD_ROWS = {
    "ranking length": (
        {"prompt": "p", "responses": [" a.", " b.", " c."], "ranking": [0, 1]},
        "ranks 2 responses but there are 3",
    ),
    "K < 2": ({"prompt": "p", "responses": [" a."], "ranking": [0]}, "needs K >= 2 responses, got 1"),
    "chosen == rejected": (
        {"prompt": "p", "chosen": " same.", "rejected": " same."},
        "'chosen' and 'rejected' are identical",
    ),
    "missing rejected": ({"prompt": "p", "chosen": " a."}, "missing column 'rejected'"),
    "missing all": ({"prompt": "p", "text": " a."}, "missing columns"),
    "missing ranking": ({"prompt": "p", "responses": [" a.", " b."]}, "missing column 'ranking'"),
    "index out of range": ({"prompt": "p", "responses": [" a.", " b."], "ranking": [0, 2]}, "index 2, out of range"),
    "duplicated index": ({"prompt": "p", "responses": [" a.", " b."], "ranking": [1, 1]}, "lists response 1 twice"),
    "non-string response": (
        {"prompt": "p", "responses": [" a.", 3], "ranking": [0, 1]},
        "'responses[1]' must be a string",
    ),
    "empty response": ({"prompt": "p", "chosen": " a.", "rejected": "  "}, "'rejected' is empty"),
    "bad margin": (
        {"prompt": "p", "chosen": " a.", "rejected": " b.", "margin": "big"},
        "'margin' must be a finite number",
    ),
}


@pytest.mark.parametrize("case", BAD_ROWS, ids=list(BAD_ROWS))
def test_bad_rows_name_file_line_and_column(tiny_tokenizer, tmp_path, case):
    bad, message = BAD_ROWS[case]
    path = jsonl(tmp_path / "bad.jsonl", [PAIRS[0], bad])
    with pytest.raises(DataError) as err:
        data_module(tiny_tokenizer, path)
    assert f"{path}:2:" in str(err.value) and message in str(err.value), str(err.value)


def test_parse_ranking_tie_groups():
    assert parse_ranking([[1, 2], 0, [3]], 4, "f:1", "ranking") == [1, 0, 0, 2]
    with pytest.raises(DataError, match="empty tie group"):
        parse_ranking([[], 0, 1], 2, "f:1", "ranking")


def test_too_long_and_all_tied_rows_are_dropped_with_counted_warnings(tiny_tokenizer, tmp_path):
    rows = [
        PAIRS[1],
        {"prompt": "p", "chosen": " great" * 40 + ".", "rejected": " bad."},
        {"prompt": "p", "responses": [" a.", " b."], "ranking": [[0, 1]]},
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = data_module(tiny_tokenizer, jsonl(tmp_path / "d.jsonl", rows), max_length=24)
    messages = [str(w.message) for w in caught]
    assert len(dm.train_dataset) == 1
    assert any("dropped 1 of 3 examples: a response would be cut by max_length=24" in m for m in messages)
    assert any("dropped 1 of 3 examples: all responses tied" in m for m in messages)


def test_predict_rows_keep_their_record_and_refuse_truncation(tiny_tokenizer, tmp_path):
    path = jsonl(
        tmp_path / "pred.jsonl",
        [{"prompt": "The movie was", "response": " great.", "id": 7}, {"prompt": "The book was", "response": " bad."}],
    )
    dm = PreferenceDataModule("unused.jsonl", predict_data=str(path), batch_size=2)
    dm.tokenizer = tiny_tokenizer
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and batch["rows"][0]["id"] == 7
    assert (
        batch["input_ids"][1][batch["attention_mask"][1].bool()].tolist()
        == tokenize_prompt_completion(tiny_tokenizer, "The book was", " bad.")[0]
    )
    short = PreferenceDataModule("unused.jsonl", predict_data=str(path), max_length=3)
    short.tokenizer = tiny_tokenizer
    with pytest.raises(DataError, match=f"{path}:1: .* exceed max_length=3"):
        short.setup("predict")


def test_a_negative_margin_is_kept_but_reported_once_with_its_place(tiny_tokenizer, tmp_path):
    rows = [
        {"prompt": "The movie was", "chosen": " great fun.", "rejected": " dull.", "margin": 1.0},
        {"prompt": "The book was", "chosen": " lovely.", "rejected": " awful.", "margin": -2.0},
        {"prompt": "The cafe was", "chosen": " nice.", "rejected": " bad.", "margin": -0.5},
    ]
    path = jsonl(tmp_path / "neg.jsonl", rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = data_module(tiny_tokenizer, path)
    negative = [str(w.message) for w in caught if "negative" in str(w.message)]
    assert len(negative) == 1, negative  # once per file, at the first offending row
    assert negative[0].startswith(f"{path}:2: column 'margin' is negative (-2.0)")
    batch = dm.collate(dm.train_dataset)
    assert batch["margin"][:, 0, 1].tolist() == [1.0, -2.0, -0.5]  # still used as given
