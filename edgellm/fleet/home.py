# SPDX-License-Identifier: MIT
"""The hub home: one folder with the hub's CAs, broker config, registry and device bundles.

Usage:

- ``home = HubHome.init("hub")`` (``edgellm hub init hub``) makes the folder below once;
- ``home.add_device(None, board="rpi5")`` issues a device certificate and writes the
  provisioning bundle ``devices/<id>/`` (device.toml, device.crt, device.key, server-ca.crt,
  provisioned-root.json once the TUF repository exists: edgellm.fleet.tuf_repo);
- ``home.revoke_device(id)`` adds the certificate to the CRL, denies the id in the ACL and
  reloads a running broker (SIGHUP), which takes effect within a second;
- ``HubHome.open("hub")`` for everything later; ``broker.Broker(home)`` runs mosquitto.

Layout (docs/fleet.md)::

    hub.toml                  [broker] host, port, public_host, max_packet_size; [hub] id
    registry.db               SQLite: component "pki" (certificates issued, revocations)
    ca/device-ca.crt, .key    issues device client certs and the hub's (CN=hub), nothing else
    ca/server-ca.crt, .key    issues the broker's server cert; devices pin it
    ca/crl.pem                the device CA's CRL (mosquitto crlfile)
    ca/issued/<cn>.crt        the newest certificate issued to each CN
    broker/                   mosquitto.conf, acl, server.crt, server.key, data/, mosquitto.log
    hub/hub.crt, hub.key      the hub service's client identity
    keys/                     root/ targets/ snapshot/ timestamp/: update signing keys (issue 6)
    devices/<id>/             the provisioning bundle copied onto the device

The registry is the source of truth for what was issued and revoked; the CRL, the ACL and the
broker config are regenerated from it and hub.toml, so they can be rebuilt at any time.

.. versionadded:: 0.1
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

from cryptography.x509.oid import NameOID

from ..errors import HubHomeError, InvalidArgumentError, UnknownDeviceError
from . import pki
from .protocol import check_device_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10: tomli is the same parser
    import tomli as tomllib

__all__ = ["HUB_ID", "KEY_ROLES", "MIGRATIONS", "HubHome", "new_device_id"]

PathLike = Union[str, "os.PathLike[str]"]
HUB_ID = "hub"  # the hub service's certificate CN (reserved: device ids may not start with "hub")
KEY_ROLES = ("root", "targets", "snapshot", "timestamp")  # TUF roles, for issue 6
DEFAULT_MAX_PACKET = 256 * 1024  # > protocol.MAX_MESSAGE_BYTES plus topic and properties

MIGRATIONS = [
    # version 1: every certificate the device CA issued (and the server cert), by serial.
    """
    CREATE TABLE pki_certs (
        serial TEXT PRIMARY KEY,        -- hex
        cn TEXT NOT NULL,               -- device id, or "hub"
        kind TEXT NOT NULL CHECK (kind IN ('device', 'hub', 'kick')),  -- kick: one-use, revoke
        board TEXT, node TEXT,
        issued_at TEXT NOT NULL,        -- ISO 8601 UTC
        expires_at TEXT NOT NULL,
        revoked_at TEXT                 -- NULL while valid
    );
    CREATE INDEX pki_certs_cn ON pki_certs (cn);
    """,
]

_HUB_TOML = """\
# edgellm hub home (docs/fleet.md). Edit, then restart `edgellm hub broker`.
[broker]
host = {host}              # address mosquitto listens on (TLS only)
port = {port}
public_host = {public_host}  # the name devices dial; in the server certificate and device.toml
max_packet_size = {max_packet_size}  # bytes; the broker drops a client sending more

