# SPDX-License-Identifier: MIT
"""Publishing a release: a node version's bundle for a board, signed into the hub's TUF
repository, and a rollout that offers it to the fleet in waves (`edgellm hub release`).

Usage flow:

- ``rel = publish_release(home, "en/medical/cardiology", 3, board="rpi5", canary=0.1,
  halt_at=0.2)`` takes version 3's rpi5 build from the model registry (``HOME/registry.sqlite``,
  what ``edgellm tree build --out HOME`` writes) or, with ``bundle=DIR``, a bundle folder
  (model.gguf + bundle.json). It records the health spec (``health.record_golden``: the
  golden prompt's greedy continuation), optionally makes a delta from an earlier released
  version (``delta_from=2``) and an adapter patch (``adapter=FILE``), publishes every file as
  TUF targets in one targets version, records the release and starts a rollout (rollout.py).
- The running hub service (``edgellm hub serve``) sends the offers, wave by wave, serves the
  TUF fetches and halts the rollout when a wave's failure share passes ``halt_at``.
- ``keep_fresh(home)`` re-signs online TUF metadata before it expires (the service calls it).

Every target of release R of node N carries in its signed ``custom``: node, version, release
(R: strictly increasing per node, the devices' anti-downgrade counter), board (or "*"), kind
("model", "manifest", "delta", "adapter"), model_sha256 (the model the device runs after
it), base_sha256 (delta and adapter: the model it applies to), adapter_sha256 (adapter), and
optionally devices (the only ids it is for) and health (``health_custom(spec)``:
HealthSpec.to_dict() with floats as ints or decimal strings, since TUF signs canonical JSON).

Target names: ``<node as dashes>.v<V>.r<R>.<board>.<gguf|json|from-v<N>.patch|adapter.patch>``
(a long node is shortened with a hash); devices never parse them.

Public API: ``publish_release``, ``Release``, ``keep_fresh``, ``release_lock``,
``target_names``, ``eligible_devices``, ``DEFAULT_PROMPT``.

.. versionadded:: 0.1
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgeLLMError, InvalidArgumentError, ReleaseError, UnknownDeviceError
from ..formats.bundle import (
    MANIFEST_NAME,
    MODEL_NAME,
    Bundle,
    check_node,
    read_manifest,
    sha256_file,
)
from . import rollout, store
from .health import HealthSpec

__all__ = ["DEFAULT_PROMPT", "Release", "eligible_devices", "health_custom", "keep_fresh",
           "publish_release", "release_lock", "target_names"]

DEFAULT_PROMPT = "Once upon a time"  # any prompt works: the check compares with the hub's run
DEFAULT_TOKENS = 16
ANY_BOARD = "*"


@dataclass(frozen=True)
class Release:
    """A published release and the rollout that carries it (rollout None: published only)."""

    node: str
    version: int
    release: int
    board: str
    targets: dict[str, str]  # kind -> target name
    model_sha256: str
    sizes: dict[str, int]  # kind -> bytes
    source: Path
    health: HealthSpec | None
    rollout: int | None
    devices: list[str] = field(default_factory=list)
    waves: list[int] = field(default_factory=list)  # cumulative device counts

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "version": self.version, "release": self.release,
                "board": self.board, "targets": self.targets, "model_sha256": self.model_sha256,
                "sizes": self.sizes, "source": str(self.source),
                "health": self.health.to_dict() if self.health else None,
                "rollout": self.rollout, "devices": self.devices, "waves": self.waves}


def _home(home: Any) -> Any:
    from .home import HubHome
    return home if isinstance(home, HubHome) else HubHome.open(home)


@contextlib.contextmanager
def release_lock(home: Any, *, wait: bool = True) -> Iterator[bool]:
    """One writer of the TUF repository at a time (`hub release` and the service's
    re-signing): an exclusive flock on HOME/tuf/release.lock. Waits for the other writer
    and yields True; with wait=False yields False at once (lock not taken) while another
    holds it."""
    path = Path(home.root) / "tuf" / "release.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def keep_fresh(home: Any) -> list[str] | None:
    """Re-sign the online TUF roles that expire soon (TufRepo.refresh_expiring); returns
    the roles re-signed, or None without waiting while another writer (a `hub release`,
    which can take minutes) holds the repository: the service's loop must not block."""
    from .tuf_repo import TufRepo

    home = _home(home)
    with release_lock(home, wait=False) as held:
        return TufRepo.open(home).refresh_expiring() if held else None


