"""One multi-process test at a time: under pytest-xdist (``make test`` runs one worker per core) two tests that
each start several processes would share the cores and the process groups' timeouts would start to bite."""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: one file for every pytest worker of the machine
LOCK_FILE = Path(tempfile.gettempdir()) / "lit_rlhf-multiprocess-tests.lock"


@contextmanager
def multiprocess_lock() -> Iterator[None]:
    """Hold the machine-wide lock of multi-process tests (blocks until the running one has finished)."""
    with open(LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
