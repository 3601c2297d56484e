# SPDX-License-Identifier: MIT
"""The hub's TUF repository (issue 6, part 3): signed release metadata for the fleet.

Built on python-tuf's Metadata API. Layout under a hub home (edgellm.fleet.home.HubHome)::

    keys/<role>/<keyid>.pem     ed25519 private keys, 0600 (roles: root targets snapshot timestamp)
    tuf/metadata/N.root.json    every root version (devices walk N+1.root.json, 404 ends it)
    tuf/metadata/N.targets.json, N.snapshot.json, timestamp.json
    tuf/targets/<sha256>.<name> the target files

Consistent snapshots are ON: python-tuf's ngclient then asks for versioned metadata and
hash-prefixed targets, so a hub that publishes while a device downloads never serves a mix of
old and new files (old versions stay on disk; nothing is overwritten but timestamp.json).
Each role's keys are a list and its threshold is read from root, so threshold > 1 works:
``init(..., thresholds={"root": 2})`` makes two root keys and every root is signed by both.

Public API: ``TufRepo.init(home)``, ``TufRepo.open(home)``, ``add_target(path, custom)``,
``add_targets([(path, custom, name), ...])`` (one targets version), ``target_file(name)``,
``refresh_timestamp()``, ``read(name) -> bytes | None``, ``read_range(name, offset, size)``,
``object_path(name)``, ``rotate_root()``, ``load(role)``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from .._fsutil import atomic_write, fsync_dir
from ..errors import InvalidArgumentError, TufRepoError
from .protocol import TARGET_NAME

__all__ = ["EXPIRY_DAYS", "ROLES", "TARGET_CUSTOM_KEYS", "TARGET_CUSTOM_OPTIONAL", "TARGET_KINDS",
           "TufRepo"]

ROLES = ("root", "targets", "snapshot", "timestamp")
EXPIRY_DAYS = {"root": 365, "targets": 90, "snapshot": 7, "timestamp": 1}
# custom fields every target carries (docs/updates.md, "Releases and rollouts")
TARGET_CUSTOM_KEYS = ("node", "version", "release", "board", "kind")
# and the ones some carry: model_sha256 (every release target: the model it runs),
# base_sha256 (delta, adapter), adapter_sha256 (adapter), devices (only these ids),
# health (HealthSpec.to_dict(); absent: the files-only check)
TARGET_CUSTOM_OPTIONAL = ("model_sha256", "base_sha256", "adapter_sha256", "devices", "health")
TARGET_KINDS = ("model", "manifest", "delta", "adapter")
_NAME = TARGET_NAME  # flat: <sha256>.<name> fits 128 chars
_OBJECT = re.compile(r"(metadata/(?:[0-9]{1,10}\.(?:root|targets|snapshot)|timestamp)\.json)"
                     r"|(targets/[0-9a-f]{64}\.[A-Za-z0-9][A-Za-z0-9._+-]{0,55})")


def _expiry(role: str, now: dt.datetime | None = None) -> dt.datetime:
    base = now or dt.datetime.now(dt.timezone.utc)
    return base.replace(microsecond=0) + dt.timedelta(days=EXPIRY_DAYS[role])


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class TufRepo:
    """A TUF repository in a hub home's tuf/ folder, signed with the keys in keys/<role>/."""

    def __init__(self, home: Any) -> None:
        self.home = home
        self.root_dir = Path(home.root) / "tuf"
        self.metadata_dir = self.root_dir / "metadata"
        self.targets_dir = self.root_dir / "targets"
        self.keys_dir = Path(home.keys_dir)
        self.signers: dict[str, list[Signer]] = {r: self._load_signers(r) for r in ROLES}
        self._ser = JSONSerializer(compact=False)

    # ------------------------------------------------------------------ creation
    @classmethod
    def init(cls, home: Any, *, thresholds: Mapping[str, int] | None = None,
             keys: Mapping[str, int] | None = None) -> TufRepo:
        """Create keys and version-1 metadata (root, targets, snapshot, timestamp).

        thresholds: per-role signature thresholds (default 1); keys: per-role key counts
        (default: the threshold), e.g. ``keys={"root": 3}, thresholds={"root": 2}``.
        Raises TufRepoError if the repository exists already, InvalidArgumentError for a
        threshold below 1 or above the key count.
        """
        thresholds = dict(thresholds or {})
        counts = dict(keys or {})
        for role in ROLES:
            n, k = int(thresholds.get(role, 1)), int(counts.get(role, thresholds.get(role, 1)))
            if n < 1 or k < n:
                raise InvalidArgumentError(f"{role}: threshold {n} with {k} keys; use "
                                           "1 <= threshold <= keys")
        md_dir = Path(home.root) / "tuf" / "metadata"
        if md_dir.exists():
            raise TufRepoError(f"{md_dir} exists: the TUF repository was initialised before")
        md_dir.mkdir(parents=True)
        (Path(home.root) / "tuf" / "targets").mkdir()
        root = Root(expires=_expiry("root"), consistent_snapshot=True)
        signers: dict[str, list[CryptoSigner]] = {}
        for role in ROLES:
            n = int(thresholds.get(role, 1))
            kdir = Path(home.keys_dir) / role
            kdir.mkdir(parents=True, exist_ok=True)
            os.chmod(kdir, 0o700)
            signers[role] = []
            for _ in range(int(counts.get(role, n))):
                s = CryptoSigner.generate_ed25519()
                _write_private(kdir / f"{s.public_key.keyid}.pem", s.private_bytes)
                root.add_key(s.public_key, role)
                signers[role].append(s)
            root.roles[role].threshold = n
        repo = cls(home)
        repo._write(Metadata(root))
        targets = Metadata(Targets(expires=_expiry("targets")))
        repo._write(targets)
        repo._publish_snapshot(targets.signed.version)
        return repo

    @classmethod
    def open(cls, home: Any) -> TufRepo:
        """The existing repository of home (TufRepoError if there is none)."""
        if not (Path(home.root) / "tuf" / "metadata" / "1.root.json").is_file():
            raise TufRepoError(f"no TUF repository in {home.root}: run TufRepo.init first")
        return cls(home)

    def _load_signers(self, role: str) -> list[Signer]:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        kdir = self.keys_dir / role
        out: list[Signer] = []
        for p in sorted(kdir.glob("*.pem")) if kdir.is_dir() else []:
            out.append(CryptoSigner(load_pem_private_key(p.read_bytes(), password=None)))
        return out

    # ------------------------------------------------------------------ reading
    def load(self, role: str) -> Metadata[Any]:
        """The newest metadata of role."""
        if role == "timestamp":
            return Metadata.from_file(str(self.metadata_dir / "timestamp.json"))
        versions = [int(p.name.split(".")[0]) for p in self.metadata_dir.glob(f"*.{role}.json")]
        if not versions:
            raise TufRepoError(f"no {role} metadata in {self.metadata_dir}")
        return Metadata.from_file(str(self.metadata_dir / f"{max(versions)}.{role}.json"))

    def read(self, name: str) -> bytes | None:
        """Bytes of the object a client asks for ("metadata/2.root.json", "targets/<h>.<n>").

        None when it does not exist or the name is not one this repository could hold (so no
        path outside tuf/ can be read: the name is matched against a strict pattern).
        """
        path = self.object_path(name)
        try:
            return path.read_bytes() if path is not None else None
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def read_range(self, name: str, offset: int, size: int) -> tuple[bytes, int] | None:
        """(size bytes of name from offset, the object's total length), or None like read().

        The responder serves chunks with this, so a multi-GiB bundle is never read whole.
        """
        path = self.object_path(name)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                total = os.fstat(f.fileno()).st_size
                f.seek(min(max(offset, 0), total))
                return f.read(size), total
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def object_path(self, name: str) -> Path | None:
        """Where name lives under tuf/, or None for a name no repository object can have."""
        if not isinstance(name, str) or not _OBJECT.fullmatch(name):
            return None
        return self.root_dir / name

    # ------------------------------------------------------------------ writing
    def _sign(self, md: Metadata[Any]) -> None:
        role = md.signed.type
        md.signatures.clear()
        if not self.signers[role]:
            raise TufRepoError(f"no {role} keys in {self.keys_dir / role}")
        for s in self.signers[role]:
            md.sign(s, append=True)

    def _write(self, md: Metadata[Any], *, sign: bool = True) -> Path:
        if sign:
            self._sign(md)
        role = md.signed.type
        name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        path = self.metadata_dir / name
        atomic_write(path, md.to_bytes(self._ser))
        return path

    def _publish_snapshot(self, targets_version: int) -> None:
        try:
            snap = self.load("snapshot")
            snap.signed.version += 1
        except TufRepoError:
            snap = Metadata(Snapshot(expires=_expiry("snapshot")))
        snap.signed.meta["targets.json"] = MetaFile(version=targets_version)
        snap.signed.expires = _expiry("snapshot")
        self._write(snap)
        self.refresh_timestamp(snapshot_version=snap.signed.version)

    def refresh_timestamp(self, *, snapshot_version: int | None = None,
                          expires: dt.datetime | None = None) -> Metadata[Any]:
        """Sign a new timestamp (version + 1) pointing at the newest snapshot.

        expires: override the expiry (tests make an already-expired one with it).
        """
        if snapshot_version is None:
            snapshot_version = self.load("snapshot").signed.version
        path = self.metadata_dir / "timestamp.json"
        if path.exists():
            ts = Metadata[Timestamp].from_file(str(path))
            ts.signed.version += 1
        else:
            ts = Metadata(Timestamp(expires=_expiry("timestamp")))
        ts.signed.snapshot_meta = MetaFile(version=snapshot_version)
        ts.signed.expires = expires or _expiry("timestamp")
        self._write(ts)
        return ts

    def add_target(self, path: str | os.PathLike[str], custom: Mapping[str, Any], *,
                   name: str | None = None) -> TargetFile:
        """Publish the file at path as target name (default: its file name).

        custom must hold node, version, release, board, kind (and may hold the keys in
        TARGET_CUSTOM_OPTIONAL): they are signed with the target. Bumps targets, snapshot and
        timestamp.
        """
        src = Path(path)
        return self.add_targets([(src, custom, name or src.name)])[0]

    def add_targets(self, items: Sequence[tuple[str | os.PathLike[str], Mapping[str, Any],
                                                 str]]) -> list[TargetFile]:
        """Publish several files as (path, custom, name) in ONE new targets version.

        A release's targets appear together: a device that refreshes sees all of them or
        none. The files are copied (fsynced) under targets/ first and the copies hashed, then
        targets, snapshot and timestamp are signed once each.
        """
        out = []
        for path, custom, name in items:
            if not _NAME.fullmatch(name):
                raise InvalidArgumentError(f"target name {name!r}: 1-56 of A-Za-z0-9._+- (flat)")
            missing = [k for k in TARGET_CUSTOM_KEYS if k not in custom]
            extra = sorted(set(custom) - set(TARGET_CUSTOM_KEYS) - set(TARGET_CUSTOM_OPTIONAL))
            if missing or extra:
                raise InvalidArgumentError(
                    f"target custom fields: missing {missing}, unknown {extra}")
            # copy first, hash the copy: what is signed is what is stored, even if the
            # source changes meanwhile
            tmp = self.targets_dir / f".{name}.tmp"
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            tf = TargetFile.from_file(name, str(tmp), ["sha256"])
            tf.unrecognized_fields["custom"] = dict(custom)
            os.replace(tmp, self.targets_dir / f"{tf.hashes['sha256']}.{name}")
            out.append(tf)
        fsync_dir(self.targets_dir)
        targets = self.load("targets")
        for tf in out:
            targets.signed.targets[tf.path] = tf
        targets.signed.version += 1
        targets.signed.expires = _expiry("targets")
        self._write(targets)
        self._publish_snapshot(targets.signed.version)
        return out

    def target_file(self, name: str) -> Path | None:
        """The stored file of the newest targets' entry name (None: no such target)."""
        tf = self.load("targets").signed.targets.get(name)
        if tf is None:
            return None
        return self.targets_dir / f"{tf.hashes['sha256']}.{name}"

    def refresh_expiring(self, now: dt.datetime | None = None) -> list[str]:
        """Re-sign the online roles that expire soon: targets within 7 days, snapshot within
        2 days, timestamp within half its life (12 h). Returns the roles re-signed.

        The hub service calls this every few minutes (release.keep_fresh), so a device
        that refreshes never sees expired metadata from a healthy hub (SECURITY A4 is about
        the device's clock, not this). Root is offline: rotate_root renews it.
        """
        now = now or dt.datetime.now(dt.timezone.utc)
        done = []
        targets = self.load("targets")
        if targets.signed.expires - now < dt.timedelta(days=7):
            targets.signed.version += 1
            targets.signed.expires = _expiry("targets", now)
            self._write(targets)
            self._publish_snapshot(targets.signed.version)
            return ["targets", "snapshot", "timestamp"]
        snap = self.load("snapshot")
        if snap.signed.expires - now < dt.timedelta(days=2):
            self._publish_snapshot(targets.signed.version)
            return ["snapshot", "timestamp"]
        ts = self.load("timestamp")
        if ts.signed.expires - now < dt.timedelta(hours=EXPIRY_DAYS["timestamp"] * 12):
            self.refresh_timestamp()
            done.append("timestamp")
        return done

    def rotate_root(self, *, new_keys: int = 1) -> Metadata[Any]:
        """Replace the root keys with new_keys fresh ones; the new root (version + 1) is signed
        by the old keys and the new ones (threshold of both), as the spec requires."""
        old = self.load("root")
        old_signers = list(self.signers["root"])
        new = Metadata(old.signed)
        new.signed.version += 1
        new.signed.expires = _expiry("root")
        for keyid in list(new.signed.roles["root"].keyids):
            new.signed.revoke_key(keyid, "root")
        fresh: list[CryptoSigner] = []
        kdir = self.keys_dir / "root"
        for _ in range(new_keys):
            s = CryptoSigner.generate_ed25519()
            new.signed.add_key(s.public_key, "root")
            fresh.append(s)
        new.signed.roles["root"].threshold = new_keys
        new.signatures.clear()
        for signer in [*old_signers, *fresh]:
            new.sign(signer, append=True)
        self._write(new, sign=False)
        retired = kdir / "retired"
        retired.mkdir(exist_ok=True, mode=0o700)
        for p in kdir.glob("*.pem"):
            os.replace(p, retired / p.name)
        for s in fresh:
            _write_private(kdir / f"{s.public_key.keyid}.pem", s.private_bytes)
        self.signers["root"] = list(fresh)
        return new
