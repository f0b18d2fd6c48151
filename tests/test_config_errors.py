"""Configuration errors are one line that names the file, the line and what to write instead
(docs/conventions.md#configuration-errors), and none of them moves an earlier run's outputs aside."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from lit_rlhf.cli import main
from lit_rlhf.errors import EXIT_ERROR, ConfigError
from lit_rlhf.hf import ModelSpec, load_tokenizer
from tests.test_exit_codes import lit_rlhf

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "configs" / "quickstart" / "sft.yaml"
PPO = ROOT / "configs" / "quickstart" / "ppo.yaml"
HINT = "(run `python -m lit_rlhf fit --help` for the accepted options)"
MISSING = "no tokenizer files (one of tokenizer.json, vocab.json, vocab.txt, *.model, *.tiktoken)"


@pytest.fixture(autouse=True)
def _run_as_module(monkeypatch):
    """The hint names the program as ``sys.argv[0]`` gives it; pytest workers (xdist) have another argv[0]."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "lit_rlhf" / "__main__.py")])


def parse_error(args: list[str], capsys) -> list[str]:
    """stderr lines of a command refused by the argument parser (exit status 2), as ``lit-rlhf`` runs it."""
    with pytest.raises(SystemExit) as exit_info:
        main(args, short_errors=True)
    assert exit_info.value.code == EXIT_ERROR
    return capsys.readouterr().err.strip().splitlines()


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "override.yaml"
    bad.write_text("model:\n  init_args:\n    micro_batch_size: [2\n")  # the flow sequence is never closed
    assert parse_error(["fit", "--config", str(SFT), f"--config={bad}"], capsys) == [
        f"error: {bad}:4:1: invalid YAML: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence at line 3)",
        HINT,
    ]
    tab = tmp_path / "tab.yaml"
    tab.write_text("trainer:\n  max_epochs: 1\n\tdevices: 1\n")
    assert parse_error(["fit", "--config", str(SFT), "--config", str(tab)], capsys)[0] == (
        f"error: {tab}:3:1: invalid YAML: found character '\\t' that cannot start any token"
    )


@pytest.mark.parametrize(
    ("yaml_text", "line", "column", "option", "suggestion"),
    [
        (
            "model:\n  init_args:\n    micro_batch_sise: 2\n",
            3,
            5,
            "model.init_args.micro_batch_sise",
            "model.init_args.micro_batch_size",
        ),
        (
            "seed_everything: 1\nmodel:\n  init_args:\n    model:\n      dropuot: 0.0\n",
            5,
            7,
            "model.init_args.model.dropuot",
            "model.init_args.model.dropout",
        ),
        ("data:\n  init_args:\n    max_lenght: 8\n", 3, 5, "data.init_args.max_lenght", "data.init_args.max_length"),
        ("trainer:\n  max_epochs: 1\n  max_step: 2\n", 3, 3, "trainer.max_step", "trainer.max_steps"),
    ],
    ids=["module", "model-spec", "data", "trainer"],
)
def test_a_misspelt_key_names_its_file_and_line_and_the_closest_valid_key(
    tmp_path, capsys, yaml_text, line, column, option, suggestion
):
    override = tmp_path / "override.yaml"
    override.write_text(yaml_text)
    err = parse_error(["fit", "--config", str(SFT), "--config", str(override)], capsys)
    assert (
        err[0] == f"error: {override}:{line}:{column}: option '{option}' is not accepted; did you mean '{suggestion}'?"
    )
    assert len(err) == 2


def test_a_misspelt_key_of_a_nested_dataclass_has_no_init_args_level(tmp_path, capsys):
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  init_args:\n    ppo:\n      clip_rang: 0.1\n")
    err = parse_error(["fit", "--config", str(PPO), "--config", str(override)], capsys)
    assert err[0] == (
        f"error: {override}:4:7: option 'model.init_args.ppo.clip_rang' is not accepted; "
        "did you mean 'model.init_args.ppo.clip_range'?"
    )


def test_a_misspelt_command_line_option_gets_a_suggestion_and_no_file(capsys):
    err = parse_error(["fit", "--config", str(SFT), "--model.init_args.model.dropuot=0.1"], capsys)
    assert err[0] == (
        "error: option 'model.init_args.model.dropuot' is not accepted; did you mean 'model.init_args.model.dropout'?"
    )


def earlier_run(tmp_path: Path) -> tuple[Path, bytes]:
    """A run folder holding an earlier export: what a refused re-run must leave in place."""
    root = tmp_path / "run"
    (root / "export").mkdir(parents=True)
    weights = bytes(range(256)) * 4
    (root / "export" / "model.safetensors").write_bytes(weights)
    return root, weights


def assert_untouched(root: Path, weights: bytes) -> None:
    assert (root / "export" / "model.safetensors").read_bytes() == weights
    assert not (root / "previous").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            "--trainer.gradient_clip_val=0.5",
            "trainer.gradient_clip_val=0.5: lit_rlhf modules use manual optimisation and clip gradients themselves; "
            "remove it and set model.init_args.max_grad_norm instead",
        ),
        (
            "--trainer.accumulate_grad_batches=4",
            "trainer.accumulate_grad_batches=4: lit_rlhf modules use manual optimisation and accumulate themselves "
            "(one optimizer step = one batch of data.init_args.batch_size); remove it and set "
            "model.init_args.micro_batch_size to the rows per forward pass instead",
        ),
    ],
    ids=["gradient_clip_val", "accumulate_grad_batches"],
)
def test_lightning_options_manual_optimisation_refuses_point_to_the_module_options(
    tmp_path, tiny_model_dir, sft_jsonl, option, message
):
    root, weights = earlier_run(tmp_path)
    args = [
        "fit",
        "--config",
        str(SFT),
        f"--trainer.default_root_dir={root}",
        f"--model.init_args.model.name_or_path={tiny_model_dir}",
        f"--data.init_args.train_data={sft_jsonl[0]}",
        f"--data.init_args.val_data={sft_jsonl[1]}",
        option,
    ]
    with pytest.raises(ConfigError) as info:
        main(args)
    assert str(info.value) == message
    assert_untouched(root, weights)


