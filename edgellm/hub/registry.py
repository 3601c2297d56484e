# SPDX-License-Identifier: MIT
"""The model registry: nodes, their versions and lineage, scores and per-board builds (SQLite).

One hub database file (edgellm.hub.db, component "registry") holds:

- ``nodes``: path and parent path;
- ``versions``: node, version number, the parent *version* it was distilled from, the corpus
  hash, config hash and tokenizer hash it was trained with, its config (JSON), checkpoint
  folder, parameter count and training summary;
- ``builds``: a version built for a board with a quant recipe: the bundle folder, weight
  bytes; ``build_files``: each file's name, sha256 and size; ``build_scores``: perplexity of
  the build on each held-out set.

Paths are stored relative to the registry's folder when they are inside it. A version is
written with all its builds in one transaction (`register`), so a failed or interrupted build
leaves the registry as it was.

Usage::

    with Registry.open("hub/registry.sqlite") as reg:
        reg.ancestors("en/medical/cardiology")        # ["en/medical", "en", "master"]
        reg.current("en")                             # VersionInfo or None
        reg.stale({"en": Expected(corpus_hash, config_hash)})   # [Staleness(...)]
        reg.register(NewVersion(...), [NewBuild(...)])

.. versionadded:: 0.1
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgeLLMError
from . import db

__all__ = ["MIGRATIONS", "BuildInfo", "Expected", "NewBuild", "NewVersion", "Registry",
           "RegistryError", "ScoreInfo", "Staleness", "VersionInfo"]

MIGRATIONS: list[str] = [
    # version 1
    """
    CREATE TABLE nodes (
        path TEXT PRIMARY KEY,
        parent TEXT REFERENCES nodes(path),
        CHECK (parent IS NULL OR parent <> path)
    );
    CREATE TABLE versions (
        id INTEGER PRIMARY KEY,
        node TEXT NOT NULL REFERENCES nodes(path),
        version INTEGER NOT NULL CHECK (version >= 1),
        parent_version_id INTEGER REFERENCES versions(id),
        corpus_hash TEXT NOT NULL,
        config_hash TEXT NOT NULL,
        tokenizer_hash TEXT NOT NULL,
        config TEXT NOT NULL,
        checkpoint TEXT NOT NULL,
        params INTEGER NOT NULL CHECK (params > 0),
        n_train_records INTEGER NOT NULL,
        train TEXT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (node, version)
    );
    CREATE TABLE builds (
        id INTEGER PRIMARY KEY,
        version_id INTEGER NOT NULL REFERENCES versions(id),
        board TEXT NOT NULL,
        recipe TEXT NOT NULL,
        folder TEXT NOT NULL,
        weights_bytes INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (version_id, board, recipe)
    );
    CREATE TABLE build_files (
        build_id INTEGER NOT NULL REFERENCES builds(id),
        name TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        PRIMARY KEY (build_id, name)
    );
    CREATE TABLE build_scores (
        build_id INTEGER NOT NULL REFERENCES builds(id),
        heldout TEXT NOT NULL,
        ppl REAL NOT NULL,
        nll REAL NOT NULL,
        n_scored INTEGER NOT NULL,
        protocol TEXT NOT NULL,
        text_sha256 TEXT NOT NULL,
        window INTEGER NOT NULL,
        stride INTEGER NOT NULL,
        PRIMARY KEY (build_id, heldout)
    );
    CREATE INDEX versions_parent ON versions(parent_version_id);
    """,
]


class RegistryError(EdgeLLMError, RuntimeError):
    """A registry write would break lineage (unknown parent, version clash) or a lookup failed."""


@dataclass(frozen=True)
class Expected:
    """What the tree file says a node's current version should have been trained with."""

    corpus_hash: str
    config_hash: str
    tokenizer_hash: str | None = None


@dataclass(frozen=True)
class NewVersion:
    """A trained node version to register (its checkpoint already on disk)."""

    node: str
    parent: str | None  # the parent node path (None: the root)
    parent_version: int | None  # the parent version it was distilled from
    corpus_hash: str
    config_hash: str
    tokenizer_hash: str
    config: Mapping[str, Any]
    checkpoint: Path
    params: int
    n_train_records: int
    train: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoreInfo:
    """Perplexity of a build on one held-out set."""

    heldout: str
    ppl: float
    nll: float
    n_scored: int
    protocol: str
    text_sha256: str
    window: int = 0  # text tokens per window (0: not recorded)
    stride: int = 0


