# SPDX-License-Identifier: MIT
"""Does a signed TUF target fit this device? The device's policy over the targets' custom fields.

TUF proves *who* signed a target and that it is fresh; this module decides whether the signed
release is meant for *this* device and may replace what it runs (Uptane "Verify image": the
hardware id, the ECU id, the release counter). Every field it reads comes from the signed
targets metadata (``TargetFile.custom``), never from the offer, which is only a hint.

Checks, in order (each refusal is ``UpdateRefusedError(reason, detail, attack=...)`` with a
``health.Reason`` value; ``attack`` is true for every one of them, since a hub that follows
its own rules never signs such a target for this device):

- the custom fields parse (``invalid``); the target's kind is the one the offer's slot names;
- ``board`` is this device's board or ``"*"`` (``wrong_board``: a Pi bundle sent to a Jetson);
- ``devices``, when present, lists this device (``wrong_device``);
- ``node`` is the node the device runs (``wrong_node``);
- ``release`` is above the installed release counter, or equal to it for exactly the model
  (and adapter) installed under it (``release_downgrade``: a downgrade ordered by a
  compromised hub, which TUF's own version checks cannot see); with no release installed
  through TUF yet (a freshly flashed device), ``version`` is above the active model's, or
  equal to it for exactly the active model (``release_downgrade`` too);
- a delta or an adapter names the active model as its base (``base_mismatch``).

``check_release`` then checks that the targets of one offer agree with each other (one node,
version, release and model; the model target's bytes are that model): ``invalid`` otherwise.

Public API: ``SignedTarget`` (``from_custom``), ``Installed``, ``DeviceFacts``, ``check``,
``check_release``, ``KINDS``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UpdateRefusedError
from .health import HealthSpec, Reason
from .slots import Active

__all__ = ["KINDS", "DeviceFacts", "Installed", "SignedTarget", "check", "check_release"]

KINDS = ("model", "manifest", "delta", "adapter")
_SHA = re.compile(r"[0-9a-f]{64}")
_MAX_DEVICES = 100_000


def _refuse(reason: Reason, detail: str) -> UpdateRefusedError:
    return UpdateRefusedError(reason.value, detail, attack=True)


def _sha(custom: Mapping[str, Any], key: str, name: str, *, required: bool) -> str | None:
    v = custom.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not _SHA.fullmatch(v):
        raise _refuse(Reason.INVALID, f"target {name}: {key} is not a sha256")
    return v


def _int(custom: Mapping[str, Any], key: str, name: str) -> int:
    v = custom.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _refuse(Reason.INVALID, f"target {name}: {key} is not an integer >= 0")
    return v


def _str(custom: Mapping[str, Any], key: str, name: str) -> str:
    v = custom.get(key)
    if not isinstance(v, str) or not v or len(v) > 128:
        raise _refuse(Reason.INVALID, f"target {name}: {key} is not a short string")
    return v


@dataclass(frozen=True)
class SignedTarget:
    """One target's signed facts: its custom fields, plus its own length and sha256."""

    name: str
    node: str
    version: int
    release: int
    board: str
    kind: str
    model_sha256: str
    base_sha256: str | None = None
    adapter_sha256: str | None = None
    devices: tuple[str, ...] | None = None
    health: HealthSpec | None = None
    length: int = 0
    sha256: str = ""

    @classmethod
    def from_custom(cls, name: str, custom: Mapping[str, Any] | None, *, length: int = 0,
                    sha256: str = "") -> SignedTarget:
        """Parse a target's custom fields (docs/updates.md, "Releases and rollouts").

        Raises:
            UpdateRefusedError: reason ``invalid`` for a missing or malformed field.
        """
        if not isinstance(custom, Mapping):
            raise _refuse(Reason.INVALID, f"target {name}: no custom fields")
        kind = _str(custom, "kind", name)
        if kind not in KINDS:
            raise _refuse(Reason.INVALID, f"target {name}: unknown kind {kind!r}")
        devices = custom.get("devices")
        if devices is not None:
            if (not isinstance(devices, list) or len(devices) > _MAX_DEVICES
                    or not all(isinstance(d, str) for d in devices)):
                raise _refuse(Reason.INVALID, f"target {name}: devices is not a list of ids")
            devices = tuple(devices)
        health = custom.get("health")
        spec = None
        if health is not None:
            try:
                spec = HealthSpec.from_dict(dict(health))
            except (TypeError, ValueError, KeyError):
                raise _refuse(Reason.INVALID, f"target {name}: health is not a HealthSpec") \
                    from None
        return cls(
            name=name, node=_str(custom, "node", name), version=_int(custom, "version", name),
            release=_int(custom, "release", name), board=_str(custom, "board", name),
            kind=kind,
            model_sha256=str(_sha(custom, "model_sha256", name, required=True)),
            base_sha256=_sha(custom, "base_sha256", name, required=kind in ("delta", "adapter")),
            adapter_sha256=_sha(custom, "adapter_sha256", name, required=kind == "adapter"),
            devices=devices, health=spec, length=int(length), sha256=sha256)


