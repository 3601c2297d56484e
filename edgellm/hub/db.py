# SPDX-License-Identifier: MIT
"""The hub's one SQLite file: connections and schema migrations kept in code.

Each part of the hub that keeps state (the model registry, the fleet service) owns a
*component* of the schema and declares its migrations as an ordered list of SQL scripts::

    MIGRATIONS = [
        "CREATE TABLE nodes (...);",        # version 1
        "ALTER TABLE nodes ADD COLUMN ...;",  # version 2
    ]
    conn = db.connect(path, {"registry": MIGRATIONS})

``connect`` applies the scripts a file has not seen yet, each in its own transaction, and
records ``(component, version)`` in the ``schema_versions`` table, so a file made by an
older edgellm is brought forward and a newer file is refused rather than misread.
Migrations are append-only: never edit one that has shipped, add the next.

.. versionadded:: 0.1
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import EdgeLLMError, StateError

__all__ = ["DatabaseError", "connect", "schema_version"]


class DatabaseError(EdgeLLMError, RuntimeError):
    """The hub database is unreadable, from a newer edgellm, or could not be written."""


_META = """CREATE TABLE IF NOT EXISTS schema_versions (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL
)"""


def connect(path: str | os.PathLike[str], components: Mapping[str, Sequence[str]],
            *, timeout: float = 30.0) -> sqlite3.Connection:
    """Open (creating if needed) the hub database at path and bring each component's schema
    up to date.

    The connection has foreign keys on, WAL journaling (readers never block the writer:
    `hub status` can run beside `hub serve`), rows as sqlite3.Row, and autocommit off;
    use ``with conn:`` for a transaction. ":memory:" gives a private in-memory database.

    Raises:
        DatabaseError: the file is not an SQLite database, a component's recorded version is
            newer than this edgellm knows (the file came from a newer release), or a
            migration failed (it is rolled back; the file keeps its earlier version).
    """
    where = str(path)
    if where != ":memory:":
        Path(where).parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(where, timeout=timeout)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        if where != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")  # a power cut keeps every committed row
        with conn:
            conn.execute(_META)
    except sqlite3.DatabaseError as exc:
        raise DatabaseError(f"{where}: not a usable hub database ({exc})") from exc
    try:
        for component, scripts in components.items():
            _migrate(conn, where, component, scripts)
    except BaseException:
        conn.close()
        raise
    return conn


def schema_version(conn: sqlite3.Connection, component: str) -> int:
    """The schema version recorded for component (0 when it has none yet)."""
    row = conn.execute("SELECT version FROM schema_versions WHERE component = ?", (component,)).fetchone()
    return int(row[0]) if row else 0


def _migrate(conn: sqlite3.Connection, where: str, component: str, scripts: Sequence[str]) -> None:
    have = schema_version(conn, component)
    if have > len(scripts):
        raise DatabaseError(
            f"{where}: its {component!r} schema is version {have}, newer than this edgellm "
            f"knows ({len(scripts)}); upgrade edgellm to open it")
    for version in range(have + 1, len(scripts) + 1):
        try:
            # executescript commits first, so the script runs inside an explicit transaction.
            conn.executescript(f"BEGIN IMMEDIATE;\n{scripts[version - 1]}\n"
                               f"INSERT INTO schema_versions (component, version) VALUES "
                               f"('{_sql_name(component)}', {version}) ON CONFLICT(component) "
                               f"DO UPDATE SET version = excluded.version;\nCOMMIT;")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.rollback()
            raise DatabaseError(
                f"{where}: migration {component} {have} -> {version} failed, nothing changed ({exc})"
            ) from exc


def _sql_name(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise StateError(f"schema component names are identifiers, not {name!r}")
    return name
