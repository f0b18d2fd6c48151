"""``python -m lit_rlhf`` / ``lit-rlhf``: LightningCLI over every lit_rlhf module and DataModule.

The model and data classes are chosen by ``class_path`` in YAML (subclass mode), so one entry point runs
SFT, reward-model training and PPO: ``python -m lit_rlhf fit --config configs/quickstart/sft.yaml``.
Optimizers and schedulers are init arguments of the modules (``OptimizerCallable``), so there is one place
to configure them.
"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

import lit_rlhf  # noqa: F401  (imports register the subclasses, so short class names work in YAML)
from lit_rlhf.checkpointing import SafeCheckpointIO
from lit_rlhf.datamodules.base import RLHFDataModule
from lit_rlhf.models.base import RLHFModule


class LitRLHFCLI(LightningCLI):
    """LightningCLI with lit_rlhf's base classes and defaults.

    Checkpoints are loaded with ``weights_only=True`` (:class:`~lit_rlhf.checkpointing.SafeCheckpointIO`)
    unless the config chose another checkpoint I/O plugin (sharded strategies bring their own).
    """

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer


def main(args: ArgsType = None, run: bool = True) -> LitRLHFCLI:
    """Entry point; ``args`` replaces ``sys.argv[1:]`` (handy in tests and notebooks)."""
    return LitRLHFCLI(
        RLHFModule,
        RLHFDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
