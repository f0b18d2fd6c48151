"""Errors lit_rlhf raises on purpose, the exit statuses of its commands, and the one-line error report.

Exit statuses of ``python -m lit_rlhf fit`` (and the other entry points), documented in the README:

====  ===========================================================================================
0     finished
2     an error in the input: bad data, config or arguments, a missing file (one line on stderr)
3     stopped by the numerical-fault guard (consecutive NaN/inf steps); ``last.ckpt`` holds the last good step
4     stopped by :class:`~lit_rlhf.callbacks.KLMonitor` (KL blow-up or NaN KL); ``kl_stop.ckpt`` written
75    pre-empted (SIGTERM, Ctrl-C): ``last.ckpt`` written by ``PreemptionCheckpoint``; resume with
      ``--ckpt_path last`` (75 is ``EX_TEMPFAIL``: "try again later")
====  ===========================================================================================

Runs stopped with 3 or 4 write no Hugging Face export: a half-trained or diverged model must not look finished.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_NUMERICAL_FAULT = 3
EXIT_KL_STOP = 4
EXIT_PREEMPTED = 75

#: ``stop_reason`` recorded on a module → exit status of the command
STOP_REASON_EXIT = {"numerical_fault": EXIT_NUMERICAL_FAULT, "kl_stop": EXIT_KL_STOP}

#: set to 1 to see the full traceback of the errors that are otherwise reported in one line
TRACEBACK_ENV = "LIT_RLHF_TRACEBACK"

_PACKAGE_DIR = Path(__file__).resolve().parent


class LitRLHFError(Exception):
    """Base class of the errors lit_rlhf raises about its input (reported in one line by the commands)."""


class ConfigError(LitRLHFError, ValueError):
    """An invalid setting: the message names it and says what is allowed."""


class DataError(LitRLHFError, ValueError):
    """Malformed input data; the message names the file and the line or column."""


def show_tracebacks() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_input_error(exc: BaseException) -> bool:
    """Whether ``exc`` reports a problem with the user's input rather than a bug.

    That is a :class:`LitRLHFError`, a missing file, or a ``ValueError`` raised by a ``raise`` statement of
    lit_rlhf's own code (its validation of settings), wherever it is wrapped (e.g. by the argument parser).
    Anything else, a bug included, keeps its traceback.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, LitRLHFError | FileNotFoundError):
            return True
        if isinstance(exc, ValueError) and _raised_by_lit_rlhf(exc):
            return True
        exc = _inner(exc)
    return False


def _inner(exc: BaseException) -> BaseException | None:
    """The exception ``exc`` was raised from or during, unless ``raise ... from None`` hid it (the outer
    message then says all, e.g. it adds the option to set to the inner one)."""
    return exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def _raised_by_lit_rlhf(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames or not Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE_DIR):
        return False
    # a deliberate `raise`, not e.g. int("x") failing inside lit_rlhf, which would be a bug worth a traceback
    return (frames[-1].line or "").lstrip().startswith("raise ")


def _message(exc: BaseException) -> str:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # report the innermost input error, not its wrapper
        seen.add(id(exc))
        inner = _inner(exc)
        if inner is None or not is_input_error(inner):
            break
        exc = inner
    return str(exc) or type(exc).__name__


def run_command(fn: Callable[[], Any]) -> NoReturn:
    """Run a command's main function and exit: its status, or one ``error: ...`` line and status 2 for input
    errors (the full traceback with ``LIT_RLHF_TRACEBACK=1``)."""
    try:
        status = fn()
    except subprocess.CalledProcessError as exc:  # a stage command run by this one failed and said why
        if show_tracebacks():
            raise
        command = " ".join(map(str, exc.cmd)) if isinstance(exc.cmd, list | tuple) else str(exc.cmd)
        print(f"error: this command failed with exit status {exc.returncode}: {command}", file=sys.stderr)
        sys.exit(exc.returncode if exc.returncode > 0 else EXIT_ERROR)
    except Exception as exc:
        if show_tracebacks() or not is_input_error(exc):
            raise
        print(f"error: {_message(exc)}", file=sys.stderr)
        print(f"(set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    sys.exit(status if isinstance(status, int) else EXIT_OK)
