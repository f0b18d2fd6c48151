"""Errors that lit_rlhf raises on purpose: the message alone says what is wrong and where."""

from __future__ import annotations


class DataError(ValueError):
    """Malformed input data; the message names the file and the line or column."""