def target_names(node: str, version: int, release: int, board: str,
                 delta_from: int | None = None) -> dict[str, str]:
    """The target name of each kind for a release (all within the 56 characters TUF names
    may have here; a long node path is cut and given 8 hex digits of its hash)."""
    b = "any" if board == ANY_BOARD else board
    suffixes = {"model": "gguf", "manifest": "json", "adapter": "adapter.patch"}
    if delta_from is not None:
        suffixes["delta"] = f"from-v{delta_from}.patch"
    slug = node.replace("/", "-")
    tail = max(len(f".v{version}.r{release}.{b}.{s}") for s in suffixes.values())
    if len(slug) + tail > 56:
        keep = 56 - tail - 9
        if keep < 1:
            raise ReleaseError(f"board name {board!r} is too long for a target name")
        slug = f"{slug[:keep]}-{hashlib.sha256(node.encode()).hexdigest()[:8]}"
    return {k: f"{slug}.v{version}.r{release}.{b}.{s}" for k, s in suffixes.items()}


# --------------------------------------------------------------------------------------
# Finding what to release


def _from_bundle(folder: Path, node: str, version: int) -> Bundle:
    try:
        b = read_manifest(folder).verify()
    except EdgeLLMError as exc:
        raise ReleaseError(f"--bundle {folder}: {exc}") from exc
    if b.node != node or b.version != version:
        raise ReleaseError(f"--bundle {folder} holds {b.node} v{b.version}, not {node} "
                           f"v{version}")
    return b


def _from_registry(registry: Path, node: str, version: int, board: str | None,
                   recipe: str | None) -> Bundle:
    from ..hub.registry import Registry
    from ..hub.select import recipe_rank

    if not registry.is_file():
        raise ReleaseError(f"no model registry at {registry}: build the tree into the hub home "
                           "(edgellm tree build TREE.toml --out HOME), pass --registry FILE, "
                           "or release a bundle folder with --bundle DIR")
    with Registry.open(registry) as reg:
        versions = [v.version for v in reg.versions(node)]
        if not versions:
            known = ", ".join(n for n, _ in reg.nodes()) or "none"
            raise ReleaseError(f"unknown node {node!r} in {registry} (nodes: {known})")
        if version not in versions:
            raise ReleaseError(f"{node} has no version {version} (versions: "
                               f"{', '.join(map(str, versions))})")
        builds = reg.builds(reg.version(node, version).id)
    boards = sorted({b.board for b in builds})
    if board is None:
        if len(boards) != 1:
            raise ReleaseError(f"{node} v{version} has builds for "
                               f"{', '.join(boards) or 'no'} board(s): name one with --board")
        board = boards[0]
    mine = [b for b in builds if b.board == board and (recipe is None or b.recipe == recipe)]
    if not mine:
        what = f"{board} with recipe {recipe}" if recipe else board
        raise ReleaseError(f"no build of {node} v{version} for {what} (builds: "
                           + (", ".join(f"{b.board}/{b.recipe}" for b in builds) or "none")
                           + "); build it (edgellm tree build) or pass --bundle DIR")
    best = min(mine, key=lambda b: recipe_rank(b.recipe))
    return read_manifest(best.folder).verify()


def _check_board(bundle: Bundle, board: str) -> None:
    from ..boards import load_board
    from ..hub.select import check_runs_on

    if board == ANY_BOARD:
        return
    profile = load_board(board)  # UnknownBoardError lists the valid names
    if board != bundle.board:
        check_runs_on(bundle, profile)  # IsaError: this build cannot run there


def _next_release(conn: sqlite3.Connection, repo: Any, node: str) -> int:
    """One above every release counter of node the hub ever published (database and the
    signed targets both: a lost database never reuses a counter)."""
    row = conn.execute("SELECT max(release) FROM fleet_releases WHERE node = ?",
                       (node,)).fetchone()
    top = int(row[0]) if row and row[0] is not None else 0
    for tf in repo.load("targets").signed.targets.values():
        custom = tf.unrecognized_fields.get("custom") or {}
        if custom.get("node") == node and isinstance(custom.get("release"), int):
            top = max(top, int(custom["release"]))
    return top + 1


