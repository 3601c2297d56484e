# SPDX-License-Identifier: MIT
"""The device's side of signed updates: from the hub's offer to a report upstream.

The agent (fleet/agent.py) owns one ``DeviceUpdates``; the offer is only a hint, every
decision comes from TUF-verified metadata::

    offer (cmd topic) --> refresh TUF (the provisioned root, MqttFetcher on the agent's client)
      --> get_targetinfo for each named target --> target_policy (board, devices, node,
          release counter, kind, base) --> download (tuf_client.download: resumable, verified)
      --> updater.Update (model+manifest: "bundle"; delta; adapter) --> Updater.offer
    agent loop: DeviceUpdates.step() = handle the latest offer, Updater.poll(), publish reports

Choices:

- A delta is used only when its signed base is the active model; otherwise, or when it cannot
  be downloaded, the full bundle of the same release is fetched instead (SECURITY C2). A delta
  whose signed base is the active model but whose bytes do not apply (the updater's
  ``base_mismatch``, ``patch_invalid``, ``invalid``, ``verify_failed``) contradicts its own
  signed metadata: the release is refused as an attack, with no fallback.
- An adapter whose base is not active installs the base bundle first, then the adapter (the
  same offer is handled again after the commit).
- Refusals before the updater (TUF errors, policy, missing targets) become ``update`` reports
  too, stored durably in the updater's outbox first; TUF verification errors, policy refusals
  and the updater's refusals of signed bytes carry ``attack=true``, which also sticks in the
  birth (``attack``) until the next committed update.
- Reports leave as ``update`` messages (protocol.SCHEMAS) on the device's state topic at QoS 1,
  not retained, and leave the outbox only once the broker acknowledged them (PUBACK).
- Before any download, an offer whose targets cannot fit is refused ``no_space`` (not an
  attack; ``_check_space`` says the factor: 2 x the signed lengths in the state folder, the
  largest one in the temp folder, the staged install in the models folder); an OSError
  (ENOSPC: ``no_space``) or ValueError while downloading is a refusal too, and drops that
  target's partial store. ``on_progress`` is called after every chunk (the agent's watchdog).
- A newer offer that replaces an update still pending in the Updater removes the older one's
  downloaded files and transaction state.
- ``<state_dir>/updates.json`` (atomic_write: fsync of file and folder) holds the installed
  release counter (the release, node, model and adapter committed last), the attack flag,
  and each transaction's rollout and release until its report is acknowledged.

python-tuf's exceptions map to typed reasons (``classify``): UnsignedMetadataError
``bad_signature``, BadVersionNumberError ``rollback``, ExpiredMetadataError ``expired``,
LengthOrHashMismatchError ``hash_mismatch`` or ``length_mismatch``,
DownloadLengthMismatchError ``length_mismatch``, any other RepositoryError ``repository``
(all attacks); DownloadHTTPError / DownloadError ``download_failed`` (not an attack; a transfer
error is retried at later steps before it is reported).

Public API: ``DeviceUpdates`` (``offer``, ``step``, ``handle_offer``, ``publish_reports``,
``attack``, ``installed``, ``facts``, ``sent``), ``classify``, ``ATTACK_REASONS``.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from tuf.api.exceptions import (
    BadVersionNumberError,
    DownloadError,
    DownloadHTTPError,
    DownloadLengthMismatchError,
    ExpiredMetadataError,
    LengthOrHashMismatchError,
    RepositoryError,
    UnsignedMetadataError,
)
from tuf.ngclient import Updater as TufUpdater
from tuf.ngclient import UpdaterConfig

from .._fsutil import atomic_write
from ..errors import EdgeLLMError, UpdateRefusedError
from . import protocol, tuf_client
from .device_config import DeviceConfig
from .health import Reason
from .slots import Active
from .target_policy import DeviceFacts, Installed, SignedTarget, check, check_release
from .tuf_mqtt import MqttFetcher
from .updater import Update, Updater

__all__ = ["ATTACK_REASONS", "DeviceUpdates", "classify"]

log = logging.getLogger(__name__)

STATE_FILE = "updates.json"
# reasons that mean tampering when an offer is refused
ATTACK_REASONS = frozenset(r.value for r in (
    Reason.BAD_SIGNATURE, Reason.ROLLBACK, Reason.EXPIRED, Reason.HASH_MISMATCH,
    Reason.LENGTH_MISMATCH, Reason.REPOSITORY, Reason.RELEASE_DOWNGRADE, Reason.WRONG_BOARD,
    Reason.WRONG_DEVICE, Reason.WRONG_NODE, Reason.BASE_MISMATCH, Reason.PATCH_INVALID,
    Reason.INVALID, Reason.VERIFY_FAILED))
# the updater's outcomes as the wire's (protocol.UPDATE_OUTCOMES)
_OUTCOMES = {"committed": "committed", "rolled_back": "rolled_back", "refused": "refused",
             "already_installed": "already_installed", "aborted": "refused",
             "fallback": "rolled_back"}
_FINAL = ("committed", "rolled_back", "refused", "already_installed")
_SLOTS = ("manifest", "model", "delta", "adapter")


def classify(exc: BaseException) -> tuple[Reason, bool]:
    """(typed reason, attack) for an error met while refreshing or downloading."""
    if isinstance(exc, UpdateRefusedError):
        return Reason(exc.reason), exc.attack
    if isinstance(exc, UnsignedMetadataError):
        return Reason.BAD_SIGNATURE, True
    if isinstance(exc, BadVersionNumberError):
        return Reason.ROLLBACK, True
    if isinstance(exc, ExpiredMetadataError):
        return Reason.EXPIRED, True
    if isinstance(exc, LengthOrHashMismatchError):
        return (Reason.LENGTH_MISMATCH if "length" in str(exc).lower()
                else Reason.HASH_MISMATCH), True
    if isinstance(exc, DownloadLengthMismatchError):
        return Reason.LENGTH_MISMATCH, True
    if isinstance(exc, RepositoryError):
        return Reason.REPOSITORY, True
    if isinstance(exc, DownloadError):
        return Reason.DOWNLOAD_FAILED, False
    return Reason.INVALID, False


def _ascii(text: str) -> str:
    """One short line of printable ASCII (protocol "detail"): no paths, no free text."""
    out = "".join(c if " " <= c <= "~" else " " for c in str(text))
    return out[:protocol.MAX_DETAIL]


class _Transient(Exception):
    """A transfer error worth another attempt later (the hub or the broker is away)."""


class DeviceUpdates:
    """Turns the hub's offers into verified updates of this device (module docstring).

    Thread use: ``offer()`` may be called from paho's network thread; everything else runs
    in the agent's loop thread (the Updater is single-threaded).
    """

    def __init__(self, cfg: DeviceConfig, client: mqtt.Client, device_id: str, *,
                 updater: Updater, state_dir: str | Path | None = None,
                 anchor: str | Path | None = None, fetch_timeout: float = 10.0,
                 retries: int = 3, backoff: float = 1.0, retry_after_s: float = 5.0,
                 max_attempts: int = 3, tuf_config: UpdaterConfig | None = None,
                 on_change: Callable[[], None] | None = None,
                 on_progress: Callable[[], None] | None = None,
                 free_bytes: Callable[[Path], int] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.client = client
        self.device_id = protocol.check_device_id(device_id)
        self.updater = updater
        self.state_dir = Path(state_dir) if state_dir is not None else Path(cfg.state_dir)
        self.anchor = Path(anchor) if anchor is not None else (
            Path(cfg.tuf_root) if cfg.tuf_root is not None
            else self.state_dir / tuf_client.PROVISIONED_ROOT)
        self.fetch_timeout = fetch_timeout
        self.retries, self.backoff = retries, backoff
        self.retry_after_s, self.max_attempts = retry_after_s, max_attempts
        self.tuf_config = tuf_config
        self.on_change = on_change
        self.on_progress = on_progress  # after every chunk fetched (watchdog keepalive)
        self.free_bytes = free_bytes or (lambda p: shutil.disk_usage(p).free)
        self.clock = clock
        self.topic = protocol.topic(self.device_id, "state")
        self.sent: list[dict[str, Any]] = []  # every update message published, in order
        self._path = self.state_dir / STATE_FILE
        self._state = self._load()
        self._lock = threading.Lock()
        self._offer: dict[str, Any] | None = None
        self._attempts = 0
        self._retry_at = 0.0
        self._fetcher: MqttFetcher | None = None
        self._inflight: dict[str, tuple[mqtt.MQTTMessageInfo, str]] = {}
        self._birth_due = False  # the active model or the attack flag changed

    # -- durable state ------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        import json

        try:
            raw = json.loads(self._path.read_bytes())
        except (OSError, ValueError):
            raw = None
        if not isinstance(raw, dict):
            raw = {}
        txns = raw.get("txns")
        seen = raw.get("processed")
        return {"installed": raw.get("installed"), "attack": raw.get("attack") is True,
                "txns": txns if isinstance(txns, dict) else {},
                "processed": [s for s in seen if isinstance(s, str)]
                if isinstance(seen, list) else []}

    def _save(self) -> None:
        import json

        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self._path, json.dumps(self._state, sort_keys=True).encode())

    @property
    def attack(self) -> bool:
        """True once a refusal meaning tampering happened since the last committed update."""
        return bool(self._state["attack"])

    @property
    def installed(self) -> Installed | None:
        """The release counter: the last release committed here (None: none yet)."""
        return Installed.from_dict(self._state["installed"])

    def facts(self) -> DeviceFacts:
        """What target_policy compares a target with."""
        active = self.updater.active
        if active is None:
            raise EdgeLLMError("DeviceUpdates needs a booted Updater")
        return DeviceFacts(self.device_id, self.cfg.board, active, self.installed)

    # -- offers -------------------------------------------------------------------------

    def offer(self, msg: Mapping[str, Any]) -> None:
        """Remember the hub's latest offer (a decoded protocol "offer"); step() handles it."""
        with self._lock:
            self._offer = dict(msg)
            self._attempts = 0
            self._retry_at = 0.0

    def step(self, now: float | None = None) -> dict[str, Any] | None:
        """One turn of the agent's loop: the pending offer, the Updater's poll, the reports.

        Returns the Updater's report of this poll (committed, rolled back, refused), if any.
        """
        t = self.clock() if now is None else now
        with self._lock:
            offer = self._offer if self._offer is not None and t >= self._retry_at else None
            if offer is not None:
                self._offer = None
        if offer is not None:
            try:
                self.handle_offer(offer)
            except _Transient as exc:
                self._attempts += 1
                if self._attempts < self.max_attempts:
                    log.info("offer of rollout %s: %s; trying again in %.0f s",
                             offer.get("rollout"), exc, self.retry_after_s)
                    with self._lock:
                        if self._offer is None:  # a newer offer wins
                            self._offer, self._retry_at = offer, t + self.retry_after_s
                else:
                    self._refuse(offer, None, Reason.DOWNLOAD_FAILED, str(exc), attack=False)
        report = self.updater.poll(now)
        self.publish_reports()
        return report

    def handle_offer(self, offer: Mapping[str, Any]) -> None:
        """Verify and stage one offer now (step() calls it; tests may too).

        Raises _Transient (internal) for a transfer error worth another attempt; every other
        failure becomes a refusal report.
        """
        names = offer.get("targets") or {}
        slots = {s: str(names[s]) for s in _SLOTS if isinstance(names.get(s), str)}
        first: SignedTarget | None = None
        downloaded: list[Path] = []
        try:
            up = self._tuf()
            targets: dict[str, SignedTarget] = {}
            for slot, name in slots.items():
                info = up.get_targetinfo(name)
                if info is None:
                    raise UpdateRefusedError(Reason.UNKNOWN_TARGET.value,
                                             f"{name} is not in the signed targets metadata",
                                             attack=False)
                targets[slot] = SignedTarget.from_custom(
                    name, info.custom, length=info.length, sha256=info.hashes.get("sha256", ""))
                first = first or targets[slot]
            if self._fetcher is not None:  # partial downloads of releases no longer offered
                self._fetcher.prune_partials(keep={t.sha256 for t in targets.values()})
            if "model" not in targets or "manifest" not in targets:
                raise UpdateRefusedError(Reason.INVALID.value, "the offer names no full bundle",
                                         attack=False)
            check_release(targets)
            self._plan(offer, up, targets, downloaded)
        except _Transient:
            raise
        except (UpdateRefusedError, RepositoryError, DownloadError) as exc:
            if isinstance(exc, DownloadError) and not isinstance(exc, DownloadLengthMismatchError) \
                    and tuf_client.is_transient(exc):
                raise _Transient(str(exc)) from None
            reason, attack = classify(exc)
            cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
            detail = f"{exc}: {cause}" if cause is not None and str(cause) else str(exc)
            self._refuse(offer, first, reason, detail, attack=attack)
            self._remove(downloaded)
        except (OSError, ValueError) as exc:  # ENOSPC while writing, a bad local file ...
            full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
            self._refuse(offer, first, Reason.NO_SPACE if full else Reason.DOWNLOAD_FAILED,
                         f"{type(exc).__name__}: {exc}", attack=False)
            self._remove(downloaded)

    def _tuf(self) -> TufUpdater:
        """A fresh ngclient Updater, refreshed (root, timestamp, snapshot, targets)."""
        try:
            if self._fetcher is None:
                self._fetcher = MqttFetcher(self.client, self.device_id,
                                            timeout=self.fetch_timeout,
                                            state_dir=self.state_dir,
                                            on_progress=self.on_progress)
            up = tuf_client.trusted_client(self.state_dir, self._fetcher,
                                           config=self.tuf_config, anchor=self.anchor)
            tuf_client.refresh(up)
        except DownloadError as exc:
            if tuf_client.is_transient(exc):
                raise _Transient(str(exc)) from None
            raise
        return up

    def _download(self, up: TufUpdater, t: SignedTarget, downloaded: list[Path]) -> Path:
        try:
            path = tuf_client.download(up, t.name, retries=self.retries, backoff=self.backoff)
        except DownloadError as exc:
            if tuf_client.is_transient(exc):
                raise _Transient(str(exc)) from None
            raise
        except (OSError, ValueError):  # not resumable from here: its chunks go (ENOSPC ...)
            if self._fetcher is not None:
                self._fetcher.drop_partial(t.sha256)
            raise
        downloaded.append(path)
        return path

    def _check_space(self, fetch: list[SignedTarget], staged: int) -> None:
        """Refuse (NO_SPACE) before any download when the free space cannot hold it.

        Each target of fetch (signed length L) needs at once: L of partial chunks and L for
        the verified copy in the state folder (the chunks go only once the copy is durable),
        and L for ngclient's temporary copy in the temp folder (one target at a time); the
        models folder then needs ``staged`` bytes for the staged install. Needs of folders
        on one file system add up.
        """
        total = sum(t.length or 0 for t in fetch)
        needs = [(self.state_dir, 2 * total),
                 (Path(tempfile.gettempdir()), max((t.length or 0 for t in fetch), default=0)),
                 (Path(self.updater.root), staged)]
        by_fs: dict[int, tuple[Path, int]] = {}
        for folder, need in needs:
            dev = os.stat(folder).st_dev
            seen = by_fs.get(dev)
            by_fs[dev] = (folder, need + (seen[1] if seen else 0))
        for folder, need in by_fs.values():
            free = self.free_bytes(folder)
            if need > free:
                raise UpdateRefusedError(Reason.NO_SPACE.value, f"{need} bytes needed to "
                                         f"download and stage, {free} free", attack=False)

    def _plan(self, offer: Mapping[str, Any], up: TufUpdater, targets: dict[str, SignedTarget],
              downloaded: list[Path]) -> None:
        """Policy, then the cheapest way to the release: already there, adapter, delta, bundle."""
        facts = self.facts()
        model, manifest = targets["model"], targets["manifest"]
        check(model, facts, slot="model")
        check(manifest, facts, slot="manifest")
        delta, adapter = targets.get("delta"), targets.get("adapter")
        followup = False
        kind = "bundle"
        if adapter is not None:
            if adapter.base_sha256 == facts.active.model_sha256:
                check(adapter, facts, slot="adapter")
                kind = "adapter"
            else:
                followup = True  # the base first; the adapter after its commit
        elif delta is not None and delta.base_sha256 == facts.active.model_sha256:
            check(delta, facts, slot="delta")
            kind = "delta"
        main = {"bundle": model, "delta": delta, "adapter": adapter}[kind]
        assert main is not None
        spec = next((t.health for t in (main, model, manifest) if t.health is not None), None)
        if followup:  # the release's golden run had its adapter on: the bare base would fail
            spec = None
        asha = adapter.adapter_sha256 if kind == "adapter" and adapter is not None else None
        target = Active(model.model_sha256, model.node, model.version, asha, 1.0)
        meta: dict[str, Any] = {
            "rollout": offer.get("rollout"), "release": model.release, "node": model.node,
            "version": model.version, "model_sha256": model.model_sha256,
            "adapter_sha256": asha, "files": [], "offer": dict(offer) if followup else None}
        if target == facts.active:
            upd = Update(kind, model.node, model.version, model.model_sha256, {},
                         adapter_sha256=asha, health=spec)
            self._remember(upd.txn, meta)
            self.updater.offer(upd)
            return
        files: dict[str, Path] = {}
        staged = (adapter.length or 0) if kind == "adapter" and adapter is not None else (
            (model.length or 0) + (manifest.length or 0))
        self._check_space([t for t in (main, manifest) if kind != "adapter" or t is main],
                          staged)
        if kind == "delta":
            assert delta is not None
            try:
                files = {"patch": self._download(up, delta, downloaded)}
            except (_Transient, DownloadHTTPError) as exc:  # C2: the full bundle instead
                log.info("delta %s not available (%s): fetching the full bundle", delta.name, exc)
                kind = "bundle"
                self._check_space([model, manifest], staged)
        if kind == "adapter":
            assert adapter is not None
            files = {"patch": self._download(up, adapter, downloaded)}
        if kind == "bundle":
            files = {"model.gguf": self._download(up, model, downloaded)}
        if kind != "adapter":
            files["bundle.json"] = self._download(up, manifest, downloaded)
        upd = Update(kind, model.node, model.version, model.model_sha256, files,
                     adapter_sha256=asha, health=spec)
        meta["files"] = [str(p) for p in downloaded]
        self._drop_replaced(upd, downloaded)
        self._remember(upd.txn, meta)
        self.updater.offer(upd)

    def _drop_replaced(self, upd: Update, keep: list[Path]) -> None:
        """The files and transaction state of a pending (not yet staged) update that upd
        replaces in the Updater (a newer offer wins): removed, but for files upd uses too."""
        old = self.updater.pending
        if old is None:
            return
        meta = self._state["txns"].get(old.txn) if old.txn != upd.txn else None
        paths = {str(p) for p in old.files.values()} | set((meta or {}).get("files") or [])
        self._remove(sorted(paths - {str(p) for p in keep}))
        if old.txn != upd.txn:
            self._state["txns"].pop(old.txn, None)
            self._save()

    def _remember(self, txn: str, meta: dict[str, Any]) -> None:
        self._state["txns"][txn] = meta
        self._save()

    def _remove(self, paths: list[Path] | list[str]) -> None:
        for p in paths:
            try:
                Path(p).unlink()
            except OSError:
                pass

    # -- reports ------------------------------------------------------------------------

    def _refuse(self, offer: Mapping[str, Any], t: SignedTarget | None, reason: Reason,
                detail: str, *, attack: bool) -> dict[str, Any]:
        """A refusal before the Updater: durable (attack flag, then the outbox) first."""
        active = self.updater.active
        rollout = offer.get("rollout")
        wire = {"type": "update", "device": self.device_id,
                "id": f"pre-{secrets.token_hex(8)}.refused",
                "rollout": rollout if isinstance(rollout, int) else None,
                "node": t.node if t else (active.node if active else "none"),
                "version": t.version if t else (active.version if active else 0),
                "release": t.release if t else 0, "outcome": "refused",
                "reason": reason.value, "detail": _ascii(detail), "attack": attack,
                "hour": protocol.current_hour()}
        if attack and not self._state["attack"]:
            self._state["attack"] = True
            self._save()
            self._birth_due = True
        record = {"id": wire["id"], "at": self.clock(), "wire": wire}
        self.updater.store.put_report(record)
        log.warning("update refused (%s%s): %s", reason.value, ", attack" if attack else "",
                    wire["detail"])
        return wire

    @staticmethod
    def _key(r: Mapping[str, Any]) -> str:
        """One report event: its outbox id and when it was made (the Updater reuses an id
        when the same transaction ends the same way twice, e.g. two re-offers)."""
        return f"{r['id']}@{float(r.get('at') or 0.0):.6f}"

    def _wire(self, r: Mapping[str, Any]) -> dict[str, Any]:
        """The update message for an outbox record (ours, or an Updater report)."""
        if isinstance(r.get("wire"), dict):
            return dict(r["wire"])
        meta = self._state["txns"].get(r.get("txn"), {})
        outcome = _OUTCOMES.get(str(r.get("outcome")), "refused")
        reason = str(r.get("reason", Reason.INVALID.value))
        target: dict[str, Any] = r["target"] if isinstance(r.get("target"), dict) else {}
        active = self.updater.active
        rollout = meta.get("rollout")
        at_ms = int(float(r.get("at") or 0.0) * 1000) % 10**12
        return {"type": "update", "device": self.device_id, "id": f"{r['id']}.{at_ms}",
                "rollout": rollout if isinstance(rollout, int) else None,
                "node": str(target.get("node") or (active.node if active else "none")),
                "version": int(target.get("version") or 0),
                "release": int(meta.get("release") or 0), "outcome": outcome,
                "reason": reason, "detail": _ascii(str(r.get("detail", ""))),
                "attack": outcome == "refused" and reason in ATTACK_REASONS
                and r.get("outcome") == "refused",
                "hour": protocol.current_hour()}

    def _effects(self, r: Mapping[str, Any], wire: Mapping[str, Any]) -> None:
        """What a report changes here, applied once (before it is first published)."""
        changed = False
        txn = r.get("txn")
        meta = self._state["txns"].get(txn) if isinstance(txn, str) else None
        outcome = wire["outcome"]
        if outcome in ("committed", "already_installed") and meta and meta.get("release"):
            inst = self.installed
            if inst is None or inst.node != meta["node"] or meta["release"] >= inst.release:
                self._state["installed"] = Installed(
                    meta["node"], int(meta["release"]), meta["model_sha256"],
                    meta.get("adapter_sha256")).to_dict()
        if outcome == "committed":
            self._state["attack"] = False
            changed = True
        if wire["attack"] and not self._state["attack"]:
            self._state["attack"] = True
            changed = True
        if outcome == "rolled_back":
            changed = True
        if meta and outcome in _FINAL:
            self._remove(meta.get("files") or [])
            if outcome == "committed" and meta.get("offer"):
                with self._lock:  # the adapter whose base just landed
                    if self._offer is None:
                        self._offer = dict(meta["offer"])
        self._state["processed"].append(self._key(r))
        self._save()
        self._birth_due = self._birth_due or changed

    def publish_reports(self) -> int:
        """Publish the outbox's reports not yet in flight; acknowledge the PUBACKed ones.

        Returns how many reports are still waiting for their PUBACK.
        """
        records = sorted(self.updater.reports(), key=lambda r: float(r.get("at") or 0.0))
        for r in records:
            rid, key = str(r["id"]), self._key(r)
            if key not in self._state["processed"]:
                self._effects(r, self._wire(r))
            sent = self._inflight.get(rid)
            if sent is not None:
                info, sent_key = sent
                if sent_key != key or info.rc != mqtt.MQTT_ERR_SUCCESS:
                    del self._inflight[rid]  # an older event of this id, or never left
                elif info.is_published():
                    self._acked(r, rid, key)
                    continue
                else:
                    continue
            if not self.client.is_connected():
                continue
            wire = self._wire(r)
            info = self.client.publish(self.topic, protocol.encode(wire), qos=1)
            self._inflight[rid] = (info, key)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                self.sent.append(wire)
        # after the reports, so the hub hears why before it hears the new birth (a birth
        # makes it re-send pending offers); only when what the birth says changed
        if self._birth_due and self.client.is_connected():
            self._birth_due = False
            if self.on_change is not None:
                self.on_change()
        return len(self._inflight)

    def _acked(self, r: Mapping[str, Any], rid: str, key: str) -> None:
        self.updater.ack_report(rid)
        del self._inflight[rid]
        if key in self._state["processed"]:
            self._state["processed"].remove(key)
        txn = r.get("txn")
        if isinstance(txn, str):  # an Updater report is its transaction's last word
            self._state["txns"].pop(txn, None)
        self._save()
