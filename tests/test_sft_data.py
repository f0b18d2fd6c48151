"""SFTDataModule: supervision masks, truncation, chat turns and clear errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lit_rlhf.datamodules import DataError, SFTDataModule
from lit_rlhf.hf.tokenization import IGNORE_INDEX, tokenize_messages, tokenize_prompt_completion
from tests.conftest import write_jsonl


def make_dm(tokenizer, train, **kwargs) -> SFTDataModule:
    dm = SFTDataModule(str(train), **kwargs)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    return dm


def test_labels_are_ignore_exactly_on_prompt_and_padding(tiny_tokenizer, tmp_path):
    rows = [
        {"prompt": "The movie was", "completion": " great."},
        {"prompt": "The book was", "completion": " bad and slow."},
    ]
    dm = make_dm(tiny_tokenizer, write_jsonl(tmp_path / "d.jsonl", rows), batch_size=2)
    batch = dm.collate([dm.train_dataset[0], dm.train_dataset[1]])
    for i, row in enumerate(rows):
        prompt_len = len(tiny_tokenizer(row["prompt"])["input_ids"])
        completion = tiny_tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [
            tiny_tokenizer.eos_token_id
        ]
        n = prompt_len + len(completion)
        labels = batch["labels"][i]
        assert labels[:prompt_len].eq(IGNORE_INDEX).all()
        assert labels[prompt_len:n].tolist() == completion  # the EOS is supervised too
        assert labels[n:].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][i].sum() == n
        assert batch["input_ids"][i, n:].eq(tiny_tokenizer.pad_token_id).all()
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id


def test_truncation_drops_examples_without_supervised_tokens(tiny_tokenizer, tmp_path):
    long_prompt = "The movie was " * 30
    rows = [
        {"prompt": long_prompt, "completion": " great."},
        {"prompt": "The book was", "completion": " good."},
    ]
    with pytest.warns(UserWarning, match="dropped 1 of 2 examples"):
        dm = make_dm(tiny_tokenizer, write_jsonl(tmp_path / "d.jsonl", rows), max_length=16)
    assert len(dm.train_dataset) == 1
    assert all(len(e["input_ids"]) <= 16 for e in dm.train_dataset)


def test_chat_messages_supervise_only_assistant_turns(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "Review the movie"},
        {"role": "assistant", "content": "It was great."},
        {"role": "user", "content": "And the book?"},
        {"role": "assistant", "content": "Bad."},
    ]
    input_ids, labels = tokenize_messages(tiny_tokenizer, messages, "x:1")
    supervised = [t for t, lab in zip(input_ids, labels) if lab != IGNORE_INDEX]
    text = tiny_tokenizer.decode(supervised)
    assert text == "It was great.<|eos|>Bad.<|eos|>"
    assert sum(lab != IGNORE_INDEX for lab in labels) == len(supervised)


def test_validation_fraction_split_is_seeded(tiny_tokenizer, sft_jsonl):
    a = make_dm(tiny_tokenizer, sft_jsonl[0], val_fraction=0.25, seed=3)
    b = make_dm(tiny_tokenizer, sft_jsonl[0], val_fraction=0.25, seed=3)
    assert len(a.val_dataset) == 16 and len(a.train_dataset) == 48
    assert [e["input_ids"] for e in a.val_dataset] == [e["input_ids"] for e in b.val_dataset]


def test_prompt_completion_tokenization_matches_concatenation(tiny_tokenizer):
    ids, labels = tokenize_prompt_completion(tiny_tokenizer, "The movie was", " great.")
    assert tiny_tokenizer.decode(ids) == "The movie was great.<|eos|>"
    assert labels.count(IGNORE_INDEX) == len(tiny_tokenizer("The movie was")["input_ids"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n',
            r"d\.jsonl:2:\d+: invalid JSON",
        ),
        (
            b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n',
            r"d\.jsonl:2: missing column 'completion'",
        ),
        (b'{"prompt": "a", "completion": 3}\n', r"d\.jsonl:1: column 'completion' must be a string, got int"),
        (b'{"prompt": "a", "completion": "  "}\n', r"d\.jsonl:1: column 'completion' is empty"),
        (
            b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n',
            r"d\.jsonl:2: not valid UTF-8",
        ),
        (b"", r"d\.jsonl: no records"),
        (b'["not", "an", "object"]\n', r"d\.jsonl:1: expected a JSON object"),
        (
            b'{"messages": [{"role": "user", "content": "hi"}]}\n',
            r"d\.jsonl:1: conversation has no assistant turn",
        ),
        (
            b'{"prompt": "a", "completion": "b"}\n'
            b'{"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]}\n',
            r"d\.jsonl:2: column 'messages', turn 1: unknown role 'wizard' \(expected one of system, user, assistant\)",
        ),
        (
            b'{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}\n',
            r"d\.jsonl:1: column 'messages', turn 0: 'content' must be a string, got int",
        ),
    ],
)
def test_bad_input_names_file_and_line(tiny_tokenizer, tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        make_dm(tiny_tokenizer, path)


def test_missing_file_and_custom_columns(tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        make_dm(tiny_tokenizer, tmp_path / "absent.jsonl")
    rows = [{"q": "The movie was", "a": " fine."}]
    dm = make_dm(tiny_tokenizer, write_jsonl(tmp_path / "c.jsonl", rows), prompt_column="q", completion_column="a")
    assert len(dm.train_dataset) == 1


def test_parquet_and_csv_sources(tiny_tokenizer, tmp_path):
    import datasets

    rows = [{"prompt": "The movie was", "completion": " fine."}] * 3
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    for name in ("d.parquet", "d.csv"):
        assert len(make_dm(tiny_tokenizer, tmp_path / name).train_dataset) == 3
    (tmp_path / "bad.csv").write_text("prompt,answer\na,b\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: missing column 'completion'"):
        make_dm(tiny_tokenizer, tmp_path / "bad.csv")


def test_json_array_file(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "The movie was", "completion": " good."}]))
    batch = next(iter(make_dm(tiny_tokenizer, path).train_dataloader()))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[0] == 1
