"""Multi-process behaviour with Lightning's DDP on CPU (gloo), through the real CLI in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT / "configs" / "quickstart" / "sft.yaml"


def sft_override(tmp_path: Path, name: str, model_dir: Path, train: Path, batch_size: int, max_steps: int) -> Path:
    run = tmp_path / name
    override = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": max_steps,
            "max_epochs": -1,
            "default_root_dir": str(run),
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True, "save_top_k": 0},
                },
                {"class_path": "lit_rlhf.callbacks.HFExport", "init_args": {"dirpath": str(run / "export")}},
            ],
        },
        "model": {
            "init_args": {
                "model": {"name_or_path": str(model_dir)},
                "max_grad_norm": None,
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}},
            }
        },
        "data": {"init_args": {"train_data": str(train), "val_data": None, "batch_size": batch_size}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


def cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "lit_rlhf", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.timeout(600)
def test_sft_ddp_two_processes_equals_one_process_with_twice_the_batch(tiny_model_dir, sft_jsonl, tmp_path):
    single = sft_override(tmp_path, "single", tiny_model_dir, sft_jsonl[0], batch_size=8, max_steps=2)
    ddp = sft_override(tmp_path, "ddp", tiny_model_dir, sft_jsonl[0], batch_size=4, max_steps=2)
    cli("fit", "--config", str(SFT), "--config", str(single))
    cli("fit", "--config", str(SFT), "--config", str(ddp), "--trainer.devices=2", "--trainer.strategy=ddp")
    one = load_file(tmp_path / "single" / "export" / "model.safetensors")
    two = load_file(tmp_path / "ddp" / "export" / "model.safetensors")
    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(one[k], initial[k]) for k in one), "two SGD steps must change the weights"
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0, msg=key)

    # a checkpoint written under DDP resumes in a single process and continues the step count
    ckpt = tmp_path / "ddp" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 2
    cli("fit", "--config", str(SFT), "--config", str(ddp), "--trainer.max_steps=3", f"--ckpt_path={ckpt}")
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
