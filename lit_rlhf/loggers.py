"""A CSV logger that never throws away a run's earlier metrics.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` whenever a Trainer starts in a log folder that has one: a run
resumed with ``--ckpt_path last`` loses every row logged before the interruption, and a ``validate`` or
``predict`` run started from a stage's config wipes that stage's training log.
"""

from __future__ import annotations

import csv
import os
import weakref
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.trainer.states import TrainerFn

from lit_rlhf.outputs import keep_earlier

__all__ = ["CSVLogger"]


class _KeepingWriter(ExperimentWriter):
    """Lightning's writer, minus the deletion at start-up; what to keep is decided at the first metrics row."""

    def __init__(self, log_dir: str, logger: CSVLogger) -> None:
        self._logger = logger
        self._decided = False
        # Lightning's writer deletes metrics.csv in `_check_log_dir_exists`; here nothing is deleted.
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        pass

    def _stage(self) -> str:
        return self._logger.stage()

    @property
    def _stage_suffix(self) -> str:
        stage = self._stage()
        return "" if stage == TrainerFn.FITTING.value else f".{stage}"

    def log_hparams(self, params: dict[str, Any]) -> None:
        if self._stage_suffix:  # validate/test/predict: the fit's hparams.yaml stays as the fit wrote it
            return
        super().log_hparams(params)

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics_dict, step)
        if not self._decided:
            self._decided = True
            self._start(int(self.metrics[-1]["step"]))

    def _start(self, first_step: int) -> None:
        """Choose the file and the earlier rows to keep, given the step of this run's first row."""
        suffix = self._stage_suffix
        if suffix:  # another stage's metrics go beside the fit's, never into it
            self.metrics_file_path = os.path.join(self.log_dir, f"metrics{suffix}.csv")
        kept: list[dict[str, str]] = []
        if os.path.isfile(self.metrics_file_path) and (suffix or self._logger.resumed()):
            with open(self.metrics_file_path, newline="") as f:
                rows = list(csv.DictReader(f))
            # a resumed fit keeps what was logged before the checkpoint (the rows it will not log again)
            kept = rows if suffix else [r for r in rows if r.get("step") and int(r["step"]) < first_step]
        if not kept:
            if os.path.isfile(self.metrics_file_path):  # a new fit starts a new log; the earlier one is kept
                keep_earlier([self.metrics_file_path], self.log_dir)
            return
        keys = sorted({k for row in kept for k, v in row.items() if v != ""})
        self.metrics_keys = keys
        # written through a temporary file and renamed, so an interruption leaves the old log or the new one
        tmp = f"{self.metrics_file_path}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows({k: v for k, v in row.items() if k in keys} for row in kept)
        os.replace(tmp, self.metrics_file_path)


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` that keeps the metrics of a run across interruptions and other stages.

    * A new ``fit`` starts a new ``metrics.csv``; an earlier one is moved to ``previous/<k>/metrics.csv`` in the
      log folder (Lightning deletes it).
    * A resumed ``fit`` (``--ckpt_path``) keeps the rows logged before the checkpoint's step and appends its
      own: the log of an interrupted-and-resumed run has the same rows as that of an uninterrupted run.
    * ``validate``, ``test`` and ``predict`` never touch the fit's files: their metrics go to
      ``metrics.<stage>.csv`` (e.g. ``metrics.validate.csv``), appended to earlier ones.

    The logger learns the stage and whether the run resumes from the Trainer, which lit_rlhf modules hand it
    in ``setup`` (:func:`bind_loggers`); without one it behaves as a new ``fit``.

    Args:
        save_dir: folder of the logs; ``None`` = the Trainer's ``default_root_dir``, so that one setting moves
            all of a stage's outputs.
        name, version, prefix, flush_logs_every_n_steps: as in Lightning's ``CSVLogger``.
    """

    def __init__(
        self,
        save_dir: str | None = None,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(save_dir if save_dir is not None else ".", name, version, prefix, flush_logs_every_n_steps)
        self._follows_default_root_dir = save_dir is None
        self._trainer_ref: weakref.ref | None = None

    def follow_default_root_dir(self, root_dir: str) -> None:
        """Put the logs under ``root_dir`` (the Trainer's) when no ``save_dir`` was given."""
        if self._follows_default_root_dir and self._experiment is None:
            self._root_dir = self._save_dir = os.fspath(root_dir)

    def bind(self, trainer) -> None:
        """Read the stage and the checkpoint path from ``trainer`` when the first metrics arrive."""
        self._trainer_ref = weakref.ref(trainer)
        self.follow_default_root_dir(trainer.default_root_dir)

    def _trainer(self):
        return self._trainer_ref() if self._trainer_ref is not None else None

    def stage(self) -> str:
        trainer = self._trainer()
        fn = trainer.state.fn if trainer is not None else None
        return (fn or TrainerFn.FITTING).value

    def resumed(self) -> bool:
        trainer = self._trainer()
        return trainer is not None and trainer.ckpt_path is not None

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _KeepingWriter(self.log_dir, self)
        return self._experiment


def bind_loggers(trainer) -> None:
    """Give lit_rlhf loggers of ``trainer`` access to it (called from the modules' ``setup``)."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            logger.bind(trainer)
