# SPDX-License-Identifier: MIT
"""Fleet test fixtures: a hub home, a real mosquitto on a free loopback port, TLS clients.

Usage (tests/ is on sys.path)::

    from support.fleet import make_home, running_broker, device_client, hub_client
    home = make_home(tmp_path, n_devices=3)            # devices dev-000, dev-001, dev-002
    with running_broker(home):
        hub = hub_client(home)                          # connected (CONNACK seen), loop running
        dev = device_client(home, "dev-000")
        ...
        close(dev, hub)

``connect(home, certfile, keyfile)`` is the low-level form: it returns the client and the
CONNACK reason code, or ``None`` when the broker closed the connection with no CONNACK (what a
refused certificate looks like under TLS 1.3). ``Inbox`` records delivered messages;
``wait_until(cond, timeout)`` polls a condition.
Every client speaks MQTT v5 unless told otherwise.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edgellm.errors import BrokerConnectError
from edgellm.fleet.broker import Broker
from edgellm.fleet.home import HubHome

__all__ = ["Inbox", "close", "connect", "device_client", "free_port", "hub_client",
           "make_home", "running_broker", "wait_until"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(cond: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll cond every 0.02 s until it is true or timeout seconds passed; its last answer."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


def make_home(tmp_path: Path, n_devices: int = 0, port: int | None = None,
              board: str = "rpi5", tuf: bool = False) -> HubHome:
    """`hub init` in tmp_path/hub on a free loopback port, plus devices dev-000, dev-001, ...

    tuf: also create the TUF repository (as `hub init` does); off by default so a test can
    call TufRepo.init itself with the keys it needs.
    """
    home = HubHome.init(tmp_path / "hub", host="127.0.0.1", port=port or free_port(), tuf=tuf)
    for i in range(n_devices):
        home.add_device(f"dev-{i:03d}", board=board, node="en/medical")
    return home


@contextlib.contextmanager
def running_broker(home: HubHome, timeout: float = 10.0) -> Iterator[Broker]:
    """mosquitto with home's generated config, stopped on exit."""
    broker = Broker(home)
    broker.start(timeout)
    try:
        yield broker
    finally:
        broker.stop()


class Inbox:
    """Thread-safe record of the messages a client received (set as its on_message)."""

    def __init__(self) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()

    def __call__(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def topics(self) -> list[str]:
        with self._cond:
            return [m.topic for m in self.messages]

    def wait_for(self, n: int, timeout: float = 5.0) -> bool:
        """Wait until at least n messages arrived; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.messages) >= n, timeout)


def connect(home: HubHome, certfile: str | Path, keyfile: str | Path, *,
            client_id: str = "", protocol: int = mqtt.MQTTv5, timeout: float = 5.0,
            ca_certs: str | Path | None = None, tls_context: ssl.SSLContext | None = None,
            clean_start: bool = True, properties: Any = None,
            will: tuple[str, bytes, int, bool] | None = None,
            ) -> tuple[mqtt.Client, ReasonCode | int | None]:
    """Connect with a client certificate; returns (client, CONNACK reason) or (client, None).

    None means no CONNACK came: the TLS handshake failed or the broker closed the
    connection (with TLS 1.3 a refused client certificate shows up only here). The client's
    network loop is running when a CONNACK arrived; otherwise it is stopped. will is
    (topic, payload, qos, retain) for the Will message.
    """
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                    reconnect_on_failure=False)
    if tls_context is None:
        tls_context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                                 cafile=str(ca_certs or home.server_ca_cert))
        tls_context.load_cert_chain(str(certfile), str(keyfile))
    c.tls_set_context(tls_context)
    if will is not None:
        c.will_set(*will)
    done = threading.Event()
    result: list[ReasonCode | int | None] = []

    def on_connect(client: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        result.append(rc)
        done.set()

    def on_disconnect(client: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        done.set()

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    host = "127.0.0.1" if home.host in ("0.0.0.0", "") else home.host
    kw: dict[str, Any] = {"clean_start": clean_start, "properties": properties} \
        if protocol == mqtt.MQTTv5 else {}
    try:
        c.connect(host, home.port, keepalive=30, **kw)
    except (OSError, ssl.SSLError):
        return c, None
    c.loop_start()
    done.wait(timeout)
    if not result:
        c.loop_stop()
        with contextlib.suppress(Exception):
            c.disconnect()
        return c, None
    rc = result[0]
    if getattr(rc, "is_failure", False) or (isinstance(rc, int) and rc != 0):
        c.loop_stop()
    return c, rc


def _connected(home: HubHome, what: str, certfile: Path, keyfile: Path, **kw: Any) -> mqtt.Client:
    c, rc = connect(home, certfile, keyfile, **kw)
    if rc is None or getattr(rc, "is_failure", False) or (isinstance(rc, int) and rc != 0):
        raise BrokerConnectError(f"{what}: broker {home.host}:{home.port} refused ({rc})")
    return c


def device_client(home: HubHome, device_id: str, *, client_id: str | None = None,
                  protocol: int = mqtt.MQTTv5, **kw: Any) -> mqtt.Client:
    """A client connected with device_id's certificate (CONNACK success seen, loop running).

    client_id defaults to the device id (the broker replaces it with the certificate's CN
    anyway). Extra keywords go to ``connect`` (clean_start, properties, will, timeout).
    """
    d = home.device_dir(device_id)
    return _connected(home, device_id, d / "device.crt", d / "device.key",
                      client_id=device_id if client_id is None else client_id,
                      protocol=protocol, **kw)


def hub_client(home: HubHome, **kw: Any) -> mqtt.Client:
    """A client connected with the hub service's certificate (CN=hub).

    The broker makes the CN the client id, so a second hub client takes the first one's
    session over (it is disconnected): one hub connection per broker at a time.
    """
    kw.setdefault("client_id", home.hub_id)
    return _connected(home, "hub", home.hub_cert, home.hub_key, **kw)


def close(*clients: mqtt.Client) -> None:
    """Disconnect clients and stop their network loops (errors ignored)."""
    for c in clients:
        with contextlib.suppress(Exception):
            c.disconnect()
    for c in clients:
        with contextlib.suppress(Exception):
            c.loop_stop()
