# SPDX-License-Identifier: MIT
"""The ``ssh://user@host[:port]/path`` flash target: the system's OpenSSH client, key auth only.

Every call runs ``ssh`` with ``BatchMode=yes`` (no password or passphrase prompt),
``StrictHostKeyChecking=yes`` and the known_hosts file given (no global file), so a host
whose key is missing from it or differs is refused (``FlashHostKeyError``) before anything is
sent. One flash is::

    probe     remote python3: the installed flash.json's sha256, the current pointer, free space
              (the same package already installed -> done, nothing copied)
    copy      the archive streamed over ssh into a private temporary folder (progress: bytes,
              rate, ETA), its sha256 computed there as it arrives and compared
    install   <remote python> -m edgellm receive --file ARCHIVE --root PATH --reprovision
              (the SSH login authenticated the operator: a device provisioned with another
              identity may be re-provisioned; the serial receiver never allows that)
    enable    the agent's systemd unit (firstboot.enable_agent; optionally systemctl)
    clean     the temporary folder is removed whatever happened

Usage::

    t = SshTarget.from_uri("ssh://pi@ward3-bed7.local/var/lib/edgellm",
                           known_hosts=Path("~/.ssh/known_hosts"))
    result = flash_ssh(t, archive, info, progress=Progress("ssh", size))

Public API: ``SshTarget``, ``RemoteState``, ``SshResult``, ``session``, ``probe``,
``flash_ssh``, ``run_remote``.

.. versionadded:: 0.1
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import (
    FlashConnectError,
    FlashDiskFullError,
    FlashHostKeyError,
    FlashRemoteError,
    FlashTargetError,
)
from .package import FlashInfo
from .progress import ProgressFn

__all__ = ["RemoteState", "SshResult", "SshTarget", "flash_ssh", "probe", "run_remote",
           "session"]

CONNECT_TIMEOUT_S = 10
ALIVE_INTERVAL_S, ALIVE_COUNT = 15, 3  # a silent peer ends the session after ~45 s
CHUNK = 1 << 20  # bytes per write into ssh's stdin
AGENT_MODES = ("enable", "systemctl", "none")

# Runs on the device with its python3 (stdlib only): what is installed, and the free space.
_PROBE = r"""
import hashlib, json, os, shutil, sys, tempfile
root = sys.argv[1]
def sha(p):
    try:
        with open(p, "rb") as f:
            return hashlib.sha256(f.read(1 << 20)).hexdigest()
    except OSError:
        return None
def cur():
    try:
        with open(os.path.join(root, "models", "current")) as f:
            return json.load(f).get("model_sha256")
    except (OSError, ValueError, AttributeError):
        return None
def free(p):
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return shutil.disk_usage(p).free
tmp = tempfile.gettempdir()
print(json.dumps({"flash_sha256": sha(os.path.join(root, "flash.json")), "current": cur(),
                  "root_free": free(root), "tmp": tmp, "tmp_free": free(tmp),
                  "root_exists": os.path.isdir(root)}))
