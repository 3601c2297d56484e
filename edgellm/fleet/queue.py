# SPDX-License-Identifier: MIT
"""The device's crash-safe report queue: usage reports wait here until the broker PUBACKs.

One SQLite file (``state_dir/agent.db``, WAL, synchronous=FULL) holds the queued reports and
the counters that must survive a power cut: the next ``seq`` (non-wrapping; a device's first
report ever is seq 0) and the last ``bdSeq`` (+1 per connection).

Public API:

- ``ReportQueue(state_dir, max_bytes)``; ``close()``.
- ``next_bd_seq() -> int``: the bdSeq of a new connection (persisted before it is used).
- ``bd_seq``: the current one.
- ``put(fields) -> seq``: queue one report (usage fields without seq/bdSeq) under the next seq.
- ``peek(n, after=-1) -> [(seq, fields)]``: the oldest reports with seq > after, in seq order.
- ``ack(seq)``: remove a report (call on PUBACK only).
- ``discard(seq)``: remove a report that can never be sent (oversized); it is counted as
  dropped on the next report.
- ``stats() -> dict``: rows, payload bytes, file bytes, merged, discarded.

The size cap: when the queued reports' bytes pass the budget, the OLDEST report is merged into
the one after it (counts and periods summed, percentiles and peak memory the max) and its seq
is counted in that report's ``dropped`` field, so the hub -- which credits ``dropped`` to a
device's oldest missing seqs -- can explain every seq. Reports being sent (``pinned``) are never
merged. Half of ``max_bytes`` goes to the reports, the rest to SQLite's pages and WAL (the WAL
is checkpointed and truncated often), so the files stay under ``max_bytes``.

.. versionadded:: 0.1
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

from ..errors import InvalidArgumentError

__all__ = ["ReportQueue", "merge_reports"]

PathLike = Union[str, "os.PathLike[str]"]
_ROW_OVERHEAD = 48  # bytes SQLite spends per row beyond the payload (record header, cell, index)
_SUM_KEYS = ("requests", "prompt_tokens", "gen_tokens", "errors", "ratings_up", "ratings_down",
             "periods", "dropped")
_PCT_KEYS = ("latency_ms", "tokens_per_s")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (seq INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('next_seq', 0), ('bd_seq', -1), ('pending_dropped', 0),
    ('merged', 0), ('discarded', 0), ('payload_bytes', 0);
"""


