# SPDX-License-Identifier: MIT
"""The device's model store: content-addressed bundles, adapters, and the pointer files.

Layout under the store's root (docs/updates.md draws it)::

    bundles/<model sha256>/   model.gguf + bundle.json, as the hub built them (never edited)
    adapters/<sha256>.gguf    LoRA adapters
    staging/<txn>/            downloads and patch results before they verify and install
    outbox/<txn>.<outcome>.json  reports not yet acknowledged by the hub (durable first: B8)
    current                   the pointer: JSON naming the active bundle (+ adapter)
    last_good                 the pointer as of the last health-checked commit
    journal                   the update state machine's record (updater.py)
    boot_count                failed starts of a model on trial (the boot-loop guard)

Every file is written with ``FileOps.write_atomic`` (temporary, fsync, rename, fsync of the
folder) and every install is one rename of a fully written, fsynced, verified folder or file,
so after a power cut each name holds either its old or its new complete content.

A folder's name is the sha256 of its model.gguf, so installing the same bundle twice is a
no-op and a half-finished install is recognised by its content, not by a flag.

Public API: ``Active`` (what a pointer names), ``SlotStore`` (``init``, ``read_pointer``,
``write_pointer``, ``verify``, ``resolve``, ``install_bundle``, ``install_adapter``, ``gc``,
``provision``, ``read_json``/``write_json``, the outbox, the boot counter).

.. versionadded:: 0.1
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EdgeLLMError, UpdateError
from ..formats.bundle import MANIFEST_NAME, MODEL_NAME, Bundle, check_node, read_manifest
from .fsops import FileOps
from .patch import CHUNK, sha256_path

__all__ = ["Active", "SlotStore"]

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_TXN_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
MAX_STATE_BYTES = 1 << 20  # a pointer, journal or report is a few hundred bytes


@dataclass(frozen=True)
class Active:
    """What a pointer names: a bundle by its model's sha256, and optionally an adapter."""

    model_sha256: str
    node: str
    version: int
    adapter_sha256: str | None = None
    adapter_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"model_sha256": self.model_sha256, "node": self.node, "version": self.version,
                "adapter_sha256": self.adapter_sha256, "adapter_scale": self.adapter_scale}

    @classmethod
    def from_dict(cls, d: Any) -> Active:
        """Parse a pointer's JSON object.

        Raises:
            UpdateError: a missing or malformed field.
        """
        if not isinstance(d, dict):
            raise UpdateError("a pointer must be a JSON object")
        sha, node, ver = d.get("model_sha256"), d.get("node"), d.get("version")
        asha, scale = d.get("adapter_sha256"), d.get("adapter_scale", 1.0)
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            raise UpdateError("pointer: model_sha256 is not a sha256")
        if asha is not None and (not isinstance(asha, str) or not _SHA_RE.match(asha)):
            raise UpdateError("pointer: adapter_sha256 is not a sha256")
        if isinstance(ver, bool) or not isinstance(ver, int) or ver < 1:
            raise UpdateError("pointer: version must be an integer >= 1")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise UpdateError("pointer: adapter_scale must be a finite number")
        if not isinstance(node, str):
            raise UpdateError("pointer: node must be a string")
        try:
            check_node(node)
        except EdgeLLMError as exc:
            raise UpdateError(f"pointer: {exc}") from None
        return cls(sha, node, ver, asha, float(scale))

    def describe(self) -> str:
        extra = f" + adapter {self.adapter_sha256[:12]}" if self.adapter_sha256 else ""
        return f"{self.node}@{self.version} ({self.model_sha256[:12]}){extra}"