[hub]
id = {hub_id}                # CN of the hub service's client certificate
"""


def new_device_id() -> str:
    """A fresh pseudonymous device id: "d-" and 12 base-32 characters (60 random bits)."""
    return "d-" + base64.b32encode(os.urandom(8)).decode().lower()[:12]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class HubHome:
    """A hub home folder (see the module docstring); ``init`` creates one, ``open`` loads one."""

    def __init__(self, path: PathLike) -> None:
        self.root = Path(path).resolve()
        self.config: dict[str, Any] = {}
        self.device_ca_cert = self.root / "ca" / "device-ca.crt"
        self.device_ca_key = self.root / "ca" / "device-ca.key"
        self.server_ca_cert = self.root / "ca" / "server-ca.crt"
        self.server_ca_key = self.root / "ca" / "server-ca.key"
        self.crl = self.root / "ca" / "crl.pem"
        self.issued_dir = self.root / "ca" / "issued"
        self.broker_dir = self.root / "broker"
        self.broker_conf = self.broker_dir / "mosquitto.conf"
        self.acl_file = self.broker_dir / "acl"
        self.server_cert = self.broker_dir / "server.crt"
        self.server_key = self.broker_dir / "server.key"
        self.broker_data = self.broker_dir / "data"
        self.broker_log = self.broker_dir / "mosquitto.log"
        self.broker_pid = self.broker_dir / "mosquitto.pid"
        self.hub_cert = self.root / "hub" / "hub.crt"
        self.hub_key = self.root / "hub" / "hub.key"
        self.keys_dir = self.root / "keys"
        self.registry_db = self.root / "registry.db"
        self.toml = self.root / "hub.toml"

    # ---------------------------------------------------------------- config values
    @property
    def host(self) -> str:
        """The address the broker listens on."""
        return str(self.config.get("broker", {}).get("host", "127.0.0.1"))

    @property
    def port(self) -> int:
        """The broker's TLS port."""
        return int(self.config.get("broker", {}).get("port", 8883))

    @property
    def public_host(self) -> str:
        """The broker's name as devices dial it (defaults to host)."""
        return str(self.config.get("broker", {}).get("public_host") or self.host)

    @property
    def max_packet_size(self) -> int:
        """The broker's Maximum Packet Size in bytes."""
        return int(self.config.get("broker", {}).get("max_packet_size", DEFAULT_MAX_PACKET))

    @property
    def hub_id(self) -> str:
        """CN of the hub service's certificate (its MQTT username and client id)."""
        return str(self.config.get("hub", {}).get("id", HUB_ID))

    def device_dir(self, device_id: str) -> Path:
        """The provisioning folder of device_id (devices/<id>/)."""
        return self.root / "devices" / check_device_id(device_id)

    def __repr__(self) -> str:
        return f"HubHome({str(self.root)!r})"

    # ---------------------------------------------------------------- create / open
    @classmethod
    def init(cls, path: PathLike, *, host: str = "127.0.0.1", port: int = 8883,
             public_host: str | None = None, max_packet_size: int = DEFAULT_MAX_PACKET,
             ca_days: int = 3650, server_days: int = 825, force: bool = False,
             tuf: bool = True, root_keys: int = 1, root_threshold: int = 1) -> HubHome:
        """Create a hub home at path (`edgellm hub init`): CAs, broker files, registry, layout.

        Args:
            path: the folder; it may exist but must not hold a hub home unless force.
            host: the address mosquitto listens on (0.0.0.0 for every interface).
            port: the TLS port (8883 is MQTT over TLS).
            public_host: the name or address devices connect to (default host; required when
                host is a wildcard address). It goes into the server certificate's SAN.
            max_packet_size: the broker's MQTT Maximum Packet Size in bytes.
            ca_days, server_days: validity of the two CAs and of the broker's certificate.
            force: replace an existing home (new CAs: every device must be re-provisioned).
            tuf: also create the TUF repository (tuf/, keys/: edgellm.fleet.tuf_repo), so
                every provisioning bundle gets provisioned-root.json, the device's trust
                anchor for updates.
            root_keys, root_threshold: TUF root keys to make and how many must sign a root
                (e.g. 3 and 2: keep them on separate offline media).

        Raises:
            HubHomeError: path already holds a hub home and force is false (nothing changes).
            InvalidArgumentError: a wildcard host with no public_host, a bad port or size.
        """
        home = cls(path)
        if home.toml.exists() or home.device_ca_key.exists():
            if not force:
                raise HubHomeError(f"{home.root} already holds a hub home; use --force to replace "
                                   "it (new CAs: every device must be provisioned again)")
            for sub in ("ca", "broker", "hub", "devices", "tuf", "keys"):
                shutil.rmtree(home.root / sub, ignore_errors=True)
            for f in (home.toml, home.registry_db):
                for g in (f, Path(f"{f}-wal"), Path(f"{f}-shm")):
                    g.unlink(missing_ok=True)
        if host in ("0.0.0.0", "::") and not public_host:
            raise InvalidArgumentError(f"host {host} listens everywhere: give --public-host, the "
                                       "name devices dial (it goes into the server certificate)")
        if not 0 < port < 65536:
            raise InvalidArgumentError(f"port {port} is not a TCP port")
        if max_packet_size < 1024:
            raise InvalidArgumentError(f"max_packet_size {max_packet_size} is too small (>= 1024)")
        if not 1 <= root_threshold <= root_keys:
            raise InvalidArgumentError(f"{root_keys} root keys, threshold {root_threshold}: use "
                                       "1 <= threshold <= keys")
        for d in (home.issued_dir, home.broker_data, home.hub_cert.parent,
                  home.root / "devices", *(home.keys_dir / r for r in KEY_ROLES)):
            d.mkdir(parents=True, exist_ok=True)
        for d in (home.root / "ca", home.keys_dir, *(home.keys_dir / r for r in KEY_ROLES),
                  home.hub_cert.parent, home.root / "devices"):
            os.chmod(d, 0o700)  # private keys live here
        # CAs first, then what they sign.
        dca_key, dca = pki.make_ca("edgellm device CA", ca_days)
        sca_key, sca = pki.make_ca("edgellm server CA", ca_days)
        pki.write_key(home.device_ca_key, dca_key)
        pki.write_pem(home.device_ca_cert, dca)
        pki.write_key(home.server_ca_key, sca_key)
        pki.write_pem(home.server_ca_cert, sca)
        skey, scert = pki.issue_server(sca_key, sca, public_host or host, server_days,
                                       extra_hosts=[host])
        pki.write_key(home.server_key, skey)
        pki.write_pem(home.server_cert, scert)
        text = _HUB_TOML.format(host=json.dumps(host), port=port,
                                public_host=json.dumps(public_host or host),
                                max_packet_size=max_packet_size, hub_id=json.dumps(HUB_ID))
        pki.write_file(home.toml, text.encode(), 0o644)
        home.config = tomllib.loads(text)
        with home._db() as conn:
            hkey, hcert = pki.issue_client(dca_key, dca, HUB_ID, ca_days)
            pki.write_key(home.hub_key, hkey)
            pki.write_pem(home.hub_cert, hcert)
            home._record(conn, hcert, "hub", None, None)
        home.write_revocations()
        from .broker import write_config

        write_config(home)
        if tuf:
            from .tuf_repo import TufRepo

            TufRepo.init(home, keys={"root": root_keys}, thresholds={"root": root_threshold})
        return home

    @classmethod
    def open(cls, path: PathLike) -> HubHome:
        """Load an existing hub home; HubHomeError names the first missing piece."""
        home = cls(path)
        if not home.root.is_dir():
            raise HubHomeError(f"no hub home at {home.root}; create one with `edgellm hub init "
                               f"{path}`")
        for p in (home.toml, home.device_ca_cert, home.device_ca_key, home.server_ca_cert,
                  home.server_cert, home.server_key, home.hub_cert, home.hub_key,
                  home.registry_db, home.crl):
            if not p.is_file():
                raise HubHomeError(f"{home.root} is not a complete hub home: {p} is missing")
        try:
            home.config = tomllib.loads(home.toml.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise HubHomeError(f"{home.toml}: {exc}") from exc
        return home

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """One transaction on the registry (committed on success), then the file is closed."""
        from ..hub import db

        conn = db.connect(self.registry_db, {"pki": MIGRATIONS})
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    @staticmethod
    def _record(conn: sqlite3.Connection, cert: Any, kind: str, board: str | None,
                node: str | None) -> None:
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        conn.execute("INSERT INTO pki_certs (serial, cn, kind, board, node, issued_at, expires_at) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (format(cert.serial_number, "x"), cn, kind, board, node, _iso(_now()),
                      _iso(cert.not_valid_after_utc)))

    # ---------------------------------------------------------------- devices
    def add_device(self, device_id: str | None, *, board: str, node: str | None = None,
                   version: int | None = None, days: int = 825) -> Path:
        """Issue a device certificate and write its provisioning bundle; returns the folder.

        Args:
            device_id: the id (protocol.check_device_id rules), or None for a fresh pseudonym.
            board: the board profile name (e.g. rpi5), written into device.toml.
            node: the model node the device serves (e.g. en/medical/cardiology).
            version: that node's version (default 1).
            days: certificate validity.

        Raises:
            ProtocolError: an invalid or reserved id.
            HubHomeError: the id was issued before (ids are never reused, even after revocation).
        """
        device_id = check_device_id(device_id if device_id is not None else new_device_id())
        if days <= 0:
            raise InvalidArgumentError(f"days={days}: a certificate must be valid for >= 1 day")
        with self._db() as conn:
            if conn.execute("SELECT 1 FROM pki_certs WHERE cn = ?", (device_id,)).fetchone():
                raise HubHomeError(f"device {device_id} was issued before; ids are never reused "
                                   "(revoke it and add a new one)")
            key, cert = pki.issue_client(pki.load_key(self.device_ca_key),
                                         pki.load_cert(self.device_ca_cert), device_id, days)
            out = self.device_dir(device_id)
            pki.write_key(out / "device.key", key)
            pki.write_pem(out / "device.crt", cert)
            pki.write_pem(self.issued_dir / f"{device_id}.crt", cert)
            shutil.copyfile(self.server_ca_cert, out / "server-ca.crt")
            roots = sorted((self.root / "tuf" / "metadata").glob("*.root.json"),
                           key=lambda p: int(p.name.split(".")[0]))
            if roots:  # the device's TUF trust anchor (edgellm.fleet.tuf_client)
                shutil.copyfile(roots[-1], out / "provisioned-root.json")
            _write_device_toml(out / "device.toml", device_id=device_id, board=board,
                               host=self.public_host, port=self.port, node=node or "",
                               version=1 if version is None else version)
            self._record(conn, cert, "device", board, node)
        return out

    def revoke_device(self, device_id: str, *, kick: bool = True) -> bool:
        """Revoke every certificate of device_id: CRL + ACL deny + reload a running broker.

        From the reload on (well under a second) the CRL refuses new connections and the ACL,
        which mosquitto re-checks on every delivery, denies the id every publish and every
        message, also on durable subscriptions of a connection open now. mosquitto 2.0.11
        keeps that connection open on reload, so with kick (the default) the hub then takes
        its session over with a one-use certificate for the same CN (clean start): the broker
        closes the old connection and drops its subscriptions and queued messages. The
        one-use certificate's key never leaves a temporary folder and the certificate is
        revoked right after (docs/fleet.md).

        Returns:
            True when a running broker was reloaded (False: none runs; the files take effect
            when it starts).

        Raises:
            UnknownDeviceError: no certificate was issued to device_id, or it is revoked already.
        """
        with self._db() as conn:
            cur = conn.execute("UPDATE pki_certs SET revoked_at = ? WHERE cn = ? AND kind = "
                               "'device' AND revoked_at IS NULL", (_iso(_now()), device_id))
            if cur.rowcount == 0:
                known = conn.execute("SELECT 1 FROM pki_certs WHERE cn = ? AND kind = 'device'",
                                     (device_id,)).fetchone()
                raise UnknownDeviceError(f"device {device_id!r} is already revoked" if known else
                                         f"no device {device_id!r} in {self.root} (see `edgellm "
                                         "hub devices`)")
        self.write_revocations()
        from .broker import signal_reload, take_over

        if not signal_reload(self):
            return False
        if kick:
            with tempfile.TemporaryDirectory(prefix="edgellm-kick-") as tmp:
                key, cert = pki.issue_client(pki.load_key(self.device_ca_key),
                                             pki.load_cert(self.device_ca_cert), device_id,
                                             days=10 / 1440)  # ten minutes
                with self._db() as conn:
                    self._record(conn, cert, "kick", None, None)
                pki.write_key(Path(tmp) / "k.key", key)
                pki.write_pem(Path(tmp) / "k.crt", cert)
                try:
                    take_over(self, Path(tmp) / "k.crt", Path(tmp) / "k.key")
                finally:
                    with self._db() as conn:
                        conn.execute("UPDATE pki_certs SET revoked_at = ? WHERE serial = ?",
                                     (_iso(_now()), format(cert.serial_number, "x")))
                    self.write_revocations()
                    signal_reload(self)
        return True

    def devices(self) -> list[dict[str, Any]]:
        """Every device certificate issued: id, board, node, serial, issued, expires, revoked."""
        with self._db() as conn:
            rows = conn.execute("SELECT cn, board, node, serial, issued_at, expires_at, revoked_at "
                                "FROM pki_certs WHERE kind = 'device' ORDER BY rowid")
            return [{"id": r[0], "board": r[1], "node": r[2], "serial": r[3], "issued": r[4],
                     "expires": r[5], "revoked": r[6]} for r in rows]

    def revoked_ids(self) -> list[str]:
        """Ids of revoked devices (the ACL denies each of them everything)."""
        with self._db() as conn:
            return [r[0] for r in conn.execute(
                "SELECT DISTINCT cn FROM pki_certs WHERE revoked_at IS NOT NULL ORDER BY cn")]

    def write_revocations(self) -> None:
        """Rewrite ca/crl.pem and broker/acl from the registry (atomic replaces)."""
        with self._db() as conn:
            revoked = [(int(r[0], 16), dt.datetime.strptime(r[1], "%Y-%m-%dT%H:%M:%SZ")
                        .replace(tzinfo=dt.timezone.utc)) for r in conn.execute(
                "SELECT serial, revoked_at FROM pki_certs WHERE revoked_at IS NOT NULL")]
        crl = pki.make_crl(pki.load_key(self.device_ca_key), pki.load_cert(self.device_ca_cert),
                           revoked)
        pki.write_pem(self.crl, crl)
        from .broker import write_acl

        write_acl(self)

    def mqtt_tls_hub(self) -> dict[str, str]:
        """Keyword arguments for paho's ``tls_set`` as the hub service (pins the server CA)."""
        return {"ca_certs": str(self.server_ca_cert), "certfile": str(self.hub_cert),
                "keyfile": str(self.hub_key)}

    def mqtt_tls_device(self, device_id: str) -> dict[str, str]:
        """``tls_set`` keyword arguments for device_id, from its provisioning bundle."""
        d = self.device_dir(device_id)
        return {"ca_certs": str(d / "server-ca.crt"), "certfile": str(d / "device.crt"),
                "keyfile": str(d / "device.key")}


def _write_device_toml(path: Path, *, device_id: str, board: str, host: str, port: int,
                       node: str, version: int) -> None:
    """device.toml through the agent's device_config (one writer of that format)."""
    from .device_config import DeviceConfig, write_device_config

    d = path.parent
    write_device_config(path, DeviceConfig(
        device_id=device_id, board=board, host=host, port=port, ca=d / "server-ca.crt",
        cert=d / "device.crt", key=d / "device.key", model_path=None, node=node,
        version=version, state_dir=d / "state", report_interval_s=60.0,
        queue_max_bytes=50_000_000, share_examples=False))
