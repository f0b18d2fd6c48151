"""TRL dataset formats detected from the columns (lit_rlhf.datamodules.formats, docs/data.md)."""

import json

import datasets
import pytest

from lit_rlhf.datamodules.base import Row, read_rows
from lit_rlhf.datamodules.formats import Format, detect_format, extract_prompt
from lit_rlhf.datamodules.sft import SFTDataModule
from lit_rlhf.errors import DataError
from lit_rlhf.quickstart.assets import build_tokenizer
from lit_rlhf.quickstart.task import corpus


@pytest.fixture(scope="module", params=["tiny", "chatml"])
def tokenizer(request):
    return build_tokenizer(corpus(seed=0, n=200), 500, family=request.param)


def _sft(tmp_path, tokenizer, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = SFTDataModule(str(path))
    dm.tokenizer = tokenizer
    dm.setup("fit")
    return dm.train_dataset


def test_conversational_prompt_completion_supervises_only_the_completion(tmp_path, tokenizer):
    prompt = [{"role": "user", "content": "hi there"}]
    completion = [{"role": "assistant", "content": "yes ok"}]
    (example,) = _sft(tmp_path, tokenizer, [{"prompt": prompt, "completion": completion}])
    (whole,) = _sft(tmp_path, tokenizer, [{"messages": prompt + completion}])
    assert example["input_ids"] == whole["input_ids"]
    assert example["labels"] == whole["labels"]  # one assistant turn: the same supervision


def test_text_rows_supervise_every_token(tmp_path, tokenizer):
    (example,) = _sft(tmp_path, tokenizer, [{"text": "some text here"}])
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] == tokenizer.eos_token_id


def test_save_to_disk_folder_honours_split(tmp_path):
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([{"text": "a"}]), "test": datasets.Dataset.from_list([{"text": "b"}])}
    ).save_to_disk(str(tmp_path / "saved"))
    assert [r.data for r in read_rows(str(tmp_path / "saved"), "test")] == [{"text": "b"}]


def test_row_fitting_no_format_is_one_line_error():
    with pytest.raises(DataError, match=r"^f\.jsonl:3: row fits no dataset format; accepted here: .*prompt-only"):
        detect_format(Row({"x": 1}, "f.jsonl:3"))
    assert detect_format(Row({"chosen": "a", "rejected": "b"}, "f:1")) is Format.IMPLICIT_PREFERENCE


def test_extract_prompt_text_and_chat():
    assert extract_prompt("Q: hi A: yes", "Q: hi A: no") == ("Q: hi A:", " yes", " no")
    u, a, b = (
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "x"},
        {"role": "assistant", "content": "y"},
    )
    assert extract_prompt([u, a], [u, b]) == ([u], [a], [b])
