"""Checkpoint I/O that never executes code from a file: every load uses ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with loading restricted to tensors and plain data.

    A pickled checkpoint can run arbitrary code when loaded with ``weights_only=False``; lit_rlhf checkpoints
    hold only tensors, numbers, strings and lit_rlhf's spec dataclasses (allow-listed), so they always load
    with ``weights_only=True``. Saving is Lightning's: serialised in memory, then written through an fsspec
    transaction (a temporary file renamed into place), so an interrupted save never corrupts a good file.
    The lit_rlhf CLI installs this plugin by default; in plain Python pass ``plugins=[SafeCheckpointIO()]``.
    """

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(f"{path}: lit_rlhf loads checkpoints with weights_only=True only")
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def route_outputs(trainer) -> None:
    """Point every output without a path of its own under ``trainer.default_root_dir``.

    ``ModelCheckpoint`` callbacks without ``dirpath`` write to ``<default_root_dir>/checkpoints`` (Lightning would
    put them inside the logger's folder), and lit_rlhf loggers and callbacks without a path resolve theirs from
    the same folder, so ``--trainer.default_root_dir runs/my-run`` moves a whole stage's outputs at once.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
    for logger in trainer.loggers:
        follow = getattr(logger, "follow_default_root_dir", None)
        if follow is not None:
            follow(trainer.default_root_dir)


def last_checkpoint_path(trainer) -> Path:
    """``last.ckpt`` in the first ``ModelCheckpoint``'s folder (else ``<default_root_dir>/checkpoints``): the
    file ``--ckpt_path last`` resumes from."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    folders = [cb.dirpath for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    folder = folders[0] if folders else os.path.join(trainer.default_root_dir, "checkpoints")
    return Path(folder) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