class SlotStore:
    """The device's model store under one root folder (see the module docstring).

    - ``s = SlotStore(root, fs)``; ``s.init()`` makes the folders (idempotent);
    - ``s.provision(bundle_folder)`` installs a first model and points current and
      last_good at it (first boot, flashing);
    - ``s.resolve()`` is the verified model to serve: current, else last_good, else the
      newest verified bundle, repairing the pointers on the way.

    Every mutation goes through ``fs`` so a FaultFS sees it. Not thread-safe: one updater.
    """

    def __init__(self, root: str | os.PathLike[str], fs: FileOps | None = None,
                 chunk: int = CHUNK) -> None:
        self.root = Path(root)
        self.fs = fs or FileOps()
        self.chunk = chunk  # bytes per append when copying in (each append is one write)
        self.bundles = self.root / "bundles"
        self.adapters = self.root / "adapters"
        self.staging = self.root / "staging"
        self.outbox = self.root / "outbox"

    def init(self) -> None:
        """Create the store's folders where missing (each entry made durable)."""
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
        for d in (self.bundles, self.adapters, self.staging, self.outbox):
            self.fs.ensure_dir(d)

    # -- small JSON state files -----------------------------------------------------------

    def read_json(self, name: str) -> Any:
        """A state file's JSON value, or None when it is missing, empty or unreadable."""
        p = self.root / name
        try:
            if p.stat().st_size > MAX_STATE_BYTES:
                return None
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None

    def write_json(self, name: str, value: Any) -> None:
        """Replace a state file durably (write_atomic)."""
        data = (json.dumps(value, sort_keys=True) + "\n").encode("utf-8")
        self.fs.write_atomic(self.root / name, data)

    def read_pointer(self, name: str) -> Active | None:
        """The pointer ``current`` or ``last_good``; None when missing or malformed."""
        raw = self.read_json(name)
        if raw is None:
            return None
        try:
            return Active.from_dict(raw)
        except UpdateError:
            return None

    def write_pointer(self, name: str, active: Active) -> None:
        """Switch a pointer by one atomic rename (a no-op when it already says this)."""
        if self.read_pointer(name) == active:
            return
        self.write_json(name, active.to_dict())

    def boot_count(self) -> int:
        raw = self.read_json("boot_count")
        return raw if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0 else 0

    def set_boot_count(self, n: int) -> None:
        if self.boot_count() != n or not (self.root / "boot_count").exists():
            self.write_json("boot_count", n)

    # -- paths and verification -----------------------------------------------------------

    def bundle_dir(self, model_sha256: str) -> Path:
        return self.bundles / model_sha256

    def model_path(self, active: Active) -> Path:
        return self.bundle_dir(active.model_sha256) / MODEL_NAME

    def adapter_path(self, active: Active) -> Path | None:
        if active.adapter_sha256 is None:
            return None
        return self.adapters / f"{active.adapter_sha256}.gguf"

    def verify(self, active: Active) -> Bundle:
        """Check that the bundle (and adapter) a pointer names are complete and unchanged.

        Returns:
            The bundle's manifest.

        Raises:
            UpdateError: a missing folder or file, a manifest that names another model, node
                or version, or a size or sha256 that differs.
        """
        folder = self.bundle_dir(active.model_sha256)
        try:
            bundle = read_manifest(folder)
            entry = bundle.file(MODEL_NAME)
            if entry.sha256 != active.model_sha256:
                raise UpdateError(f"{folder}: the manifest names model {entry.sha256[:12]}...")
            if bundle.node != active.node or bundle.version != active.version:
                raise UpdateError(f"{folder}: the manifest is {bundle.node}@{bundle.version}, "
                                  f"the pointer says {active.node}@{active.version}")
            bundle.verify()
        except UpdateError:
            raise
        except EdgeLLMError as exc:
            raise UpdateError(f"{folder}: {exc}") from None
        ap = self.adapter_path(active)
        if ap is not None:
            try:
                digest = sha256_path(ap)
            except OSError:
                raise UpdateError(f"adapter {ap} is missing") from None
            if digest != active.adapter_sha256:
                raise UpdateError(f"adapter {ap} has sha256 {digest[:12]}...")
        return bundle

    def valid(self, active: Active | None) -> bool:
        if active is None:
            return False
        try:
            self.verify(active)
        except UpdateError:
            return False
        return True

    def resolve(self) -> tuple[Active, str]:
        """The verified model to serve and where it came from, repairing the pointers.

        Returns:
            (active, source) with source "current", "last_good" (current was missing or
            failed verification and now points at last_good) or "scan" (both failed; the
            newest verified bundle found became current and last_good).

        Raises:
            UpdateError: no verified model on the device at all.
        """
        cur = self.read_pointer("current")
        if self.valid(cur):
            assert cur is not None
            return cur, "current"
        good = self.read_pointer("last_good")
        if self.valid(good):
            assert good is not None
            self.write_pointer("current", good)
            return good, "last_good"
        found: list[Active] = []
        if self.bundles.is_dir():
            for d in sorted(self.bundles.iterdir()):
                try:
                    b = read_manifest(d)
                    a = Active(d.name, b.node, b.version)
                except (EdgeLLMError, OSError):
                    continue
                if self.valid(a):
                    found.append(a)
        if not found:
            raise UpdateError(f"{self.root}: no verified model on this device; re-provision it "
                              "(edgellm flash) or wait for a full bundle")
        best = max(found, key=lambda a: (a.version, a.model_sha256))
        self.write_pointer("current", best)
        self.write_pointer("last_good", best)
        return best, "scan"

    # -- installing ---------------------------------------------------------------------

    def staging_dir(self, txn: str) -> Path:
        if not _TXN_RE.match(txn):
            raise UpdateError(f"bad transaction id {txn!r}")
        return self.staging / txn

    def copy_in(self, src: Path, dst: Path) -> None:
        """Copy a file into the store in appends of self.chunk, then fsync it (not its folder)."""
        if dst.exists():
            self.fs.unlink(dst)
        self.fs.write(dst, b"")
        with open(src, "rb") as f:
            while chunk := f.read(self.chunk):
                self.fs.append(dst, chunk)
        self.fs.fsync(dst)

    def install_bundle(self, staged: Path, active: Active) -> None:
        """Move a verified staged bundle folder to bundles/<sha> (idempotent)."""
        final = self.bundle_dir(active.model_sha256)
        if final.is_dir():
            if self.valid(Active(active.model_sha256, active.node, active.version)):
                self.fs.remove_tree(staged)
                self.fs.fsync_dir(self.staging)
                return
            self.fs.remove_tree(final)  # a damaged copy (it can only be left by a crash)
        self.fs.rename(staged, final)
        self.fs.fsync_dir(self.bundles)
        self.fs.fsync_dir(self.staging)

    def install_adapter(self, staged_file: Path, sha256: str) -> None:
        """Move a verified staged adapter to adapters/<sha>.gguf (idempotent)."""
        final = self.adapters / f"{sha256}.gguf"
        if not (final.is_file() and sha256_path(final) == sha256):
            self.fs.rename(staged_file, final)
            self.fs.fsync_dir(self.adapters)
        self.fs.remove_tree(staged_file.parent)
        self.fs.fsync_dir(self.staging)

    def gc(self, keep: list[Active | None]) -> None:
        """Remove bundles, adapters and staging folders no kept pointer needs."""
        bundles = {a.model_sha256 for a in keep if a is not None}
        adapters = {f"{a.adapter_sha256}.gguf" for a in keep if a is not None and a.adapter_sha256}
        for d, names in ((self.bundles, bundles), (self.adapters, adapters), (self.staging, set())):
            if not d.is_dir():
                continue
            gone = False
            for p in sorted(d.iterdir()):
                if p.name not in names:
                    self.fs.remove_tree(p)
                    gone = True
            if gone:
                self.fs.fsync_dir(d)
        tmps = [*self.root.glob(".*.tmp"), *self.outbox.glob(".*.tmp")]
        for p in sorted(tmps):  # a write_atomic cut before its rename
            self.fs.unlink(p)

    def provision(self, bundle_folder: str | os.PathLike[str]) -> Active:
        """Install a first bundle (verified) and point current and last_good at it."""
        self.init()
        src = read_manifest(bundle_folder).verify()
        active = Active(src.file(MODEL_NAME).sha256, src.node, src.version)
        if not self.valid(active):
            staged = self.staging_dir("provision")
            self.fs.remove_tree(staged)
            self.fs.mkdir(staged)
            for f in src.files:
                self.copy_in(src.folder / f.name, staged / f.name)
            if MANIFEST_NAME not in {f.name for f in src.files}:
                self.copy_in(src.folder / MANIFEST_NAME, staged / MANIFEST_NAME)
            self.fs.fsync_dir(staged)
            self.fs.fsync_dir(self.staging)
            self.install_bundle(staged, active)
        self.write_pointer("current", active)
        self.write_pointer("last_good", active)
        return active

    # -- the outbox (reports for the hub) ------------------------------------------------

    def put_report(self, report: dict[str, Any]) -> None:
        """Store a report durably before anything acknowledges it (B8).

        Its file is ``outbox/<id>.json`` with id ``<txn>.<outcome>``: a later outcome of the
        same transaction (aborted, then committed) never overwrites an earlier one.
        """
        self.write_json(f"outbox/{report['id']}.json", report)

    def reports(self) -> list[dict[str, Any]]:
        """Reports not yet acknowledged, by id."""
        out = []
        if self.outbox.is_dir():
            for p in sorted(self.outbox.glob("*.json")):
                r = self.read_json(f"outbox/{p.name}")
                if isinstance(r, dict):
                    out.append(r)
        return out

    def ack_report(self, report_id: str) -> None:
        """The hub has the report (its ``id``): drop it (idempotent)."""
        if not _TXN_RE.match(report_id):
            raise UpdateError(f"bad report id {report_id!r}")
        p = self.outbox / f"{report_id}.json"
        if p.exists():
            self.fs.unlink(p)
            self.fs.fsync_dir(self.outbox)
