"""The LightningCLI entry point: every shipped YAML parses, and a tiny SFT run goes end to end."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_rlhf.cli import main
from lit_rlhf.datamodules import PreferenceDataModule, PromptDataModule, RLHFDataModule, SFTDataModule

ROOT = Path(__file__).resolve().parents[1]
# configs/iterate/ drive the round loop (python -m lit_rlhf.iterate), not a stage: tests/test_iterate.py
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "iterate" not in p.relative_to(ROOT).parts)
BASE = ROOT / "configs" / "quickstart" / "sft.yaml"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_parses_and_instantiates(config, capsys):
    content = yaml.safe_load(config.read_text())
    # presets that hold only trainer settings (strategies) are stacked on a stage config, as users do
    stack = [] if "model" in content else ["--config", str(BASE)]
    with pytest.raises(SystemExit) as exit_info:
        main([*stack, "--config", str(config), "--print_config"], run=False)
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("lit_rlhf.")
    if "strategy" in content.get("trainer", {}):
        return  # FSDP and DeepSpeed need CUDA (and deepspeed) to be instantiated
    # accelerator forced to CPU: this checks the schema and the constructors, not the hardware
    cli = main([*stack, "--config", str(config), "--trainer.logger=false", "--trainer.accelerator=cpu"], run=False)
    assert cli.model.__class__.__module__.startswith("lit_rlhf")
    assert cli.datamodule is not None


@pytest.mark.parametrize("cls", [SFTDataModule, PromptDataModule, PreferenceDataModule], ids=lambda c: c.__name__)
def test_each_data_module_schema_holds_the_shared_arguments_it_passes_on(cls):
    """The stage DataModules take the arguments they share as ``**kwargs`` of RLHFDataModule: the config schema
    still lists every one with its default, and a config value reaches the instance."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    defaults = parser.get_defaults().as_dict()["data"]
    shared = list(inspect.signature(RLHFDataModule.__init__).parameters.values())[1:]
    assert len(shared) == 9
    for param in shared:
        assert defaults[param.name] == (None if param.default is inspect.Parameter.empty else param.default)
    values = ["--data.train_data=rows.jsonl", "--data.val_fraction=0.25", "--data.batch_size=3", "--data.seed=7"]
    data = parser.instantiate(parser.parse_args([*values, "--data.tokenizer=tok", "--data.val_split=dev"])).data
    assert type(data) is cls
    assert (data.train_data, data.val_fraction, data.batch_size, data.seed) == ("rows.jsonl", 0.25, 3, 7)
    assert (data.tokenizer_name, data.val_split, data.train_split, data.val_data) == ("tok", "dev", "train", None)


def test_unknown_key_and_wrong_type_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        main(["--config", str(BASE), "--model.init_args.micro_batch_sise=2"], run=False)
    assert "micro_batch_sise" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(BASE), "--model.init_args.micro_batch_size=two"], run=False)
    assert "micro_batch_size" in capsys.readouterr().err


def override_yaml(tmp_path: Path, model_dir: Path, train: Path, val: Path) -> Path:
    run = tmp_path / "run"
    override = {
        "trainer": {
            "max_steps": 3,
            "max_epochs": 3,
            "default_root_dir": str(run),
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run)},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True},
                },
                {"class_path": "lit_rlhf.callbacks.HFExport", "init_args": {"dirpath": str(run / "export")}},
            ],
        },
        "model": {"init_args": {"model": {"name_or_path": str(model_dir)}, "micro_batch_size": 4}},
        "data": {"init_args": {"train_data": str(train), "val_data": str(val), "batch_size": 8}},
    }
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


def test_fit_quickstart_config_writes_checkpoint_and_export(tmp_path, tiny_model_dir, sft_jsonl):
    override = override_yaml(tmp_path, tiny_model_dir, *sft_jsonl)
    main(["fit", "--config", str(BASE), "--config", str(override)])
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    model = AutoModelForCausalLM.from_pretrained(run / "export")
    tokenizer = AutoTokenizer.from_pretrained(run / "export")
    out = model.generate(
        **tokenizer("The movie was", return_tensors="pt"),
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert out.shape[1] > 3
    saved = yaml.safe_load(next(run.rglob("config.yaml")).read_text())
    assert saved["model"]["class_path"] == "lit_rlhf.models.SFTModule"

    # validate/test reuse the same config; resuming from the checkpoint continues the step count
    main(
        [
            "validate",
            "--config",
            str(BASE),
            "--config",
            str(override),
            "--ckpt_path",
            str(run / "checkpoints" / "last.ckpt"),
        ]
    )
    main(
        [
            "fit",
            "--config",
            str(BASE),
            "--config",
            str(override),
            "--trainer.max_steps=5",
            "--ckpt_path",
            str(run / "checkpoints" / "last.ckpt"),
        ]
    )
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_python_m_and_print_config():
    out = subprocess.run(
        [sys.executable, "-m", "lit_rlhf", "fit", "--config", str(BASE), "--print_config"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    printed = yaml.safe_load(out.stdout)
    assert printed["model"]["init_args"]["model"]["dropout"] == 0.0
    assert printed["data"]["class_path"] == "lit_rlhf.datamodules.SFTDataModule"


def test_predict_writes_sft_completions(tmp_path, tiny_model_dir):
    import json

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The movie was", "id": 1}\n{"prompt": "The hotel was", "id": 2}\n')
    out = tmp_path / "completions.jsonl"
    writer = {
        "class_path": "lit_rlhf.callbacks.JsonlPredictionWriter",
        "init_args": {"output_path": str(out), "key": "completion"},
    }
    main(
        [
            "predict",
            "--config",
            str(BASE),
            "--trainer.logger=false",
            f"--trainer.callbacks=[{json.dumps(writer)}]",
            f"--model.init_args.model.name_or_path={tiny_model_dir}",
            "--model.init_args.max_new_tokens=5",
            f"--data.init_args.predict_data={prompts}",
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2]
    assert all(isinstance(r["completion"], str) and r["completion"] for r in rows)
