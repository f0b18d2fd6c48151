"""Write a trained module as a Hugging Face folder at the end of training."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


class HFExport(Callback):
    """At the end of ``fit``, export the module's trained model with ``pl_module.export_hf(dirpath)``.

    The folder loads back with ``from_pretrained`` (or, for adapters, peft's ``AutoPeftModel``). It is written
    under a temporary name and renamed into place; an existing export at ``dirpath`` is replaced, and the
    replacement is announced.

    Args:
        dirpath: output folder.
        merge_adapters: with LoRA, write merged full weights (``True``) or only the adapter (``False``).
    """

    def __init__(self, dirpath: str, merge_adapters: bool = True) -> None:
        self.dirpath = dirpath
        self.merge_adapters = merge_adapters

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        if trainer.is_global_zero:
            from pathlib import Path

            verb = "replaced" if Path(self.dirpath).exists() else "written"
            pl_module.export_hf(self.dirpath, merge_adapters=self.merge_adapters)
            rank_zero_info(f"Hugging Face export {verb}: {self.dirpath}")
        trainer.strategy.barrier("hf_export")