def _delta_base(conn: sqlite3.Connection, repo: Any, node: str, version: int,
                board: str) -> Path:
    row = conn.execute("SELECT targets FROM fleet_releases WHERE node = ? AND version = ? AND "
                       "board IN (?, ?) ORDER BY release DESC LIMIT 1",
                       (node, version, board, ANY_BOARD)).fetchone()
    if row is None:
        raise ReleaseError(f"--delta-from {version}: {node} v{version} was never released for "
                           f"{board}, so no device can hold it as a base")
    path = repo.target_file(json.loads(row[0])["model"])
    if path is None or not path.is_file():
        raise ReleaseError(f"--delta-from {version}: its model target is gone from the "
                           "TUF repository")
    return Path(path)


def eligible_devices(home: Any, conn: sqlite3.Connection, node: str, board: str) -> list[str]:
    """Issued, unrevoked devices that run node on board: the birth's node and board when the
    hub heard one, else what `hub add-device` recorded."""
    heard = {d["device"]: d for d in store.devices(conn)}
    out = []
    for d in home.devices():
        if d["revoked"]:
            continue
        h = heard.get(d["id"]) or {}
        dev_board = h.get("board") or d["board"]
        dev_node = h.get("node") or d["node"]
        if dev_node == node and (board == ANY_BOARD or dev_board == board):
            out.append(str(d["id"]))
    return sorted(out)


def _check_devices(home: Any, devices: Sequence[str]) -> list[str]:
    issued = {d["id"]: d for d in home.devices()}
    for dev in devices:
        if dev not in issued:
            raise UnknownDeviceError(f"--devices: no device {dev!r} in {home.root} (see "
                                     "`edgellm hub devices`)")
        if issued[dev]["revoked"]:
            raise UnknownDeviceError(f"--devices: device {dev!r} is revoked")
    return sorted(set(devices))


# --------------------------------------------------------------------------------------
# Publishing


