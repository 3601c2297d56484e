# SPDX-License-Identifier: MIT
"""A tuf-conformance client (CLIENT-CLI.md) whose every fetch goes over MQTT (SECURITY A1).

The public suite (theupdateframework/tuf-conformance) drives a client through three commands
and serves its simulated repositories over HTTP on loopback::

    python -m edgellm.fleet.conformance_client --metadata-dir DIR init ROOT.json
    python -m edgellm.fleet.conformance_client --metadata-dir DIR --metadata-url URL refresh
    python -m edgellm.fleet.conformance_client --metadata-dir DIR --metadata-url URL \\
        --target-name NAME [--target-name NAME ...] --target-base-url URL --target-dir DIR download

Exit status 0 on success, 1 on any failure. The client is the device's: python-tuf's ngclient
(``tuf_client.DurableUpdater``: every metadata write fsync'd) with ``tuf_mqtt.MqttFetcher``.
Its fetches reach the suite's HTTP server through a *bridge*, started once for the suite by
the first command and left running (``stop`` ends it; it also exits after ``--idle-exit``
seconds without a request):

- a loopback Mosquitto (plain TCP on 127.0.0.1, anonymous: the suite runs some clients under
  ``faketime``, which would move a TLS client's clock outside its certificates' validity; TLS
  and the ACLs are the fleet's tests), and
- an MQTT client answering the device's ``fetch`` requests with ``tuf_mqtt.TufResponder``
  over an ``HttpSource``: the first chunk of an object is one HTTP GET, the rest come from
  that answer, so the suite sees exactly one request per fetch.

A fetch request's ``path`` must fit the protocol's identifier (128 characters of
``A-Za-z0-9._/@+-``), which a suite URL does not; each command therefore registers its two
base URLs in the bridge folder (``bases/<key>``, key = the first 20 hex digits of the
URL's sha256) and asks for ``<key>/<the rest, with other bytes escaped as @XX>`` (a URL whose
rest is still too long, such as a target name prefixed with a sha512, is registered whole
and asked for as ``<key>/``). Only loopback HTTP URLs are registered or fetched.

Public API: ``main(argv) -> int``, ``Bridge`` (``ensure``, ``serve``, ``stop``),
``HttpSource``, ``BridgeFetcher``, ``encode_name`` / ``decode_name``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from tuf.api.exceptions import DownloadError

from .._fsutil import atomic_write
from ..errors import BrokerError, InvalidArgumentError
from . import protocol
from .broker import find_mosquitto
from .tuf_client import DurableUpdater, download
from .tuf_mqtt import MqttFetcher, TufResponder

__all__ = ["DEVICE_ID", "Bridge", "BridgeFetcher", "HttpSource", "decode_name", "encode_name",
           "main"]

log = logging.getLogger(__name__)

DEVICE_ID = "conformance"  # the device id the client's requests carry
IDLE_EXIT_S = 900.0  # a bridge nobody used for this long exits
_RAW = re.compile(r"[A-Za-z0-9._/-]")
_ESC = re.compile(r"@([0-9A-F]{2})")
_KEY = re.compile(r"[0-9a-f]{20}")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_CACHE = 64  # objects the bridge keeps for their later chunks
_PRELOAD = ("LD_PRELOAD", "DYLD_INSERT_LIBRARIES")  # how faketime gets into a process


def default_dir() -> Path:
    """$EDGELLM_CONFORMANCE_DIR, else <tmp>/edgellm-tuf-conformance-<uid>."""
    env = os.environ.get("EDGELLM_CONFORMANCE_DIR")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"edgellm-tuf-conformance-{os.getuid()}"


def encode_name(text: str) -> str:
    """text with every byte outside ``A-Za-z0-9._/-`` written as ``@XX`` (reversible)."""
    return "".join(ch if _RAW.fullmatch(ch) else "".join(f"@{b:02X}" for b in ch.encode())
                   for ch in text)


def decode_name(name: str) -> str:
    """The inverse of encode_name."""
    raw = bytearray()
    i = 0
    while i < len(name):
        m = _ESC.match(name, i)
        if m:
            raw.append(int(m.group(1), 16))
            i = m.end()
        else:
            raw += name[i].encode()
            i += 1
    return raw.decode("utf-8", errors="strict")


def _check_loopback(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in _LOOPBACK:
        raise InvalidArgumentError(f"{url!r}: the bridge fetches only http://127.0.0.1 URLs")
    return url


def _key(base: str) -> str:
    return hashlib.sha256(base.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------
# Hub side of the bridge


class HttpSource:
    """A TufRepo look-alike for TufResponder: ``read_range`` GETs the registered URL.

    Offset 0 is one HTTP GET (kept for the object's later chunks); a 4xx/5xx answer or a
    name that is not ``<registered key>/<escaped rest>`` reads as missing (a 404).
    """

    def __init__(self, bridge_dir: Path, *, timeout: float = 30.0) -> None:
        self.bridge_dir = bridge_dir
        self.timeout = timeout
        self.cache: OrderedDict[str, bytes] = OrderedDict()
        self.last_request = time.monotonic()
        self.requests = 0

    def url_of(self, name: str) -> str | None:
        key, slash, rest = name.partition("/")
        if not _KEY.fullmatch(key) or not slash:
            return None
        try:
            base = (self.bridge_dir / "bases" / key).read_text()
            return _check_loopback(base + decode_name(rest))
        except (OSError, UnicodeDecodeError, InvalidArgumentError):
            return None

    def _log(self, line: str) -> None:
        with contextlib.suppress(OSError), open(self.bridge_dir / "bridge.log", "a") as f:
            f.write(line + "\n")

    def read_range(self, name: str, offset: int, size: int) -> tuple[bytes, int] | None:
        self.last_request = time.monotonic()
        body = self.cache.get(name) if offset > 0 else None
        if body is None:
            url = self.url_of(name)
            if url is None:
                return None
            self.requests += 1
            try:
                with urllib.request.urlopen(url, timeout=self.timeout) as r:
                    body = bytes(r.read())
            except (urllib.error.URLError, OSError) as exc:
                self._log(f"GET {url} {getattr(exc, 'code', 'error')}")
                return None
            self._log(f"GET {url} 200 {len(body)}")
            self.cache[name] = body
            while len(self.cache) > _CACHE:
                self.cache.popitem(last=False)
        return body[offset:offset + size], len(body)


class Bridge:
    """The suite-wide loopback Mosquitto plus the HTTP bridge, in bridge_dir.

    - ``Bridge(dir).ensure()`` returns the broker port, starting ``serve`` in the background
      (a new session, faketime's variables removed) when none answers;
    - ``serve()`` runs both in the foreground until ``stop()`` or the idle timeout.
    """

    def __init__(self, bridge_dir: str | os.PathLike[str] | None = None, *,
                 idle_exit: float = IDLE_EXIT_S) -> None:
        self.dir = Path(bridge_dir) if bridge_dir is not None else default_dir()
        self.idle_exit = idle_exit
        self.state = self.dir / "bridge.json"

    # -- client side --------------------------------------------------------------------

    def running_port(self) -> int | None:
        """The port of a live bridge of this folder, or None."""
        try:
            info = json.loads(self.state.read_text())
            os.kill(int(info["pid"]), 0)
            with socket.create_connection(("127.0.0.1", int(info["port"])), timeout=1):
                return int(info["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def ensure(self, timeout: float = 20.0) -> int:
        """The broker port of a running bridge (started if needed)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            port = self.running_port()
            if port is not None:
                return port
            self.state.unlink(missing_ok=True)
            env = {k: v for k, v in os.environ.items()  # the bridge runs on the real clock
                   if not k.startswith("FAKETIME") and k not in _PRELOAD}
            here = str(Path(__file__).resolve().parents[2])  # this copy of edgellm, first
            env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
            with open(self.dir / "bridge.out", "ab") as out:
                subprocess.Popen(
                    [sys.executable, "-m", "edgellm.fleet.conformance_client",
                     "--bridge-dir", str(self.dir), "--idle-exit", str(self.idle_exit), "serve"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                port = self.running_port()
                if port is not None:
                    return port
                time.sleep(0.05)
        raise BrokerError(f"the conformance bridge did not start within {timeout:g} s; see "
                          f"{self.dir / 'bridge.out'}")

    def register(self, base: str) -> str:
        """Register a base URL; returns its key."""
        _check_loopback(base)
        key = _key(base)
        path = self.dir / "bases" / key
        if not path.is_file() or path.read_text() != base:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, base.encode())
        return key

    def stop(self) -> bool:
        """Stop a running bridge; True when one was signalled."""
        try:
            pid = int(json.loads(self.state.read_text())["pid"])
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return True

    # -- the bridge process -------------------------------------------------------------

    def serve(self) -> int:
        """Run the broker and the HTTP bridge until SIGTERM or idle_exit seconds idle."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        conf = self.dir / "mosquitto.conf"
        conf.write_text(f"# edgellm tuf-conformance bridge (loopback only)\n"
                        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        f"set_tcp_nodelay true\nlog_dest file {self.dir / 'mosquitto.log'}\n")
        broker = subprocess.Popen([str(find_mosquitto()), "-c", str(conf)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        client = None
        try:
            _wait_listening(port, broker)
            client = _connect(port, "edgellm-conformance-hub")
            source = HttpSource(self.dir)
            responder = TufResponder(source, client)
            responder.attach()
            atomic_write(self.state, json.dumps({"pid": os.getpid(), "port": port}).encode())
            log.info("bridge on 127.0.0.1:%d (folder %s)", port, self.dir)
            while not stop.wait(0.5):
                if broker.poll() is not None:
                    raise BrokerError(f"mosquitto exited ({broker.returncode})")
                if time.monotonic() - source.last_request > self.idle_exit:
                    break
        finally:
            if client is not None:
                client.disconnect()
                client.loop_stop()
            broker.terminate()
            broker.wait(10)
            with contextlib.suppress(OSError, ValueError, KeyError):
                if json.loads(self.state.read_text())["pid"] == os.getpid():
                    self.state.unlink()
        return 0


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"mosquitto exited with status {proc.returncode} at start")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.02)
    raise BrokerError(f"mosquitto did not listen on 127.0.0.1:{port} within {timeout:g} s")


def _connect(port: int, client_id: str, timeout: float = 10.0) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    deadline = time.monotonic() + timeout
    while not c.is_connected():
        if time.monotonic() > deadline:
            c.loop_stop()
            raise BrokerError(f"no CONNACK from 127.0.0.1:{port} within {timeout:g} s")
        time.sleep(0.005)
    return c


# --------------------------------------------------------------------------------------
# Device side


class BridgeFetcher(MqttFetcher):
    """An MqttFetcher for URLs under registered base URLs: path ``<key>/<escaped rest>``."""

    def __init__(self, client: mqtt.Client, bridge: Bridge, bases: dict[str, str],
                 **kw: Any) -> None:
        self.bridge = bridge
        self.bases = dict(sorted(bases.items(), key=lambda kv: -len(kv[0])))  # longest first
        super().__init__(client, DEVICE_ID, **kw)

    def object_path(self, url: str) -> str:
        for base, key in self.bases.items():
            if url.startswith(base):
                path = f"{key}/{encode_name(url[len(base):])}"
                if not self._fits(path):  # a long name (a sha512 prefix): the URL is a base
                    path = f"{self.bridge.register(url)}/"
                return path
        raise DownloadError(f"{url!r} is under no registered base URL")

    def _fits(self, path: str) -> bool:
        try:
            protocol.encode({"type": "fetch", "device": self.device_id, "path": path})
        except protocol.ProtocolError:
            return False
        return True


def _slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _updater(args: argparse.Namespace, bridge: Bridge) -> tuple[DurableUpdater, mqtt.Client]:
    if not args.metadata_url:
        raise InvalidArgumentError("--metadata-url is required")
    bases = {_slash(args.metadata_url): ""}
    if args.target_base_url:
        bases[_slash(args.target_base_url)] = ""
    port = bridge.ensure()
    for base in bases:
        bases[base] = bridge.register(base)
    client = _connect(port, f"conformance-{os.getpid()}")
    fetcher = BridgeFetcher(client, bridge, bases, timeout=args.timeout,
                            partial_dir=args.partial_dir)
    target_dir = args.target_dir
    if target_dir:
        Path(target_dir).mkdir(parents=True, exist_ok=True)
    up = DurableUpdater(args.metadata_dir, _slash(args.metadata_url), target_dir,
                        _slash(args.target_base_url) if args.target_base_url else None,
                        fetcher, bootstrap=None)
    return up, client


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edgellm.fleet.conformance_client",
        description="The edgellm device's TUF client (python-tuf ngclient over MQTT) behind "
                    "tuf-conformance's client CLI (CLIENT-CLI.md). Fetches go through a "
                    "loopback Mosquitto and a bridge to the suite's HTTP server, started on "
                    "first use.",
        epilog="examples:\n"
               "  %(prog)s --metadata-dir md init initial_root.json\n"
               "  %(prog)s --metadata-dir md --metadata-url http://127.0.0.1:8000/r/metadata "
               "refresh\n"
               "  %(prog)s --metadata-dir md --metadata-url http://127.0.0.1:8000/r/metadata \\\n"
               "      --target-name a.txt --target-base-url http://127.0.0.1:8000/r/targets "
               "--target-dir t download\n"
               "  %(prog)s stop          # end the bridge (it also exits when idle)\n"
               "the suite: pytest tuf_conformance --entrypoint /path/to/a/script/running/this",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metadata-dir", help="trusted metadata (root.json, timestamp.json, ...)")
    p.add_argument("--metadata-url", help="the repository's metadata base URL (loopback http)")
    p.add_argument("--target-name", action="append", default=[],
                   help="a target path to download (repeat: in order, one updater)")
    p.add_argument("--target-base-url", help="the repository's targets base URL")
    p.add_argument("--target-dir", help="where verified targets are stored")
    p.add_argument("--bridge-dir", type=Path, default=None,
                   help="the bridge's folder (default $EDGELLM_CONFORMANCE_DIR or "
                        "<tmp>/edgellm-tuf-conformance-<uid>)")
    p.add_argument("--partial-dir", default=None,
                   help="keep resumable target chunks here (default: none)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for an answer or a connection (default 10)")
    p.add_argument("--idle-exit", type=float, default=IDLE_EXIT_S,
                   help="a started bridge exits after this many idle seconds (default 900)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="store the trusted root (no request is made)")
    init.add_argument("trusted_root")
    sub.add_parser("refresh", help="update top-level metadata (TUF client workflow)")
    sub.add_parser("download", help="refresh, then download and verify each --target-name")
    sub.add_parser("serve", help="run the broker and the bridge in the foreground")
    sub.add_parser("stop", help="stop the bridge of --bridge-dir")
    return p


def run(args: argparse.Namespace) -> int:
    """One command; raises on failure."""
    bridge = Bridge(args.bridge_dir, idle_exit=args.idle_exit)
    if args.command == "serve":
        return bridge.serve()
    if args.command == "stop":
        return 0 if bridge.stop() else 1
    if not args.metadata_dir:
        raise InvalidArgumentError("--metadata-dir is required")
    if args.command == "init":
        Path(args.metadata_dir).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(args.metadata_dir) / "root.json",
                     Path(args.trusted_root).read_bytes())
        return 0
    up, client = _updater(args, bridge)
    try:
        up.refresh()
        if args.command == "download":
            if not args.target_name or not args.target_dir or not args.target_base_url:
                raise InvalidArgumentError("download needs --target-name, --target-dir and "
                                           "--target-base-url")
            for name in args.target_name:
                download(up, name, retries=0)
        return 0
    finally:
        client.disconnect()
        client.loop_stop()


def main(argv: Sequence[str] | None = None) -> int:
    """CLIENT-CLI.md entry point: exit status 0 on success, 1 on any failure."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose <= 1 else logging.INFO if args.verbose == 2 \
        else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except Exception as exc:  # the protocol: any failure is exit status 1
        print(f"edgellm conformance client: {type(exc).__name__}: {exc}", file=sys.stderr)
        if args.verbose:
            log.exception("failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