@dataclass(frozen=True)
class Installed:
    """The release counter: the last release committed on this device, and what it installed."""

    node: str
    release: int
    model_sha256: str
    adapter_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "release": self.release, "model_sha256": self.model_sha256,
                "adapter_sha256": self.adapter_sha256}

    @classmethod
    def from_dict(cls, d: Any) -> Installed | None:
        if not isinstance(d, dict):
            return None
        try:
            return cls(str(d["node"]), int(d["release"]), str(d["model_sha256"]),
                       None if d.get("adapter_sha256") is None else str(d["adapter_sha256"]))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class DeviceFacts:
    """What the policy compares a target with: who the device is and what it runs."""

    device_id: str
    board: str
    active: Active
    installed: Installed | None = None


def check(custom: Mapping[str, Any] | SignedTarget, device: DeviceFacts, *, name: str = "",
          slot: str | None = None) -> SignedTarget:
    """Refuse a signed target that does not fit device; return it parsed when it does.

    Args:
        custom: the target's signed custom fields (or an already parsed SignedTarget).
        device: the device's identity, active model and release counter.
        name: the target's name (for messages).
        slot: the offer's slot it was named in ("model", "manifest", "delta", "adapter"):
            the signed kind must be the same.

    Raises:
        UpdateRefusedError: with the reason (see the module docstring), attack=True.
    """
    t = custom if isinstance(custom, SignedTarget) else SignedTarget.from_custom(name, custom)
    if slot is not None and t.kind != slot:
        raise _refuse(Reason.INVALID, f"target {t.name} is signed as a {t.kind}, offered as "
                      f"the {slot}")
    if t.board not in ("*", device.board):
        raise _refuse(Reason.WRONG_BOARD, f"target {t.name} is for board {t.board}, this "
                      f"device is a {device.board}")
    if t.devices is not None and device.device_id not in t.devices:
        raise _refuse(Reason.WRONG_DEVICE, f"target {t.name} is for {len(t.devices)} other "
                      "device(s)")
    if t.node != device.active.node:
        raise _refuse(Reason.WRONG_NODE, f"target {t.name} is for node {t.node}, this device "
                      f"runs {device.active.node}")
    inst = device.installed
    if inst is not None and inst.node == t.node:
        same = t.model_sha256 == inst.model_sha256 and (
            t.kind != "adapter" or inst.adapter_sha256 in (None, t.adapter_sha256))
        if t.release < inst.release or (t.release == inst.release and not same):
            raise _refuse(Reason.RELEASE_DOWNGRADE, f"target {t.name} has release "
                          f"{t.release}; release {inst.release} is installed")
    else:  # nothing installed via TUF yet (a freshly flashed device): the active version
        act = device.active
        if t.version < act.version or (t.version == act.version
                                       and t.model_sha256 != act.model_sha256):
            raise _refuse(Reason.RELEASE_DOWNGRADE, f"target {t.name} is version "
                          f"{t.version}; version {act.version} of another model is active"
                          if t.version == act.version else f"target {t.name} is version "
                          f"{t.version}; version {act.version} is active")
    if t.kind in ("delta", "adapter") and t.base_sha256 != device.active.model_sha256:
        raise _refuse(Reason.BASE_MISMATCH, f"the {t.kind} {t.name} is for base "
                      f"{(t.base_sha256 or '')[:12]}..., this device runs "
                      f"{device.active.model_sha256[:12]}...")
    if t.kind == "adapter" and t.model_sha256 != t.base_sha256:
        raise _refuse(Reason.INVALID, f"adapter {t.name}: model_sha256 is not its base")
    return t


def check_release(targets: Mapping[str, SignedTarget]) -> None:
    """The targets of one offer (by slot) must describe one release of one model.

    Raises:
        UpdateRefusedError: reason ``invalid`` (attack=True) when they disagree.
    """
    items = list(targets.items())
    if not items:
        raise _refuse(Reason.INVALID, "the offer names no targets")
    first = items[0][1]
    for slot, t in items:
        if t.kind != slot:
            raise _refuse(Reason.INVALID, f"target {t.name} is a {t.kind}, not the {slot}")
        if (t.node, t.version, t.release, t.model_sha256) != (
                first.node, first.version, first.release, first.model_sha256):
            raise _refuse(Reason.INVALID, f"targets {first.name} and {t.name} are not one "
                          "release")
    model = targets.get("model")
    if model is not None and model.sha256 and model.sha256 != model.model_sha256:
        raise _refuse(Reason.INVALID, f"target {model.name}'s bytes are not its model_sha256")
