# SPDX-License-Identifier: MIT
"""Durable file writes shared by the hub and the device: fsync a folder, write atomically.

A rename is durable only once its folder is fsync'd (POSIX); ``atomic_write`` writes a
temporary file beside the target, fsyncs it, renames it over the target and fsyncs the
folder, so a power cut leaves either the old file or the new one, never a mix. Errors are
the OSErrors of the calls (callers turn ENOSPC into their own typed errors).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir", "fsync_path"]


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync the file or folder path names (a folder: its entries become durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a folder's entries (creates, renames, unlinks) durable."""
    fsync_path(path)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace path's contents with data: temp file, fsync, rename, fsync of the folder."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    fsync_dir(p.parent)
