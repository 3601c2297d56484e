# SPDX-License-Identifier: MIT
"""The hub's fleet tables in SQLite: devices, usage reports, sequence gaps and refusals.

The hub service (service.py) writes through a ``FleetStore``; the CLI and tests read through
the query functions. Everything lives in the hub's one SQLite file under the component
"fleet" (edgellm/hub/db.py), so ``hub status`` can read while ``hub serve`` writes (WAL).

Usage: ``conn = store.connect(home.registry_db)`` then

- ``FleetStore(conn).usage(device, msg, now)`` / ``.birth`` / ``.death`` / ``.example`` /
  ``.update_report`` / ``.reject(reason, device, detail, now)``, inside ``with conn:`` (one
  transaction per batch); releases and rollouts (migration 2) are written by rollout.py;
  ``.expire_gaps(now, timeout)`` makes old gaps final and returns the devices to rebirth;
- queries: ``devices``, ``accounting``, ``gaps``, ``rejects``, ``fleet_status``,
  ``usage_summary``, plus ``parse_since`` for ``--since 1d``.

Sequence accounting, per device (one non-wrapping ``seq`` stream, the first report is 0):
``next_seq`` is one past the highest seq seen; every seq below it is either a stored report or
inside exactly one gap row, so ``reports + gap seqs == next_seq`` always holds. A report above
``next_seq`` opens the gap before it (state ``open``); a later arrival inside a gap (reordering)
splits it; a seq already stored is a duplicate (counted, not stored). After the reorder timeout
an open gap becomes ``lost`` (final) and its device is asked to rebirth. A report's ``dropped``
count (reports the device discarded while offline, oldest first) turns the device's oldest
open or lost gap seqs into ``dropped``; a count with no gap to explain yet is kept as credit
for the next gap.

.. versionadded:: 0.1
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import InvalidArgumentError
from ..hub import db
from .protocol import current_hour

__all__ = [
    "FIRST_SEQ", "K_ANONYMITY", "MIGRATIONS", "FleetStore", "accounting", "connect", "devices",
    "fleet_status", "format_status", "format_usage", "gaps", "parse_since", "rejects", "usage_summary", "weighted_quantile",
]

FIRST_SEQ = 0  # the seq of a device's first report ever
K_ANONYMITY = 11  # SECURITY E2: aggregates over fewer reports than this are suppressed

MIGRATIONS = [
    # version 1
    """
    CREATE TABLE fleet_devices (
        device TEXT PRIMARY KEY,
        online INTEGER,                      -- 1 after a birth, 0 after its death, NULL: no birth seen
        bd_seq INTEGER,                      -- bdSeq of the current birth
        board TEXT, node TEXT, version INTEGER, adapter TEXT, runtime TEXT,
        birth_hour INTEGER,                  -- the birth's hour (Unix hours)
        last_seen_hour INTEGER NOT NULL,     -- the hub's hour of the last accepted message
        next_seq INTEGER NOT NULL DEFAULT 0, -- one past the highest usage seq seen
        reports INTEGER NOT NULL DEFAULT 0,  -- usage reports stored
        duplicates INTEGER NOT NULL DEFAULT 0,
        reordered INTEGER NOT NULL DEFAULT 0,  -- reports that filled an open gap
        late INTEGER NOT NULL DEFAULT 0,       -- reports that filled a gap already final
        dropped_declared INTEGER NOT NULL DEFAULT 0,  -- sum of the reports' `dropped`
        drop_credit INTEGER NOT NULL DEFAULT 0,       -- declared drops no gap has used yet
        births INTEGER NOT NULL DEFAULT 0,
        deaths INTEGER NOT NULL DEFAULT 0,
        stale_deaths INTEGER NOT NULL DEFAULT 0,      -- deaths whose bdSeq was not the birth's
        rebirths_sent INTEGER NOT NULL DEFAULT 0,
        last_rebirth_at REAL
    );
    CREATE TABLE fleet_usage (
        device TEXT NOT NULL,
        seq INTEGER NOT NULL,
        bd_seq INTEGER NOT NULL,
        hour INTEGER NOT NULL,               -- the report's hour (Unix hours, from the device)
        periods INTEGER NOT NULL,
        board TEXT,                          -- the device's board (from its birth) at receipt
        node TEXT NOT NULL, version INTEGER NOT NULL, adapter TEXT,
        requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, gen_tokens INTEGER NOT NULL,
        errors INTEGER NOT NULL, ratings_up INTEGER NOT NULL, ratings_down INTEGER NOT NULL,
        latency_p50 REAL NOT NULL, latency_p90 REAL NOT NULL, latency_p99 REAL NOT NULL,
        tps_p50 REAL NOT NULL, tps_p90 REAL NOT NULL, tps_p99 REAL NOT NULL,
        peak_rss_mb REAL NOT NULL,
        dropped INTEGER NOT NULL,
        stored_at REAL NOT NULL,             -- hub clock (Unix s) as its batch's transaction began
        PRIMARY KEY (device, seq)
    ) WITHOUT ROWID;
    CREATE INDEX fleet_usage_hour ON fleet_usage (hour);
    CREATE TABLE fleet_gaps (
        device TEXT NOT NULL,
        first_seq INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,           -- inclusive
        state TEXT NOT NULL CHECK (state IN ('open', 'lost', 'dropped')),
        opened_at REAL NOT NULL,             -- hub clock when the gap was first seen
        final_at REAL,                       -- when it became lost or dropped
        PRIMARY KEY (device, first_seq)
    ) WITHOUT ROWID;
    CREATE INDEX fleet_gaps_open ON fleet_gaps (state, opened_at);
    CREATE TABLE fleet_rejects (
        reason TEXT NOT NULL,
        device TEXT NOT NULL,                -- '' when the topic named no valid device
        count INTEGER NOT NULL,
        first_at REAL NOT NULL, last_at REAL NOT NULL,
        last_detail TEXT NOT NULL,
        PRIMARY KEY (reason, device)
    ) WITHOUT ROWID;
    CREATE TABLE fleet_examples (
        id INTEGER PRIMARY KEY,
        device TEXT NOT NULL, hour INTEGER NOT NULL, node TEXT NOT NULL,
        text TEXT NOT NULL,                  -- redacted on the device; opt-in only
        delete_tag TEXT NOT NULL, rating INTEGER,
        stored_at REAL NOT NULL
    );
    CREATE INDEX fleet_examples_tag ON fleet_examples (delete_tag);
    """,
    # version 2: releases, rollouts in waves, the devices' update reports (issue 6;
    # edgellm/fleet/release.py and rollout.py write them)
    """
    ALTER TABLE fleet_devices ADD COLUMN attack INTEGER NOT NULL DEFAULT 0;  -- the birth's flag
    CREATE TABLE fleet_releases (
        node TEXT NOT NULL,
        release INTEGER NOT NULL,            -- anti-downgrade counter, strictly increasing per node
        version INTEGER NOT NULL,
        board TEXT NOT NULL,                 -- board id, or '*'
        model_sha256 TEXT NOT NULL,          -- the model.gguf devices run after it
        adapter_sha256 TEXT,
        targets TEXT NOT NULL,               -- JSON {"manifest", "model", "delta"?, "adapter"?}
        source TEXT NOT NULL,                -- the bundle folder it came from
        health INTEGER NOT NULL,             -- 1: a golden-prompt HealthSpec is signed with it
        created_at REAL NOT NULL,
        PRIMARY KEY (node, release)
    ) WITHOUT ROWID;
    CREATE TABLE fleet_rollouts (
        id INTEGER PRIMARY KEY,
        node TEXT NOT NULL, release INTEGER NOT NULL, version INTEGER NOT NULL,
        board TEXT NOT NULL,
        waves TEXT NOT NULL,                 -- JSON: devices in each wave, cumulative, e.g. [2, 20]
        halt_at REAL NOT NULL,               -- a wave's failure share above this halts it
        wave_timeout REAL,                   -- s a wave waits for silent devices (NULL: forever)
        state TEXT NOT NULL CHECK (state IN ('active', 'halted', 'done', 'superseded')),
        wave INTEGER NOT NULL DEFAULT 0,     -- the wave being offered (0-based)
        wave_started_at REAL,
        reason TEXT,                         -- why it halted (or by whom)
        created_at REAL NOT NULL, updated_at REAL NOT NULL,
        FOREIGN KEY (node, release) REFERENCES fleet_releases (node, release)
    );
    CREATE TABLE fleet_rollout_devices (
        rollout INTEGER NOT NULL REFERENCES fleet_rollouts (id),
        device TEXT NOT NULL,
        wave INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('waiting', 'offered', 'committed',
                                             'already_installed', 'rolled_back', 'refused')),
        offers INTEGER NOT NULL DEFAULT 0,   -- offers sent (re-sent on each birth until it reports)
        offered_at REAL, reported_at REAL,
        reason TEXT, detail TEXT, attack INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (rollout, device)
    ) WITHOUT ROWID;
    CREATE INDEX fleet_rollout_devices_device ON fleet_rollout_devices (device, state);
    CREATE TABLE fleet_updates (
        device TEXT NOT NULL,
        id TEXT NOT NULL,                    -- the device's report id: a re-sent one is a duplicate
        rollout INTEGER,                     -- the offer's, or the rollout it was matched to
        node TEXT NOT NULL, version INTEGER NOT NULL, release INTEGER NOT NULL,
        outcome TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL,
        attack INTEGER NOT NULL, hour INTEGER NOT NULL,
        stored_at REAL NOT NULL,
        PRIMARY KEY (device, id)
    ) WITHOUT ROWID;
    """,
]

_USAGE_COLS = ("device", "seq", "bd_seq", "hour", "periods", "board", "node", "version",
               "adapter", "requests", "prompt_tokens", "gen_tokens", "errors", "ratings_up",
               "ratings_down", "latency_p50", "latency_p90", "latency_p99", "tps_p50", "tps_p90",
               "tps_p99", "peak_rss_mb", "dropped", "stored_at")
_INSERT_USAGE = (f"INSERT INTO fleet_usage ({', '.join(_USAGE_COLS)}) VALUES "
                 f"({', '.join('?' * len(_USAGE_COLS))}) ON CONFLICT (device, seq) DO NOTHING")


def connect(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open the hub database at path with the fleet schema up to date (db.connect)."""
    return db.connect(path, {"fleet": MIGRATIONS})


