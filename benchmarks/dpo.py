"""DPO: comparisons/s on K-wise (K=4) rankings under the Trainer, with the reference log-probs recomputed every
step (a frozen copy) or cached once before training, beside a plain-PyTorch floor that recomputes them."""

from __future__ import annotations

import itertools
import time

import lightning as L
import torch

from benchmarks.common import PRESETS, BatchTimer, PeakMemory, Timer, base_model_dir, bench_trainer, device
from benchmarks.rm import ranked_pairs, ranking_file
from lit_rlhf import ModelSpec
from lit_rlhf.datamodules import PreferenceDataModule
from lit_rlhf.hf import load_model, load_tokenizer
from lit_rlhf.models import DPOModule
from lit_rlhf.rlhf import kwise_preference_loss, sequence_logprobs


class FitStartTimer(L.Callback):
    """Seconds from ``on_fit_start`` (callbacks run before the module's hook) to ``on_train_start``: the
    module's one-off work before the first batch, here the reference log-prob cache."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self._t0


def _run_module(preset: str, cached: bool) -> dict[str, float]:
    p = PRESETS[preset]
    timer, start = BatchTimer(ranked_pairs), FitStartTimer()
    with PeakMemory() as memory:
        module = DPOModule(
            ModelSpec(str(base_model_dir(preset))),
            precompute_ref_logprobs=cached,
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4),
        )
        data = PreferenceDataModule(ranking_file(preset, False), batch_size=p["batch_size"], max_length=64)
        bench_trainer([timer, start], max_steps=p["steps"] + 1).fit(module, datamodule=data)
    result = {"comparisons_per_s": timer.work / timer.timer.seconds, "seconds": timer.timer.seconds}
    if cached:
        result["cache_seconds"] = start.seconds
    return {**result, "peak_mib": memory.mib}


def run_recompute(preset: str) -> dict[str, float]:
    return _run_module(preset, cached=False)


def run_cached(preset: str) -> dict[str, float]:
    return _run_module(preset, cached=True)


def run_floor(preset: str) -> dict[str, float]:
    """Policy and frozen reference copy; each step: reference forward (no grad), policy forward, per-response
    log-probs from the full logits, the K-wise sigmoid loss, backward, clip, AdamW step."""
    p = PRESETS[preset]
    path = str(base_model_dir(preset))
    tokenizer = load_tokenizer(path)
    data = PreferenceDataModule(ranking_file(preset, False), batch_size=p["batch_size"], max_length=64)
    data.tokenizer = tokenizer
    data.setup("fit")
    batches = list(itertools.islice(iter(data.train_dataloader()), p["steps"] + 1))
    timer, pairs = Timer(), 0
    with PeakMemory() as memory:
        policy = load_model(ModelSpec(path), tokenizer, kind="causal_lm").to(device())
        reference = load_model(ModelSpec(path), tokenizer, kind="causal_lm", trainable=False).to(device())
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
        for i, batch in enumerate(batches):
            batch = {k: v.to(device()) for k, v in batch.items()}
            if i >= 1:
                timer.__enter__()
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            with torch.no_grad():
                ref_logps, _ = sequence_logprobs(reference(input_ids=ids, attention_mask=mask).logits, labels)
            logps, lengths = sequence_logprobs(policy(input_ids=ids, attention_mask=mask).logits, labels)
            shape = batch["ranks"].shape
            out = kwise_preference_loss(
                "sigmoid",
                logps.view(shape),
                lengths.view(shape),
                batch["ranks"],
                batch["response_mask"],
                ref_logps.view(shape),
                beta=0.1,
            )
            (out.loss_sum / shape[0]).backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= 1:
                timer.__exit__()
                pairs += ranked_pairs(batch)
    return {"comparisons_per_s": pairs / timer.seconds, "seconds": timer.seconds, "peak_mib": memory.mib}


CASES = {"dpo": {"lit_rlhf": run_recompute, "floor": run_floor, "lit_rlhf_cached_ref": run_cached}}