def test_gradient_clip_val_in_yaml_is_one_line_from_the_command(tmp_path, tiny_model_dir, sft_jsonl):
    root, weights = earlier_run(tmp_path)
    override = tmp_path / "override.yaml"
    override.write_text(
        yaml.safe_dump(
            {
                "trainer": {"gradient_clip_val": 1.0, "default_root_dir": str(root)},
                "model": {"init_args": {"model": {"name_or_path": str(tiny_model_dir)}}},
                "data": {"init_args": {"train_data": str(sft_jsonl[0]), "val_data": str(sft_jsonl[1])}},
            }
        )
    )
    out = lit_rlhf(["fit", "--config", str(SFT), "--config", str(override)], tmp_path)
    assert out.returncode == EXIT_ERROR, out.stderr[-3000:]
    assert [line for line in out.stderr.splitlines() if line.startswith("error: ")] == [
        "error: trainer.gradient_clip_val=1.0: lit_rlhf modules use manual optimisation and clip gradients "
        "themselves; remove it and set model.init_args.max_grad_norm instead"
    ]
    assert "Traceback" not in out.stderr
    assert_untouched(root, weights)


def without_tokenizer(model_dir: Path, dest: Path) -> Path:
    """A copy of a saved model folder with its weights and config but none of its tokenizer files."""
    dest.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, dest / name)
    assert (dest / "model.safetensors").is_file()
    return dest


def test_a_model_folder_without_tokenizer_files_is_refused_by_name(tmp_path, tiny_model_dir):
    folder = without_tokenizer(tiny_model_dir, tmp_path / "no-tokenizer")
    with pytest.raises(ConfigError) as info:
        load_tokenizer(ModelSpec(str(folder)))
    assert str(info.value) == (
        f"{folder}: {MISSING}; save the tokenizer there (tokenizer.save_pretrained) or set ModelSpec.tokenizer "
        "(e.g. model.init_args.model.tokenizer) to a folder or hub id that has one"
    )
    # `tokenizer:` pointing at a folder that has one is the fix
    assert len(load_tokenizer(ModelSpec(str(folder), tokenizer=str(tiny_model_dir)))) == 320


def test_a_config_json_naming_a_tokenizer_class_is_not_enough(tmp_path):
    # transformers builds a GPT-2 tokenizer of one special token from this folder: every text would be empty
    folder = tmp_path / "gpt2-like"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=rf"^{folder}: no tokenizer files \("):
        load_tokenizer(ModelSpec(str(folder)))


def test_a_tokenizer_with_an_empty_vocabulary_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = {"<eos>": 0, "<pad>": 1, "<unk>": 2}
    backend = Tokenizer(models.WordLevel(vocab=specials, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    folder = tmp_path / "empty"
    tokenizer.save_pretrained(folder)
    with pytest.raises(ConfigError) as info:
        load_tokenizer(ModelSpec(str(folder)))
    assert str(info.value) == (
        f"{folder}: the tokenizer has an empty vocabulary (special tokens only); set ModelSpec.tokenizer "
        "(e.g. model.init_args.model.tokenizer) to a folder or hub id with a complete tokenizer"
    )


def test_fit_names_the_option_of_a_model_without_tokenizer_files_and_moves_nothing(tmp_path, tiny_model_dir, sft_jsonl):
    folder = without_tokenizer(tiny_model_dir, tmp_path / "no-tokenizer")
    root, weights = earlier_run(tmp_path)
    args = [
        "fit",
        "--config",
        str(SFT),
        f"--trainer.default_root_dir={root}",
        f"--model.init_args.model.name_or_path={folder}",
        f"--data.init_args.train_data={sft_jsonl[0]}",
        f"--data.init_args.val_data={sft_jsonl[1]}",
    ]
    with pytest.raises(ConfigError) as info:
        main(args)
    assert str(info.value) == (
        f"{folder}: {MISSING}; save the tokenizer there (tokenizer.save_pretrained) or set "
        "model.init_args.model.tokenizer to a folder or hub id that has one"
    )
    assert_untouched(root, weights)


def test_a_wrong_value_names_the_file_that_set_it_last_or_the_command_line(tmp_path, capsys):
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  init_args:\n    micro_batch_size: two\n")  # sft.yaml sets it too, at line 25
    err = parse_error(["fit", "--config", str(SFT), "--config", str(override)], capsys)
    assert (
        err[0]
        == f"error: {override}:3:5: option 'model.init_args.micro_batch_size': Expected a <class 'int'>, got 'two'"
    )
    err = parse_error(["fit", "--config", str(SFT), "--model.init_args.model.dtype=float33"], capsys)
    assert err[0] == (
        "error: option 'model.init_args.model.dtype': Expected a typing.Literal['auto', 'float32', 'bfloat16', "
        "'float16'], got 'float33'"
    )


def test_a_misspelt_class_path_gets_the_closest_class_and_its_place(tmp_path, capsys):
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  class_path: lit_rlhf.models.SFTModul\n")
    err = parse_error(["fit", "--config", str(SFT), "--config", str(override)], capsys)
    assert err[0] == (
        f"error: {override}:2:15: no class 'lit_rlhf.models.SFTModul'; did you mean 'lit_rlhf.models.SFTModule'?"
    )
