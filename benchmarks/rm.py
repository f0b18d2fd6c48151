"""RM: comparisons/s and peak memory for K-wise (K=4) data under the Trainer, its plain-PyTorch floor, and the
same rankings fed as separate pairs (InstructGPT's reason for K-wise batching: one forward per response)."""

from __future__ import annotations

import itertools
import json

import torch

from benchmarks.common import CACHE, PRESETS, BatchTimer, PeakMemory, Timer, base_model_dir, bench_trainer, device
from lit_rlhf import ModelSpec
from lit_rlhf.datamodules import PreferenceDataModule
from lit_rlhf.hf import load_model, load_tokenizer
from lit_rlhf.models import RewardModule
from lit_rlhf.quickstart.task import ranking_examples
from lit_rlhf.rlhf import kwise_ranking_loss


def ranking_file(preset: str, pairs: bool) -> str:
    p = PRESETS[preset]
    rows = ranking_examples(p["batch_size"] * (p["steps"] + 1), seed=0, k=p["k"])
    if pairs:  # every ordered pair of a ranking as its own example: C(K,2) rows per prompt
        rows = [
            {"prompt": r["prompt"], "chosen": r["responses"][w], "rejected": r["responses"][loser]}
            for r in rows
            for w, loser in itertools.combinations(r["ranking"], 2)
        ]
    path = CACHE / f"rm-{preset}-{'pairs' if pairs else 'kwise'}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ranked_pairs(batch: dict) -> int:
    """Ordered (better, worse) pairs of a preference batch."""
    ranks, real = batch["ranks"], batch["response_mask"].bool()
    return int(((ranks[:, :, None] < ranks[:, None, :]) & real[:, :, None] & real[:, None, :]).sum())


def _run_module(preset: str, pairs: bool) -> dict[str, float]:
    p = PRESETS[preset]
    k_pairs = p["k"] * (p["k"] - 1) // 2
    batch_size = p["batch_size"] * (k_pairs if pairs else 1)  # the same comparisons per optimizer step
    timer = BatchTimer(ranked_pairs)
    with PeakMemory() as memory:
        module = RewardModule(
            ModelSpec(str(base_model_dir(preset))), optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4)
        )
        data = PreferenceDataModule(ranking_file(preset, pairs), batch_size=batch_size, max_length=64)
        bench_trainer([timer], max_steps=p["steps"] + 1).fit(module, datamodule=data)
    return {
        "comparisons_per_s": timer.work / timer.timer.seconds,
        "seconds": timer.timer.seconds,
        "peak_mib": memory.mib,
    }


def run_kwise(preset: str) -> dict[str, float]:
    return _run_module(preset, pairs=False)


def run_pairs(preset: str) -> dict[str, float]:
    return _run_module(preset, pairs=True)


def run_floor(preset: str) -> dict[str, float]:
    p = PRESETS[preset]
    path = str(base_model_dir(preset))
    tokenizer = load_tokenizer(path)
    data = PreferenceDataModule(ranking_file(preset, False), batch_size=p["batch_size"], max_length=64)
    data.tokenizer = tokenizer
    data.setup("fit")
    batches = list(itertools.islice(iter(data.train_dataloader()), p["steps"] + 1))
    timer, pairs = Timer(), 0
    with PeakMemory() as memory:
        model = load_model(ModelSpec(path), tokenizer, kind="sequence_classifier").to(device())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for i, batch in enumerate(batches):
            batch = {k: v.to(device()) for k, v in batch.items()}
            if i >= 1:
                timer.__enter__()
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            # the HF classifier pools at the last non-pad token itself (right padding)
            rewards = out.logits.view(batch["ranks"].shape)
            loss = kwise_ranking_loss(rewards, batch["ranks"], batch["response_mask"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= 1:
                timer.__exit__()
                pairs += p["k"] * (p["k"] - 1) // 2 * batch["ranks"].shape[0]
    return {"comparisons_per_s": pairs / timer.seconds, "seconds": timer.seconds, "peak_mib": memory.mib}


CASES = {"rm": {"lit_rlhf": run_kwise, "floor": run_floor, "lit_rlhf_as_pairs": run_pairs}}
