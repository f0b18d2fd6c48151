"""SFT: tokens/s and peak memory of ``SFTModule`` under the Trainer vs a plain PyTorch loop on the same batches."""

from __future__ import annotations

import torch

from benchmarks.common import PRESETS, BatchTimer, PeakMemory, Timer, base_model_dir, bench_trainer, data_dir, device
from lit_rlhf import ModelSpec, SFTDataModule, SFTModule
from lit_rlhf.hf import load_model, load_tokenizer
from lit_rlhf.rlhf import sft_nll


def batches(preset: str, tokenizer) -> list[dict[str, torch.Tensor]]:
    p = PRESETS[preset]
    dm = SFTDataModule(str(data_dir() / "sft" / "train.jsonl"), batch_size=p["batch_size"], max_length=64)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    loader = dm.train_dataloader()
    return [b for _, b in zip(range(p["steps"] + 1), loader)]


def run_lit_rlhf(preset: str) -> dict[str, float]:
    p = PRESETS[preset]
    path = str(base_model_dir(preset))
    timer = BatchTimer(lambda batch: int(batch["attention_mask"].sum()))
    with PeakMemory() as memory:
        module = SFTModule(ModelSpec(path), optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4))
        data = SFTDataModule(str(data_dir() / "sft" / "train.jsonl"), batch_size=p["batch_size"], max_length=64)
        trainer = bench_trainer([timer], max_steps=p["steps"] + 1)
        trainer.fit(module, datamodule=data)
    return {"tokens_per_s": timer.work / timer.timer.seconds, "seconds": timer.timer.seconds, "peak_mib": memory.mib}


def run_floor(preset: str) -> dict[str, float]:
    path = str(base_model_dir(preset))
    tokenizer = load_tokenizer(path)
    data = batches(preset, tokenizer)
    timer, tokens = Timer(), 0
    with PeakMemory() as memory:
        model = load_model(ModelSpec(path), tokenizer).to(device())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for i, batch in enumerate(data):
            batch = {k: v.to(device()) for k, v in batch.items()}
            if i >= 1:
                timer.__enter__()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll_sum, num_tokens = sft_nll(logits, batch["labels"])
            (nll_sum / num_tokens).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= 1:
                timer.__exit__()
                tokens += int(batch["attention_mask"].sum())
    return {"tokens_per_s": tokens / timer.seconds, "seconds": timer.seconds, "peak_mib": memory.mib}


CASES = {"sft": {"lit_rlhf": run_lit_rlhf, "floor": run_floor}}
