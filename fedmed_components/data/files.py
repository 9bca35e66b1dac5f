"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every writer goes the same way: a temp file ``<name>.tmp`` in the same folder (so the
rename stays on one file system), flush, ``os.fsync``, ``os.replace`` over the target.
If the write fails the temp file is removed and the old file is left as it was; a
process killed mid-write leaves at most ``<name>.tmp`` (the next write to that path
replaces it). One writer per path at a time: two concurrent writers share the temp name.
``sync_dir=True`` also fsyncs the folder, so that the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["TEMP_SUFFIX", "atomic_open", "atomic_write_text", "fsync_path", "temp_path"]

TEMP_SUFFIX = ".tmp"


def temp_path(path: str | os.PathLike) -> Path:
    """The temp file an atomic write of ``path`` goes through (``<name>.tmp`` beside it)."""
    path = Path(path)
    return path.with_name(path.name + TEMP_SUFFIX)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's entries to disk (a crash keeps what was renamed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike,
    mode: str = "w",
    *,
    encoding: str | None = "utf-8",
    newline: str | None = "",
    sync_dir: bool = False,
) -> Iterator[IO]:
    """Open ``path`` for writing through its temp file; on a clean exit the data is
    flushed, fsynced and renamed over ``path``, on an exception the temp file goes.

    ``mode`` is ``"w"`` (text; UTF-8 and no newline translation by default) or ``"wb"``.
    The parent folder is created if need be.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    text = {"encoding": encoding, "newline": newline} if mode == "w" else {}
    try:
        with open(tmp, mode, **text) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        fsync_path(path.parent)


def atomic_write_text(
    path: str | os.PathLike, text: str, *, encoding: str = "utf-8", newline: str | None = "", sync_dir: bool = False
) -> Path:
    """Write ``text`` to ``path`` atomically (see ``atomic_open``); returns the path."""
    with atomic_open(path, "w", encoding=encoding, newline=newline, sync_dir=sync_dir) as fh:
        fh.write(text)
    return Path(path)
