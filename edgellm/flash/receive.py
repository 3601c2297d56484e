# SPDX-License-Identifier: MIT
"""The device side of flashing: take a flash package archive and install it.

``edgellm receive --serial /dev/ttyGS0 --root /var/lib/edgellm`` waits for ``edgellm flash
--to serial://...`` on the other end of the cable, receives the archive with
``serial_link.receive_file`` (resumable: the unfinished part waits in
``ROOT/.incoming/``; the whole archive's sha256 must match the sender's), then unpacks it
safely and installs it with ``package.install_package`` (every file verified against
flash.json before any write; the model through the update apply path). ``edgellm receive
--file ARCHIVE --root ROOT`` does the last two steps for an archive that came another way
(the SSH target copies it). Whatever fails, the device keeps the model and identity it had.

A device already provisioned takes only a package with its own identity (device id, broker,
certificate, key, CA, TUF root) unless ``reprovision=True`` (``--reprovision``): the serial
receiver runs unattended on a cable anyone can plug in, so it never passes it; the SSH target
does (its login already authenticated the operator).

Public API: ``receive_serial``, ``install_archive``, ``INCOMING``.

.. versionadded:: 0.1
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Union

from ..errors import FlashTargetError
from .package import install_package, unpack
from .serial_link import receive_file

__all__ = ["INCOMING", "install_archive", "receive_serial"]

PathLike = Union[str, "os.PathLike[str]"]
INCOMING = ".incoming"  # under the device root: partial and received archives, unpack space


def install_archive(archive: PathLike, device_root: PathLike, *,
                    reprovision: bool = False) -> Any:
    """Unpack a flash package archive and install it into the device root.

    The archive is unpacked into a fresh folder beside it (the SSH target checks room for
    that in its upload folder; a serial transfer lands in ``device_root/.incoming``), which
    is removed afterwards. reprovision: as ``install_package`` (off: a provisioned device
    refuses another identity).

    Returns:
        The active model (slots.Active) after installing.

    Raises:
        FlashTargetError: the archive does not exist.
        FlashPackageError: the archive is unsafe, malformed, truncated or altered.
        FlashIdentityError: the device is provisioned with another identity (no reprovision).
        FlashDiskFullError: too little space to unpack or install.
        FlashError: the update path refused or rolled back the model.
    """
    src = Path(archive)
    if not src.is_file():
        raise FlashTargetError(f"{src}: no such archive")
    work = Path(tempfile.mkdtemp(prefix=".unpack-", dir=src.resolve().parent))
    try:
        pkg = unpack(src, work / "package")
        return install_package(pkg, device_root, reprovision=reprovision)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def receive_serial(port: str, device_root: PathLike, *, baud: int = 921600,
                   idle_timeout: float | None = None, reprovision: bool = False) -> Any:
    """Receive a flash package over a serial port and install it; returns the active model.

    A transfer cut short resumes on the next call (the partial archive and its durable
    offset stay in ``device_root/.incoming``); a received archive is removed once installed
    or refused. reprovision: as ``install_archive`` (keep it off for an unattended port).

    Raises:
        FlashTargetError, FlashPortBusyError: the port is missing or held by another process.
        SerialLinkError: the link failed or stayed silent for idle_timeout seconds.
        ImageRejectedError: the received archive's sha256 differs from the sender's.
        FlashPackageError, FlashIdentityError, FlashDiskFullError, FlashError: as
            ``install_archive``.
    """
    spool = Path(device_root) / INCOMING
    archive = receive_file(port, spool, baud=baud, idle_timeout=idle_timeout)
    try:
        return install_archive(archive, device_root, reprovision=reprovision)
    finally:
        archive.unlink(missing_ok=True)
