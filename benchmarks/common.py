"""Shared benchmark plumbing: presets, the benchmark model, timing and peak-memory measurement."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

PRESETS = {
    # ~4M parameters: 6 layers of width 256 (the "tiny but not trivial" size); widths are multiples of
    # 64 because bitsandbytes' 4-bit CPU inference kernel needs them
    "cpu": dict(
        hidden_size=256,
        num_layers=6,
        num_heads=4,
        intermediate_size=704,
        n_examples=128,
        batch_size=16,
        steps=8,
        prompts=64,
        new_tokens=32,
        ppo_epochs=4,
        minibatches=4,
        k=4,
    ),
    # 113M parameters (12 layers of width 768, MLP 3072, fp32): the PPO memory comparison of issue 16
    # (benchmarks/ppo_memory.py): 16 prompts x 16 new tokens, 1 epoch, 1 minibatch in micro-batches of 8
    "mid": dict(
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        n_examples=128,
        batch_size=16,
        steps=4,
        prompts=16,
        new_tokens=16,
        ppo_epochs=1,
        minibatches=1,
        micro_batch_size=8,
        k=4,
    ),
    # ~160M parameters, for GPUs
    "gpu": dict(
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=2048,
        n_examples=1024,
        batch_size=32,
        steps=20,
        prompts=256,
        new_tokens=64,
        ppo_epochs=4,
        minibatches=4,
        k=4,
    ),
}
# 134M parameters: 12 layers of width 768, MLP 2048, a 32,000-row vocabulary (embedding rows past the
# tokenizer's 512, untied), fp32 -- the shape of the model on which vLLM was first measured here (issue 22):
# the per-token output projection and softmax of a real vocabulary, which the 512-token presets lack
PRESETS["mid32k"] = {**PRESETS["mid"], "intermediate_size": 2048, "vocab_size": 32000}
CACHE = Path(os.environ.get("LIT_RLHF_BENCH_DIR", "runs/bench"))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def base_model_dir(preset: str) -> Path:
    """Build (once) the benchmark Llama and its tokenizer as a Hugging Face folder."""
    from lit_rlhf.quickstart.assets import build_tiny_llama, build_tokenizer
    from lit_rlhf.quickstart.task import corpus

    p = PRESETS[preset]
    vocab = f"-v{p['vocab_size']}" if "vocab_size" in p else ""
    path = CACHE / f"base-{preset}-{p['hidden_size']}x{p['num_layers']}-{p['intermediate_size']}{vocab}"
    if not (path / "config.json").exists():
        tokenizer = build_tokenizer(corpus(seed=0), vocab_size=512)
        build_tiny_llama(
            path,
            tokenizer,
            hidden_size=p["hidden_size"],
            num_layers=p["num_layers"],
            num_heads=p["num_heads"],
            intermediate_size=p["intermediate_size"],
            vocab_size=p.get("vocab_size"),
        )
    return path


def data_dir() -> Path:
    from lit_rlhf.quickstart.task import write_quickstart_data

    path = CACHE / "data"
    if not (path / "sft" / "train.jsonl").exists():
        write_quickstart_data(path, seed=0)
    return path


class PeakMemory:
    """Peak memory in MiB over a block: CUDA allocator peak on GPU, growth of the process's peak RSS on CPU."""

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            import psutil

            self.start = psutil.Process().memory_info().rss
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.mib = max(peak - self.start, 0) / 2**20


@dataclass
class Timer:
    """Accumulates wall time of timed sections (synchronising CUDA first)."""

    seconds: float = 0.0

    def __enter__(self) -> Timer:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._t0


class BatchTimer(L.Callback):
    """Times training batches after the first (warm-up) one and sums the work they hold.

    Args:
        count: maps a batch to its work (tokens, comparisons...).
    """

    def __init__(self, count: Callable[[dict], int]) -> None:
        self.timer, self.count, self.work = Timer(), count, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx >= 1:
            self.timer.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= 1:
            self.timer.__exit__()
            self.work += self.count(batch)


def bench_trainer(callbacks: list, **limits) -> L.Trainer:
    """A Trainer with nothing on the side (no logger, checkpoints, progress bar, summary or validation), so the
    timings are the training loop's own; ``limits`` sets ``max_steps`` or ``limit_train_batches``."""
    return L.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        **limits,
    )
