# SPDX-License-Identifier: MIT
"""`edgellm flash`: choose the build, give the device its identity, deliver to the target.

One call of ``flash(...)`` does, in this order (each step checks before the next one writes):

1. the board profile (an unknown board names the valid ones, with "did you mean");
2. the build: ``--need NODE`` selects it like ``edgellm select`` (the deepest node on the
   path whose build runs on the board and fits its RAM at the context); ``--model BUILD``
   takes a bundle folder (or a folder name under the bundles folder) and refuses it when the
   board lacks an ISA feature it needs, its backend or recipe, or its RAM budget is short;
3. the target: ``serial:///dev/ttyUSB0?baud=921600`` (the port exists and is free),
   ``ssh://user@host[:port]/path`` (connects with the host key checked, reads what is
   installed and the free space), ``dir:/media/bootfs`` (a folder with room for the package);
4. the identity: ``HubHome.add_device`` when the hub has none for the id (certificate, key,
   device.toml with the broker and the TUF root);
5. the package (``package.make_package``, ``package.pack``) in a temporary folder, and the
   delivery with progress (bytes, rate, ETA): ``serial_link.send_file`` (the device runs
   ``edgellm receive --serial``), ``ssh.flash_ssh``, ``firstboot.write_boot``.

Public API: ``Target``, ``parse_target``, ``check_target``, ``choose_build``, ``FlashResult``,
``flash``.

.. versionadded:: 0.1
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import (
    FlashDiskFullError,
    FlashPortBusyError,
    FlashTargetError,
    InvalidArgumentError,
    UnsupportedError,
)
from .package import ARCHIVE_SUFFIX, make_package, pack, read_package
from .progress import Progress

__all__ = ["DEFAULT_BAUD", "FlashResult", "Target", "check_target", "choose_build", "flash",
           "parse_target"]

DEFAULT_BAUD = 921600
DEFAULT_CONTEXT = 2048  # as `edgellm select`, or the builds' longest seq_len when shorter
SCHEMES = ("serial", "ssh", "dir")


@dataclass(frozen=True)
class Target:
    """A parsed target URI: kind "serial" (path = port), "ssh" (ssh set) or "dir" (a folder)."""

    kind: str
    uri: str
    path: str
    baud: int = DEFAULT_BAUD
    ssh: Any = None  # ssh.SshTarget for kind "ssh"


def parse_target(uri: str, **ssh_kw: Any) -> Target:
    """Parse a --to value.

    Args:
        uri: ``serial:///dev/X[?baud=N]``, ``ssh://[user@]host[:port]/path`` or ``dir:/path``.
        ssh_kw: SshTarget fields for an ssh target (known_hosts, key, remote_python, ...).

    Raises:
        FlashTargetError: an unknown scheme or a malformed URI (the message shows the forms).
    """
    forms = ("serial:///dev/ttyUSB0?baud=921600, ssh://pi@host[:22]/var/lib/edgellm or "
             "dir:/media/bootfs")
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme not in SCHEMES:
        raise FlashTargetError(f"target {uri!r}: use {forms}")
    if scheme == "dir":
        path = unquote(rest[2:] if rest.startswith("//") else rest)
        if not path:
            raise FlashTargetError(f"target {uri!r}: name the folder, e.g. dir:/media/bootfs")
        return Target("dir", uri, path)
    if scheme == "ssh":
        from .ssh import SshTarget

        return Target("ssh", uri, "", ssh=SshTarget.from_uri(uri, **ssh_kw))
    u = urlsplit(uri)
    if u.netloc or not u.path:
        raise FlashTargetError(f"target {uri!r}: a serial target is serial:///dev/ttyUSB0"
                               "?baud=921600 (three slashes: the port is a local path)")
    baud = DEFAULT_BAUD
    q = parse_qs(u.query, keep_blank_values=True)
    if set(q) - {"baud"}:
        raise FlashTargetError(f"target {uri!r}: the only option is ?baud=N")
    if "baud" in q:
        try:
            baud = int(q["baud"][-1])
        except ValueError:
            baud = 0
        if baud <= 0:
            raise FlashTargetError(f"target {uri!r}: baud must be a positive integer")
    return Target("serial", uri, unquote(u.path), baud)


def check_target(t: Target) -> None:
    """Refuse a local target that does not exist or cannot be used, before any work.

    ssh targets are checked by connecting (``ssh.probe``), which ``flash`` does next; here
    only their device root (the agent's unit needs an absolute path).

    Raises:
        FlashTargetError: a missing folder or port.
        FlashError: an ssh device root the agent's unit cannot use (give --agent none).
        FlashPortBusyError: another process holds the serial port.
    """
    if t.kind == "ssh" and t.ssh.agent != "none":
        from .firstboot import agent_unit

        agent_unit(t.ssh.path, exe="edgellm")  # the unit's rules for the root, before any work
    if t.kind == "dir":
        p = Path(t.path)
        if not p.is_dir():
            raise FlashTargetError(f"target folder {p} does not exist (is the card mounted? "
                                   "`lsblk -o NAME,MOUNTPOINT` lists mounts)")
        if not os.access(p, os.W_OK):
            raise FlashTargetError(f"target folder {p} is not writable by this user")
    elif t.kind == "serial":
        if not os.path.exists(t.path):
            raise FlashTargetError(f"serial port {t.path} does not exist (cable plugged in? "
                                   "`ls /dev/ttyUSB* /dev/ttyACM*` lists the ports)")
        import serial

        try:  # the same exclusive lock the transfer takes: a held port fails here, not later
            serial.Serial(t.path, t.baud, exclusive=True, timeout=0).close()
        except serial.SerialException as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EBUSY):
                raise FlashPortBusyError(f"serial port {t.path} is in use by another process "
                                         f"(`fuser -v {t.path}` names it)") from None
            raise FlashTargetError(f"cannot open serial port {t.path}: {exc}") from None


def _bundles_folder(bundles: str | os.PathLike[str] | None) -> Path:
    return Path(bundles or os.environ.get("EDGELLM_BUNDLES") or "bundles")


def choose_build(board: Any, *, need: str | None = None, model: str | None = None,
                 bundles: str | os.PathLike[str] | None = None, context: int | None = None,
                 min_tokens_per_s: float | None = None) -> tuple[Any, str]:
    """The build to flash and a line saying why.

    Args:
        board: the board profile.
        need: a node path to select for (``edgellm select``'s rules), or
        model: a bundle folder, or the name of one under the bundles folder.
        bundles: the folder of bundle folders (default $EDGELLM_BUNDLES, else ./bundles).
        context, min_tokens_per_s: what the device must hold and reach (context None:
            DEFAULT_CONTEXT, or the longest seq_len among the candidate builds when shorter).

    Raises:
        InvalidArgumentError: neither or both of need and model.
        IsaError: the build needs an ISA feature, backend or recipe the board lacks.
        SelectionError: nothing fits (with the smallest shortfall), or the build needs more
            RAM than the board's budget at the context.
        BundleError: the model is not a bundle.
    """
    from ..formats.bundle import list_bundles, read_manifest
    from ..hub.select import SelectionError, check_runs_on, node_path, select

    if (need is None) == (model is None):
        raise InvalidArgumentError("give --need NODE (select the build) or --model BUILD "
                                   "(a bundle folder), not both")
    if need is not None:
        folder = _bundles_folder(bundles)
        if not folder.is_dir():
            raise FlashTargetError(f"bundles folder {folder} does not exist (give --bundles DIR "
                                   "or set $EDGELLM_BUNDLES)")
        found = list_bundles(folder, skip_invalid=True)
        if context is None:
            path = set(node_path(need))
            lens = [x.config.seq_len for x in found if x.node in path]
            context = min(DEFAULT_CONTEXT, max(lens, default=DEFAULT_CONTEXT))
        sel = select(board, need, found, context=context, min_tokens_per_s=min_tokens_per_s)
        b = sel.require()
        why = f"selected for {need} on {board.name}" + (f" ({sel.fallback})" if sel.fallback
                                                         else "")
        return b, why
    assert model is not None
    p = Path(model)
    if not p.is_dir() and os.sep not in model:
        p = _bundles_folder(bundles) / model
    b = read_manifest(p)
    check_runs_on(b, board)  # ISA features, backend, recipe
    if context is None:
        context = min(DEFAULT_CONTEXT, b.config.seq_len)
    sel = select(board, b.node, [b], context=context, min_tokens_per_s=min_tokens_per_s)
    if sel.choice is None:
        raise SelectionError(f"{p.name} does not fit {board.name}: {sel.shortfall}")
    return b, f"given ({p})"


@dataclass
class FlashResult:
    """What one flash did (the CLI prints it)."""

    device_id: str
    board: str
    node: str
    version: int
    recipe: str
    target: str
    identity_created: bool
    skipped: bool = False  # the device had this package already
    bytes_sent: int = 0
    seconds: float = 0.0
    package_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        what = f"{self.node}@{self.version} ({self.recipe})"
        if self.skipped:
            return f"device {self.device_id}: {what} is installed already on {self.target}; " \
                   "nothing copied"
        rate = self.bytes_sent / self.seconds / 1e6 if self.seconds > 0 else 0.0
        return (f"device {self.device_id}: {what} -> {self.target}: {self.bytes_sent / 1e6:.1f} "
                f"MB in {self.seconds:.2f} s ({rate:.1f} MB/s)"
                + ("; new identity issued" if self.identity_created else ""))


def _identity(home: Any, device_id: str, board: str, b: Any) -> tuple[Path, bool]:
    d = home.device_dir(device_id)
    if (d / "device.toml").is_file():
        return d, False
    return home.add_device(device_id, board=board, node=b.node, version=b.version), True


def flash(*, board: str, device_id: str, target: str, home: str | os.PathLike[str],
          need: str | None = None, model: str | None = None,
          bundles: str | os.PathLike[str] | None = None, context: int | None = None,
          min_tokens_per_s: float | None = None, ssh_options: dict[str, Any] | None = None,
          force: bool = False, show_progress: bool | None = None,
          log: IO[str] | None = None) -> FlashResult:
    """Flash one device (see the module docstring for the steps).

    Args:
        board: board id (boards/<id>.toml).
        device_id: the device's id at the hub (created there when missing).
        target: the target URI.
        home: the hub home folder.
        need, model, bundles, context, min_tokens_per_s: see choose_build.
        ssh_options: SshTarget fields (known_hosts, key, remote_python, agent, sysroot, ...).
        force: deliver even when an ssh device reports this package installed.
        show_progress: draw the progress bar (None: when stderr is a terminal).
        log: where step lines go (default stderr).

    Raises:
        UnknownBoardError, IsaError, SelectionError, FlashTargetError, FlashPortBusyError,
        FlashConnectError, FlashHostKeyError, FlashDiskFullError, FlashRemoteError,
        FlashPackageError, HubHomeError: each before anything is written to the device where
        it can be known beforehand; the device keeps its previous model otherwise.
    """
    from ..boards import load_board
    from ..fleet.home import HubHome
    from ..fleet.protocol import check_device_id

    out = log if log is not None else sys.stderr
    prof = load_board(board)
    check_device_id(device_id)
    b, why = choose_build(prof, need=need, model=model, bundles=bundles, context=context,
                          min_tokens_per_s=min_tokens_per_s)
    if b.backend:  # a tflite build: its model.tflite would not travel (the package is GGUF)
        raise UnsupportedError(f"{b.folder.name} is a {b.backend.get('name')} build: `edgellm "
                               "flash` carries native GGUF bundles only; copy the bundle folder "
                               "to the device (docs/tflite.md)")
    print(f"build: {b.node}@{b.version} {b.recipe} ({b.model_size / 1e6:.1f} MB), {why}",
          file=out)
    t = parse_target(target, **(ssh_options or {}))
    check_target(t)
    hub = HubHome.open(home)
    with contextlib.ExitStack() as stack:
        state = None
        if t.kind == "ssh":
            from .ssh import probe, session

            t = dataclasses.replace(t, ssh=stack.enter_context(session(t.ssh)))
            state = probe(t.ssh)  # host key, login and what is installed: before the hub changes
        return _deliver(t, hub, prof, b, device_id, state, force, show_progress, out)


def _deliver(t: Target, hub: Any, prof: Any, b: Any, device_id: str, state: Any, force: bool,
             show_progress: bool | None, out: IO[str]) -> FlashResult:
    """Identity, package, transfer (flash's steps 4 and 5)."""
    board, target = prof.name, t.uri
    ident, created = _identity(hub, device_id, board, b)
    if created:
        print(f"identity: issued {device_id} at {hub.root} ({ident})", file=out)
    res = FlashResult(device_id, board, b.node, b.version, b.recipe, target, created)
    with tempfile.TemporaryDirectory(prefix="edgellm-flash-") as tmp:
        pkg = make_package(Path(tmp) / "package", bundle_dir=b.folder, identity_dir=ident,
                           board=board)
        info = read_package(pkg)
        res.package_bytes = info.total_bytes
        if t.kind == "dir":
            free = shutil.disk_usage(t.path).free
            if info.total_bytes > free:
                raise FlashDiskFullError(f"{t.path}: the package needs {info.total_bytes} bytes, "
                                         f"{free} are free (nothing was written)")
            from .firstboot import write_boot

            with Progress(f"dir {device_id}", info.total_bytes, enabled=show_progress) as prog:
                written = write_boot(pkg, t.path)
                prog(info.total_bytes, info.total_bytes)
            res.bytes_sent, res.seconds = info.total_bytes, prog.seconds
            res.notes.append(f"{len(written)} file(s) written or changed")
            return res
        archive = pack(pkg, Path(tmp) / f"{device_id}{ARCHIVE_SUFFIX}")
        size = archive.stat().st_size
        with Progress(f"{t.kind} {device_id}", size, enabled=show_progress) as prog:
            if t.kind == "serial":
                from .serial_link import send_file

                stats = send_file(t.path, archive, baud=t.baud, progress=prog)
                res.bytes_sent, res.seconds = size, float(stats.seconds)
            else:
                from .ssh import flash_ssh

                r = flash_ssh(t.ssh, archive, info, progress=prog, state=state, force=force)
                res.skipped, res.bytes_sent, res.seconds = r.skipped, r.bytes_sent, r.seconds
                if r.output.strip():
                    res.notes.append(r.output.strip().splitlines()[-1])
    return res