def merge_reports(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """One report covering both periods: counts summed, percentiles and peak memory the max."""
    out = dict(new)
    for k in _SUM_KEYS:
        if k in old or k in new:
            out[k] = int(old.get(k, 0)) + int(new.get(k, 0))
    for k in _PCT_KEYS:
        a, b = old.get(k) or {}, new.get(k) or {}
        out[k] = {p: max(float(a.get(p, 0.0)), float(b.get(p, 0.0))) for p in ("p50", "p90", "p99")}
    out["peak_rss_mb"] = max(float(old.get("peak_rss_mb", 0.0)), float(new.get("peak_rss_mb", 0.0)))
    return out


class ReportQueue:
    """Persistent FIFO of usage reports with seq/bdSeq counters (see the module docstring)."""

    def __init__(self, state_dir: PathLike, max_bytes: int) -> None:
        if max_bytes < 64 * 1024:
            raise InvalidArgumentError(f"queue max_bytes={max_bytes}: at least 65536")
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.state_dir / "agent.db"
        self.max_bytes = int(max_bytes)
        self.budget = self.max_bytes // 2 - 16 * 1024  # payload bytes; the rest is SQLite's
        self.pinned: set[int] = set()  # seqs published and waiting for PUBACK: never merged
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        page = 4096
        wal_pages = max(4, (self.max_bytes // 8) // page)
        for pragma in ("journal_mode=WAL", "synchronous=FULL", f"wal_autocheckpoint={wal_pages}",
                       f"journal_size_limit={wal_pages * page}"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.executescript(_SCHEMA)

    # -- counters ------------------------------------------------------------------------------
    def _get(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def _set(self, key: str, value: int) -> None:
        self._db.execute("UPDATE meta SET value = ? WHERE key = ?", (int(value), key))

    @property
    def bd_seq(self) -> int:
        with self._lock:
            return max(0, self._get("bd_seq"))

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._get("next_seq")

    def next_bd_seq(self) -> int:
        """Increment and persist bdSeq for a new connection; returns it (the first is 0)."""
        with self._lock, self._tx():
            bd = self._get("bd_seq") + 1
            self._set("bd_seq", bd)
        return bd

    def _tx(self) -> Any:
        db = self._db

        class _Tx:
            def __enter__(self) -> None:
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, et: Any, *rest: Any) -> None:
                db.execute("ROLLBACK" if et is not None else "COMMIT")
        return _Tx()

    # -- reports -------------------------------------------------------------------------------
    def put(self, fields: dict[str, Any]) -> int:
        """Queue one report; returns its seq. Merges the oldest reports while over budget."""
        body = dict(fields)
        body.pop("seq", None)
        body.pop("bdSeq", None)
        with self._lock, self._tx():
            seq = self._get("next_seq")
            pending = self._get("pending_dropped")
            if pending:
                body["dropped"] = int(body.get("dropped", 0)) + pending
                self._set("pending_dropped", 0)
            text = json.dumps(body, separators=(",", ":"), sort_keys=True)
            self._db.execute("INSERT INTO reports VALUES (?, ?)", (seq, text))
            self._set("next_seq", seq + 1)
            self._set("payload_bytes", self._get("payload_bytes") + len(text) + _ROW_OVERHEAD)
            self._shrink()
        return seq

    def _shrink(self) -> None:
        while self._get("payload_bytes") > self.budget:
            rows = self._db.execute(
                "SELECT seq, body FROM reports ORDER BY seq LIMIT ?",
                (len(self.pinned) + 2,)).fetchall()
            rows = [r for r in rows if r[0] not in self.pinned][:2]
            if len(rows) < 2:
                return  # nothing mergeable: the budget is smaller than two reports
            (s_old, b_old), (s_new, b_new) = rows
            merged = merge_reports(json.loads(b_old), json.loads(b_new))
            merged["dropped"] = int(merged.get("dropped", 0)) + 1  # s_old's seq is never sent
            text = json.dumps(merged, separators=(",", ":"), sort_keys=True)
            self._db.execute("DELETE FROM reports WHERE seq = ?", (s_old,))
            self._db.execute("UPDATE reports SET body = ? WHERE seq = ?", (text, s_new))
            delta = len(text) - len(b_old) - len(b_new) - _ROW_OVERHEAD
            self._set("payload_bytes", self._get("payload_bytes") + delta)
            self._set("merged", self._get("merged") + 1)

    def peek(self, n: int, after: int = -1) -> list[tuple[int, dict[str, Any]]]:
        """Up to n queued reports with seq > after, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT seq, body FROM reports WHERE seq > ? ORDER BY seq "
                                    "LIMIT ?", (after, n)).fetchall()
        return [(int(s), json.loads(b)) for s, b in rows]

    def _remove(self, seqs: Iterable[int], *, discarded: bool) -> None:
        with self._lock, self._tx():
            for seq in seqs:
                row = self._db.execute("SELECT body FROM reports WHERE seq = ?",
                                       (seq,)).fetchone()
                self.pinned.discard(seq)
                if row is None:
                    continue
                self._db.execute("DELETE FROM reports WHERE seq = ?", (seq,))
                self._set("payload_bytes",
                          self._get("payload_bytes") - len(row[0]) - _ROW_OVERHEAD)
                if discarded:
                    lost = 1 + int(json.loads(row[0]).get("dropped", 0))
                    self._set("discarded", self._get("discarded") + 1)
                    nxt = self._db.execute("SELECT seq, body FROM reports WHERE seq > ? "
                                           "ORDER BY seq LIMIT 1", (seq,)).fetchone()
                    if nxt is not None and int(nxt[0]) not in self.pinned:
                        body = json.loads(nxt[1])
                        body["dropped"] = int(body.get("dropped", 0)) + lost
                        self._db.execute("UPDATE reports SET body = ? WHERE seq = ?",
                                         (json.dumps(body, separators=(",", ":"),
                                                     sort_keys=True), nxt[0]))
                    else:
                        self._set("pending_dropped", self._get("pending_dropped") + lost)

    def ack(self, seq: int) -> None:
        """The broker acknowledged seq: it is the hub's now."""
        self._remove((seq,), discarded=False)

    def discard(self, seq: int) -> None:
        """Give up on seq (it can never be sent); the next report declares it dropped."""
        self._remove((seq,), discarded=True)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM reports").fetchone()[0])

    def file_bytes(self) -> int:
        """Bytes on disk: the database, its WAL and shared-memory files."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                total += p.stat().st_size
        return total

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"rows": len(self), "payload_bytes": self._get("payload_bytes"),
                    "file_bytes": self.file_bytes(), "merged": self._get("merged"),
                    "discarded": self._get("discarded"), "next_seq": self._get("next_seq"),
                    "bd_seq": self._get("bd_seq")}

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()
