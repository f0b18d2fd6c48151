"""Importing a Python callable named in YAML or on the command line (e.g. a rule-based reward function)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch

#: a rule-based score: ``fn(prompts, responses) -> one score per response`` (a list or a tensor ``[N]``)
RewardFn = Callable[[list[str], list[str]], "Sequence[float] | torch.Tensor"]


def import_callable(path: str) -> Callable:
    """Import ``"package.module:function"`` (or ``"package.module.function"``).

    Raises:
        ValueError: the path is malformed, cannot be imported, or does not name a callable.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path!r} must look like 'package.module:function' or 'package.module.function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {path!r}: {err}") from err
    if not callable(fn):
        raise ValueError(f"{path!r} is not callable")
    return fn
