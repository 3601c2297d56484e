# SPDX-License-Identifier: MIT
"""The fleet's wire protocol: MQTT v5 topics, device ids and the JSON message schemas.

Everything a device and the hub say to each other goes through here, so the allow-list
(what may leave a device) is in one place. docs/fleet.md explains it with examples.

Topics (``edgellm/v1/dev/<device-id>/<kind>``):

=========== ========= ======================================================================
kind        direction what
=========== ========= ======================================================================
state       up        birth (retained, QoS 1), death (the Will, retained, QoS 1) and
                      update reports (QoS 1, not retained)
usage       up        batched usage reports (QoS 1), one ``seq`` stream per device
req         up        requests to the hub (update fetches, next issue); QoS 1
examples    up        opt-in, redacted example text (off by default)
cmd         down      commands from the hub (``rebirth``, ``offer``)
resp/...    down      responses to ``req`` (response topic + correlation data, MQTT v5)
=========== ========= ======================================================================

The broker's ACL lets a device write only its own up topics and read only its own down
topics (its certificate CN is its username and client id), so the device id in a topic is
the authenticated one; the hub still rejects a payload whose ``device`` differs from it.

Device ids are pseudonyms the hub issues (``d-`` and 12 base-32 characters, say), never a
serial number, bed or MAC address; the names ``hub*`` are reserved for the hub.

Every message is a UTF-8 JSON object of at most MAX_MESSAGE_BYTES with ``"v": 1`` and a
``"type"``; ``decode`` refuses unknown keys, wrong types, out-of-range numbers and strings
that are not short identifiers, so free text cannot ride in a usage report.
Timestamps are whole hours (``hour`` = Unix time // 3600): coarse on purpose.

.. versionadded:: 0.1
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from typing import Any, Callable

from ..errors import EdgeLLMError

__all__ = [
    "DEVICE_KINDS_DOWN", "DEVICE_KINDS_UP", "HUB_SUBSCRIPTIONS", "MAX_DETAIL", "MAX_MESSAGE_BYTES",
    "PREFIX", "SCHEMA_VERSION", "TARGET_NAME", "UPDATE_OUTCOMES", "ProtocolError",
    "check_device_id", "current_hour", "decode", "encode", "parse_topic", "topic",
]

PREFIX = "edgellm/v1"
SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024  # the broker's max_packet_size is larger (headers, properties)
DEVICE_KINDS_UP = ("state", "usage", "req", "examples")
DEVICE_KINDS_DOWN = ("cmd", "resp")
HUB_SUBSCRIPTIONS = tuple(f"{PREFIX}/dev/+/{k}" for k in DEVICE_KINDS_UP)

_DEVICE_ID = re.compile(r"[a-z0-9][a-z0-9-]{2,62}")
_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/@+-]{0,127}")  # node paths, versions, boards, enums
_MAX_COUNT = 2**53  # exact in a JSON number / float
TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,55}")  # <sha256>.<name> fits 128 chars
UPDATE_OUTCOMES = ("committed", "rolled_back", "refused", "already_installed")
MAX_DETAIL = 200
_REASON = re.compile(r"[a-z][a-z0-9_]{0,39}")
_DETAIL = re.compile(r"[ -~]*")  # printable ASCII


class ProtocolError(EdgeLLMError, ValueError):
    """A topic or message that does not follow the fleet protocol (the reason says which rule)."""


def check_device_id(device_id: str) -> str:
    """Return device_id if it is a valid, unreserved device id, else raise ProtocolError.

    3-63 characters of a-z, 0-9 and '-', starting with a letter or digit: no MQTT wildcard,
    separator, NUL or non-ASCII character can appear (CVE-2017-7650 abused '+' and '#').
    """
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise ProtocolError(f"device id {device_id!r}: use 3-63 of a-z, 0-9, '-' (first not '-')")
    if device_id.startswith("hub"):
        raise ProtocolError(f"device id {device_id!r}: names starting with 'hub' are the hub's")
    return device_id


def topic(device_id: str, kind: str, *rest: str) -> str:
    """The topic of device_id's kind stream, e.g. topic("d-abc", "usage")."""
    if kind not in DEVICE_KINDS_UP + DEVICE_KINDS_DOWN:
        raise ProtocolError(f"unknown topic kind {kind!r}")
    return "/".join((PREFIX, "dev", check_device_id(device_id), kind, *rest))


