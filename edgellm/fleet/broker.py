# SPDX-License-Identifier: MIT
"""Run Eclipse Mosquitto for a hub home: its config and ACL, start, stop, reload.

Usage:

- ``with Broker(home) as b: ...`` (or ``b.start(); ...; b.stop()``) runs
  ``mosquitto -c HOME/broker/mosquitto.conf`` as a child process and returns once its TLS
  listener accepts connections; ``b.reload()`` sends SIGHUP (ACL, CRL and certificates are
  re-read); ``edgellm hub broker`` runs it in the foreground;
- ``write_config(home)`` / ``write_acl(home)`` regenerate the two files from hub.toml and the
  registry (``Broker.start`` and ``HubHome.revoke_device`` call them);
- ``find_mosquitto()`` finds the binary or raises MissingToolError with the install command;
- ``signal_reload(home)`` makes the broker a home's ``Broker`` started re-read its files.

The config has exactly one listener, TLS only (1.2 minimum) with client certificates from the
device CA, the CN as username and client id, the CRL, and pattern ACLs: no anonymous access,
no plain-text listener, not even on localhost. Only standard MQTT v5 is relied on, so a
clustered broker (EMQX, HiveMQ) can take its place with an equivalent config (docs/fleet.md).

.. versionadded:: 0.1
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from ..errors import BrokerError, MissingToolError
from .protocol import PREFIX

if TYPE_CHECKING:
    from .home import HubHome

__all__ = ["INSTALL_HINT", "Broker", "find_mosquitto", "render_acl", "render_config",
           "signal_reload", "take_over", "write_acl", "write_config"]

INSTALL_HINT = "sudo apt install mosquitto"
_SBIN = ("/usr/sbin", "/usr/local/sbin")  # Debian installs mosquitto outside a user's PATH
DEVICE_WRITE = ("state", "usage", "req", "examples")  # protocol.DEVICE_KINDS_UP
DEVICE_READ = ("cmd", "resp/+")  # protocol.DEVICE_KINDS_DOWN; a response topic is resp/<one level>
# Names a response topic's level may not take. A certificate CN with a "/" ("V/resp") would
# turn the %u patterns into topics inside device V's resp/ level ("V/resp/state"); denying
# these names there (and reading only resp/<one level>) leaves such a CN nothing of V's.
RESERVED_RESP = ("state", "usage", "req", "examples", "cmd", "resp")


def find_mosquitto(search_path: str | None = None) -> Path:
    """The mosquitto binary: $EDGELLM_MOSQUITTO if set, else PATH, then /usr/sbin.

    Args:
        search_path: a PATH-style list to search instead of $PATH and the sbin folders.

    Raises:
        MissingToolError: not found (or $EDGELLM_MOSQUITTO is not an executable file); the
            message gives the install command.
    """
    env = os.environ.get("EDGELLM_MOSQUITTO")
    if env:
        if os.path.isfile(env) and os.access(env, os.X_OK):
            return Path(env)
        raise MissingToolError(f"EDGELLM_MOSQUITTO={env} is not an executable file; install "
                               f"the broker with `{INSTALL_HINT}` or fix the variable")
    if search_path is None:
        search_path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    found = shutil.which("mosquitto", path=search_path)
    if not found:
        raise MissingToolError(f"the MQTT broker mosquitto is not installed (looked in "
                               f"{search_path}); install it with `{INSTALL_HINT}`")
    return Path(found)


# --------------------------------------------------------------------------------------
# The generated files


def render_acl(hub_id: str, revoked: list[str]) -> str:
    """The ACL file: the hub gets the whole tree, a device only its own topics (%u = its CN).

    mosquitto 2.0.11 checks a client's ``user`` rules first (an explicit deny there ends the
    check), then the patterns; anything no rule allows is denied, on publish and again on
    every delivery, so after a reload a revoked id's existing subscriptions deliver nothing.
    """
    lines = ["# edgellm hub ACL, generated from the registry (edgellm/fleet/broker.py).",
             "# Do not edit: `edgellm hub revoke-device ID` rewrites it and reloads the broker.",
             "",
             f"# The hub service (certificate CN={hub_id}) reads and writes the protocol tree.",
             f"user {hub_id}",
             f"topic readwrite {PREFIX}/#",
             ""]
    if revoked:
        lines.append("# Revoked devices: nothing at all (a user's deny wins over the patterns).")
        for d in revoked:
            lines += [f"user {d}", "topic deny #", ""]
    lines.append("# No device reads or writes these response-level names (see RESERVED_RESP in")
    lines.append("# edgellm/fleet/broker.py: they make a hostile CN containing '/' fail closed).")
    lines += [f"pattern deny {PREFIX}/dev/+/resp/{k}" for k in RESERVED_RESP]
    lines.append("")
    lines.append("# Every device: write its up topics, read its down topics, nothing else.")
    lines += [f"pattern write {PREFIX}/dev/%u/{k}" for k in DEVICE_WRITE]
    lines += [f"pattern read {PREFIX}/dev/%u/{k}" for k in DEVICE_READ]
    return "\n".join(lines) + "\n"


def render_config(home: HubHome) -> str:
    """mosquitto.conf for home: one TLS listener with client certificates, ACL, persistence."""
    b = home.broker_dir
    return f"""\
