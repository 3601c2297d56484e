# SPDX-License-Identifier: MIT
"""The device's TUF client (issue 6, part 3): python-tuf's ngclient, made durable.

``trusted_client(state_dir, fetcher)`` builds a ``tuf.ngclient.Updater`` whose trust anchor
is the root written at provisioning (``<state_dir>/provisioned-root.json``, passed as
``bootstrap``, so a replaced or corrupted cached root.json does not change trust: SECURITY A6).
Metadata goes to ``<state_dir>/tuf/metadata``, targets to ``<state_dir>/tuf/targets``.
``DurableUpdater`` is the Updater with every metadata write fsync'd (file and directory):
python-tuf 7.0.1 renames atomically but never fsyncs (SECURITY 0), which on an SD card can
leave an empty timestamp.json after a power cut.

Public API: ``PROVISIONED_ROOT``, ``trusted_client``, ``refresh(updater)``,
``download(updater, target_name) -> Path``, ``DurableUpdater``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from tuf.api.exceptions import RepositoryError
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from .._fsutil import fsync_dir
from ..errors import UpdateError
from .tuf_mqtt import METADATA_URL, TARGETS_URL

__all__ = ["PROVISIONED_ROOT", "DurableUpdater", "download", "refresh", "trusted_client"]

PROVISIONED_ROOT = "provisioned-root.json"


class DurableUpdater(Updater):
    """An Updater whose metadata files are fsync'd before and after the atomic rename."""

    def _persist_file(self, filename: str, data: bytes) -> None:
        directory = os.path.dirname(filename)
        tmp = None
        try:
            with tempfile.NamedTemporaryFile(dir=directory, delete=False) as f:
                tmp = f.name
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, filename)
            tmp = None
            fsync_dir(directory)
        finally:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)

    def _update_root_symlink(self) -> None:
        super()._update_root_symlink()
        fsync_dir(self._dir)


def trusted_client(state_dir: str | os.PathLike[str], fetcher: FetcherInterface, *,
                   config: UpdaterConfig | None = None) -> DurableUpdater:
    """An Updater for the device whose state folder is state_dir (see the module docstring).

    Raises UpdateError when the provisioned root is missing.
    """
    state = Path(state_dir)
    anchor = state / PROVISIONED_ROOT
    try:
        bootstrap = anchor.read_bytes()
    except FileNotFoundError:
        raise UpdateError(f"{anchor} is missing: the device was not provisioned with a "
                          "TUF root") from None
    md_dir = state / "tuf" / "metadata"
    tg_dir = state / "tuf" / "targets"
    md_dir.mkdir(parents=True, exist_ok=True)
    tg_dir.mkdir(parents=True, exist_ok=True)
    return DurableUpdater(str(md_dir), METADATA_URL, str(tg_dir), TARGETS_URL, fetcher,
                          config, bootstrap=bootstrap)


def refresh(updater: Updater) -> None:
    """Refresh top-level metadata (python-tuf's typed errors pass through unchanged)."""
    updater.refresh()


def download(updater: Updater, target_name: str) -> Path:
    """Verified local path of target_name (downloaded unless a verified copy is cached).

    Raises tuf.api.exceptions.RepositoryError (unknown target) or python-tuf's download
    and verification errors (length or hash mismatch ...).
    """
    info = updater.get_targetinfo(target_name)
    if info is None:
        raise RepositoryError(f"target {target_name!r} is not in the signed targets metadata")
    path = updater.find_cached_target(info) or updater.download_target(info)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return Path(path)