def parse_topic(name: str) -> tuple[str, str]:
    """(device_id, kind) of a topic under PREFIX/dev/; ProtocolError for anything else."""
    parts = name.split("/")
    if len(parts) < 5 or "/".join(parts[:3]) != f"{PREFIX}/dev":
        raise ProtocolError(f"topic {name!r} is not under {PREFIX}/dev/<id>/<kind>")
    kind = parts[4]
    if kind not in DEVICE_KINDS_UP + DEVICE_KINDS_DOWN or (len(parts) > 5 and kind != "resp"):
        raise ProtocolError(f"topic {name!r}: unknown kind {kind!r}")
    return check_device_id(parts[3]), kind


def current_hour(now: float | None = None) -> int:
    """Unix time in whole hours: the only clock reading that leaves a device."""
    return int((time.time() if now is None else now) // 3600)


# --------------------------------------------------------------------------------------
# Schemas: for each message type, each key and its checker. Optional keys end with "?".

Check = Callable[[Any], bool]


def _int(lo: int = 0, hi: int = _MAX_COUNT) -> Check:
    return lambda x: isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _num(lo: float = 0.0, hi: float = 1e12) -> Check:
    return lambda x: (isinstance(x, (int, float)) and not isinstance(x, bool)
                      and math.isfinite(x) and lo <= x <= hi)


def _ident(x: Any) -> bool:
    return isinstance(x, str) and _IDENT.fullmatch(x) is not None


def _device(x: Any) -> bool:
    return isinstance(x, str) and _DEVICE_ID.fullmatch(x) is not None


def _nullable(c: Check) -> Check:
    return lambda x: x is None or c(x)


def _obj(schema: Mapping[str, Check]) -> Check:
    return lambda x: isinstance(x, dict) and _problem(x, schema) is None


def _bool(x: Any) -> bool:
    return isinstance(x, bool)


def _target(x: Any) -> bool:  # a TUF target name as tuf_repo publishes them (flat)
    return isinstance(x, str) and TARGET_NAME.fullmatch(x) is not None


def _reason(x: Any) -> bool:  # a health.Reason value
    return isinstance(x, str) and _REASON.fullmatch(x) is not None


def _detail(x: Any) -> bool:  # one short line of printable ASCII: no room for a note
    return isinstance(x, str) and len(x) <= MAX_DETAIL and _DETAIL.fullmatch(x) is not None


def _text(x: Any) -> bool:  # only in "example" messages, after redaction on the device
    return isinstance(x, str) and 0 < len(x) <= 16 * 1024


_PERCENTILES = _obj({"p50": _num(), "p90": _num(), "p99": _num()})
_HEADER: dict[str, Check] = {"v": lambda x: x == SCHEMA_VERSION, "type": _ident, "device": _device}

SCHEMAS: dict[str, dict[str, Check]] = {
    # A device's birth certificate (retained on its state topic): what it runs.
    # attack: a refusal that means tampering (update report attack=true) happened since the
    # device's last committed update.
    "birth": {**_HEADER, "bdSeq": _int(), "hour": _int(), "board": _ident, "node": _ident,
              "version": _int(), "adapter": _nullable(_ident), "runtime": _ident,
              "attack?": _bool},
    # Its death certificate: the Will the broker publishes when the connection drops, and
    # what a clean shutdown publishes. bdSeq matches the birth it ends (Sparkplug).
    "death": {**_HEADER, "bdSeq": _int()},
    # Usage over one reporting period (or several, aggregated while offline: "periods").
    "usage": {**_HEADER, "bdSeq": _int(), "seq": _int(), "hour": _int(), "periods": _int(1),
              "node": _ident, "version": _int(), "adapter": _nullable(_ident),
              "requests": _int(), "prompt_tokens": _int(), "gen_tokens": _int(), "errors": _int(),
              "ratings_up": _int(), "ratings_down": _int(),
              "latency_ms": _PERCENTILES, "tokens_per_s": _PERCENTILES, "peak_rss_mb": _num(),
              "dropped?": _int()},
    # Opt-in example text for learning, already redacted on the device; delete_tag lets the
    # hub delete every copy on request.
    "example": {**_HEADER, "hour": _int(), "node": _ident, "text": _text, "delete_tag": _ident,
                "rating?": _int(-1, 1)},
    # A device asks the hub for one chunk of a TUF object (edgellm.fleet.tuf_mqtt) on its req
    # topic, with MQTT v5 Response Topic (its resp/<one level>) and Correlation Data.
    "fetch": {**_HEADER, "path": _ident, "offset?": _int()},
    # The outcome of one update on a device (state topic, QoS 1, NOT retained): committed,
    # rolled back, refused (before or by the updater) or already installed. rollout is the
    # offer's (null when none); reason a health.Reason value; detail short ASCII, never PHI.
    "update": {"v": _HEADER["v"], "type": _ident, "device?": _device, "id": _ident, "rollout": _nullable(_int()),
               "node": _ident, "version": _int(), "release": _int(),
               "outcome": lambda x: x in UPDATE_OUTCOMES, "reason": _reason,
               "detail": _detail, "attack": _bool, "hour": _int()},
    # Commands from the hub.
    "rebirth": {"v": _HEADER["v"], "type": _ident},
    # A hint that a release waits for the device (its cmd topic, QoS 1): the names of its TUF
    # targets. The device decides from the signed targets metadata alone, so a forged or
    # replayed offer can at most make it refresh.
    "offer": {"v": _HEADER["v"], "type": _ident, "rollout": _int(),
              "targets": _obj({"manifest": _target, "model": _target, "delta?": _target,
                               "adapter?": _target})},
}


def _problem(obj: Mapping[str, Any], schema: Mapping[str, Check]) -> str | None:
    allowed = {k.rstrip("?") for k in schema}
    extra = sorted(set(obj) - allowed)
    if extra:
        return f"unknown key {extra[0]!r}"
    for key, check in schema.items():
        name = key.rstrip("?")
        if name not in obj:
            if key.endswith("?"):
                continue
            return f"missing key {name!r}"
        if not check(obj[name]):
            return f"bad value for {name!r}"
    return None


def encode(msg: Mapping[str, Any]) -> bytes:
    """Serialise a message after checking it against its schema (ProtocolError if it fails).

    A device calls this on everything it sends, so a bug that puts free text into a usage
    report fails on the device, before the byte leaves it.
    """
    obj = dict(msg)
    obj.setdefault("v", SCHEMA_VERSION)
    _validate(obj)
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{obj['type']} message of {len(data)} bytes > {MAX_MESSAGE_BYTES}")
    return data


def decode(payload: bytes, *, expect: str | None = None) -> dict[str, Any]:
    """Parse and validate one message; ProtocolError says why a message is refused.

    expect names the type the topic carries (e.g. "usage"); a state topic carries "birth" or
    "death", so pass expect=None there and check the type yourself.
    """
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(payload)} bytes > {MAX_MESSAGE_BYTES}")
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise ProtocolError(f"not a UTF-8 JSON object ({exc})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("not a JSON object")
    if obj.get("v") != SCHEMA_VERSION:
        raise ProtocolError(f"schema version {obj.get('v')!r}, this hub speaks {SCHEMA_VERSION}")
    if expect is not None and obj.get("type") != expect:
        raise ProtocolError(f"type {obj.get('type')!r} where {expect!r} was expected")
    _validate(obj)
    return obj


def _validate(obj: dict[str, Any]) -> None:
    kind = obj.get("type")
    schema = SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    problem = _problem(obj, schema)
    if problem:
        raise ProtocolError(f"{kind} message: {problem}")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