def publish_release(home: Any, node: str, version: int, *, board: str | None = None,
                    bundle: str | os.PathLike[str] | None = None,
                    registry: str | os.PathLike[str] | None = None, recipe: str | None = None,
                    delta_from: int | None = None,
                    adapter: str | os.PathLike[str] | None = None,
                    health: HealthSpec | bool = True, prompt: str = DEFAULT_PROMPT,
                    n_tokens: int = DEFAULT_TOKENS, max_ms_per_token: float = 1000.0,
                    canary: float = 0.1, waves: Sequence[float] | None = None,
                    halt_at: float = 0.2, devices: Sequence[str] | None = None,
                    wave_timeout: float | None = None, start_rollout: bool = True,
                    now: float | None = None) -> Release:
    """Publish version `version` of node for a board and start its rollout.

    Args:
        home: the HubHome (or its path).
        node, version: what to release ("en/medical/cardiology", 3).
        board: the board id; default the bundle's board (or the registry's only board).
            "*" publishes for every board.
        bundle: a bundle folder to release instead of the registry's build.
        registry: the model registry file (default HOME/registry.sqlite).
        recipe: which of the board's builds (default the best: f32 > f16 > q8_0 > ...).
        delta_from: also publish a delta from this earlier released version.
        adapter: a LoRA adapter GGUF for this model: released as an adapter patch.
        health: True: record the golden run (prompt, n_tokens, max_ms_per_token); a
            HealthSpec: sign that one; False: devices run the files-only check.
        canary: the first wave's share; waves: cumulative shares instead (e.g. [.1, .5, 1]).
        halt_at: the failure share of a wave that halts the rollout.
        devices: only these device ids (signed into the targets too); default every device
            of the node and board.
        wave_timeout: seconds a wave waits for devices that do not report (None: forever).
        start_rollout: False publishes the targets only (e.g. the version devices were
            provisioned with, so a later release can be a delta from it).

    Raises:
        ReleaseError: unknown node or version, no build for the board, a bundle that is not
            node v`version`, a delta base never released.
        UnknownBoardError, IsaError: the board is unknown or cannot run the build.
        UnknownDeviceError: a device in `devices` was never issued or is revoked.
        InvalidArgumentError: bad shares, or no device to roll out to.
    """
    from .patch import make_adapter_patch, make_delta
    from .tuf_repo import TufRepo

    home = _home(home)
    node = check_node(node)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ReleaseError(f"version {version!r}: a node version is an integer >= 1")
    shares = list(waves) if waves else ([canary, 1.0] if canary < 1 else [1.0])
    if not shares[0] > 0 or any(b <= a for a, b in zip(shares, shares[1:])) or shares[-1] > 1:
        raise InvalidArgumentError(f"waves {shares}: increasing shares in (0, 1]")
    if not 0 <= halt_at <= 1:
        raise InvalidArgumentError(f"halt_at {halt_at}: a share in 0..1")
    if bundle is not None:
        b = _from_bundle(Path(bundle), node, version)
    else:
        reg = Path(registry) if registry is not None else Path(home.root) / "registry.sqlite"
        b = _from_registry(reg, node, version, board, recipe)
    board = board or b.board
    _check_board(b, board)
    only = _check_devices(home, devices) if devices is not None else None
    model = b.folder / MODEL_NAME
    model_sha = b.file(MODEL_NAME).sha256
    if health is True:
        spec: HealthSpec | None = _record(model, prompt, n_tokens, max_ms_per_token, adapter)
    else:
        spec = health or None
    now = time.time() if now is None else now
    repo = TufRepo.open(home)
    conn = store.connect(home.registry_db)
    try:
        with release_lock(home), tempfile.TemporaryDirectory(prefix="edgellm-release-") as tmp:
            number = _next_release(conn, repo, node)
            names = target_names(node, version, number, board, delta_from)
            base = {"node": node, "version": version, "release": number, "board": board,
                    "model_sha256": model_sha}
            if only is not None:
                base["devices"] = only
            if spec is not None:
                base["health"] = health_custom(spec)
            items: list[tuple[Path, dict[str, Any], str]] = [
                (model, {**base, "kind": "model"}, names["model"]),
                (b.folder / MANIFEST_NAME, {**base, "kind": "manifest"}, names["manifest"])]
            if delta_from is not None:
                if delta_from == version:
                    raise ReleaseError(f"--delta-from {delta_from} is the version released")
                src = _delta_base(conn, repo, node, delta_from, board)
                path = Path(tmp) / "delta.patch"
                path.write_bytes(make_delta(src, model, node=node))
                items.append((path, {**base, "kind": "delta", "base_sha256": sha256_file(src)},
                              names["delta"]))
            if adapter is not None:
                path = Path(tmp) / "adapter.patch"
                path.write_bytes(make_adapter_patch(adapter, model, node=node))
                items.append((path, {**base, "kind": "adapter", "base_sha256": model_sha,
                                     "adapter_sha256": sha256_file(adapter)},
                              names["adapter"]))
            sizes = {c["kind"]: p.stat().st_size for p, c, _ in items}
            targets = {c["kind"]: n for _, c, n in items}
            chosen: list[str] = []
            if start_rollout:
                chosen = only if only is not None else eligible_devices(home, conn, node, board)
                if not chosen:
                    raise InvalidArgumentError(
                        f"no device runs {node} on {board}: nothing to roll out (see `edgellm "
                        "hub devices`; name them with --devices, or publish with --no-rollout)")
            # signed targets first: a crash before the rows below skips a counter (it is
            # read back from the targets), never reuses one
            repo.add_targets(items)
            rid = None
            with conn:
                conn.execute(
                    "INSERT INTO fleet_releases (node, release, version, board, model_sha256, "
                    "adapter_sha256, targets, source, health, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (node, number, version, board, model_sha,
                     sha256_file(adapter) if adapter is not None else None,
                     json.dumps(targets, sort_keys=True), str(b.folder), int(spec is not None),
                     now))
                if start_rollout:
                    rid = rollout.create(conn, node=node, release=number, version=version,
                                         board=board, devices=chosen, shares=shares,
                                         halt_at=halt_at, now=now, wave_timeout=wave_timeout)
            plan = rollout.plan_waves(len(chosen), shares) if start_rollout else []
    finally:
        conn.close()
    return Release(node, version, number, board, targets, model_sha, sizes, b.folder, spec,
                   rid, chosen, plan)


def health_custom(spec: HealthSpec) -> dict[str, Any]:
    """HealthSpec.to_dict() in a form TUF can sign: canonical JSON has no floats, so a float
    field is written as an int when integral (60.0 -> 60), else as a decimal string ("0.75");
    HealthSpec.from_dict casts them back."""
    out: dict[str, Any] = {}
    for k, v in spec.to_dict().items():
        if isinstance(v, float):
            out[k] = int(v) if v.is_integer() else repr(v)
        else:
            out[k] = v
    return out


def _record(model: Path, prompt: str, n_tokens: int, max_ms: float,
            adapter: str | os.PathLike[str] | None) -> HealthSpec:
    from .health import record_golden

    try:
        return record_golden(model, prompt, n_tokens, adapter=adapter, max_ms_per_token=max_ms)
    except EdgeLLMError as exc:
        raise ReleaseError(f"{model}: the golden run failed, this release cannot ship "
                           f"({exc})") from exc