class FleetStore:
    """Writes the fleet's state; call its methods inside ``with conn:`` (one batch each).

    - ``usage(device, msg, now)`` -> "stored", "duplicate" or "filled" (a gap's seq arrived);
    - ``birth`` / ``death`` -> "birth", "death" or "stale_death";
    - ``reject(reason, device, detail, now)`` counts a refused message;
    - ``expire_gaps(now, timeout)`` -> devices whose gaps just became final (send them rebirth).

    ``device`` is always the authenticated id (the topic's), checked against the payload by the
    caller. ``now`` is the hub clock in Unix seconds. Single-threaded, like its connection.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    # -- devices ---------------------------------------------------------------------------

    def _touch(self, device: str, now: float) -> sqlite3.Row:
        hour = current_hour(now)
        self.conn.execute(
            "INSERT INTO fleet_devices (device, last_seen_hour) VALUES (?, ?) ON CONFLICT (device) "
            "DO UPDATE SET last_seen_hour = max(last_seen_hour, excluded.last_seen_hour)",
            (device, hour))
        row: sqlite3.Row = self.conn.execute("SELECT * FROM fleet_devices WHERE device = ?",
                                             (device,)).fetchone()
        return row

    def birth(self, device: str, msg: dict[str, Any], now: float) -> str:
        """Record a birth certificate: the device is online and runs what it says."""
        row = self._touch(device, now)
        repeat = row["online"] == 1 and row["bd_seq"] == msg["bdSeq"]  # retained replay, rebirth
        self.conn.execute(
            "UPDATE fleet_devices SET online = 1, bd_seq = ?, board = ?, node = ?, version = ?, "
            "adapter = ?, runtime = ?, birth_hour = ?, births = births + ?, attack = ? "
            "WHERE device = ?",
            (msg["bdSeq"], msg["board"], msg["node"], msg["version"], msg["adapter"],
             msg["runtime"], msg["hour"], 0 if repeat else 1, int(bool(msg.get("attack"))),
             device))
        return "birth"

    def update_report(self, device: str, msg: dict[str, Any], now: float,
                      rollout: int | None) -> str:
        """Store a device's update report once (by its id); "update" or "duplicate".

        rollout: the rollout it belongs to (the offer's, or the one rollout.match found).
        An attack=true report sets the device's attack flag (its next birth says the same).
        """
        self._touch(device, now)
        cur = self.conn.execute(
            "INSERT INTO fleet_updates (device, id, rollout, node, version, release, outcome, "
            "reason, detail, attack, hour, stored_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (device, id) DO NOTHING",
            (device, msg["id"], rollout, msg["node"], msg["version"], msg["release"],
             msg["outcome"], msg["reason"], msg["detail"], int(msg["attack"]), msg["hour"], now))
        if cur.rowcount == 0:
            return "duplicate"
        if msg["attack"]:
            self.conn.execute("UPDATE fleet_devices SET attack = 1 WHERE device = ?", (device,))
        elif msg["outcome"] == "committed":
            self.conn.execute("UPDATE fleet_devices SET attack = 0 WHERE device = ?", (device,))
        return "update"

    def death(self, device: str, msg: dict[str, Any], now: float) -> str:
        """Record a death certificate; a stale one (bdSeq not the current birth's) is ignored."""
        row = self._touch(device, now)
        if row["bd_seq"] is None or row["bd_seq"] != msg["bdSeq"]:
            self.conn.execute("UPDATE fleet_devices SET stale_deaths = stale_deaths + 1 "
                              "WHERE device = ?", (device,))
            return "stale_death"
        if row["online"] == 1:
            self.conn.execute("UPDATE fleet_devices SET online = 0, deaths = deaths + 1 "
                              "WHERE device = ?", (device,))
        return "death"

    # -- usage and sequence accounting ------------------------------------------------------

    def usage(self, device: str, msg: dict[str, Any], now: float) -> str:
        """Store one usage report (once per seq) and account for its place in the stream."""
        row = self._touch(device, now)
        seq, next_seq = int(msg["seq"]), int(row["next_seq"])
        lat, tps = msg["latency_ms"], msg["tokens_per_s"]
        cur = self.conn.execute(_INSERT_USAGE, (
            device, seq, msg["bdSeq"], msg["hour"], msg["periods"], row["board"], msg["node"],
            msg["version"], msg["adapter"], msg["requests"], msg["prompt_tokens"],
            msg["gen_tokens"], msg["errors"], msg["ratings_up"], msg["ratings_down"],
            lat["p50"], lat["p90"], lat["p99"], tps["p50"], tps["p90"], tps["p99"],
            msg["peak_rss_mb"], msg.get("dropped", 0), now))
        if cur.rowcount == 0:
            self.conn.execute("UPDATE fleet_devices SET duplicates = duplicates + 1 "
                              "WHERE device = ?", (device,))
            return "duplicate"
        outcome = "stored"
        if seq >= next_seq:
            if seq > next_seq:  # the seqs between were not seen: a gap, maybe just reordering
                self.conn.execute(
                    "INSERT INTO fleet_gaps (device, first_seq, last_seq, state, opened_at) "
                    "VALUES (?, ?, ?, 'open', ?)", (device, next_seq, seq - 1, now))
            next_seq = seq + 1
            filled = None
        else:
            filled = self._fill(device, seq)
            outcome = "filled"
        self.conn.execute(
            "UPDATE fleet_devices SET next_seq = ?, reports = reports + 1, "
            "reordered = reordered + ?, late = late + ?, "
            "dropped_declared = dropped_declared + ? WHERE device = ?",
            (next_seq, int(filled == "open"), int(filled in ("lost", "dropped")),
             msg.get("dropped", 0), device))
        # drops declared earlier that no gap explained yet (credit) may explain this one
        declared = int(msg.get("dropped", 0)) + int(row["drop_credit"])
        if declared:
            left = self._declare_dropped(device, declared, now)
            self.conn.execute("UPDATE fleet_devices SET drop_credit = ? WHERE device = ?",
                              (left, device))
        return outcome

    def _fill(self, device: str, seq: int) -> str | None:
        """Take seq out of the gap that holds it; return that gap's state (None: no gap)."""
        gap = self.conn.execute(
            "SELECT * FROM fleet_gaps WHERE device = ? AND first_seq <= ? AND last_seq >= ? ",
            (device, seq, seq)).fetchone()
        if gap is None:  # cannot happen while the invariant holds; store it all the same
            return None
        self._split(gap, seq, seq, None)
        return str(gap["state"])

    def _split(self, gap: sqlite3.Row, lo: int, hi: int, state: str | None,
               now: float | None = None) -> None:
        """Replace gap's seqs lo..hi (inside it) by nothing (state None) or a gap in state."""
        device, first, last = gap["device"], int(gap["first_seq"]), int(gap["last_seq"])
        self.conn.execute("DELETE FROM fleet_gaps WHERE device = ? AND first_seq = ?",
                          (device, first))
        pieces = [(first, lo - 1, gap["state"], gap["final_at"]),
                  (hi + 1, last, gap["state"], gap["final_at"])]
        if state is not None:
            pieces.insert(1, (lo, hi, state, now))
        for a, b, st, final_at in pieces:
            if a <= b:
                self.conn.execute(
                    "INSERT INTO fleet_gaps (device, first_seq, last_seq, state, opened_at, "
                    "final_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (device, a, b, st, gap["opened_at"], final_at))

    def _declare_dropped(self, device: str, count: int, now: float) -> int:
        """Mark the device's oldest open/lost gap seqs as dropped; return the unused count."""
        while count > 0:
            gap = self.conn.execute(
                "SELECT * FROM fleet_gaps WHERE device = ? AND state != 'dropped' "
                "ORDER BY first_seq LIMIT 1", (device,)).fetchone()
            if gap is None:
                break
            first, last = int(gap["first_seq"]), int(gap["last_seq"])
            hi = min(last, first + count - 1)
            self._split(gap, first, hi, "dropped", now)
            count -= hi - first + 1
        return count

    def expire_gaps(self, now: float, timeout: float) -> list[str]:
        """Make gaps open for longer than timeout final ("lost"); return their devices.

        The caller sends each returned device a rebirth command (at most once per timeout).
        """
        rows = self.conn.execute(
            "SELECT DISTINCT device FROM fleet_gaps WHERE state = 'open' AND opened_at <= ?",
            (now - timeout,)).fetchall()
        if not rows:
            return []
        self.conn.execute("UPDATE fleet_gaps SET state = 'lost', final_at = ? "
                          "WHERE state = 'open' AND opened_at <= ?", (now, now - timeout))
        out = []
        for r in rows:
            dev = self.conn.execute(
                "UPDATE fleet_devices SET rebirths_sent = rebirths_sent + 1, last_rebirth_at = ? "
                "WHERE device = ? AND (last_rebirth_at IS NULL OR last_rebirth_at <= ?) "
                "RETURNING device", (now, r["device"], now - timeout)).fetchone()
            if dev is not None:
                out.append(str(dev["device"]))
        return out

    # -- other messages --------------------------------------------------------------------

    def example(self, device: str, msg: dict[str, Any], now: float) -> str:
        """Store one opt-in, redacted example (deletable by its delete_tag)."""
        self._touch(device, now)
        self.conn.execute(
            "INSERT INTO fleet_examples (device, hour, node, text, delete_tag, rating, stored_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (device, msg["hour"], msg["node"], msg["text"], msg["delete_tag"],
             msg.get("rating"), now))
        return "example"

    def delete_examples(self, delete_tag: str) -> int:
        """Delete every example carrying delete_tag; return how many were deleted."""
        return self.conn.execute("DELETE FROM fleet_examples WHERE delete_tag = ?",
                                 (delete_tag,)).rowcount

    def reject(self, reason: str, device: str | None, detail: str, now: float) -> None:
        """Count one refused message under (reason, device); keep the latest detail."""
        self.conn.execute(
            "INSERT INTO fleet_rejects (reason, device, count, first_at, last_at, last_detail) "
            "VALUES (?, ?, 1, ?, ?, ?) ON CONFLICT (reason, device) DO UPDATE SET "
            "count = count + 1, last_at = excluded.last_at, last_detail = excluded.last_detail",
            (reason, device or "", now, now, detail[:200]))


# ------------------------------------------------------------------------------------------
# Queries (the CLI and tests)

def _dicts(rows: Iterable[sqlite3.Row]) -> list[dict[str, Any]]:
    return [dict(r) for r in rows]


def devices(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every device the hub has heard from, with its reported state and counters, by id."""
    return _dicts(conn.execute("SELECT * FROM fleet_devices ORDER BY device"))


def gaps(conn: sqlite3.Connection, device: str | None = None) -> list[dict[str, Any]]:
    """Gap rows (device, first_seq, last_seq, state, opened_at, final_at), in seq order."""
    if device is None:
        return _dicts(conn.execute("SELECT * FROM fleet_gaps ORDER BY device, first_seq"))
    return _dicts(conn.execute("SELECT * FROM fleet_gaps WHERE device = ? ORDER BY first_seq",
                               (device,)))


def rejects(conn: sqlite3.Connection) -> dict[str, int]:
    """Refused messages counted per reason (all devices together)."""
    return {r[0]: int(r[1]) for r in conn.execute(
        "SELECT reason, sum(count) FROM fleet_rejects GROUP BY reason ORDER BY reason")}


def accounting(conn: sqlite3.Connection, device: str) -> dict[str, int]:
    """Where every seq of device's stream went.

    Returns next_seq, reports, duplicates, reordered, late, dropped_declared and the gap seqs
    by state (gap_open, gap_lost, gap_dropped); ``reports + gap_* == next_seq``, and
    ``unaccounted`` is next_seq minus that sum (0 unless the store is corrupt).
    """
    row = conn.execute("SELECT * FROM fleet_devices WHERE device = ?", (device,)).fetchone()
    out = dict.fromkeys(("next_seq", "reports", "duplicates", "reordered", "late",
                         "dropped_declared", "gap_open", "gap_lost", "gap_dropped"), 0)
    if row is None:
        return {**out, "unaccounted": 0}
    for k in ("next_seq", "reports", "duplicates", "reordered", "late", "dropped_declared"):
        out[k] = int(row[k])
    for state, n in conn.execute(
            "SELECT state, sum(last_seq - first_seq + 1) FROM fleet_gaps WHERE device = ? "
            "GROUP BY state", (device,)):
        out[f"gap_{state}"] = int(n)
    stored = conn.execute("SELECT count(*) FROM fleet_usage WHERE device = ?",
                          (device,)).fetchone()[0]
    out["unaccounted"] = out["next_seq"] - int(stored) - out["gap_open"] - out["gap_lost"] \
        - out["gap_dropped"]
    return out


_SINCE = re.compile(r"(\d+)\s*([hdw])")
_UNIT_HOURS = {"h": 1, "d": 24, "w": 168}


def parse_since(text: str) -> int:
    """Hours in a window such as "12h", "1d" or "2w" (InvalidArgumentError otherwise)."""
    m = _SINCE.fullmatch(text.strip().lower())
    if not m or int(m.group(1)) < 1:
        raise InvalidArgumentError(f"--since {text!r}: use a count and a unit, e.g. 12h, 1d, 2w")
    return int(m.group(1)) * _UNIT_HOURS[m.group(2)]


def weighted_quantile(values: Sequence[float], weights: Sequence[float], q: float) -> float | None:
    """The smallest value whose cumulative weight reaches q of the total (None if no weight)."""
    pairs = sorted((v, w) for v, w in zip(values, weights) if w > 0)
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return None
    acc = 0.0
    for v, w in pairs:
        acc += w
        if acc >= q * total - 1e-9 * total:
            return v
    return pairs[-1][0]


_PCTS = ("p50", "p90", "p99")


def usage_summary(conn: sqlite3.Connection, since_hours: int, *, k: int = K_ANONYMITY,
                  now: float | None = None,
                  by: Sequence[str] = ("node", "board", "version")) -> list[dict[str, Any]]:
    """Aggregate usage reports of the last since_hours whole hours (the current one included).

    One row per group (default node, board, version): reports, devices, requests,
    prompt_tokens, gen_tokens, errors, ratings_up, ratings_down, and latency_ms / tokens_per_s
    {p50, p90, p99}: for each, the request-weighted median over the reports of that report's
    percentile (a typical period's p50, p90, p99). A group with fewer than k reports keeps only
    its keys and ``"suppressed": True`` (SECURITY E2); k below K_ANONYMITY is refused.
    """
    if k < K_ANONYMITY:
        raise InvalidArgumentError(f"k = {k}: aggregates need at least {K_ANONYMITY} reports")
    cols = [c for c in by if c in ("node", "board", "version", "adapter")]
    if len(cols) != len(by):
        raise InvalidArgumentError(f"group by {list(by)}: choose from node, board, version, adapter")
    start = current_hour(now) - since_hours + 1
    groups: dict[tuple[Any, ...], list[sqlite3.Row]] = {}
    for r in conn.execute("SELECT * FROM fleet_usage WHERE hour >= ?", (start,)):
        groups.setdefault(tuple(r[c] for c in cols), []).append(r)
    out = []
    for key in sorted(groups, key=lambda t: tuple("" if x is None else str(x) for x in t)):
        rows = groups[key]
        cell: dict[str, Any] = dict(zip(cols, key))
        if len(rows) < k:
            cell.update(reports=f"<{k}", suppressed=True)
            out.append(cell)
            continue
        cell["reports"] = len(rows)
        cell["devices"] = len({r["device"] for r in rows})
        for f in ("requests", "prompt_tokens", "gen_tokens", "errors", "ratings_up",
                  "ratings_down"):
            cell[f] = sum(int(r[f]) for r in rows)
        w = [float(r["requests"]) for r in rows]
        for name, col in (("latency_ms", "latency"), ("tokens_per_s", "tps")):
            cell[name] = {p: weighted_quantile([float(r[f"{col}_{p}"]) for r in rows], w, 0.5)
                          for p in _PCTS}
        cell["suppressed"] = False
        out.append(cell)
    return out


def fleet_status(conn: sqlite3.Connection, *, k: int = K_ANONYMITY, since_hours: int = 24,
                 now: float | None = None) -> dict[str, Any]:
    """The fleet at a glance: device counts by state, devices per (node, version), tokens/s by
    board over the last since_hours (k-suppressed), sequence accounting and refusals."""
    devs = devices(conn)
    missing = {d: int(n) for d, n in conn.execute(
        "SELECT device, sum(last_seq - first_seq + 1) FROM fleet_gaps WHERE state != 'dropped' "
        "GROUP BY device")}
    for d in devs:
        d["gap_seqs"] = missing.get(d["device"], 0)  # seqs missing, not declared dropped
    states = {"online": 0, "offline": 0, "unknown": 0}
    versions: dict[tuple[str, int], int] = {}
    for d in devs:
        states[{1: "online", 0: "offline"}.get(d["online"], "unknown")] += 1
        if d["node"] is not None:
            versions[(d["node"], d["version"])] = versions.get((d["node"], d["version"]), 0) + 1
    gap_seqs = {s: int(n) for s, n in conn.execute(
        "SELECT state, sum(last_seq - first_seq + 1) FROM fleet_gaps GROUP BY state")}
    totals = conn.execute("SELECT coalesce(sum(reports), 0), coalesce(sum(duplicates), 0), "
                          "coalesce(sum(stale_deaths), 0), coalesce(sum(rebirths_sent), 0) "
                          "FROM fleet_devices").fetchone()
    boards = [{"board": r["board"], "reports": r["reports"], "devices": r.get("devices"),
               "tokens_per_s": r.get("tokens_per_s"), "suppressed": r["suppressed"]}
              for r in usage_summary(conn, since_hours, k=k, now=now, by=("board",))]
    return {
        "devices": len(devs), **states,
        "versions": [{"node": n, "version": v, "devices": c}
                     for (n, v), c in sorted(versions.items())],
        "tokens_per_s_by_board": boards,
        "reports": int(totals[0]), "duplicates": int(totals[1]),
        "stale_deaths": int(totals[2]), "rebirths_sent": int(totals[3]),
        "gap_seqs": {s: gap_seqs.get(s, 0) for s in ("open", "lost", "dropped")},
        "rejects": rejects(conn),
        "device_list": devs,
    }


# ------------------------------------------------------------------------------------------
# Tables for the terminal (`edgellm hub status`, `edgellm hub usage`)

def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], right: set[int]) -> list[str]:
    cells = [list(header)] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                      for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in cells]


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.1f}"


def _hour(h: Any) -> str:
    import datetime as dt
    if h is None:
        return "-"
    return dt.datetime.fromtimestamp(int(h) * 3600, dt.timezone.utc).strftime("%Y-%m-%d %H:00")


def format_status(st: dict[str, Any], *, since_hours: int = 24, k: int = K_ANONYMITY) -> str:
    """The text `edgellm hub status` prints for fleet_status(...)."""
    gap = st["gap_seqs"]
    out = [f"devices: {st['devices']} ({st['online']} online, {st['offline']} offline, "
           f"{st['unknown']} no birth yet)",
           f"reports: {st['reports']} stored, {st['duplicates']} duplicates; missing seqs: "
           f"{gap['open']} waiting (reorder), {gap['lost']} lost, {gap['dropped']} dropped by "
           f"devices; {st['stale_deaths']} stale deaths ignored, {st['rebirths_sent']} "
           f"rebirths sent",
           "refused: " + (", ".join(f"{r} {n}" for r, n in st["rejects"].items()) or "none"),
           ""]
    out += _table(("DEVICE", "STATE", "BOARD", "NODE", "VERSION", "ADAPTER", "LAST SEEN (UTC)",
                   "REPORTS", "DUPS", "MISSING"),
                  [(d["device"], {1: "online", 0: "offline"}.get(d["online"], "unknown"),
                    d["board"], d["node"], d["version"], d["adapter"], _hour(d["last_seen_hour"]),
                    d["reports"], d["duplicates"], d["gap_seqs"]) for d in st["device_list"]],
                  {4, 7, 8, 9})
    out += ["", "versions:"]
    out += _table(("NODE", "VERSION", "DEVICES"),
                  [(v["node"], v["version"], v["devices"]) for v in st["versions"]], {1, 2})
    out += ["", f"tokens/s by board (last {since_hours} h; request-weighted median of the "
                f"reports' p50/p90/p99; under {k} reports: <{k}):"]
    out += _table(("BOARD", "REPORTS", "DEVICES", "P50", "P90", "P99"),
                  [(b["board"], b["reports"], "" if b["suppressed"] else b["devices"],
                    *[_num((b["tokens_per_s"] or {}).get(p)) if not b["suppressed"] else ""
                      for p in _PCTS]) for b in st["tokens_per_s_by_board"]],
                  {1, 2, 3, 4, 5})
    return "\n".join(out)


def format_usage(rows: Sequence[dict[str, Any]], *, since_hours: int,
                 k: int = K_ANONYMITY) -> str:
    """The text `edgellm hub usage` prints for usage_summary(...)."""
    out = [f"usage over the last {since_hours} h by node, board and version (percentiles: the "
           f"request-weighted median of the reports' own; groups under {k} reports: <{k})"]
    table = []
    for r in rows:
        head = (r["node"], r["board"], r["version"], r["reports"])
        if r["suppressed"]:
            table.append(head + ("",) * 13)
            continue
        lat, tps = r["latency_ms"], r["tokens_per_s"]
        table.append(head + (r["devices"], r["requests"], r["prompt_tokens"], r["gen_tokens"],
                             r["errors"], r["ratings_up"], r["ratings_down"],
                             *[_num(lat[p]) for p in _PCTS], *[_num(tps[p]) for p in _PCTS]))
    out += _table(("NODE", "BOARD", "VERSION", "REPORTS", "DEVICES", "REQUESTS", "PROMPT_TOK",
                   "GEN_TOK", "ERRORS", "UP", "DOWN", "LAT_P50_MS", "LAT_P90_MS", "LAT_P99_MS",
                   "TOK/S_P50", "TOK/S_P90", "TOK/S_P99"), table, set(range(2, 17)))
    if not rows:
        out.append("(no reports in the window)")
    return "\n".join(out)
