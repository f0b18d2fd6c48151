"""``python -m lit_rlhf`` / ``lit-rlhf``: LightningCLI over every lit_rlhf module and DataModule.

The model and data classes are chosen by ``class_path`` in YAML (subclass mode), so one entry point runs
SFT, reward-model training and PPO: ``python -m lit_rlhf fit --config configs/quickstart/sft.yaml``.
Optimizers and schedulers are init arguments of the modules (``OptimizerCallable``), so there is one place
to configure them. The command's exit status says how the run ended (:mod:`lit_rlhf.errors`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

import lit_rlhf  # noqa: F401  (imports register the subclasses, so short class names work in YAML)
from lit_rlhf.checkpointing import SafeCheckpointIO, route_outputs
from lit_rlhf.config_errors import NOISE, explain_parser_error
from lit_rlhf.datamodules.base import RLHFDataModule
from lit_rlhf.errors import EXIT_ERROR, EXIT_OK, EXIT_PREEMPTED, STOP_REASON_EXIT, run_command, show_tracebacks
from lit_rlhf.models.base import RLHFModule
from lit_rlhf.outputs import keep_earlier
from lit_rlhf.preflight import check_inputs, check_manual_optimization


class StageConfigSaver(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` for ``fit`` and as ``config.<stage>.yaml`` for the other
    stages, so a ``predict`` or ``validate`` run with a stage's config does not replace its training config."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            root, ext = os.path.splitext(self.config_filename)
            self.config_filename = f"{root}.{stage}{ext}"
        super().setup(trainer, pl_module, stage)


class LitRLHFCLI(LightningCLI):
    """LightningCLI with lit_rlhf's base classes and defaults.

    Checkpoints are loaded with ``weights_only=True`` (:class:`~lit_rlhf.checkpointing.SafeCheckpointIO`)
    unless the config chose another checkpoint I/O plugin (sharded strategies bring their own). Outputs given no
    path of their own (checkpoints, logs, exports) go under ``trainer.default_root_dir``
    (:func:`~lit_rlhf.checkpointing.route_outputs`).

    Args:
        short_errors: report argument errors in one ``error: ...`` line (exit status 2) instead of the usage
            text followed by the error.
    """

    def __init__(self, *args: Any, short_errors: bool = False, **kwargs: Any) -> None:
        self.short_errors = short_errors
        self._args: list[str] = []
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any):
        parser = super().init_parser(**kwargs)
        if self.short_errors:  # subcommand parsers inherit the handler
            parser._error_handler = lambda parser, message: _short_parser_error(parser, message, self)
        return parser

    def parse_arguments(self, parser, args: ArgsType) -> None:
        # kept for the error messages, which name the --config file and line of a bad key
        given = sys.argv[1:] if args is None else args
        self._args = [str(a) for a in given] if isinstance(given, list | tuple) else []  # not a dict or Namespace
        super().parse_arguments(parser, args)

    def command_keys(self) -> list[str]:
        """Every option of the command given in the arguments (``trainer.max_epochs``, ``model``, ...)."""
        parsers = getattr(self, "_subcommand_parsers", {})
        subcommand = next((a for a in self._args if a in parsers), None)
        parser = parsers.get(subcommand) or self.parser
        return [action.dest for action in parser._actions]

    def before_fit(self) -> None:
        """Check the inputs, then, for a new ``fit`` (no ``--ckpt_path``), move the earlier run's outputs into
        ``<default_root_dir>/previous/<k>/``: a re-run never deletes what an earlier run wrote, and one that
        fails on bad input leaves them where they were (:mod:`lit_rlhf.preflight`;
        docs/conventions.md#validate-then-move)."""
        check_manual_optimization(self.trainer, self.model)
        check_inputs(self.model, self.datamodule)
        if self.config[self.subcommand].get("ckpt_path") is not None or rank_zero_only.rank != 0:
            return
        root = self.trainer.default_root_dir
        kept = keep_earlier(output_paths(self.trainer), root)
        if kept is not None:
            print(f"[lit_rlhf] earlier outputs of {root} kept in {kept}", flush=True)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        route_outputs(trainer)
        return trainer


def output_paths(trainer) -> list[str]:
    """Where ``fit`` writes with ``trainer``'s callbacks and loggers: checkpoint folders, fixed-version log folders,
    Hugging Face exports and the KL stop checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_rlhf.callbacks import HFExport, KLMonitor

    paths = []
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            paths.append(callback.dirpath)
        elif isinstance(callback, HFExport):
            paths.append(callback.resolve_dirpath(trainer))
        elif isinstance(callback, KLMonitor):
            paths.append(os.path.join(callback.dirpath or trainer.default_root_dir, KLMonitor.STOP_CHECKPOINT))
    for logger in trainer.loggers:  # an unversioned logger opens a new folder each run: nothing to keep
        if isinstance(logger, (LightningCSVLogger, TensorBoardLogger)):
            paths.append(logger.log_dir)
    return paths


def _short_parser_error(parser, message: str, cli: LitRLHFCLI | None = None) -> None:
    """Print ``error: <message>`` (located and with a suggestion where :func:`explain_parser_error` can) and
    exit with status 2."""
    prog = parser.prog.replace(" [options]", "").replace("__main__.py", "python -m lit_rlhf")
    explained = explain_parser_error(message, cli._args, cli.command_keys) if cli is not None else None
    lines = (
        [explained]
        if explained
        else [line for line in message.strip().splitlines() if not line.strip().startswith(NOISE)]
    )
    print("error: " + "\n".join(lines) + f"\n(run `{prog} --help` for the accepted options)", file=sys.stderr)
    sys.exit(EXIT_ERROR)


def main(args: ArgsType = None, run: bool = True, short_errors: bool = False) -> LitRLHFCLI:
    """Entry point; ``args`` replaces ``sys.argv[1:]`` (handy in tests and notebooks)."""
    return LitRLHFCLI(
        RLHFModule,
        RLHFDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=StageConfigSaver,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        short_errors=short_errors,
    )


def exit_status(cli: LitRLHFCLI) -> int:
    """The exit status of a finished command: 0, or the code of the reason its module stopped early."""
    reason = getattr(cli.model, "stop_reason", None)
    return STOP_REASON_EXIT.get(reason, EXIT_OK)


def run_main(args: ArgsType = None) -> int:
    """``main`` as a command: the exit status is :func:`exit_status`, 75 when pre-empted (SIGTERM/Ctrl-C)."""
    try:
        cli = main(args, short_errors=not show_tracebacks())
    except SIGTERMException:  # Lightning's clean stop on SIGTERM: after PreemptionCheckpoint saved last.ckpt
        return EXIT_PREEMPTED
    return exit_status(cli)


def console_main() -> None:
    """The ``lit-rlhf`` / ``python -m lit_rlhf`` command (exit statuses: :mod:`lit_rlhf.errors`)."""
    run_command(run_main)
