"""PromptDataModule: plain and chat prompts, left padding, over-long prompts dropped with a count."""

from __future__ import annotations

import pytest
import torch

from lit_rlhf.datamodules.base import write_jsonl
from lit_rlhf.datamodules.prompts import PromptDataModule
from lit_rlhf.errors import DataError


def _module(path, tokenizer, **kwargs) -> PromptDataModule:
    dm = PromptDataModule(str(path), batch_size=kwargs.pop("batch_size", 4), **kwargs)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    return dm


def test_plain_prompts_are_left_padded_with_texts(tmp_path, tiny_tokenizer):
    prompts = ["The movie was", "I stayed at this new hotel and it was", "Overall, the app was"]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts])
    dm = _module(path, tiny_tokenizer, drop_last=False)
    batch = dm.collate([dm.train_dataset[i] for i in range(3)])
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    assert batch["prompts"] == prompts
    lengths = [len(tiny_tokenizer(p)["input_ids"]) for p in prompts]
    assert mask.sum(1).tolist() == lengths
    assert ids.shape == (3, max(lengths))
    for row, n in enumerate(lengths):  # real tokens at the right end, pads (mask 0) on the left
        assert mask[row, ids.shape[1] - n :].all() and not mask[row, : ids.shape[1] - n].any()
        assert ids[row, -n:].tolist() == tiny_tokenizer(prompts[row])["input_ids"]
        assert (ids[row, : ids.shape[1] - n] == tiny_tokenizer.pad_token_id).all()


def test_chat_prompts_use_the_template_with_generation_prompt(tmp_path, tiny_tokenizer):
    messages = [{"role": "user", "content": "The movie was"}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    dm = _module(path, tiny_tokenizer)
    example = dm.train_dataset[0]
    expected = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert example["prompt"] == expected and expected.endswith("<|assistant|>")
    assert example["input_ids"] == tiny_tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_long_prompts_are_dropped_with_a_count(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "The movie was"}, {"prompt": "In my opinion the new restaurant was " * 4}] * 3
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.warns(UserWarning, match="dropped 3 of 6 examples: prompt longer than max_prompt_length=8"):
        dm = _module(path, tiny_tokenizer, max_prompt_length=8)
    assert len(dm.train_dataset) == 3


def test_bad_rows_name_file_and_line(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing column 'prompt'"):
        _module(path, tiny_tokenizer)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"chat.jsonl:1: the conversation ends with an assistant turn"):
        _module(path, tiny_tokenizer)


def test_train_loader_is_seeded_and_drops_the_last_partial_batch(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"The movie {i} was"} for i in range(10)])
    dm = _module(path, tiny_tokenizer, batch_size=4, seed=3)
    first = [b["prompts"] for b in dm.train_dataloader()]
    second = [b["prompts"] for b in dm.train_dataloader()]
    assert [len(b) for b in first] == [4, 4] and first == second
    assert isinstance(next(iter(dm.train_dataloader()))["prompt_input_ids"], torch.Tensor)


def test_one_chat_validator_for_every_stage(tmp_path, tiny_tokenizer):
    """A role outside system/user/assistant fails with file:line in PPO prompts and RM comparisons as in SFT."""
    from lit_rlhf.datamodules import PreferenceDataModule

    wizard = [{"role": "wizard", "content": "Rate the movie"}]
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ok"}, {"messages": wizard}])
    with pytest.raises(DataError, match=r"prompts.jsonl:2: column 'messages', turn 0: unknown role 'wizard'"):
        _module(path, tiny_tokenizer)
    answer = [{"role": "assistant", "content": "great"}]
    rows = [{"chosen": wizard + answer, "rejected": wizard + [{"role": "assistant", "content": "bad"}]}]
    dm = PreferenceDataModule(str(write_jsonl(tmp_path / "rm.jsonl", rows)))
    dm.tokenizer = tiny_tokenizer
    with pytest.raises(DataError, match=r"rm.jsonl:1: column 'chosen', turn 0: unknown role 'wizard'"):
        dm.setup("fit")
