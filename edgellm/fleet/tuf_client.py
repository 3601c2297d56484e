# SPDX-License-Identifier: MIT
"""The device's TUF client (issue 6, part 3): python-tuf's ngclient, made durable.

``trusted_client(state_dir, fetcher, anchor=None)`` builds a ``tuf.ngclient.Updater`` whose
trust anchor is the root written at provisioning (``anchor``, default
``<state_dir>/provisioned-root.json``, passed as ``bootstrap``, so a replaced or corrupted
cached root.json does not change trust: SECURITY A6). Metadata goes to
``<state_dir>/tuf/metadata``, targets to ``<state_dir>/tuf/targets``, and an MqttFetcher
without a partial store gets ``<state_dir>/tuf/partial`` (resumable target chunks).
``download(updater, name, retries=, backoff=)`` retries transient transfer errors (a broker
restart, a silent hub) with bounded exponential back-off; a resumed attempt fetches only the
missing chunks. Verification errors are never retried.
``DurableUpdater`` is the Updater with every metadata write fsync'd (file and directory):
python-tuf 7.0.1 renames atomically but never fsyncs (SECURITY 0), which on an SD card can
leave an empty timestamp.json after a power cut.

Public API: ``PROVISIONED_ROOT``, ``trusted_client``, ``refresh(updater)``,
``download(updater, target_name, *, retries, backoff) -> Path``, ``is_transient(exc)``,
``DurableUpdater``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

from tuf.api.exceptions import (
    DownloadError,
    DownloadHTTPError,
    DownloadLengthMismatchError,
    RepositoryError,
)
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from .._fsutil import atomic_write, fsync_dir, fsync_path
from ..errors import UpdateError
from .tuf_mqtt import METADATA_URL, PARTIAL_DIR, TARGETS_URL, MqttFetcher

__all__ = ["PROVISIONED_ROOT", "DurableUpdater", "download", "is_transient", "refresh",
           "trusted_client"]

log = logging.getLogger(__name__)

PROVISIONED_ROOT = "provisioned-root.json"
RETRIES = 3  # download() attempts after the first
BACKOFF_S = 1.0  # first back-off; doubles per attempt
MAX_BACKOFF_S = 30.0  # the longest pause between two attempts


class DurableUpdater(Updater):
    """An Updater whose metadata files are fsync'd before and after the atomic rename, and
    whose downloaded targets are fsync'd (file and folder) before an MqttFetcher's partial
    store of them goes."""

    def _persist_file(self, filename: str, data: bytes) -> None:
        atomic_write(filename, data)

    def download_target(self, targetinfo: TargetFile, filepath: str | None = None,
                        target_base_url: str | None = None) -> str:
        path = super().download_target(targetinfo, filepath, target_base_url)
        fsync_path(path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        if isinstance(self._fetcher, MqttFetcher):  # durable now: the chunks may go
            for sha in targetinfo.hashes.values():
                self._fetcher.drop_partial(sha)
        return path

    def _update_root_symlink(self) -> None:
        super()._update_root_symlink()
        fsync_dir(self._dir)


def trusted_client(state_dir: str | os.PathLike[str], fetcher: FetcherInterface, *,
                   config: UpdaterConfig | None = None,
                   anchor: str | os.PathLike[str] | None = None) -> DurableUpdater:
    """An Updater for the device whose state folder is state_dir (see the module docstring).

    Args:
        state_dir: the device's state folder (tuf/metadata, tuf/targets, tuf/partial).
        fetcher: an MqttFetcher (or any FetcherInterface); an MqttFetcher without a partial
            store gets ``state_dir/tuf/partial``.
        config: python-tuf's UpdaterConfig (length limits ...).
        anchor: the provisioned root.json, the trust anchor (default
            ``state_dir/provisioned-root.json``).

    Raises:
        UpdateError: the provisioned root is missing.
    """
    state = Path(state_dir)
    root_file = Path(anchor) if anchor is not None else state / PROVISIONED_ROOT
    try:
        bootstrap = root_file.read_bytes()
    except FileNotFoundError:
        raise UpdateError(f"{root_file} is missing: the device was not provisioned with a "
                          "TUF root") from None
    md_dir = state / "tuf" / "metadata"
    tg_dir = state / "tuf" / "targets"
    md_dir.mkdir(parents=True, exist_ok=True)
    tg_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(fetcher, MqttFetcher) and fetcher.partial_dir is None:
        fetcher.partial_dir = state / PARTIAL_DIR
    return DurableUpdater(str(md_dir), METADATA_URL, str(tg_dir), TARGETS_URL, fetcher,
                          config, bootstrap=bootstrap)


def refresh(updater: Updater) -> None:
    """Refresh top-level metadata (python-tuf's typed errors pass through unchanged)."""
    updater.refresh()


def is_transient(exc: BaseException) -> bool:
    """True for a transfer error worth another attempt: the broker gone or restarting, a
    silent hub, an HTTP 5xx. Never for a verification error (RepositoryError: hash, length,
    signature, version), a 4xx (a 404 is an answer), or more bytes than the signed length."""
    if isinstance(exc, DownloadHTTPError):
        return exc.status_code >= 500
    if isinstance(exc, DownloadLengthMismatchError):
        return False
    return isinstance(exc, DownloadError)


def download(updater: Updater, target_name: str, *, retries: int = RETRIES,
             backoff: float = BACKOFF_S, max_backoff: float = MAX_BACKOFF_S,
             sleep: Callable[[float], None] = time.sleep) -> Path:
    """Verified local path of target_name (downloaded unless a verified copy is cached).

    A transient transfer error (``is_transient``) is retried up to ``retries`` times, after
    ``backoff``, 2 x ``backoff``, ... seconds (at most ``max_backoff`` each); with an
    MqttFetcher's partial store each attempt asks only for the chunks still missing.

    Raises:
        tuf.api.exceptions.RepositoryError: unknown target, or python-tuf's verification
            errors (length or hash mismatch ...): never retried.
        tuf.api.exceptions.DownloadError: the last attempt's transfer error.
    """
    attempt = 0
    while True:
        try:
            return _download_once(updater, target_name)
        except DownloadError as exc:
            if attempt >= retries or not is_transient(exc):
                raise
            pause = min(max_backoff, backoff * 2 ** attempt)
            attempt += 1
            log.info("download of %s failed (%s); attempt %d of %d in %.1f s", target_name,
                     exc, attempt + 1, retries + 1, pause)
            sleep(pause)


def _download_once(updater: Updater, target_name: str) -> Path:
    info = updater.get_targetinfo(target_name)
    if info is None:
        raise RepositoryError(f"target {target_name!r} is not in the signed targets metadata")
    path = updater.find_cached_target(info)
    if path is None:
        path = updater.download_target(info)
        if isinstance(updater, DurableUpdater):
            return Path(path)  # fsync'd already
    fsync_path(path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return Path(path)
