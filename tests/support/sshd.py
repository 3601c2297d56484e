# SPDX-License-Identifier: MIT
"""A real OpenSSH server on a loopback port for flash tests and benches (no root needed).

Usage (tests/ is on sys.path)::

    from support.sshd import running_sshd
    with running_sshd(tmp_path / "sshd") as s:      # sshd -D with its own config and keys
        ssh://{getpass.getuser()}@127.0.0.1:{s.port}/...   key s.key, known_hosts s.known_hosts

The server runs in the foreground (``-D -e``) as the current user with its own host key,
``AuthorizedKeysFile`` naming a fresh client key, ``UsePAM no`` and ``StrictModes no``; it is
terminated when the block ends. ``wrong_known_hosts`` lists another key for the same host and
port (a changed host key). Debian: apt-get install openssh-server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Sshd", "running_sshd"]


@dataclass(frozen=True)
class Sshd:
    port: int
    key: Path  # the client's private key (authorized)
    known_hosts: Path  # the server's real host key
    wrong_known_hosts: Path  # another key for the same [127.0.0.1]:port
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgellm-test", "-f",
                    str(path)], check=True)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


@contextlib.contextmanager
def running_sshd(folder: Path, timeout: float = 10.0) -> Iterator[Sshd]:
    """Start sshd on 127.0.0.1 with keys and config in folder; stop it on exit."""
    exe = shutil.which("sshd") or "/usr/sbin/sshd"
    assert Path(exe).is_file(), "sshd is needed: apt-get install openssh-server (.ci/setup)"
    assert shutil.which("ssh") and shutil.which("ssh-keygen"), "openssh-client is needed"
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    host_pub, other_pub = _keygen(d / "host_key"), _keygen(d / "other_key")
    _keygen(d / "client_key")
    shutil.copyfile(d / "client_key.pub", d / "authorized_keys")
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
        "Subsystem sftp internal-sftp\nLogLevel VERBOSE\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    for name, pub in (("known_hosts", host_pub), ("wrong_known_hosts", other_pub)):
        (d / name).write_text(f"[127.0.0.1]:{port} {pub}\n")
    log = d / "sshd.log"
    with open(log, "wb") as lf:
        proc = subprocess.Popen([exe, "-D", "-e", "-f", str(d / "sshd_config")], stdout=lf,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"sshd exited: {log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"sshd did not listen: {log.read_text()}"
                time.sleep(0.05)
        yield Sshd(port, d / "client_key", d / "known_hosts", d / "wrong_known_hosts", log)
    finally:
        proc.terminate()
        proc.wait(10)
