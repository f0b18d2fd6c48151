"""Importing a Python callable named in YAML or on the command line (e.g. a rule-based ``reward_fn``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def import_callable(path: str, allow_dotted: bool = False) -> Callable:
    """Import ``"package.module:function"`` (with ``allow_dotted``, also ``"package.module.function"``).

    Raises:
        ValueError: the path is malformed, cannot be imported, or does not name a callable.
    """
    module_name, sep, attr = path.partition(":")
    if not sep and allow_dotted:
        module_name, _, attr = path.rpartition(".")
    elif not sep:
        module_name = ""
    if not module_name or not attr:
        raise ValueError(f"{path!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {path!r}: {err}") from err
    if not callable(fn):
        raise ValueError(f"{path!r} is not callable")
    return fn
