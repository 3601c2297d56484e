# SPDX-License-Identifier: MIT
"""The file operations of the update path, and a fault-injecting double that cuts the power.

Every mutation the device's update code makes goes through a ``FileOps``: write (create or
truncate), append, fsync of a file, fsync of a folder, rename, unlink, mkdir and rmdir. Reads
go straight to the OS (they change nothing a power cut could lose).

``FaultFS`` is the test double of SECURITY.md B1. It performs the real operations under one
root folder and keeps a model of what the disk holds durably, as a page cache does:

- a file's bytes become durable at ``fsync(file)``; until then a crash gives back the bytes of
  its last fsync (or an empty file if it never had one);
- a folder's entries (creates, renames, unlinks, mkdirs in it) become durable at
  ``fsync_dir(folder)``; until then a crash may give back the folder's old entries.

``FaultFS(root, cut_at=k)`` counts mutations; the k-th one (0-based) raises ``PowerCut``
*before* it happens, after rewriting the disk under root to what survives the crash, and every
later call raises ``PowerCut`` too (the process is dead). Two crash models:

- ``"strict"``: unsynced data and unsynced folder entries are both lost (the worst case POSIX
  allows; the default);
- ``"meta"``: folder entries survive without a folder fsync but unsynced data is still lost
  (ext4 ``data=writeback``-like: the classic "renamed, zero-length file" after a crash).

Public API: ``FileOps`` (the real thing), ``FaultFS``, ``PowerCut``, ``MUTATIONS``.

.. versionadded:: 0.1
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from .._fsutil import fsync_path

__all__ = ["MUTATIONS", "FaultFS", "FileOps", "PowerCut", "StrPath"]

StrPath = Union[str, "os.PathLike[str]"]
MUTATIONS = ("write", "append", "fsync", "fsync_dir", "rename", "unlink", "mkdir", "rmdir")


class PowerCut(BaseException):
    """Raised by FaultFS at the chosen cut: the simulated device lost power.

    A BaseException on purpose, like KeyboardInterrupt: code under test must not be able to
    catch it with ``except Exception`` and carry on as if the power were still on.
    """


class FileOps:
    """The real file operations (POSIX), one method per mutation, plus two composed helpers.

    - ``fs.write(p, data)``, ``fs.append(p, data)``, ``fs.fsync(p)``, ``fs.fsync_dir(d)``,
      ``fs.rename(a, b)`` (atomic replace), ``fs.unlink(p)``, ``fs.mkdir(d)``, ``fs.rmdir(d)``;
    - ``fs.write_atomic(p, data)``: temporary file, fsync, rename, fsync of the folder;
    - ``fs.remove_tree(d)``: unlink files and remove folders, deepest first.

    ``FileOps(sync=False)`` skips the real fsync calls (for tests whose durability is
    modelled by FaultFS, or throwaway folders); the device always uses the default.
    """

    def __init__(self, sync: bool = True) -> None:
        self.sync = sync

    def write(self, path: StrPath, data: bytes) -> None:
        """Create or truncate path and write data (not durable until fsync)."""
        with open(path, "wb") as f:
            f.write(data)

    def append(self, path: StrPath, data: bytes) -> None:
        """Append data to path, creating it (not durable until fsync)."""
        with open(path, "ab") as f:
            f.write(data)

    def fsync(self, path: StrPath) -> None:
        """Make a file's bytes durable."""
        if self.sync:
            fsync_path(path)

    def fsync_dir(self, path: StrPath) -> None:
        """Make a folder's entries (creates, renames, unlinks) durable."""
        if self.sync:
            fsync_path(path)

    def rename(self, src: StrPath, dst: StrPath) -> None:
        """Atomically replace dst by src (POSIX rename)."""
        os.replace(src, dst)

    def unlink(self, path: StrPath) -> None:
        os.unlink(path)

    def mkdir(self, path: StrPath) -> None:
        os.mkdir(path)

    def rmdir(self, path: StrPath) -> None:
        os.rmdir(path)

    # -- composed helpers (they go through the methods above, so a FaultFS sees each step) --

    def write_atomic(self, path: StrPath, data: bytes) -> None:
        """Replace path by data durably: write a temporary beside it, fsync, rename, fsync dir."""
        p = Path(path)
        tmp = p.with_name(f".{p.name}.tmp")
        self.write(tmp, data)
        self.fsync(tmp)
        self.rename(tmp, p)
        self.fsync_dir(p.parent)

    def ensure_dir(self, path: StrPath) -> None:
        """Create a folder (and make its entry durable) unless it exists."""
        p = Path(path)
        if not p.is_dir():
            self.mkdir(p)
            self.fsync_dir(p.parent)

    def remove_tree(self, path: StrPath) -> None:
        """Remove a file or a folder with everything in it (deepest first); missing is fine."""
        p = Path(path)
        if p.is_symlink() or p.is_file():
            self.unlink(p)
            return
        if not p.is_dir():
            return
        for child in sorted(p.iterdir()):
            self.remove_tree(child)
        self.rmdir(p)