@dataclass(frozen=True)
class NewBuild:
    """A finished bundle folder of a version, for one board and recipe."""

    board: str
    recipe: str
    folder: Path
    weights_bytes: int
    files: Sequence[tuple[str, str, int]]  # (name, sha256, size)
    scores: Sequence[ScoreInfo] = ()


@dataclass(frozen=True)
class BuildInfo:
    """A registered build."""

    id: int
    board: str
    recipe: str
    folder: Path  # absolute
    weights_bytes: int
    files: tuple[tuple[str, str, int], ...]
    scores: Mapping[str, ScoreInfo]

    @property
    def size(self) -> int:
        """Bytes of all its files."""
        return sum(f[2] for f in self.files)


@dataclass(frozen=True)
class VersionInfo:
    """A registered node version."""

    id: int
    node: str
    version: int
    parent: str | None
    parent_version: int | None
    parent_version_id: int | None
    corpus_hash: str
    config_hash: str
    tokenizer_hash: str
    config: Mapping[str, Any]
    checkpoint: Path  # absolute
    params: int
    n_train_records: int
    train: Mapping[str, Any]
    created_at: str


@dataclass(frozen=True)
class Staleness:
    """Why a node needs a (re)build: reasons empty means it is current."""

    node: str
    version: int | None  # its current version (None: never built)
    reasons: tuple[str, ...]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Registry:
    """The model registry in a hub database file.

    - ``Registry.open(path)`` (a context manager) creates or migrates the file;
    - lineage: ``ancestors``, ``descendants``, ``children``; versions: ``current``,
      ``versions``, ``version``; builds: ``builds``;
    - ``stale(expected)`` says which nodes need rebuilding and why;
    - ``register`` / ``add_builds`` write a version (and builds) in one transaction.

    A Registry is single-threaded (one sqlite3 connection).

    .. versionadded:: 0.1
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self.root = path.parent if str(path) != ":memory:" else Path.cwd()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Registry:
        """Open (creating) the registry in the hub database at path.

        Raises:
            DatabaseError: not an SQLite file, or from a newer edgellm.
        """
        p = Path(path)
        conn = db.connect(p, {"registry": MIGRATIONS})
        return cls(conn, p.resolve() if str(p) != ":memory:" else p)

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- paths ---------------------------------------------------------------------------

    def rel(self, p: Path) -> str:
        """p relative to the registry's folder when inside it, else absolute."""
        a = Path(os.path.abspath(p))
        try:
            return a.relative_to(self.root).as_posix()
        except ValueError:
            return str(a)

    def abs(self, stored: str) -> Path:
        """A stored path as an absolute path."""
        p = Path(stored)
        return p if p.is_absolute() else self.root / p

    # --- lineage -------------------------------------------------------------------------

    def nodes(self) -> list[tuple[str, str | None]]:
        """(path, parent) of every node, parents first."""
        rows = {r["path"]: r["parent"] for r in self.conn.execute("SELECT path, parent FROM nodes")}
        out: list[tuple[str, str | None]] = []

        def visit(p: str | None) -> None:
            for c in sorted(k for k, v in rows.items() if v == p):
                out.append((c, p))
                visit(c)

        visit(None)
        return out

    def parent(self, node: str) -> str | None:
        """The parent path of a registered node.

        Raises:
            RegistryError: the node is not registered.
        """
        row = self.conn.execute("SELECT parent FROM nodes WHERE path = ?", (node,)).fetchone()
        if row is None:
            raise RegistryError(f"node {node!r} is not in the registry {self.path}")
        return row[0] if row[0] is None else str(row[0])

    def ancestors(self, node: str) -> list[str]:
        """The parent, grandparent, ... up to the root (nearest first)."""
        rows = self.conn.execute(
            """WITH RECURSIVE up(path, parent, depth) AS (
                   SELECT path, parent, 0 FROM nodes WHERE path = ?
                   UNION ALL
                   SELECT n.path, n.parent, up.depth + 1 FROM nodes n JOIN up ON n.path = up.parent)
               SELECT path FROM up WHERE depth > 0 ORDER BY depth""", (node,)).fetchall()
        self.parent(node)  # raises for an unknown node
        return [str(r[0]) for r in rows]

    def children(self, node: str) -> list[str]:
        """The nodes whose parent is node, sorted."""
        return [str(r[0]) for r in self.conn.execute(
            "SELECT path FROM nodes WHERE parent = ? ORDER BY path", (node,))]

    def descendants(self, node: str) -> list[str]:
        """Every node below node, parents first (depth-first, children sorted)."""
        self.parent(node)
        out: list[str] = []
        stack = list(reversed(self.children(node)))
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(reversed(self.children(n)))
        return out

    # --- versions ------------------------------------------------------------------------

    _VERSION_SQL = """SELECT v.*, n.parent AS parent_node, pv.version AS parent_version_no
                      FROM versions v JOIN nodes n ON n.path = v.node
                      LEFT JOIN versions pv ON pv.id = v.parent_version_id"""

    def _version(self, row: sqlite3.Row) -> VersionInfo:
        return VersionInfo(
            id=row["id"], node=row["node"], version=row["version"], parent=row["parent_node"],
            parent_version=row["parent_version_no"], parent_version_id=row["parent_version_id"],
            corpus_hash=row["corpus_hash"], config_hash=row["config_hash"],
            tokenizer_hash=row["tokenizer_hash"], config=json.loads(row["config"]),
            checkpoint=self.abs(row["checkpoint"]), params=row["params"],
            n_train_records=row["n_train_records"], train=json.loads(row["train"]),
            created_at=row["created_at"])

    def versions(self, node: str) -> list[VersionInfo]:
        """Every version of node, oldest first."""
        return [self._version(r) for r in self.conn.execute(
            self._VERSION_SQL + " WHERE v.node = ? ORDER BY v.version", (node,))]

    def current(self, node: str) -> VersionInfo | None:
        """The node's newest version (None when it has none)."""
        row = self.conn.execute(self._VERSION_SQL + " WHERE v.node = ? ORDER BY v.version DESC "
                                "LIMIT 1", (node,)).fetchone()
        return self._version(row) if row is not None else None

    def version(self, node: str, version: int) -> VersionInfo:
        """One version.

        Raises:
            RegistryError: no such version.
        """
        row = self.conn.execute(self._VERSION_SQL + " WHERE v.node = ? AND v.version = ?",
                                (node, version)).fetchone()
        if row is None:
            raise RegistryError(f"{node}@{version} is not in the registry {self.path}")
        return self._version(row)

    def builds(self, version_id: int) -> list[BuildInfo]:
        """The builds of a version, by board then recipe."""
        out = []
        for b in self.conn.execute("SELECT * FROM builds WHERE version_id = ? ORDER BY board, "
                                   "recipe", (version_id,)).fetchall():
            files = tuple((str(f["name"]), str(f["sha256"]), int(f["size"])) for f in
                          self.conn.execute("SELECT * FROM build_files WHERE build_id = ? "
                                            "ORDER BY name", (b["id"],)))
            scores = {str(s["heldout"]): ScoreInfo(s["heldout"], s["ppl"], s["nll"],
                                                   s["n_scored"], s["protocol"],
                                                   s["text_sha256"], s["window"], s["stride"])
                      for s in self.conn.execute("SELECT * FROM build_scores WHERE build_id = ? "
                                                 "ORDER BY rowid", (b["id"],))}
            out.append(BuildInfo(b["id"], b["board"], b["recipe"], self.abs(b["folder"]),
                                 b["weights_bytes"], files, scores))
        return out

    # --- staleness -----------------------------------------------------------------------

    def stale(self, expected: Mapping[str, Expected] | None = None,
              builds: Sequence[tuple[str, str]] = ()) -> list[Staleness]:
        """Which nodes need a new version or builds, and why, parents first.

        A node's current version is stale when its parent's current version is not the one
        it was distilled from, or (given expected) its corpus, config or tokenizer hash
        differs from the expected one, or its checkpoint folder is gone; a node below a stale
        node is stale too ("ancestor X is stale"). A node in expected without a version is
        "missing". Given builds (board, recipe pairs), a current version lacking one gets the
        reason "missing build BOARD/RECIPE". Nodes with no reason are listed too.
        """
        exp = dict(expected or {})
        paths = [n for n, _ in self.nodes()]
        paths += [n for n in exp if n not in paths]
        stale_set: set[str] = set()
        out = []
        for node in paths:
            cur = self.current(node)
            reasons: list[str] = []
            parent = self._parent_or_none(node)
            if parent is not None and parent in stale_set:
                reasons.append(f"ancestor {parent} is stale")
            if cur is None:
                reasons.append("missing: no version yet")
            else:
                if parent is not None:
                    pcur = self.current(parent)
                    if pcur is None:
                        reasons.append(f"parent {parent} has no version")
                    elif cur.parent_version_id != pcur.id:
                        reasons.append(f"parent rebuilt: trained from {parent}@"
                                       f"{cur.parent_version}, current is {parent}@{pcur.version}")
                e = exp.get(node)
                if e is not None:
                    if cur.corpus_hash != e.corpus_hash:
                        reasons.append("corpus changed")
                    if cur.config_hash != e.config_hash:
                        reasons.append("config changed")
                    if e.tokenizer_hash is not None and cur.tokenizer_hash != e.tokenizer_hash:
                        reasons.append("tokenizer changed")
                if not cur.checkpoint.is_dir():
                    reasons.append(f"checkpoint {cur.checkpoint} is gone")
                if builds and not reasons:
                    have = {(b.board, b.recipe) for b in self.builds(cur.id)}
                    reasons += [f"missing build {b}/{r}" for b, r in builds if (b, r) not in have]
            if any(not r.startswith("missing build") for r in reasons):
                stale_set.add(node)
            out.append(Staleness(node, cur.version if cur else None, tuple(reasons)))
        return out

    def stale_builds(self) -> list[tuple[str, int, BuildInfo]]:
        """(node, version, build) of every build of a version that is not current or is stale."""
        bad = {s.node for s in self.stale() if s.reasons}
        out = []
        for node, _ in self.nodes():
            cur = self.current(node)
            for v in self.versions(node):
                if cur is None or v.id != cur.id or node in bad:
                    out += [(node, v.version, b) for b in self.builds(v.id)]
        return out

    def _parent_or_none(self, node: str) -> str | None:
        row = self.conn.execute("SELECT parent FROM nodes WHERE path = ?", (node,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    # --- writes --------------------------------------------------------------------------

    def register(self, v: NewVersion, builds: Sequence[NewBuild] = ()) -> VersionInfo:
        """Add the node (if new), a new version of it and its builds, in one transaction.

        The version number is the node's last one plus one.

        Raises:
            RegistryError: the parent is not registered or has no such version, the node is
                registered under another parent; nothing is written.
        """
        try:
            with self._transaction():
                row = self.conn.execute("SELECT parent FROM nodes WHERE path = ?",
                                        (v.node,)).fetchone()
                if row is None:
                    if v.parent is not None and self.conn.execute(
                            "SELECT 1 FROM nodes WHERE path = ?", (v.parent,)).fetchone() is None:
                        raise RegistryError(f"cannot register {v.node}: its parent {v.parent} "
                                            "is not registered; build the parent first")
                    self.conn.execute("INSERT INTO nodes (path, parent) VALUES (?, ?)",
                                      (v.node, v.parent))
                elif row[0] != v.parent:
                    raise RegistryError(f"{v.node} is registered with parent {row[0]!r}, not "
                                        f"{v.parent!r}; a node cannot move in the tree")
                pid = None
                if v.parent is not None:
                    prow = self.conn.execute("SELECT id FROM versions WHERE node = ? AND "
                                             "version = ?", (v.parent, v.parent_version)).fetchone()
                    if prow is None:
                        raise RegistryError(f"cannot register {v.node}: its parent version "
                                            f"{v.parent}@{v.parent_version} is not registered")
                    pid = int(prow[0])
                last = self.conn.execute("SELECT MAX(version) FROM versions WHERE node = ?",
                                         (v.node,)).fetchone()[0]
                number = int(last or 0) + 1
                cur = self.conn.execute(
                    "INSERT INTO versions (node, version, parent_version_id, corpus_hash, "
                    "config_hash, tokenizer_hash, config, checkpoint, params, n_train_records, "
                    "train, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (v.node, number, pid, v.corpus_hash, v.config_hash, v.tokenizer_hash,
                     json.dumps(dict(v.config), sort_keys=True), self.rel(v.checkpoint),
                     v.params, v.n_train_records, json.dumps(dict(v.train), sort_keys=True),
                     _now()))
                vid = int(cur.lastrowid or 0)
                self._insert_builds(vid, builds)
        except sqlite3.Error as exc:
            raise RegistryError(f"registering {v.node} failed, nothing written ({exc})") from exc
        return self.version(v.node, number)

    def add_builds(self, node: str, version: int, builds: Sequence[NewBuild]) -> None:
        """Add builds to an existing version, in one transaction (replacing same board/recipe).

        Raises:
            RegistryError: no such version; nothing is written.
        """
        vid = self.version(node, version).id
        try:
            with self._transaction():
                for b in builds:
                    old = self.conn.execute("SELECT id FROM builds WHERE version_id = ? AND "
                                            "board = ? AND recipe = ?",
                                            (vid, b.board, b.recipe)).fetchone()
                    if old is not None:
                        for t in ("build_files", "build_scores"):
                            self.conn.execute(f"DELETE FROM {t} WHERE build_id = ?", (old[0],))
                        self.conn.execute("DELETE FROM builds WHERE id = ?", (old[0],))
                self._insert_builds(vid, builds)
        except sqlite3.Error as exc:
            raise RegistryError(f"adding builds to {node}@{version} failed, nothing written "
                                f"({exc})") from exc

    def _insert_builds(self, vid: int, builds: Sequence[NewBuild]) -> None:
        for b in builds:
            cur = self.conn.execute(
                "INSERT INTO builds (version_id, board, recipe, folder, weights_bytes, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (vid, b.board, b.recipe, self.rel(b.folder), b.weights_bytes, _now()))
            bid = cur.lastrowid
            self.conn.executemany("INSERT INTO build_files (build_id, name, sha256, size) "
                                  "VALUES (?, ?, ?, ?)", [(bid, *f) for f in b.files])
            self.conn.executemany(
                "INSERT INTO build_scores (build_id, heldout, ppl, nll, n_scored, protocol, "
                "text_sha256, window, stride) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(bid, s.heldout, s.ppl, s.nll, s.n_scored, s.protocol, s.text_sha256,
                  s.window, s.stride) for s in b.scores])

    def _transaction(self) -> _Tx:
        return _Tx(self.conn)

    # --- export --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every node with its versions and builds (JSON-ready)."""
        nodes = []
        for node, parent in self.nodes():
            cur = self.current(node)
            vs = []
            for v in self.versions(node):
                vs.append({
                    "version": v.version, "parent_version": v.parent_version,
                    "corpus_hash": v.corpus_hash, "config_hash": v.config_hash,
                    "tokenizer_hash": v.tokenizer_hash, "params": v.params,
                    "checkpoint": str(v.checkpoint), "n_train_records": v.n_train_records,
                    "config": v.config, "train": v.train, "created_at": v.created_at,
                    "builds": [{"board": b.board, "recipe": b.recipe, "folder": str(b.folder),
                                "weights_bytes": b.weights_bytes, "size": b.size,
                                "files": [{"name": n, "sha256": h, "size": s}
                                          for n, h, s in b.files],
                                "scores": {k: vars(s) for k, s in b.scores.items()}}
                               for b in self.builds(v.id)]})
            nodes.append({"path": node, "parent": parent,
                          "current": cur.version if cur else None, "versions": vs})
        return {"registry": str(self.path), "nodes": nodes}


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")


def iter_scores(reg: Registry, node: str) -> Iterator[tuple[str, str, ScoreInfo]]:
    """(board, recipe, score) of the node's current builds."""
    cur = reg.current(node)
    if cur is None:
        return
    for b in reg.builds(cur.id):
        for s in b.scores.values():
            yield b.board, b.recipe, s