"""



@dataclass(frozen=True)
class SshTarget:
    """Where and how to reach a device over SSH (see the module docstring)."""

    host: str
    path: str  # the device root on the device (DEVICE_ROOT)
    user: str | None = None
    port: int = 22
    known_hosts: Path = field(default_factory=lambda: Path("~/.ssh/known_hosts").expanduser())
    key: Path | None = None  # a private key file (-i); None: ssh's defaults / agent
    remote_python: str = "python3"  # shell words; e.g. "/opt/edgellm/bin/python"
    agent: str = "enable"  # "enable" (unit file + wants link), "systemctl" (also start it), "none"
    sysroot: str = "/"  # the device's file system root: files go to SYSROOT/PATH (as dpkg --root)
    connect_timeout: int = CONNECT_TIMEOUT_S
    options: tuple[str, ...] = ()  # extra ssh -o options, e.g. ("Ciphers=aes128-gcm@openssh.com",)
    control_path: str | None = None  # a master connection's socket (session() sets it)

    @classmethod
    def from_uri(cls, uri: str, **kw: Any) -> SshTarget:
        """Parse ``ssh://[user@]host[:port]/path`` (the path is the device root).

        Raises:
            FlashTargetError: another scheme, no host, no path, a bad port.
        """
        u = urlsplit(uri)
        if u.scheme != "ssh" or not u.hostname:
            raise FlashTargetError(f"{uri!r}: an SSH target is ssh://[user@]host[:port]/path")
        try:
            port = u.port or 22
        except ValueError:
            raise FlashTargetError(f"{uri!r}: the port is not a number in 1-65535") from None
        path = unquote(u.path)
        if not path or path == "/":
            raise FlashTargetError(f"{uri!r}: name the device root, e.g. "
                                   "ssh://pi@host/var/lib/edgellm")
        if u.query or u.fragment:
            raise FlashTargetError(f"{uri!r}: an SSH target takes no ?query or #fragment")
        if kw.get("agent", "enable") not in AGENT_MODES:
            raise FlashTargetError(f"agent mode {kw['agent']!r}: one of {', '.join(AGENT_MODES)}")
        return cls(host=u.hostname, path=path, user=unquote(u.username) if u.username else None,
                   port=port, **kw)

    @property
    def install_root(self) -> str:
        """The device root as seen from the login: sysroot + path."""
        return os.path.join(self.sysroot, self.path.lstrip("/"))

    @property
    def where(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}:{self.port}"

    def ssh_argv(self) -> list[str]:
        """The ssh command line up to (not including) the remote command."""
        kh = Path(self.known_hosts).expanduser()
        argv = ["ssh", "-p", str(self.port), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={kh}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "UpdateHostKeys=no",
                "-o", f"ConnectTimeout={self.connect_timeout}", "-o", "LogLevel=ERROR",
                "-o", f"ServerAliveInterval={ALIVE_INTERVAL_S}",
                "-o", f"ServerAliveCountMax={ALIVE_COUNT}"]
        if self.key is not None:
            argv += ["-i", str(Path(self.key).expanduser()), "-o", "IdentitiesOnly=yes"]
        if self.control_path:  # one TCP connection and key exchange for every step
            argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_path}",
                     "-o", "ControlPersist=60"]
        for opt in self.options:
            argv += ["-o", opt]
        argv += ["-l", self.user] if self.user else []
        return [*argv, "--", self.host]


@dataclass(frozen=True)
class RemoteState:
    """What the probe found on the device."""

    flash_sha256: str | None  # of DEVICE_ROOT/flash.json (None: never flashed)
    current: str | None  # model sha256 of the current pointer
    root_free: int
    tmp: str
    tmp_free: int
    root_exists: bool


@dataclass(frozen=True)
class SshResult:
    """What one SSH flash did."""

    skipped: bool  # the same package was installed already: nothing copied
    bytes_sent: int
    seconds: float  # of the copy
    output: str  # the receiver's output


def _classify(t: SshTarget, rc: int, err: str) -> None:
    """Turn ssh's own failures (exit 255) into typed errors; other codes are the command's."""
    if rc != 255:
        return
    low = err.lower()
    if "host key verification failed" in low or "remote host identification has changed" in low \
            or "no matching host key" in low:
        raise FlashHostKeyError(
            f"{t.where}: the host key is not the one in {t.known_hosts} (or is missing there); "
            f"refused. Check the device, then add its key (ssh-keyscan -p {t.port} {t.host} "
            f">> {t.known_hosts}) -- ssh said: {err.strip()[-300:]}")
    if "permission denied" in low:
        raise FlashConnectError(f"{t.where}: the login was refused (key auth only; give --ssh-key "
                                f"or load the key into ssh-agent): {err.strip()[-300:]}")
    raise FlashConnectError(f"{t.where}: cannot reach the device over SSH: "
                            f"{err.strip()[-300:] or 'ssh exited 255'}")


@contextlib.contextmanager
def session(t: SshTarget) -> Iterator[SshTarget]:
    """t with a shared master connection: the steps of a flash log in once, not six times.

    The master's socket lives in a private temporary folder; the master is stopped (ssh -O
    exit) when the block ends. The first command made through it does the host key check.
    """
    if t.control_path:
        yield t
        return
    d = tempfile.mkdtemp(prefix="edgellm-ssh-")  # short: a unix socket path has ~100 bytes
    try:
        st = dataclasses.replace(t, control_path=os.path.join(d, "master"))
        yield st
    finally:
        if os.path.exists(os.path.join(d, "master")):
            subprocess.run([*st.ssh_argv()[:-2], "-O", "exit", "--", t.host], check=False,
                           capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
        shutil.rmtree(d, ignore_errors=True)


def run_remote(t: SshTarget, command: str, *, timeout: float | None = 600,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one shell command line on the device; returns the completed process.

    Raises:
        FlashHostKeyError, FlashConnectError: ssh could not connect or log in.
        FlashRemoteError: the command exited non-zero (with check).
        MissingToolError: no ssh client installed.
    """
    argv = [*t.ssh_argv(), command]
    try:
        r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        from ..errors import MissingToolError

        raise MissingToolError("ssh is not installed (apt-get install openssh-client)") from None
    except subprocess.TimeoutExpired:
        raise FlashConnectError(f"{t.where}: no answer within {timeout} s") from None
    _classify(t, r.returncode, r.stderr)
    if check and r.returncode != 0:
        raise FlashRemoteError(f"{t.where}: `{command[:120]}` exited {r.returncode}: "
                               f"{(r.stderr or r.stdout).strip()[-500:]}")
    return r


