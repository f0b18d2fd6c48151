"""Earlier outputs are moved aside, never deleted: a re-run keeps everything the runs before it wrote."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["PREVIOUS", "keep_earlier"]

#: folder, inside a run's root, that holds the outputs of earlier runs as ``previous/1``, ``previous/2``, …
PREVIOUS = "previous"


def keep_earlier(paths: Iterable[str | os.PathLike], root: str | os.PathLike) -> Path | None:
    """Move every existing file or folder of ``paths`` into ``<root>/previous/<k>/``, ``k`` the first free number.

    A path inside ``root`` keeps its place relative to ``root`` (``<root>/export`` → ``<root>/previous/3/export``);
    one outside it keeps its name. Moves are renames within a file system when possible (no copy of large
    weights). Returns the ``previous/<k>`` folder, or ``None`` when none of the paths existed.
    """
    root = Path(root)
    existing = [Path(p) for p in dict.fromkeys(os.fspath(p) for p in paths) if os.path.lexists(p)]
    # a folder and something inside it: moving the folder moves both
    existing = [p for p in existing if not any(q != p and q.resolve() in p.resolve().parents for q in existing)]
    if not existing:
        return None
    previous = root / PREVIOUS
    previous.mkdir(parents=True, exist_ok=True)
    k = 1 + max((int(p.name) for p in previous.iterdir() if p.name.isdigit()), default=0)
    target = previous / str(k)
    for path in existing:
        try:
            relative = path.resolve().relative_to(root.resolve())
        except ValueError:
            relative = Path(path.name)
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    return target