@dataclass
class _Dir:
    cur: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> ("f"|"d", id)
    dur: dict[str, tuple[str, int]] = field(default_factory=dict)  # as of the last fsync_dir


class FaultFS(FileOps):
    """FileOps over one root folder that records every mutation and can cut the power.

    - ``fs = FaultFS(root)`` (counting only) or ``FaultFS(root, cut_at=k, mode="strict")``;
    - run the code under test with it; a ``PowerCut`` escapes at mutation k, with the disk
      under root already rewritten to what survived;
    - ``fs.points`` lists ``(op, path relative to root)`` of each mutation performed (and the
      cut one last), ``fs.cut`` tells whether the cut happened.

    Everything under root must be reached through this object while it is alive; paths
    outside root are refused (they would escape the model).
    """

    def __init__(self, root: StrPath, cut_at: int | None = None, mode: str = "strict") -> None:
        if mode not in ("strict", "meta"):
            raise ValueError(f"mode must be 'strict' or 'meta', not {mode!r}")
        super().__init__(sync=False)  # durability is the model's business, not the disk's
        self.root = Path(root).resolve()
        self.cut_at = cut_at
        self.mode = mode
        self.points: list[tuple[str, str]] = []
        self.cut = False
        self._dirs: dict[int, _Dir] = {0: _Dir()}
        self._data: dict[int, bytes | None] = {}  # file id -> durable bytes (None: never synced)
        self._next = 1
        self._scan(self.root, 0)

    # -- the model ----------------------------------------------------------------------

    def _new_id(self) -> int:
        self._next += 1
        return self._next

    def _scan(self, path: Path, dir_id: int) -> None:
        """Everything already on disk is durable."""
        for child in sorted(path.iterdir()):
            if child.is_dir() and not child.is_symlink():
                cid = self._new_id()
                self._dirs[cid] = _Dir()
                self._dirs[dir_id].cur[child.name] = ("d", cid)
                self._scan(child, cid)
            else:
                fid = self._new_id()
                self._data[fid] = child.read_bytes()
                self._dirs[dir_id].cur[child.name] = ("f", fid)
        self._dirs[dir_id].dur = dict(self._dirs[dir_id].cur)

    def _rel(self, path: StrPath) -> tuple[str, ...]:
        p = Path(os.path.abspath(path))
        try:
            rel = p.relative_to(self.root)
        except ValueError:
            raise ValueError(f"{p} is outside the FaultFS root {self.root}") from None
        return rel.parts

    def _lookup(self, parts: tuple[str, ...]) -> tuple[str, int] | None:
        node: tuple[str, int] = ("d", 0)
        for name in parts:
            if node[0] != "d":
                return None
            nxt = self._dirs[node[1]].cur.get(name)
            if nxt is None:
                return None
            node = nxt
        return node

    def _parent(self, parts: tuple[str, ...]) -> _Dir:
        if not parts:
            raise ValueError("the FaultFS root itself cannot be changed")
        node = self._lookup(parts[:-1])
        if node is None or node[0] != "d":
            raise FileNotFoundError(os.path.join(self.root, *parts[:-1]))
        return self._dirs[node[1]]

    def _step(self, op: str, path: StrPath) -> tuple[str, ...]:
        """Count one mutation; at the cut, crash the disk and raise PowerCut."""
        if self.cut:
            raise PowerCut(f"the power is off ({op} {path})")
        parts = self._rel(path)
        self.points.append((op, "/".join(parts)))
        if self.cut_at is not None and len(self.points) - 1 == self.cut_at:
            self.cut = True
            self._crash()
            raise PowerCut(f"power cut before mutation {self.cut_at}: {op} {'/'.join(parts)}")
        return parts

    def _crash(self) -> None:
        """Rewrite the disk under root to what a crash leaves, per the mode."""
        view = "dur" if self.mode == "strict" else "cur"
        for child in list(self.root.iterdir()):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        self._rebuild(0, self.root, view, 0)

    def _rebuild(self, dir_id: int, path: Path, view: str, depth: int) -> None:
        if depth > 64:  # a folder reachable from itself: stop (can't happen with sane renames)
            return
        entries = getattr(self._dirs[dir_id], view)
        for name, (kind, nid) in sorted(entries.items()):
            if kind == "d":
                (path / name).mkdir()
                self._rebuild(nid, path / name, view, depth + 1)
            else:
                (path / name).write_bytes(self._data.get(nid) or b"")

    # -- the operations -----------------------------------------------------------------

    def write(self, path: StrPath, data: bytes) -> None:
        parts = self._step("write", path)
        parent = self._parent(parts)
        node = parent.cur.get(parts[-1])
        if node is None:
            fid = self._new_id()
            self._data[fid] = None
            parent.cur[parts[-1]] = ("f", fid)
        super().write(path, data)

    def append(self, path: StrPath, data: bytes) -> None:
        parts = self._step("append", path)
        parent = self._parent(parts)
        if parts[-1] not in parent.cur:
            fid = self._new_id()
            self._data[fid] = None
            parent.cur[parts[-1]] = ("f", fid)
        super().append(path, data)

    def fsync(self, path: StrPath) -> None:
        parts = self._step("fsync", path)
        node = self._lookup(parts)
        if node is None or node[0] != "f":
            raise FileNotFoundError(path)
        self._data[node[1]] = Path(path).read_bytes()
        super().fsync(path)

    def fsync_dir(self, path: StrPath) -> None:
        parts = self._step("fsync_dir", path)
        node = self._lookup(parts)
        if node is None or node[0] != "d":
            raise FileNotFoundError(path)
        d = self._dirs[node[1]]
        d.dur = dict(d.cur)
        super().fsync_dir(path)

    def rename(self, src: StrPath, dst: StrPath) -> None:
        sparts = self._step("rename", src)
        dparts = self._rel(dst)
        self.points[-1] = ("rename", "/".join(sparts) + " -> " + "/".join(dparts))
        sparent, dparent = self._parent(sparts), self._parent(dparts)
        node = sparent.cur.get(sparts[-1])
        if node is None:
            raise FileNotFoundError(src)
        super().rename(src, dst)
        del sparent.cur[sparts[-1]]
        dparent.cur[dparts[-1]] = node

    def unlink(self, path: StrPath) -> None:
        parts = self._step("unlink", path)
        parent = self._parent(parts)
        super().unlink(path)
        parent.cur.pop(parts[-1], None)

    def mkdir(self, path: StrPath) -> None:
        parts = self._step("mkdir", path)
        parent = self._parent(parts)
        super().mkdir(path)
        did = self._new_id()
        self._dirs[did] = _Dir()
        parent.cur[parts[-1]] = ("d", did)

    def rmdir(self, path: StrPath) -> None:
        parts = self._step("rmdir", path)
        parent = self._parent(parts)
        super().rmdir(path)
        parent.cur.pop(parts[-1], None)