def _py(t: SshTarget, script: str, *args: str) -> str:
    """A remote command line running script with the device's python."""
    return " ".join([t.remote_python, "-c", shlex.quote(script), *map(shlex.quote, args)])


def probe(t: SshTarget) -> RemoteState:
    """Connect (host key checked), and read what the device has installed and its free space.

    Raises:
        FlashHostKeyError, FlashConnectError: see run_remote.
        FlashRemoteError: the device's python could not run the probe.
    """
    r = run_remote(t, _py(t, _PROBE, t.install_root), timeout=t.connect_timeout + 30)
    try:
        d = json.loads(r.stdout.strip().splitlines()[-1])
        return RemoteState(d["flash_sha256"], d["current"], int(d["root_free"]), str(d["tmp"]),
                           int(d["tmp_free"]), bool(d["root_exists"]))
    except (ValueError, KeyError, IndexError, TypeError):
        raise FlashRemoteError(f"{t.where}: the probe printed {r.stdout[-200:]!r}") from None


_RECV = r"""
import hashlib, os, sys, tempfile
os.umask(0o077)
d = tempfile.mkdtemp(prefix="edgellm-flash-", dir=sys.argv[1])
print(d, flush=True)
h, n = hashlib.sha256(), 0
with open(os.path.join(d, sys.argv[2]), "wb") as f:
    for b in iter(lambda: sys.stdin.buffer.read(1 << 20), b""):
        h.update(b)
        f.write(b)
        n += len(b)
print(n, h.hexdigest(), flush=True)
"""


