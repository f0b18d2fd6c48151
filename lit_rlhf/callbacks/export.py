"""Write a trained module as a Hugging Face folder at the end of training."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lit_rlhf.hf.sharding import is_sharded
from lit_rlhf.outputs import keep_earlier


class HFExport(Callback):
    """At the end of ``fit``, export the module's trained model with ``pl_module.export_hf(dirpath)``
    (or another export method of the module, e.g. ``method: export_critic_hf`` for a PPO critic).

    The folder loads back with ``from_pretrained`` (or, for adapters, peft's ``AutoPeftModel``). It is written
    under a temporary name and renamed into place; an existing export at ``dirpath`` is first moved into
    ``previous/<k>/`` beside it (:func:`~lit_rlhf.outputs.keep_earlier`, announced), never deleted. Nothing is
    written when training did not finish: an interrupted run
    (``trainer.interrupted``) or a run stopped by a fault guard (the module's ``stop_reason``, set by the
    numerical-fault guard and by :class:`~lit_rlhf.callbacks.KLMonitor`).

    Args:
        dirpath: output folder; ``None`` = ``<trainer.default_root_dir>/export`` (``/critic`` for
            ``method: export_critic_hf``).
        merge_adapters: with LoRA, write merged full weights (``True``) or only the adapter (``False``).
        method: the module's export method, called as ``method(dirpath, merge_adapters=...)``.
    """

    def __init__(self, dirpath: str | None = None, merge_adapters: bool = True, method: str = "export_hf") -> None:
        self._dirpath = dirpath
        self.dirpath = dirpath
        self.merge_adapters = merge_adapters
        self.method = method

    def resolve_dirpath(self, trainer: L.Trainer) -> str:
        """The folder this callback writes for ``trainer``: its own ``dirpath``, else under the trainer's root."""
        if self._dirpath is not None:
            return self._dirpath
        folder = "critic" if self.method == "export_critic_hf" else "export"
        return os.path.join(trainer.default_root_dir, folder)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.dirpath = self.resolve_dirpath(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        reason = getattr(pl_module, "stop_reason", None)
        if reason is not None:
            rank_zero_info(f"No Hugging Face export: training stopped early ({reason}); {self.dirpath} is unchanged")
            return
        if trainer.is_global_zero:
            kept = keep_earlier([self.dirpath], os.path.dirname(os.path.abspath(self.dirpath)))
            if kept is not None:
                rank_zero_info(f"Earlier export kept in {kept}")
        # sharded weights (FSDP2) are gathered by every process; rank 0 writes the folder
        if trainer.is_global_zero or is_sharded(pl_module):
            getattr(pl_module, self.method)(self.dirpath, merge_adapters=self.merge_adapters)
            rank_zero_info(f"Hugging Face export written: {self.dirpath}")
        trainer.strategy.barrier("hf_export")