# mosquitto 2.0 config for the edgellm hub at {home.root}
# Generated from hub.toml by edgellm (edgellm/fleet/broker.py) at every `hub broker` start.

# Settings below a listener apply to that listener only; there is exactly one listener, so
# nothing can open a second, plain or anonymous, port (mosquitto 2.0.12 fixed such a case).
per_listener_settings true
# Run as the home's owner (mosquitto started as root would switch to "mosquitto", which
# cannot read the 0700 ca/ folder).
user {_owner(home.root)}

# Global: durability, limits, logs.
persistence true
persistence_location {b / 'data'}/
autosave_interval 60
check_retain_source true
max_packet_size {home.max_packet_size}
max_queued_messages 1000000
max_queued_bytes 0
# Small MQTT packets go out at once (Nagle off): a chunked TUF fetch took 0.3 s -> 0.014 s.
set_tcp_nodelay true
log_dest file {home.broker_log}
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
log_timestamp_format %Y-%m-%dT%H:%M:%S

listener {home.port} {home.host}
protocol mqtt
allow_anonymous false
# TLS 1.2 or 1.3; the server certificate is from the server CA, devices pin that CA.
tls_version tlsv1.2
certfile {home.server_cert}
keyfile {home.server_key}
# Clients must present a certificate from the device CA (and only that CA) not in the CRL.
cafile {home.device_ca_cert}
crlfile {home.crl}
require_certificate true
# The certificate CN is the username (for the ACL) and the client id (no session takeover).
use_identity_as_username true
use_username_as_clientid true
acl_file {home.acl_file}
"""


def _owner(path: Path) -> str:
    import pwd

    try:
        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (KeyError, OSError):
        return pwd.getpwuid(os.getuid()).pw_name


def write_config(home: HubHome) -> Path:
    """Regenerate broker/mosquitto.conf and broker/acl for home; returns the config path."""
    from .pki import write_file

    write_acl(home)
    return write_file(home.broker_conf, render_config(home).encode(), 0o644)


def write_acl(home: HubHome) -> Path:
    """Regenerate broker/acl from the registry's revocations."""
    from .pki import write_file

    return write_file(home.acl_file, render_acl(home.hub_id, home.revoked_ids()).encode(), 0o644)


