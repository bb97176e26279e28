"""Files that survive a crash or a power cut: write a temporary file, fsync it, rename it
over the target, fsync the directory. Used for results.json, checkpoint.npz and
predictions.npz (standard library and numpy only)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where directories
    cannot be opened (Windows)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """``os.replace(tmp, path)`` that survives a crash or power cut: ``tmp``'s data is
    fsynced first, the directory after the rename."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def write_npz_durably(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """``np.savez`` of ``arrays`` to ``path``, atomically and durably."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    replace_durably(tmp, path)
    return path
