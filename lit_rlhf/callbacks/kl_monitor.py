"""Watch the KL between the PPO policy and its reference; stop cleanly when it blows up."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class KLMonitor(Callback):
    """Log the mean per-sequence KL of each PPO iteration, warn when it looks wrong, stop when it blows up.

    Reads ``outputs["kl"]`` (mean over responses of ``Σ_t KL_t``, in nats, as returned by
    :class:`~lit_rlhf.models.PPOModule`'s ``training_step``) in ``on_train_batch_end``.

    * KL below ``warn_below`` (negative): k1's per-token estimate can be negative, but a clearly negative
      mean means the policy found tokens the reference prefers more; often a precursor of failure (TRL
      warns below -1).
    * KL above ``warn_above``: the policy drifts far from the reference (reward hacking is likely).
    * KL above ``stop_above``, or a non-finite KL: save ``<dirpath>/kl_stop.ckpt`` (the state *before* it
      gets worse, for inspection or a resume with a larger β) and set ``trainer.should_stop``; the module's
      ``stop_reason`` becomes ``"kl_stop"``, so no Hugging Face export is written and ``python -m lit_rlhf``
      exits with status 4.

    Args:
        warn_below: warn when the KL goes below this (nats per sequence; must be ≤ 0).
        warn_above: warn when the KL exceeds this (nats per sequence).
        stop_above: stop when the KL exceeds this; ``None`` only stops on NaN/inf.
        dirpath: folder of the stop checkpoint; ``None`` = ``trainer.default_root_dir``.
        key: the key of the ``training_step`` output holding the KL.
    """

    #: file name of the checkpoint saved when the KL crosses ``stop_above``
    STOP_CHECKPOINT = "kl_stop.ckpt"

    def __init__(
        self,
        warn_below: float = -1.0,
        warn_above: float = 20.0,
        stop_above: float | None = 50.0,
        dirpath: str | None = None,
        key: str = "kl",
    ) -> None:
        if warn_below > 0:
            raise ValueError(f"warn_below must be <= 0 (a KL estimate below it is suspicious), got {warn_below}")
        if stop_above is not None and stop_above < warn_above:
            raise ValueError(f"stop_above ({stop_above}) must be >= warn_above ({warn_above})")
        self.warn_below = warn_below
        self.warn_above = warn_above
        self.stop_above = stop_above
        self.dirpath = dirpath
        self.key = key
        self.stop_reason: str | None = None
        self.stop_checkpoint: Path | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(outputs, dict) or self.key not in outputs:
            raise KeyError(
                f"KLMonitor needs training_step to return a dict with {self.key!r} "
                f"(got {type(outputs).__name__}); it works with PPOModule."
            )
        kl = float(outputs[self.key])
        pl_module.log("kl_monitor/kl", kl, batch_size=1)
        step = f"iteration {batch_idx} (global step {trainer.global_step})"
        if not math.isfinite(kl):
            self._stop(
                trainer, pl_module, f"KL is {kl} at {step}: the policy or reference produced non-finite log-probs"
            )
        elif self.stop_above is not None and kl > self.stop_above:
            self._stop(trainer, pl_module, f"KL {kl:.2f} nats exceeds stop_above={self.stop_above} at {step}")
        elif kl > self.warn_above:
            rank_zero_warn(f"KLMonitor: KL {kl:.2f} nats exceeds warn_above={self.warn_above} at {step}.")
        elif kl < self.warn_below:
            rank_zero_warn(
                f"KLMonitor: KL {kl:.2f} nats is below warn_below={self.warn_below} at {step}; a negative mean KL "
                "often precedes a failed run."
            )

    def _stop(self, trainer: L.Trainer, pl_module: L.LightningModule, reason: str) -> None:
        dirpath = Path(self.dirpath or trainer.default_root_dir)
        path = dirpath / self.STOP_CHECKPOINT
        trainer.save_checkpoint(path)  # collective call: every process takes part, rank 0 writes
        self.stop_reason, self.stop_checkpoint = reason, path
        trainer.should_stop = True
        pl_module.stop_reason = "kl_stop"
        rank_zero_info(f"KLMonitor stopped training: {reason}. Checkpoint saved to {path}.")