def _pid_of(home: HubHome) -> int | None:
    """The pid in broker/mosquitto.pid if that process is alive and runs this home's config."""
    try:
        pid = int(home.broker_pid.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    if not cmdline or "mosquitto" not in Path(os.fsdecode(cmdline[0])).name \
            or os.fsencode(str(home.broker_conf)) not in cmdline:
        return None  # a stale pid file (the number may belong to another process now)
    return pid


def signal_reload(home: HubHome) -> bool:
    """SIGHUP the broker running home's config (if any); True when one was signalled."""
    pid = _pid_of(home)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    return True


def take_over(home: HubHome, certfile: Path, keyfile: Path, timeout: float = 5.0) -> bool:
    """Connect with a certificate (clean start, no Will), then disconnect; True on CONNACK 0.

    With the certificate of a CN that is connected now, this takes that session over: the
    broker closes the old connection and, because of the clean start, drops its
    subscriptions and queued messages (HubHome.revoke_device uses it on a revoked id).
    """
    import ssl
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(home.server_ca_cert))
    ctx.load_cert_chain(str(certfile), str(keyfile))
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv5,
                    reconnect_on_failure=False)
    c.tls_set_context(ctx)
    done = threading.Event()
    ok: list[bool] = []

    def on_connect(client: mqtt.Client, u: object, f: object, rc: object, p: object) -> None:
        ok.append(not getattr(rc, "is_failure", True))
        done.set()

    c.on_connect = on_connect
    try:
        c.connect(_dial(home.host), home.port, keepalive=10, clean_start=True)
    except OSError:
        return False
    c.loop_start()
    try:
        done.wait(timeout)
    finally:
        with contextlib.suppress(Exception):
            c.disconnect()
        c.loop_stop()
    return bool(ok and ok[0])


def _dial(host: str) -> str:
    """The address to connect to for a listen address (a wildcard means this machine)."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host


# --------------------------------------------------------------------------------------
# The process


class Broker:
    """mosquitto running a hub home's config, as a child process.

    - ``Broker(home).start(timeout=10)`` regenerates the config, starts mosquitto and waits
      until its listener accepts TCP connections (BrokerError with the log tail if it exits);
    - ``.reload()`` (SIGHUP), ``.stop()`` (SIGTERM, then SIGKILL after 10 s), ``.wait()``;
    - ``.running``, ``.pid``; a context manager stops it on exit.

    Args:
        home: the HubHome.
        config: run this config file instead of generating one (tests of broken configs).
        mosquitto: the binary (default ``find_mosquitto()``).
    """

    def __init__(self, home: HubHome, *, config: str | os.PathLike[str] | None = None,
                 mosquitto: str | os.PathLike[str] | None = None) -> None:
        self.home = home
        self.config = Path(config) if config is not None else None
        self.mosquitto = Path(mosquitto) if mosquitto is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = home.broker_dir / "mosquitto.out"  # stderr before the log file opens

    @property
    def running(self) -> bool:
        """True while the mosquitto child is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The child's process id (None before start)."""
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 10.0) -> Broker:
        """Start mosquitto and wait until it listens; returns self.

        Raises:
            MissingToolError: mosquitto is not installed.
            BrokerError: it exited (bad config, port in use) or did not listen within timeout.
        """
        if self.running:
            return self
        exe = self.mosquitto or find_mosquitto()
        other = _pid_of(self.home) if self.config is None else None
        if other is not None:
            raise BrokerError(f"a broker for {self.home.root} already runs (pid {other}); "
                              "stop it first")
        conf = self.config or write_config(self.home)
        self.home.broker_data.mkdir(parents=True, exist_ok=True)
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen([str(exe), "-c", str(conf)], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # Ctrl-C goes to us, not it
        if self.config is None:
            from .pki import write_file

            write_file(self.home.broker_pid, f"{self.proc.pid}\n".encode(), 0o644)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with status {self.proc.returncode} at start "
                                  f"({conf}):\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    (_dial(self.home.host), self.home.port), timeout=0.5):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"mosquitto did not listen on {self.home.host}:{self.home.port} "
                                  f"within {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.02)

    def reload(self) -> None:
        """Send SIGHUP: mosquitto re-reads the ACL, CRL and certificates (for new TLS sessions)."""
        if not self.running or self.proc is None:
            raise BrokerError("the broker is not running")
        self.proc.send_signal(signal.SIGHUP)

    def wait(self) -> int:
        """Block until mosquitto exits; returns its exit status."""
        if self.proc is None:
            raise BrokerError("the broker was never started")
        return self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop mosquitto (SIGTERM; SIGKILL if it has not exited after timeout seconds)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.config is None:
            with contextlib.suppress(OSError):
                if self.home.broker_pid.read_text().split()[0] == str(self.proc.pid):
                    self.home.broker_pid.unlink()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of mosquitto's start-up output and log file."""
        text = []
        for p in (self.output, self.home.broker_log):
            with contextlib.suppress(OSError):
                text += p.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(text)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
