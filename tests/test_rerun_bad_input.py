"""A re-run that fails on bad input leaves the earlier run's outputs where they were
(docs/conventions.md#validate-then-move): downstream configs read ``<stage>/export``, so nothing may be moved
into ``previous/<k>/`` before the inputs have been read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lit_rlhf.cli import main, run_main
from lit_rlhf.errors import EXIT_ERROR, TRACEBACK_ENV, ConfigError, DataError, run_command
from lit_rlhf.quickstart.task import prompt_examples
from tests.conftest import write_jsonl
from tests.test_config_errors import without_tokenizer
from tests.test_outputs import snapshot

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "configs" / "quickstart" / "sft.yaml"
PPO = ROOT / "configs" / "quickstart" / "ppo.yaml"


def sft_args(root: Path, model_dir: Path, train: Path, val: Path) -> list[str]:
    return [
        "fit",
        "--config",
        str(SFT),
        f"--trainer.default_root_dir={root}",
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
        f"--model.init_args.model.name_or_path={model_dir}",
        "--model.init_args.micro_batch_size=8",
        "--model.init_args.max_new_tokens=4",
        f"--data.init_args.train_data={train}",
        f"--data.init_args.val_data={val}",
        "--data.init_args.batch_size=8",
    ]


def test_a_rerun_with_a_bad_row_fails_before_moving_the_first_export(
    tmp_path, tiny_model_dir, sft_jsonl, capsys, monkeypatch
):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    root = tmp_path / "sft"
    train, val = sft_jsonl
    main(sft_args(root, tiny_model_dir, train, val))
    first = snapshot(root)
    assert {"export/model.safetensors", "export/tokenizer.json", "checkpoints/last.ckpt"} <= set(first)

    bad = tmp_path / "train.jsonl"
    rows = train.read_text().splitlines()
    bad.write_text("\n".join([*rows[:2], '{"prompt": "The hotel was"}', *rows[2:]]) + "\n")  # no completion
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: run_main(sft_args(root, tiny_model_dir, bad, val)))
    assert exit_info.value.code == EXIT_ERROR
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}:3: "), errors
    assert snapshot(root) == first  # every file of the first run, byte for byte; no previous/1
    assert not (root / "previous").exists()


@pytest.fixture
def ppo_inputs(tmp_path, tiny_model_dir, tiny_classifier_dir, sft_jsonl) -> dict[str, Path]:
    """A PPO run folder holding an earlier run's export, and the inputs of a re-run."""
    root = tmp_path / "ppo"
    (root / "export").mkdir(parents=True)
    (root / "export" / "model.safetensors").write_bytes(bytes(range(256)))
    return {
        "root": root,
        "policy": tiny_model_dir,
        "scorer": tiny_classifier_dir,
        "scorer_without_tokenizer": without_tokenizer(tiny_classifier_dir, tmp_path / "rm-no-tokenizer"),
        "prompts": write_jsonl(tmp_path / "prompts.jsonl", prompt_examples(8, seed=1)),
        "ptx": sft_jsonl[0],
    }


def ppo_args(inputs: dict[str, Path], critic: Path, reward_model: Path, ptx: Path) -> list[str]:
    return [
        "fit",
        "--config",
        str(PPO),
        f"--trainer.default_root_dir={inputs['root']}",
        f"--model.init_args.policy.name_or_path={inputs['policy']}",
        f"--model.init_args.critic.name_or_path={critic}",
        f"--model.init_args.reward_model.name_or_path={reward_model}",
        f"--model.init_args.ptx.data={ptx}",
        f"--data.init_args.train_data={inputs['prompts']}",
        f"--data.init_args.val_data={inputs['prompts']}",
    ]


@pytest.mark.parametrize("role", ["critic", "reward_model"])
def test_a_ppo_rerun_with_a_scoring_model_without_tokenizer_files_moves_nothing(ppo_inputs, role):
    bad, good = ppo_inputs["scorer_without_tokenizer"], ppo_inputs["scorer"]
    critic, reward_model = (bad, good) if role == "critic" else (good, bad)
    before = snapshot(ppo_inputs["root"])
    with pytest.raises(ConfigError) as info:
        main(ppo_args(ppo_inputs, critic, reward_model, ppo_inputs["ptx"]))
    assert str(info.value).startswith(f"{bad}: no tokenizer files (")
    assert str(info.value).endswith(f"set model.init_args.{role}.tokenizer to a folder or hub id that has one")
    assert snapshot(ppo_inputs["root"]) == before
    assert not (ppo_inputs["root"] / "previous").exists()


def test_a_ppo_rerun_with_a_missing_ptx_file_moves_nothing(ppo_inputs, tmp_path):
    missing = tmp_path / "nowhere" / "sft.jsonl"
    before = snapshot(ppo_inputs["root"])
    with pytest.raises(DataError) as info:
        main(ppo_args(ppo_inputs, ppo_inputs["scorer"], ppo_inputs["scorer"], missing))
    assert str(info.value) == f"{missing}: no such file (model.init_args.ptx.data)"
    assert snapshot(ppo_inputs["root"]) == before
    assert not (ppo_inputs["root"] / "previous").exists()


def test_a_model_folder_that_is_not_a_model_is_refused_before_moving(ppo_inputs, tmp_path):
    empty = tmp_path / "empty-export"
    shutil.copytree(ppo_inputs["scorer"], empty)
    (empty / "config.json").unlink()
    before = snapshot(ppo_inputs["root"])
    with pytest.raises(ConfigError) as info:
        main(ppo_args(ppo_inputs, ppo_inputs["scorer"], empty, ppo_inputs["ptx"]))
    assert str(info.value) == (
        f"{empty}: no config.json, not a Hugging Face model folder "
        "(set model.init_args.reward_model.name_or_path to an export or a hub id)"
    )
    assert snapshot(ppo_inputs["root"]) == before
