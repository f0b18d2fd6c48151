from __future__ import annotations

import pytest

from tests.sharded.lock import multiprocess_lock


@pytest.fixture
def one_multiprocess_test_at_a_time():
    """Use in every test that starts several processes (see tests/sharded/lock.py)."""
    with multiprocess_lock():
        yield
