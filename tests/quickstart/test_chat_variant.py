"""The chat-model quickstart (``python -m lit_rlhf.quickstart --chat``): its data are the plain quickstart's task
in TRL's conversational formats, its evaluation prompts tokenize as the conversations do, and its configs are
the plain quickstart's with the chat paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_rlhf.cli import main as cli_main
from lit_rlhf.datamodules.base import read_rows
from lit_rlhf.datamodules.formats import Format, detect_format, is_conversational
from lit_rlhf.hf.tokenization import chat_prompt, prompt_ids, tokenize_messages
from lit_rlhf.quickstart import chat, compare, task
from lit_rlhf.quickstart.assets import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SIZES = dict(n_sft_train=30, n_sft_val=9, n_rank_train=12, n_rank_val=10, n_prompts_train=8, n_prompts_eval=6)
#: file -> the TRL format (docs/data.md) its rows are written in
FORMATS = {
    "sft_train": Format.PROMPT_COMPLETION,
    "sft_val": Format.MESSAGES,
    "rm_train": Format.RANKING,
    "rm_val": Format.PREFERENCE,
    "prompts_train": Format.PROMPT,
    "prompts_eval": Format.PROMPT,
}
STAGES = ("sft", "rm", "ppo", "grpo")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``(chat paths, plain rows)`` of the same seed and sizes."""
    out = tmp_path_factory.mktemp("chat") / "data"
    return chat.write_chat_data(out, seed=5, **SIZES), task.quickstart_rows(seed=5, **SIZES)


def _rows(path: Path) -> list[dict]:
    return [row.data for row in read_rows(str(path))]


