# SPDX-License-Identifier: MIT
"""Rollouts in waves: which device gets a release's offer when, and when a rollout halts.

A rollout sends one release (edgellm.fleet.release) to a set of devices in waves: a canary
share first, then the rest (or the shares of ``--waves``). Each wave is offered at once; a wave
is complete when every device in it has reported (committed, already installed, rolled back or
refused), or when ``wave_timeout`` passed and at least one did. Its failure share is
(rolled_back + refused) / reported. The rollout HALTS, and no further offer is sent, when

- a complete wave's failure share passes ``halt_at``, or
- earlier, as soon as the wave's failures alone pass ``halt_at`` of the whole wave (the share
  can then only end above it);

otherwise the next wave starts. ``halt`` / ``resume`` do the same by hand (resume after a
failing wave accepts it and starts the next one).

Everything is rows in the hub's SQLite file (store.py, migration 2), so ``hub release``,
``hub rollout halt`` and the running ``hub serve`` share it: the service calls ``tick`` and
``due_offers`` / ``mark_offered`` a few times a second and ``on_report`` for each update
report, inside its batch transaction. Pure functions of (connection, now): the tests drive
them without a broker.

Public API: ``parse_share``, ``parse_waves``, ``plan_waves``, ``create``, ``on_report``,
``match``, ``tick``, ``due_offers``, ``resend_offers``, ``mark_offered``, ``halt``, ``resume``,
``status``, ``rollouts``, ``offer_message``, ``format_status``; ``Offer``.

.. versionadded:: 0.1
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgumentError, RolloutError

__all__ = ["FAILED", "FINAL", "Offer", "create", "due_offers", "format_status", "halt",
           "mark_offered", "match", "offer_message", "on_report", "parse_share", "parse_waves",
           "plan_waves", "resend_offers", "resume", "rollouts", "status", "tick"]

FINAL = ("committed", "already_installed", "rolled_back", "refused")  # a device's last word
FAILED = ("rolled_back", "refused")


def parse_share(text: str | float, what: str = "share") -> float:
    """A share written "10%", "0.1" or 10 (percent when > 1) as a float in [0, 1].

    Raises:
        InvalidArgumentError: not a number, or outside 0..100 %.
    """
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise InvalidArgumentError(f"{what} {text!r}: write a percentage such as 10% or 0.1") \
            from None
    if not raw.endswith("%") and value > 1:
        value /= 100
    if not math.isfinite(value) or not 0 <= value <= 1:
        raise InvalidArgumentError(f"{what} {text!r}: use 0% to 100%")
    return value


def parse_waves(text: str) -> list[float]:
    """"10%,50%,100%" -> [0.1, 0.5, 1.0]: cumulative shares, increasing, the last 100 %."""
    shares = [parse_share(s, "wave") for s in text.split(",") if s.strip()]
    if not shares or any(b <= a for a, b in zip(shares, shares[1:])) or shares[0] <= 0:
        raise InvalidArgumentError(f"--waves {text!r}: increasing shares above 0, e.g. "
                                   "10%,50%,100%")
    if shares[-1] < 1:
        shares.append(1.0)
    return shares


def plan_waves(n_devices: int, shares: Sequence[float]) -> list[int]:
    """Cumulative device counts per wave: plan_waves(20, [0.1, 1]) == [2, 20].

    Each wave gets at least one device (a 10 % canary of 3 devices is 1 device); waves that
    would add nobody are dropped; the last wave covers everyone.
    """
    out: list[int] = []
    for s in shares:
        k = min(n_devices, max(math.ceil(s * n_devices - 1e-9), (out[-1] if out else 0) + 1))
        if not out or k > out[-1]:
            out.append(k)
    if n_devices and (not out or out[-1] < n_devices):
        out.append(n_devices)
    return out


def _order(rollout: int, devices: Iterable[str]) -> list[str]:
    """Devices in a fixed pseudo-random order per rollout (who is canary is not by name)."""
    return sorted(set(devices),
                  key=lambda d: hashlib.sha256(f"{rollout}:{d}".encode()).hexdigest())


# --------------------------------------------------------------------------------------
# Creating and steering


def create(conn: sqlite3.Connection, *, node: str, release: int, version: int, board: str,
           devices: Sequence[str], shares: Sequence[float], halt_at: float, now: float,
           wave_timeout: float | None = None) -> int:
    """Start a rollout of (node, release) to devices; returns its id (call inside a
    transaction; the release row must exist). Earlier active or halted rollouts of the same
    node and board are superseded: they send nothing more ("*" overlaps every board: a "*"
    rollout supersedes them all, a board's rollout supersedes the "*" ones).

    Raises:
        InvalidArgumentError: no devices, bad shares or halt_at.
    """
    if not devices:
        raise InvalidArgumentError(f"no device runs {node} on {board}: nothing to roll out "
                                   "(see `edgellm hub devices`, or name them with --devices)")
    if not 0 <= halt_at <= 1:
        raise InvalidArgumentError(f"halt_at {halt_at}: use 0..1")
    waves = plan_waves(len(set(devices)), shares)
    # a "*" release and a board's release overlap: either supersedes the other (else the
    # older offer is re-sent on births and devices refuse it as a downgrade)
    conn.execute("UPDATE fleet_rollouts SET state = 'superseded', updated_at = ?, reason = ? "
                 "WHERE node = ? AND (board = ? OR board = '*' OR ? = '*') "
                 "AND state IN ('active', 'halted')",
                 (now, f"superseded by release {release}", node, board, board))
    cur = conn.execute(
        "INSERT INTO fleet_rollouts (node, release, version, board, waves, halt_at, "
        "wave_timeout, state, wave, wave_started_at, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, 'active', 0, ?, ?, ?)",
        (node, release, version, board, json.dumps(waves), halt_at, wave_timeout, now, now, now))
    rid = int(cur.lastrowid or 0)
    ordered = _order(rid, devices)
    start = 0
    for w, end in enumerate(waves):
        conn.executemany("INSERT INTO fleet_rollout_devices (rollout, device, wave, state) "
                         "VALUES (?, ?, ?, 'waiting')", [(rid, d, w) for d in ordered[start:end]])
        start = end
    return rid


def _rollout(conn: sqlite3.Connection, rid: int) -> sqlite3.Row:
    row: sqlite3.Row | None = conn.execute("SELECT * FROM fleet_rollouts WHERE id = ?",
                                           (rid,)).fetchone()
    if row is None:
        raise RolloutError(f"no rollout {rid} (edgellm hub rollout status lists them)")
    return row


def halt(conn: sqlite3.Connection, rid: int, now: float, reason: str = "halted by hand") -> None:
    """Stop offering an active rollout (devices already offered may still install it).

    Raises:
        RolloutError: no such rollout, or it is not active.
    """
    r = _rollout(conn, rid)
    if r["state"] != "active":
        raise RolloutError(f"rollout {rid} is {r['state']}; only an active one can be halted")
    conn.execute("UPDATE fleet_rollouts SET state = 'halted', reason = ?, updated_at = ? "
                 "WHERE id = ?", (reason, now, rid))


def resume(conn: sqlite3.Connection, rid: int, now: float) -> None:
    """Resume a halted rollout. A wave that halted it on failures is accepted as it is and
    the next wave starts (a wave still under way goes on).

    Raises:
        RolloutError: no such rollout, or it is not halted.
    """
    r = _rollout(conn, rid)
    if r["state"] != "halted":
        raise RolloutError(f"rollout {rid} is {r['state']}; only a halted one can be resumed")
    conn.execute("UPDATE fleet_rollouts SET state = 'active', reason = ?, updated_at = ? "
                 "WHERE id = ?", (f"resumed (was: {r['reason']})", now, rid))
    verdict = _judge(conn, _rollout(conn, rid), now)
    if verdict in ("halt", "next"):
        _advance(conn, _rollout(conn, rid), now)


# --------------------------------------------------------------------------------------
# The service's side: reports in, waves forward, offers out


def match(conn: sqlite3.Connection, device: str, msg: dict[str, Any]) -> int | None:
    """The rollout an update report belongs to: its own ``rollout`` when the device is in it,
    else the newest rollout of the same node and release that holds the device."""
    rid = msg.get("rollout")
    if rid is not None and conn.execute(
            "SELECT 1 FROM fleet_rollout_devices WHERE rollout = ? AND device = ?",
            (rid, device)).fetchone():
        return int(rid)
    row = conn.execute(
        "SELECT r.id FROM fleet_rollouts r JOIN fleet_rollout_devices d ON d.rollout = r.id "
        "WHERE d.device = ? AND r.node = ? AND r.release = ? ORDER BY r.id DESC LIMIT 1",
        (device, msg["node"], msg["release"])).fetchone()
    return int(row[0]) if row else None


def on_report(conn: sqlite3.Connection, device: str, msg: dict[str, Any], rid: int | None,
              now: float) -> str | None:
    """Record an update report's outcome in rollout rid and move the rollout on.

    Returns what happened to the rollout ("halt", "next", "done") or None. A later report
    replaces an earlier one for the same device (a commit, then a boot-loop rollback), except
    that "already_installed" (an offer re-sent after the commit) keeps the commit.
    """
    if rid is None:
        return None
    cur = conn.execute(
        "UPDATE fleet_rollout_devices SET state = ?, reported_at = ?, reason = ?, detail = ?, "
        "attack = ? WHERE rollout = ? AND device = ? AND NOT (? = 'already_installed' AND "
        "state = 'committed')",
        (msg["outcome"], now, msg["reason"], msg["detail"], int(msg["attack"]), rid, device,
         msg["outcome"]))
    if cur.rowcount == 0:
        return None
    r = _rollout(conn, rid)
    return _step(conn, r, now) if r["state"] == "active" else None


def tick(conn: sqlite3.Connection, now: float) -> list[tuple[int, str]]:
    """Move every active rollout on (wave timeouts); returns (rollout, what happened)."""
    out = []
    for r in conn.execute("SELECT * FROM fleet_rollouts WHERE state = 'active'").fetchall():
        what = _step(conn, r, now)
        if what:
            out.append((int(r["id"]), what))
    return out


def _counts(conn: sqlite3.Connection, rid: int, wave: int) -> tuple[int, int, int]:
    """(devices, reported, failed) of one wave."""
    size = reported = failed = 0
    for state, n in conn.execute("SELECT state, count(*) FROM fleet_rollout_devices WHERE "
                                 "rollout = ? AND wave = ? GROUP BY state", (rid, wave)):
        size += n
        reported += n if state in FINAL else 0
        failed += n if state in FAILED else 0
    return size, reported, failed


def _judge(conn: sqlite3.Connection, r: sqlite3.Row, now: float) -> str | None:
    """"halt", "next" (the wave is complete and healthy) or None (still under way)."""
    size, reported, failed = _counts(conn, int(r["id"]), int(r["wave"]))
    halt_at = float(r["halt_at"])
    if size and failed > halt_at * size:  # the share can only end above halt_at
        return "halt"
    timed_out = r["wave_timeout"] is not None and r["wave_started_at"] is not None and \
        now - float(r["wave_started_at"]) >= float(r["wave_timeout"]) and reported > 0
    if reported == size or timed_out:
        if reported and failed / reported > halt_at:
            return "halt"
        return "next"
    return None


def _step(conn: sqlite3.Connection, r: sqlite3.Row, now: float) -> str | None:
    verdict = _judge(conn, r, now)
    if verdict == "halt":
        size, reported, failed = _counts(conn, int(r["id"]), int(r["wave"]))
        conn.execute(
            "UPDATE fleet_rollouts SET state = 'halted', reason = ?, updated_at = ? WHERE id = ?",
            (f"wave {int(r['wave']) + 1}: {failed} of {reported} reported failed (of {size}); "
             f"above the halt share {float(r['halt_at']):.0%}", now, r["id"]))
        return "halt"
    if verdict == "next":
        return _advance(conn, r, now)
    return None


def _advance(conn: sqlite3.Connection, r: sqlite3.Row, now: float) -> str:
    waves = json.loads(r["waves"])
    nxt = int(r["wave"]) + 1
    if nxt >= len(waves):
        conn.execute("UPDATE fleet_rollouts SET state = 'done', updated_at = ? WHERE id = ?",
                     (now, r["id"]))
        return "done"
    conn.execute("UPDATE fleet_rollouts SET wave = ?, wave_started_at = ?, updated_at = ? "
                 "WHERE id = ?", (nxt, now, now, r["id"]))
    return "next"


@dataclass(frozen=True)
class Offer:
    """One offer to send: the device, the rollout and the release's target names."""

    device: str
    rollout: int
    targets: dict[str, str]


def offer_message(offer: Offer) -> dict[str, Any]:
    """The ``offer`` command (protocol.SCHEMAS) for an Offer."""
    return {"type": "offer", "rollout": offer.rollout, "targets": dict(offer.targets)}


_OFFER_SQL = (
    "SELECT d.device, r.id, l.targets FROM fleet_rollout_devices d "
    "JOIN fleet_rollouts r ON r.id = d.rollout "
    "JOIN fleet_releases l ON l.node = r.node AND l.release = r.release "
    "WHERE r.state = 'active' AND d.wave <= r.wave ")


def due_offers(conn: sqlite3.Connection, limit: int = 10_000) -> list[Offer]:
    """Devices of active rollouts whose wave has started and who were not offered yet."""
    rows = conn.execute(_OFFER_SQL + "AND d.state = 'waiting' ORDER BY r.id, d.wave, d.device "
                        "LIMIT ?", (limit,)).fetchall()
    return [Offer(str(d), int(i), json.loads(t)) for d, i, t in rows]


def resend_offers(conn: sqlite3.Connection, device: str) -> list[Offer]:
    """Offers device was sent but has not answered (re-sent when its birth arrives), unless
    its birth says it runs the release's version already (its report is on the way)."""
    rows = conn.execute(
        _OFFER_SQL + "AND d.state = 'offered' AND d.device = ? AND NOT EXISTS (SELECT 1 FROM "
        "fleet_devices f WHERE f.device = d.device AND f.node = r.node AND "
        "f.version = r.version) ORDER BY r.id", (device,)).fetchall()
    return [Offer(str(d), int(i), json.loads(t)) for d, i, t in rows]


def mark_offered(conn: sqlite3.Connection, offers: Iterable[Offer], now: float) -> None:
    """Record that offers were published (a waiting device becomes offered)."""
    conn.executemany(
        "UPDATE fleet_rollout_devices SET state = CASE WHEN state = 'waiting' THEN 'offered' "
        "ELSE state END, offers = offers + 1, offered_at = ? WHERE rollout = ? AND device = ?",
        [(now, o.rollout, o.device) for o in offers])


# --------------------------------------------------------------------------------------
# Queries


def rollouts(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every rollout with its per-state device counts, newest first."""
    return [status(conn, int(r[0])) for r in
            conn.execute("SELECT id FROM fleet_rollouts ORDER BY id DESC").fetchall()]


def status(conn: sqlite3.Connection, rid: int) -> dict[str, Any]:
    """One rollout: its fields, waves (devices, offered, reported, failed each) and devices.

    Raises:
        RolloutError: no such rollout.
    """
    r = dict(_rollout(conn, rid))
    cum = json.loads(r.pop("waves"))
    waves = []
    for w in range(len(cum)):
        size, reported, failed = _counts(conn, rid, w)
        offered = conn.execute("SELECT count(*) FROM fleet_rollout_devices WHERE rollout = ? "
                               "AND wave = ? AND state != 'waiting'", (rid, w)).fetchone()[0]
        waves.append({"wave": w + 1, "devices": size, "offered": int(offered),
                      "reported": reported, "failed": failed,
                      "failure_share": round(failed / reported, 4) if reported else None})
    devs = [dict(d) for d in conn.execute(
        "SELECT device, wave, state, offers, reason, detail, attack FROM fleet_rollout_devices "
        "WHERE rollout = ? ORDER BY wave, device", (rid,))]
    for d in devs:
        d["wave"] += 1
    counts: dict[str, int] = {}
    for d in devs:
        counts[d["state"]] = counts.get(d["state"], 0) + 1
    rel = conn.execute("SELECT targets, model_sha256 FROM fleet_releases WHERE node = ? AND "
                       "release = ?", (r["node"], r["release"])).fetchone()
    r.update(wave=int(r["wave"]) + 1, waves=waves, counts=counts, devices=devs,
             targets=json.loads(rel[0]) if rel else {}, model_sha256=rel[1] if rel else None)
    return r


def format_status(rows: Sequence[dict[str, Any]], *, detail: bool = False) -> str:
    """The text `edgellm hub rollout status` prints."""
    if not rows:
        return "no rollouts yet (edgellm hub release NODE --version V starts one)"
    out = []
    for r in rows:
        c = r["counts"]
        done = c.get("committed", 0) + c.get("already_installed", 0)
        failed = c.get("rolled_back", 0) + c.get("refused", 0)
        out.append(f"rollout {r['id']}: {r['node']} v{r['version']} (release {r['release']}) "
                   f"for {r['board']}: {r['state']}, wave {r['wave']} of {len(r['waves'])}; "
                   f"{done} updated, {failed} failed, {len(r['devices'])} devices"
                   + (f"; {r['reason']}" if r.get("reason") else ""))
        if detail:
            for w in r["waves"]:
                share = "-" if w["failure_share"] is None else f"{w['failure_share']:.0%}"
                out.append(f"  wave {w['wave']}: {w['devices']} devices, {w['offered']} "
                           f"offered, {w['reported']} reported, {w['failed']} failed ({share})")
            for d in r["devices"]:
                why = f" {d['reason']}" if d["reason"] and d["reason"] != "ok" else ""
                out.append(f"  {d['device']:<16} wave {d['wave']}  {d['state']}{why}"
                           + ("  ATTACK" if d["attack"] else ""))
    return "\n".join(out)
