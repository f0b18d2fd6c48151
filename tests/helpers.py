"""Test-only callbacks, rewards and modules, importable by class path from subprocess runs
(``tests.helpers.RecordLosses``, ``tests.helpers:count_e``, ``tests.helpers.DeterministicGroups``)."""

from __future__ import annotations

import json
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lit_rlhf.datamodules.prompts import PromptDataModule
from lit_rlhf.hf.engines import Generation
from lit_rlhf.models import CriticFreeModule
from lit_rlhf.rlhf import truncate_after_eos


class RecordLosses(Callback):
    """Append ``{"step", "loss"}`` after every training batch to a jsonl file; optionally sleep (for signals)."""

    def __init__(self, path: str, metric: str = "train/loss", sleep: float = 0.0) -> None:
        self.path = path
        self.metric = metric
        self.sleep = sleep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        value = float(trainer.callback_metrics[self.metric])
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "loss": value}) + "\n")
        print(f"STEP {trainer.global_step}", flush=True)
        time.sleep(self.sleep)


def read_losses(path) -> dict[int, float]:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return {row["step"]: row["loss"] for row in rows}


class StopAt(Callback):
    """Stop training cleanly after ``step`` optimizer steps (an interruption that keeps the run's config)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def randomize_lora(model: torch.nn.Module, std: float, seed: int, adapters=("default", "policy")) -> None:
    """lora_B starts at 0: give the adapters an effect so that switching them matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f"lora_B.{adapter}." in name for adapter in adapters):
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def cpu_trainer(**kwargs) -> L.Trainer:
    """A quiet single-process CPU Trainer (no logger, checkpoints, progress bar or validation by default)."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


class AnnounceBatches(Callback):
    """Print ``BATCH n`` after the n-th training batch of this process and sleep, so a test can signal mid-run."""

    def __init__(self, sleep: float = 0.0) -> None:
        self.sleep = sleep
        self.seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        print(f"BATCH {self.seen}", flush=True)
        time.sleep(self.sleep)


def trainer_override(run, checkpoint: bool = True, export: bool = True, **settings) -> dict:
    """The ``trainer`` section of a test's YAML override: CPU, quiet, no validation, outputs under ``run``
    (``checkpoints/last.ckpt`` and the Hugging Face ``export/``, each when asked), plus ``settings``."""
    callbacks = []
    if checkpoint:
        callbacks.append(
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True, "save_top_k": 0},
            }
        )
    if export:
        callbacks.append({"class_path": "lit_rlhf.callbacks.HFExport", "init_args": {"dirpath": str(run / "export")}})
    return {
        "accelerator": "cpu",
        "default_root_dir": str(run),
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "callbacks": callbacks,
        **settings,
    }


def nan_scores(prompts, responses) -> list[float]:
    """A reward function that always fails (NaN), to trip the numerical-fault guard."""
    return [float("nan")] * len(responses)


def count_e(prompts: list[str], responses: list[str]) -> list[float]:
    """A rule-based reward: one point per letter "e"."""
    return [float(r.count("e")) for r in responses]


class DeterministicGroups(CriticFreeModule):
    """Samples that depend only on the prompt, its position in its group and the iteration, not on the process or
    the seed: a run on 2 processes then sees exactly the responses of one process with twice the batch."""

    def generate(self, prompt_ids, prompt_mask, seed):
        tok, k = self.tokenizer, self.algorithm.group_size
        words = torch.tensor(tok(" the movie was great awful fine")["input_ids"])
        length = self.sampling.max_new_tokens
        rows = []
        for i, (ids, mask) in enumerate(zip(prompt_ids, prompt_mask, strict=True)):
            key = int((ids[mask.bool()] * torch.arange(1, int(mask.sum()) + 1)).sum()) * 31 + i % k
            gen = torch.Generator().manual_seed(key + 1000 * self.iteration)
            row = words[torch.randint(len(words), (length,), generator=gen)]
            row[int(torch.randint(1, length, (1,), generator=gen))] = tok.eos_token_id
            rows.append(row)
        responses = truncate_after_eos(torch.stack(rows).to(prompt_ids.device), tok.eos_token_id, tok.pad_token_id)
        return Generation(responses)


def prompt_batch(module, path, size: int) -> dict:
    """The first ``size`` prompts of a prompt file, collated as a training batch for ``module``'s tokenizer."""
    dm = PromptDataModule(str(path), batch_size=size)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    return dm.collate([dm.train_dataset[i] for i in range(size)])
