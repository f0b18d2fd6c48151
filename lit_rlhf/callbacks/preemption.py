"""Save a resumable checkpoint when a run is told to stop (SIGTERM from a scheduler, Ctrl-C from a person)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_rlhf.checkpointing import last_checkpoint_path


class PreemptionCheckpoint(Callback):
    """On SIGTERM or SIGINT, finish the current batch, save ``last.ckpt`` and exit; resume with ``--ckpt_path last``.

    Lightning already turns SIGTERM into a clean stop at the next batch boundary (all processes agree on it);
    this callback routes the first SIGINT (Ctrl-C) the same way instead of interrupting mid-step, and writes
    the checkpoint into the ``ModelCheckpoint`` folder under the name ``last.ckpt``, which is what
    ``--ckpt_path last`` looks for. The checkpoint holds the optimizer, schedulers, the module's state
    (KL controller, reward statistics...) and the data position, so the resumed run continues the same run.
    A second Ctrl-C interrupts at once. ``python -m lit_rlhf`` then exits with status 75 (``EX_TEMPFAIL``), so a
    scheduler can tell a pre-empted run from a finished (0) or failed one (:mod:`lit_rlhf.errors`).

    Args:
        dirpath: where to save; default the first ``ModelCheckpoint``'s folder, else
            ``<default_root_dir>/checkpoints``.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self._previous_sigint = None

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath) / last_checkpoint_path(trainer).name
        return last_checkpoint_path(trainer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _in_main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._sigint_as_sigterm)

    def _sigint_as_sigterm(self, signum, frame) -> None:
        # later Ctrl-Cs interrupt immediately
        signal.signal(signal.SIGINT, self._previous_sigint or signal.default_int_handler)
        rank_zero_info("Interrupted: finishing the current batch, then saving a resumable checkpoint.")
        os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"Saved resumable checkpoint {path} at step {trainer.global_step}; resume with --ckpt_path last")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None and _in_main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
