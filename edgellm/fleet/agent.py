# SPDX-License-Identifier: MIT
"""The device agent: tells the hub what this device runs and how it is used, over MQTT v5.

``edgellm agent --config device.toml`` runs it; in Python::

    agent = Agent(load_device_config("device.toml"))
    model.usage_hook = agent.usage.record       # the runtime counts every generate()
    agent.start()                               # connect (background reconnects), birth
    ...                                         # agent.report() runs every report_interval_s
    agent.stop()                                # death certificate, clean disconnect

Public API: ``Agent(cfg, *, adapter=None, updater=None)`` with ``start()``, ``stop()``,
``run(once=False)``, ``tick()`` (one turn of the update loop), ``report()`` (take usage into
the queue, then drain), ``drain(timeout)``, ``offer_example(text, rating=None)``,
``wait_connected(timeout)``, ``model_path()``, and the attributes ``usage`` (UsageRecorder),
``queue`` (ReportQueue), ``bd_seq``, ``stats`` (counters), ``updater`` (Updater or None),
``updates`` (DeviceUpdates or None).

What it does (docs/fleet.md, "The device agent"):

- TLS with the device certificate; the server certificate must chain to the CA file in the
  config (only that CA is trusted). Client id = the hub-issued pseudonym, nothing else
  identifying (no hostname, MAC, IP or serial) is ever sent.
- Each connection gets a new bdSeq (persisted); the Will is the retained death certificate
  with that bdSeq; on CONNACK a retained birth (board, node, version, adapter, runtime,
  hour) is published. ``rebirth`` on the cmd topic re-publishes the birth.
- Usage reports go through the crash-safe queue (queue.py) and leave in seq order at QoS 1;
  a report is removed only on PUBACK. One larger than the broker's Maximum Packet Size
  (CONNACK property, else protocol.MAX_MESSAGE_BYTES) is never sent: logged, discarded and
  counted in the next report's ``dropped``.
- Commands that are oversized, malformed, of another schema version or unknown are logged
  with the reason and ignored.
- clean_start=False with a Session Expiry Interval; reconnects back off from 1 s to 60 s.
- ``example`` messages (opt-in ``share_examples``) carry text redacted by privacy.redact and
  a random delete_tag.
- Updates (issue 6): when ``[model] models_dir`` holds a model, an ``Updater`` on it is booted
  at start (crash recovery, boot-loop guard) and the birth names its active model (node,
  version, adapter) plus ``attack``; when the TUF root (``[update] tuf_root``) is there too,
  ``offer`` commands go to a ``DeviceUpdates`` (fleet/device_updates.py), driven by ``tick()``
  every ``tick_s`` in ``run()``, which also pings systemd's watchdog (``WATCHDOG=1``, and after
  every chunk of a TUF transfer, so a long download inside one tick keeps it fed;
  ``READY=1`` after each CONNACK: edgellm._sdnotify).

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
import random
import secrets
import ssl
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .. import __version__
from .._sdnotify import notify
from ..errors import BrokerConnectError, UpdateError
from . import protocol
from .device_config import DeviceConfig
from .device_updates import DeviceUpdates
from .privacy import redact
from .queue import ReportQueue
from .updater import UpdatePolicy, Updater
from .usage import UsageRecorder

__all__ = ["Agent"]

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 24 * 3600
WINDOW = 200  # reports published before waiting for their PUBACKs
_PACKET_OVERHEAD = 64  # fixed header, topic length, packet id, properties of a PUBLISH


class Agent:
    """One device's fleet agent (see the module docstring)."""

    def __init__(self, cfg: DeviceConfig, *, adapter: str | None = None,
                 keepalive: int = 30, reconnect_max_s: int = 60,
                 updater: Updater | None = None, tick_s: float = 1.0,
                 fetch_timeout: float = 10.0) -> None:
        self.cfg = cfg
        self.adapter = adapter
        self.keepalive = keepalive
        self.tick_s = tick_s
        self.usage = UsageRecorder()
        self.queue = ReportQueue(cfg.state_dir, cfg.queue_max_bytes)
        self.stats: dict[str, int] = {"births": 0, "reports": 0, "acked": 0, "oversized": 0,
                                      "bad_commands": 0, "examples": 0, "connects": 0}
        self.max_packet = protocol.MAX_MESSAGE_BYTES
        self._lock = threading.RLock()  # report()/drain() against each other
        self._acked = threading.Condition()
        self._mids: dict[int, int | None] = {}  # paho mid -> seq (None: birth, example)
        self._early: dict[int, Any] = {}  # PUBACKs that arrived before _send recorded the mid
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._started = False
        self.bd_seq = self.queue.next_bd_seq()
        self._client = self._make_client(reconnect_max_s)
        self.updater = updater if updater is not None else self._make_updater()
        if self.updater is not None and self.updater.active is None:
            self.updater.boot()
        self.updates: DeviceUpdates | None = None
        if self.updater is not None and cfg.tuf_root is not None and cfg.tuf_root.is_file():
            self.updates = DeviceUpdates(cfg, self._client, cfg.device_id, updater=self.updater,
                                         fetch_timeout=fetch_timeout,
                                         on_change=self._rebirth,
                                         on_progress=self._keepalive)

    # -- the model store ------------------------------------------------------------------------
    def _make_updater(self) -> Updater | None:
        """An Updater on models_dir, booted, when the store holds a model; else None."""
        root = self.cfg.models_dir
        if root is None or not (root / "bundles").is_dir() or not any(
                (root / "bundles").iterdir()):
            return None
        policy = UpdatePolicy.from_config(self.cfg.window or None, idle_s=self.cfg.idle_s,
                                          utc_offset_s=time.localtime().tm_gmtoff)
        u = Updater(root, policy=policy)
        try:
            u.boot()
        except UpdateError as exc:
            log.error("no verified model in %s (%s): updates are off", root, exc)
            return None
        return u

    def model_path(self) -> Any:
        """The model to serve: the store's active model.gguf, else [model] path (or None)."""
        if self.updater is not None:
            return self.updater.model_path()
        return self.cfg.model_path

    # -- the MQTT client ------------------------------------------------------------------------
    def _make_client(self, reconnect_max_s: int) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.cfg.device_id,
                        protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.cfg.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.cfg.cert), str(self.cfg.key))
        c.tls_set_context(ctx)
        c.reconnect_delay_set(min_delay=1, max_delay=reconnect_max_s)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.enable_logger(log)
        self._set_will(c)
        return c

    def _topic(self, kind: str) -> str:
        return protocol.topic(self.cfg.device_id, kind)

    def _set_will(self, c: mqtt.Client) -> None:
        death = protocol.encode({"type": "death", "device": self.cfg.device_id,
                                 "bdSeq": self.bd_seq})
        c.will_set(self._topic("state"), death, qos=1, retain=True)

    def _serving(self) -> tuple[str, int, str | None]:
        """(node, version, adapter) of the model this device runs now: the updater's active
        model when there is one (it changes with every committed update), else the config's."""
        active = self.updater.active if self.updater is not None else None
        if active is not None:
            return active.node, active.version, active.adapter_sha256 or self.adapter
        return self.cfg.node or "none", self.cfg.version, self.adapter

    def _birth(self) -> bytes:
        node, version, adapter = self._serving()
        return protocol.encode({
            "type": "birth", "device": self.cfg.device_id, "bdSeq": self.bd_seq,
            "hour": protocol.current_hour(), "board": self.cfg.board,
            "node": node, "version": version, "adapter": adapter, "runtime": __version__,
            "attack": self.updates.attack if self.updates is not None else False})

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    props: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("broker refused the connection: %s", reason)
            return
        mps = getattr(props, "MaximumPacketSize", None) if props is not None else None
        self.max_packet = int(mps) if mps else protocol.MAX_MESSAGE_BYTES
        self.stats["connects"] += 1
        client.subscribe(self._topic("cmd"), qos=1)
        self._publish_birth()
        # what was in flight stays pinned: paho resends it on this connection (same mids)
        self._connected.set()
        notify("READY=1")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       props: Any = None) -> None:
        self._connected.clear()
        with self._acked:
            self._acked.notify_all()
        if not self._stopping.is_set():
            # the next connection is a new one: new bdSeq, new Will (set before paho reconnects)
            self.bd_seq = self.queue.next_bd_seq()
            self._set_will(client)
            log.info("disconnected (%s); reconnecting with bdSeq %d", reason, self.bd_seq)

    def _publish_birth(self) -> None:
        info = self._client.publish(self._topic("state"), self._birth(), qos=1, retain=True)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._track(info, None)
        self.stats["births"] += 1

    def _rebirth(self) -> None:
        """A new birth when what it says changed (the model, the attack flag): if connected;
        otherwise the next CONNACK publishes it anyway."""
        if self._connected.is_set():
            self._publish_birth()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    props: Any = None) -> None:
        with self._acked:
            if mid not in self._mids:  # a PUBACK can beat _track's bookkeeping: _track claims it
                self._early[mid] = reason
                return
            seq = self._mids.pop(mid)
        if seq is not None:
            self._acked_one(seq, reason)

    def _track(self, info: mqtt.MQTTMessageInfo, seq: int | None) -> None:
        """Remember what a QoS 1 publish was (seq, or None for births/examples)."""
        with self._acked:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._mids[info.mid] = seq
        if early is not None and seq is not None:
            self._acked_one(seq, early)

    def _acked_one(self, seq: int, reason: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("broker refused report seq %d (%s); it stays queued", seq, reason)
            self.queue.pinned.discard(seq)
        else:
            self.queue.ack(seq)
            self.stats["acked"] += 1
        with self._acked:
            self._acked.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._command(msg)
        except Exception as exc:  # never let a command stop the agent
            self.stats["bad_commands"] += 1
            log.warning("command on %s ignored: %s", msg.topic, exc)

    def _command(self, msg: mqtt.MQTTMessage) -> None:
        if msg.topic != self._topic("cmd"):
            raise protocol.ProtocolError(f"unexpected topic {msg.topic!r}")
        if len(msg.payload) > protocol.MAX_MESSAGE_BYTES:
            raise protocol.ProtocolError(f"{len(msg.payload)} bytes > "
                                         f"{protocol.MAX_MESSAGE_BYTES}")
        cmd = protocol.decode(bytes(msg.payload))
        if cmd["type"] == "rebirth":
            log.info("rebirth requested")
            self._publish_birth()
        elif cmd["type"] == "offer":
            if self.updates is None:
                raise protocol.ProtocolError("an offer, but updates are off on this device "
                                             "(no model store or no TUF root)")
            log.info("offer of rollout %s: %s", cmd["rollout"], sorted(cmd["targets"].values()))
            self.updates.offer(cmd)
        else:
            raise protocol.ProtocolError(f"unknown command {cmd['type']!r}")

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> Agent:
        """Connect (asynchronously: the network thread retries with back-off until stop).

        With timeout, wait that long for the CONNACK and raise BrokerConnectError without one.
        """
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.keepalive,
                                   clean_start=False, properties=props)
        self._client.loop_start()
        self._started = True
        if timeout is not None and not self._connected.wait(timeout):
            raise BrokerConnectError(f"agent: no CONNACK from {self.cfg.host}:{self.cfg.port} "
                                     f"in {timeout:g} s")
        return self

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the death certificate, disconnect cleanly, close the queue."""
        self._stopping.set()
        if self._started:
            if self._connected.is_set():
                death = protocol.encode({"type": "death", "device": self.cfg.device_id,
                                         "bdSeq": self.bd_seq})
                info = self._client.publish(self._topic("state"), death, qos=1, retain=True)
                try:
                    info.wait_for_publish(timeout)
                except (RuntimeError, ValueError):
                    pass
                self._client.disconnect()
            self._client.loop_stop()
            self._started = False
        self.queue.close()

    def kill(self) -> None:
        """Tests only: drop the connection without a DISCONNECT (the broker sends the Will)."""
        self._stopping.set()
        sock = self._client.socket()
        self._client.loop_stop()
        if sock is not None:
            sock.close()
        self._started = False
        self.queue.close()

    @staticmethod
    def _keepalive() -> None:
        """systemd's watchdog ping during a long transfer (every chunk): step() can take
        minutes, WatchdogSec is 300 s."""
        notify("WATCHDOG=1")

    def tick(self) -> dict[str, Any] | None:
        """One turn of the update loop: the pending offer, the Updater's poll, its reports;
        then a watchdog ping. Returns the Updater's report of this turn, if any."""
        report = None
        if self.updates is not None:
            try:
                report = self.updates.step()
            except Exception:  # an update bug must not stop the agent (or its reports)
                log.exception("update step failed")
        elif self.updater is not None:
            report = self.updater.poll()
        notify("WATCHDOG=1")
        return report

    def run(self, once: bool = False) -> None:
        """Tick every tick_s and report every report_interval_s until interrupted (once: one
        tick and one report, then stop)."""
        self.start()
        try:
            if once:
                self.wait_connected(30)
                self.tick()
                self.report(timeout=30)
                return
            next_at = time.monotonic() + self.cfg.report_interval_s
            while True:
                self.tick()
                wait = next_at - time.monotonic()
                if wait > 0:
                    time.sleep(min(wait, self.tick_s))
                    continue
                next_at += self.cfg.report_interval_s * random.uniform(0.95, 1.05)
                self.report()
        finally:
            self.stop()

    # -- reports --------------------------------------------------------------------------------
    def report(self, timeout: float = 10.0, *, hour: int | None = None) -> int:
        """Queue the usage since the last report, then drain the queue; returns its seq."""
        fields = self.usage.take(protocol.current_hour() if hour is None else hour)
        node, version, adapter = self._serving()
        fields.update(type="usage", device=self.cfg.device_id, node=node, version=version,
                      adapter=adapter)
        with self._lock:
            seq = self.queue.put(fields)
            self.stats["reports"] += 1
        if self._connected.is_set():
            self.drain(timeout)
        return seq

    def drain(self, timeout: float = 10.0) -> bool:
        """Send queued reports in seq order until the queue is empty (True) or timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._connected.is_set():
                with self._acked:
                    after = max(self.queue.pinned, default=-1)
                    room = WINDOW - len(self.queue.pinned)
                batch = self.queue.peek(room, after) if room > 0 else []
                if not batch and not self.queue.pinned:
                    return len(self.queue) == 0
                for seq, fields in batch:
                    self._send(seq, fields)
                with self._acked:
                    self._acked.wait_for(lambda: len(self.queue.pinned) < WINDOW // 2
                                         or not self._connected.is_set(),
                                         max(0.0, deadline - time.monotonic()))
                if time.monotonic() >= deadline:
                    return False
        return False

    def _send(self, seq: int, fields: dict[str, Any]) -> None:
        payload = protocol.encode({**fields, "seq": seq, "bdSeq": self.bd_seq})
        t = self._topic("usage")
        if len(payload) + len(t) + _PACKET_OVERHEAD > self.max_packet:
            log.error("report seq %d is %d bytes, over the broker's packet limit %d: dropped",
                      seq, len(payload), self.max_packet)
            self.stats["oversized"] += 1
            self.queue.discard(seq)
            return
        # paho calls on_publish holding its own lock, so publish() must not run under _acked
        self.queue.pinned.add(seq)
        info = self._client.publish(t, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.queue.pinned.discard(seq)
            return  # not connected: stays queued
        self._track(info, seq)

    # -- examples -------------------------------------------------------------------------------
    def offer_example(self, text: str, rating: int | None = None) -> bool:
        """Send one redacted example if share_examples is on and connected; True if sent."""
        if not self.cfg.share_examples or not self._connected.is_set():
            return False
        clean, _ = redact(text)
        clean = clean[:16 * 1024].strip()
        if not clean:
            return False
        msg: dict[str, Any] = {"type": "example", "device": self.cfg.device_id,
                               "hour": protocol.current_hour(), "node": self._serving()[0],
                               "text": clean, "delete_tag": secrets.token_hex(8)}
        if rating is not None:
            msg["rating"] = max(-1, min(1, int(rating)))
        info = self._client.publish(self._topic("examples"), protocol.encode(msg), qos=1)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._track(info, None)
        self.stats["examples"] += 1
        return True