def test_every_file_is_written_in_its_conversational_format(data):
    paths, _ = data
    assert set(paths) == set(FORMATS)
    for key, path in paths.items():
        rows = read_rows(str(path))
        assert rows, key
        for row in rows:
            assert detect_format(row) is FORMATS[key], (key, row.data)
            # every message list holds only user and assistant turns with non-empty text
            lists = [v for v in row.data.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
            lists += [r for r in row.data.get("responses", [])]
            assert lists, (key, row.data)
            for messages in lists:
                assert is_conversational(messages)
                assert all(m["role"] in ("user", "assistant") and m["content"].strip() for m in messages)


def test_the_rows_are_the_plain_quickstart_as_user_and_assistant_turns(data):
    paths, plain = data
    sft = _rows(paths["sft_train"])
    assert [(r["prompt"], r["completion"]) for r in sft] == [
        ([{"role": "user", "content": p["prompt"]}], [{"role": "assistant", "content": p["completion"][1:]}])
        for p in plain["sft_train"][1]
    ]
    assert all(p["completion"].startswith(" ") for p in plain["sft_train"][1])  # the space only [1:] drops
    val = _rows(paths["sft_val"])
    assert [[m["content"] for m in r["messages"]] for r in val] == [
        [p["prompt"], p["completion"].lstrip()] for p in plain["sft_val"][1]
    ]
    ranked = _rows(paths["rm_train"])
    assert [r["ranking"] for r in ranked] == [p["ranking"] for p in plain["rm_train"][1]]
    assert [[x[0]["content"] for x in r["responses"]] for r in ranked] == [
        [s.lstrip() for s in p["responses"]] for p in plain["rm_train"][1]
    ]
    for key in ("prompts_train", "prompts_eval"):
        assert [r["prompt"][0]["content"] for r in _rows(paths[key])] == [p["prompt"] for p in plain[key][1]]
    # the gold judge scores an assistant turn exactly as the plain continuation
    responses = [p["completion"] for p in plain["sft_train"][1]]
    contents = [r["completion"][0]["content"] for r in sft]
    assert task.gold_scores(contents, contents) == task.gold_scores(responses, responses)


def test_held_out_pairs_are_every_non_tied_pair_of_the_gold_rankings(data):
    assert chat.preference_pairs(["a", "b", "c", "d"], [2, [0, 3], 1]) == [(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)]
    assert chat.preference_pairs(["a", "b"], [1, 0]) == [(1, 0)]
    with pytest.raises(ValueError, match="once each"):
        chat.preference_pairs(["a", "b", "c"], [0, 1])
    paths, plain = data
    pairs = _rows(paths["rm_val"])
    expected = [
        (p["prompt"], p["responses"][w].lstrip(), p["responses"][lose].lstrip())
        for p in plain["rm_val"][1]
        for w, lose in chat.preference_pairs(p["responses"], p["ranking"])
    ]
    assert [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in pairs] == (
        expected
    )
    # the noise-free order: every chosen answer scores strictly higher under the gold judge
    chosen = [r["chosen"][0]["content"] for r in pairs]
    rejected = [r["rejected"][0]["content"] for r in pairs]
    assert all(c > r for c, r in zip(task.gold_scores(chosen, chosen), task.gold_scores(rejected, rejected)))
    assert len(pairs) > len(plain["rm_val"][1])  # K = 4 rankings give several pairs each


def test_degenerate_text_vocabulary_is_the_plain_one(data, tmp_path):
    paths, _ = data
    plain = task.write_quickstart_data(tmp_path, seed=5, **SIZES)
    vocabulary = chat.demonstration_vocabulary([paths["sft_train"], paths["sft_val"]])
    assert vocabulary == compare.demonstration_vocabulary([plain["sft_train"], plain["sft_val"]])
    assert not {"role", "content", "user", "assistant"} & vocabulary  # no JSON keys or role names


@pytest.fixture(scope="module")
def chatml():
    return build_tokenizer(chat.chat_corpus(seed=0)[::20], vocab_size=400, family="chatml")


def test_evaluation_prompts_tokenize_as_the_conversations(data, chatml):
    paths, plain = data
    texts, shown = chat.evaluation_prompts(paths["prompts_eval"], chatml)
    rows = read_rows(str(paths["prompts_eval"]))
    assert len(texts) == len(rows) == SIZES["n_prompts_eval"]
    for text, row in zip(texts, rows):
        rendered, ids = chat_prompt(chatml, row.data["prompt"], row.where, "prompt")
        user = row.data["prompt"][0]["content"]
        assert text == rendered == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        assert prompt_ids(chatml, text) == ids  # what evaluate() samples from is what PPO samples from
        assert ids[0] == chatml.convert_tokens_to_ids("<|im_start|>") and ids[-1] == chatml.encode("\n")[0]
    assert list(shown.values()) == [p["prompt"] for p in plain["prompts_eval"][1]]


def test_sft_supervises_the_answer_and_its_im_end(chatml):
    messages = chat.user_turn("The phone was") + chat.assistant_turn(" great.")
    ids, labels = tokenize_messages(chatml, messages, "row")
    answer = chatml("great.", add_special_tokens=False)["input_ids"]
    im_end, newline = chatml.convert_tokens_to_ids("<|im_end|>"), chatml.encode("\n")[0]
    supervised = [i for i, label in zip(ids, labels) if label != -100]
    assert supervised == [*answer, im_end, newline]
    assert chatml.pad_token == "<|endoftext|>" and chatml.eos_token == "<|im_end|>" and chatml.bos_token is None


def _without_paths(value):
    """A config with every ``quickstart-chat`` path read as the plain quickstart's, and comments dropped."""
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    if isinstance(value, str):
        return value.replace("runs/quickstart-chat/", "runs/quickstart/")
    return value


#: where a chat config departs from the plain one (each explained by a comment in the YAML): stage -> list of
#: (path of keys and list indices, chat value, plain value)
DIFFERENCES = {
    "ppo": [(("model", "init_args", "ptx", "coef"), 0.75, 0.5)],
    "grpo": [(("model", "init_args", "ptx", "coef"), 0.2, 0.3)],
}


@pytest.mark.parametrize("stage", STAGES)
def test_chat_configs_are_the_plain_ones_on_the_chat_folders(stage):
    path = ROOT / "configs" / "quickstart-chat" / f"{stage}.yaml"
    config = yaml.safe_load(path.read_text())
    for keys, chat_value, plain_value in DIFFERENCES.get(stage, []):
        parent = config
        for key in keys[:-1]:
            parent = parent[key]
        assert parent[keys[-1]] == chat_value
        parent[keys[-1]] = plain_value
    assert _without_paths(config) == yaml.safe_load((ROOT / "configs" / "quickstart" / f"{stage}.yaml").read_text())
    text = path.read_text()
    assert "runs/quickstart/" not in text  # nothing reads or writes the plain quickstart's folders
    assert config["trainer"]["default_root_dir"] == f"runs/quickstart-chat/{stage}"


@pytest.mark.parametrize("stage", STAGES)
def test_chat_configs_parse_with_the_cli(stage, capsys):
    path = ROOT / "configs" / "quickstart-chat" / f"{stage}.yaml"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--config", str(path), "--print_config"], run=False)
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["default_root_dir"] == f"runs/quickstart-chat/{stage}"
    assert printed["data"]["init_args"]["train_data"].startswith("runs/quickstart-chat/data/")


def test_chat_prepare_writes_under_its_own_folder_and_keeps_earlier_outputs(tmp_path):
    """``--chat --prepare-only`` twice: the chat data, a ChatML base model under runs/quickstart-chat/, the first
    run's outputs moved to previous/1, the plain quickstart's folder never touched."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "lit_rlhf.quickstart", "--chat", "--smoke", "--prepare-only"]
    for _ in range(2):
        out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart-chat"
    assert "[quickstart] earlier outputs kept in runs/quickstart-chat/previous/1" in out.stdout
    assert not (tmp_path / "runs" / "quickstart").exists()
    for folder in (run, run / "previous" / "1"):
        first = json.loads((folder / "data" / "sft" / "train.jsonl").read_text().splitlines()[0])
        assert detect_format(read_rows(str(folder / "data" / "sft" / "train.jsonl"))[0]) is Format.PROMPT_COMPLETION
        assert first["prompt"][0]["role"] == "user" and first["completion"][0]["role"] == "assistant"
        config = json.loads((folder / "base" / "tokenizer_config.json").read_text())
        assert (config["eos_token"], config["pad_token"]) == ("<|im_end|>", "<|endoftext|>")
    assert (run / "data" / "sft" / "train.jsonl").read_bytes() == (
        run / "previous" / "1" / "data" / "sft" / "train.jsonl"
    ).read_bytes()  # seeded: the same data again
    assert len((run / "data" / "sft" / "train.jsonl").read_text().splitlines()) == 128  # the --smoke sizes
