"""Interrupted runs resume where they stopped: same data position, optimizer, schedule and losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_rlhf import ModelSpec, SFTDataModule, SFTModule
from lit_rlhf.callbacks import PreemptionCheckpoint
from lit_rlhf.datamodules.loader import ResumableLoader
from tests.helpers import RecordLosses, StopAt, read_losses

ROOT = Path(__file__).resolve().parents[1]


def fit(model_dir, sft_jsonl, log, ckpt_dir, stop_at=None, ckpt_path=None):
    L.seed_everything(0)
    module = SFTModule(ModelSpec(str(model_dir)), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = SFTDataModule(str(sft_jsonl[0]), batch_size=8, max_length=48)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=14,
        max_epochs=-1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordLosses(str(log)), ModelCheckpoint(dirpath=ckpt_dir, save_last=True)]
        + ([StopAt(stop_at)] if stop_at else []),
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)


@pytest.mark.parametrize("stop_at", [3, 8, 11])  # mid-epoch, end of epoch 0, mid-epoch 1 (8 batches an epoch)
def test_resume_reproduces_the_uninterrupted_losses(tiny_model_dir, sft_jsonl, tmp_path, stop_at):
    fit(tiny_model_dir, sft_jsonl, tmp_path / "full.jsonl", tmp_path / "full")
    fit(tiny_model_dir, sft_jsonl, tmp_path / "part.jsonl", tmp_path / "part", stop_at=stop_at)
    fit(tiny_model_dir, sft_jsonl, tmp_path / "part.jsonl", tmp_path / "part", ckpt_path="last")
    full, resumed = read_losses(tmp_path / "full.jsonl"), read_losses(tmp_path / "part.jsonl")
    assert sorted(resumed) == list(range(1, 15))
    for step in range(1, 15):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step


def test_data_order_continues_after_a_stop_at_max_steps(tiny_model_dir, sft_jsonl, tmp_path):
    """Lightning counts an epoch cut short by max_steps as finished; the data position must not."""

    class RecordBatches(L.Callback):
        def __init__(self):
            self.batches = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches.append(batch["input_ids"][:, :4].tolist())

    def run(max_steps, ckpt_path=None, dirpath=tmp_path / "ck"):
        record = RecordBatches()
        module = SFTModule(
            ModelSpec(str(tiny_model_dir)),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        )
        L.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            max_epochs=-1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[record, ModelCheckpoint(dirpath=dirpath, save_last=True)],
        ).fit(module, datamodule=SFTDataModule(str(sft_jsonl[0]), batch_size=8), ckpt_path=ckpt_path)
        return record.batches

    full = run(12, dirpath=tmp_path / "full")
    assert run(5) + run(12, ckpt_path="last") == full


def test_loader_shards_evenly_and_shuffles_per_epoch():
    dataset = list(range(10))
    loaders = [ResumableLoader(dataset, 2, list, progress=lambda: 0, seed=1, rank=r, world_size=3) for r in range(3)]
    batches = [loader.batches(0) for loader in loaders]
    assert all(len(b) == 2 == len(loader) for b, loader in zip(batches, loaders))
    seen = sorted(i for b in batches for batch in b for i in batch)
    assert set(seen) == set(range(10)) and len(seen) == 12  # 2 wrapped around so every rank has 4
    assert loaders[0].batches(0) != loaders[0].batches(1)
    assert loaders[0].batches(1) == ResumableLoader(dataset, 2, list, lambda: 0, seed=1, world_size=3).batches(1)


def test_sigterm_to_a_real_run_saves_a_checkpoint_that_resumes_the_same_run(tiny_model_dir, sft_jsonl, tmp_path):
    def config(name, sleep, max_steps):
        run = tmp_path / name
        override = {
            "trainer": {
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
                        "init_args": {"dirpath": str(run / "checkpoints"), "save_top_k": 0},
                    },
                    {"class_path": "lit_rlhf.callbacks.PreemptionCheckpoint"},
                    {
                        "class_path": "tests.helpers.RecordLosses",
                        "init_args": {"path": str(tmp_path / f"{name}.jsonl"), "sleep": sleep},
                    },
                ],
            },
            "model": {"init_args": {"model": {"name_or_path": str(tiny_model_dir)}}},
            "data": {"init_args": {"train_data": str(sft_jsonl[0]), "val_data": None, "batch_size": 8}},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(override))
        return ["--config", str(ROOT / "configs/quickstart/sft.yaml"), "--config", str(path)]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "lit_rlhf", "fit"]
    subprocess.run(cmd + config("full", 0.0, 12), check=True, cwd=ROOT, env=env, capture_output=True)

    proc = subprocess.Popen(cmd + config("part", 0.5, 12), cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("STEP 4"):
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=120)
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert ckpt.exists(), "the interrupted run must leave a resumable checkpoint"
    stopped_at = torch.load(ckpt, weights_only=True)["global_step"]
    assert 4 <= stopped_at < 12
    subprocess.run(
        cmd + config("part", 0.0, 12) + ["--ckpt_path", "last"], check=True, cwd=ROOT, env=env, capture_output=True
    )
    full, resumed = read_losses(tmp_path / "full.jsonl"), read_losses(tmp_path / "part.jsonl")
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step


def test_preemption_checkpoint_defaults_to_the_model_checkpoint_folder(tmp_path):
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck")], logger=False)
    assert PreemptionCheckpoint().checkpoint_path(trainer) == tmp_path / "ck" / "last.ckpt"


def test_the_lr_schedule_length_is_filled_in_once_training_starts(tiny_model_dir, sft_jsonl):
    from lit_rlhf.models import WarmupCosineLR
    from tests.helpers import cpu_trainer

    module = SFTModule(ModelSpec(str(tiny_model_dir)), lr_scheduler=lambda opt: WarmupCosineLR(opt, warmup_steps=2))
    trainer = cpu_trainer(max_epochs=2)  # 64 examples in batches of 8: 16 optimizer steps
    trainer.fit(module, datamodule=SFTDataModule(str(sft_jsonl[0]), batch_size=8))
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == 16
    # the cosine ran to its end: min_lr_ratio (0.1) x the default AdamW LR (1e-5)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-6, rel=1e-6)


def test_a_loader_built_before_the_restore_is_refused_instead_of_repeating_batches(tiny_model_dir, sft_jsonl, tmp_path):
    class EagerSchedule(SFTModule):
        def configure_optimizers(self):
            steps = self.trainer.estimated_stepping_batches  # builds the training loader before the restore
            optimizer = torch.optim.AdamW(self.trainer_parameters(), lr=1e-3)
            return {
                "optimizer": optimizer,
                "lr_scheduler": torch.optim.lr_scheduler.LinearLR(optimizer, total_iters=steps),
            }

        def trainer_parameters(self):
            return [p for p in self.parameters() if p.requires_grad]

    def run(max_steps: int, ckpt_path=None):
        L.Trainer(
            accelerator="cpu",
            max_epochs=2,
            max_steps=max_steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        ).fit(
            EagerSchedule(ModelSpec(str(tiny_model_dir))),
            SFTDataModule(str(sft_jsonl[0]), batch_size=8),
            ckpt_path=ckpt_path,
        )

    run(3)
    with pytest.raises(RuntimeError, match="starts at batch 0 of the run, but 3 batches were already trained"):
        run(6, ckpt_path="last")
