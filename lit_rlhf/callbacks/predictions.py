"""Write ``predict`` outputs as JSON Lines, one input row plus its prediction per line."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class JsonlPredictionWriter(BasePredictionWriter):
    """Write each ``predict_data`` row with the module's prediction for it added under ``key``.

    Works with every stage whose ``predict_step`` returns one prediction per row (a tensor or a list): the
    SFT module's sampled completions, the reward model's normalised scores. Rows keep the input order. With
    several processes each rank writes ``<stem>.rank<N><suffix>`` (the distributed sampler interleaves rows).

    Args:
        output_path: the ``.jsonl`` file to (over)write.
        key: name of the added field.
    """

    def __init__(self, output_path: str, key: str = "prediction") -> None:
        super().__init__("batch")
        self.output_path = output_path
        self.key = key

    def _path(self, trainer: L.Trainer) -> Path:
        path = Path(self.output_path)
        if trainer.world_size == 1:
            return path
        return path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        values = prediction.tolist() if isinstance(prediction, torch.Tensor) else list(prediction)
        with self._path(trainer).open("a", encoding="utf-8") as f:
            for row, value in zip(batch["rows"], values, strict=True):
                f.write(json.dumps({**row, self.key: value}, ensure_ascii=False) + "\n")