def _send(t: SshTarget, archive: Path, tmp: str, progress: ProgressFn | None
          ) -> tuple[int, str]:
    """Stream archive into a new private folder under tmp on the device, through ssh's stdin.

    The device's python writes it and computes its sha256 as it arrives (one pass, OpenSSL's
    sha256: a Pi's crypto extensions), which must equal the local one. No fsync: the file is
    only read by the receiver, which installs durably.

    Returns:
        (bytes sent, the remote folder) -- the caller removes the folder.

    Raises:
        FlashRemoteError: the copy differs or failed; FlashDiskFullError: no space there.
    """
    size = archive.stat().st_size
    h = hashlib.sha256()  # of what was read and sent, in the same pass
    proc = subprocess.Popen([*t.ssh_argv(), _py(t, _RECV, tmp, archive.name)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    sent = 0
    try:
        try:
            with open(archive, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    proc.stdin.write(chunk)
                    sent += len(chunk)
                    if progress is not None:
                        progress(sent, size)
        except BrokenPipeError:
            pass  # ssh ended early: its exit status and stderr say why
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        out_b, err_b = proc.stdout.read(), proc.stderr.read()  # a few lines each
        proc.wait()
    finally:  # progress() raised, or an interrupt: no ssh left running (or unreaped)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    want = h.hexdigest()
    lines = out_b.decode("utf-8", "replace").split()
    err = err_b.decode("utf-8", "replace")
    folder = lines[0] if lines and lines[0].startswith("/") else ""
    _classify(t, proc.returncode, err)
    try:
        if proc.returncode != 0 or sent != size or len(lines) != 3:
            low = err.lower()
            if "no space left" in low or "file too large" in low:
                raise FlashDiskFullError(f"{t.where}: no space left for the archive in {tmp}")
            raise FlashRemoteError(f"{t.where}: copying to {tmp} failed ({proc.returncode}): "
                                   f"{err.strip()[-300:]}")
        if lines[1:] != [str(size), want]:
            raise FlashRemoteError(f"{t.where}: the copy is {lines[1]} bytes with sha256 "
                                   f"{lines[2][:16]}..., the archive {size} bytes, "
                                   f"{want[:16]}...: the link altered it; nothing was installed")
    except BaseException:
        if folder:
            run_remote(t, f"rm -rf -- {shlex.quote(folder)}", check=False)
        raise
    return sent, folder


def flash_ssh(t: SshTarget, archive: str | os.PathLike[str], info: FlashInfo, *,
              progress: ProgressFn | None = None, state: RemoteState | None = None,
              force: bool = False) -> SshResult:
    """Copy a packed flash package to the device, verify it there, install it, enable the agent.

    Args:
        t: the target.
        archive: the .elpkg file (``package.pack``).
        info: its flash.json (``package.read_package``): the no-op check compares its digest.
        progress: called as progress(done, total) while the archive goes out.
        state: a probe() made just before (else one is made here).
        force: copy and install even when the device has this package installed.

    Raises:
        FlashHostKeyError, FlashConnectError: no connection (nothing was copied).
        FlashDiskFullError: too little free space on the device (checked before the copy).
        FlashRemoteError: the copy's sha256 differs on the device, or the receiver or the agent
            step failed (the receiver installs atomically: the device keeps its old model).
    """
    arch = Path(archive)
    st = state if state is not None else probe(t)
    if not force and st.flash_sha256 == info.digest and st.current == info.model_sha256:
        return SshResult(True, 0, 0.0, "already installed")
    size = arch.stat().st_size
    if st.tmp_free < 2 * size:  # the archive, and the receiver's unpacked copy beside it
        raise FlashDiskFullError(f"{t.where}: {st.tmp} has {st.tmp_free} bytes free, the package "
                                 f"needs {2 * size} there (nothing was copied)")
    if st.root_free < info.total_bytes:
        raise FlashDiskFullError(f"{t.where}: {t.install_root} has {st.root_free} bytes free, "
                                 f"the model and identity need {info.total_bytes} (nothing was "
                                 "copied)")
    t0 = time.perf_counter()
    sent, tmpdir = _send(t, arch, st.tmp, progress)
    seconds = time.perf_counter() - t0
    remote = f"{tmpdir}/{arch.name}"
    try:
        out = run_remote(t, f"{t.remote_python} -m edgellm receive --file {shlex.quote(remote)} "
                            f"--root {shlex.quote(t.install_root)} --reprovision").stdout
        out += _enable_agent(t)
        return SshResult(False, sent, seconds, out)
    finally:
        run_remote(t, f"rm -rf -- {shlex.quote(tmpdir)}", check=False)


def _enable_agent(t: SshTarget) -> str:
    """Install and enable the agent's systemd unit on the device (per t.agent)."""
    if t.agent == "none":
        return ""
    script = ("import sys; from edgellm.flash.firstboot import enable_agent; "
              "print(enable_agent(sys.argv[1], sys.argv[2]))")
    out = run_remote(t, _py(t, script, t.sysroot, t.path)).stdout
    if t.agent == "systemctl":
        out += run_remote(t, "systemctl daemon-reload && systemctl enable --now "
                             "edgellm-agent.service").stdout
    return out

