"""Writing a run's outputs without losing earlier ones.

Earlier outputs are moved aside, never deleted: a re-run keeps everything the runs before it wrote
(:func:`keep_earlier`). A folder that is rewritten in place (a Hugging Face export) is replaced atomically:
a complete folder is at its path at every instant, even when the process is killed mid-swap
(:func:`replace_dir`, :func:`recover_export`).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = ["PREVIOUS", "keep_earlier", "recover_export", "replace_dir"]

log = logging.getLogger(__name__)

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


def _old_dir(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.old")


def recover_export(dirpath: str | os.PathLike, clean: bool = False) -> None:
    """Undo what a process killed while replacing the export ``dirpath`` left behind.

    A missing ``dirpath`` next to ``.NAME.old`` (killed between the two renames of a swap) gets the old export
    back. With ``clean`` (before a new export to ``dirpath``; never while another process writes there), a
    ``.NAME.old`` beside a complete export and the temporary ``.NAME.*`` folders of killed exports are removed.
    """
    dirpath = Path(dirpath).expanduser()
    old = _old_dir(dirpath)
    if old.is_dir() and not dirpath.exists():
        old.rename(dirpath)
        log.warning("%s: put back the previous export, whose replacement was interrupted", dirpath)
    if not clean or not dirpath.parent.is_dir():
        return
    for stale in dirpath.parent.glob(f".{dirpath.name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put the complete folder ``src`` at ``dst`` (a sibling of ``src``), replacing what ``dst`` held.

    On Linux the two are exchanged in one atomic ``renameat2(RENAME_EXCHANGE)`` and the old folder is removed;
    elsewhere (or where the filesystem cannot) ``dst`` is renamed to ``.NAME.old`` first, and a process killed
    between the two renames leaves it there, for :func:`recover_export` to put back. ``src`` no longer exists
    afterwards.
    """
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        src.rename(dst)
        return
    if _exchange_dirs(src, dst):  # dst now holds the new export, src the old one
        shutil.rmtree(src, ignore_errors=True)
        return
    old = _old_dir(dst)
    shutil.rmtree(old, ignore_errors=True)
    dst.rename(old)
    src.rename(dst)  # killed before this line: recover_export renames .NAME.old back
    shutil.rmtree(old, ignore_errors=True)


def _exchange_dirs(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the kernel or filesystem cannot
        return False
    raise OSError(err, os.strerror(err), str(b))
