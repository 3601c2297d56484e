# SPDX-License-Identifier: MIT
"""The device agent: tells the hub what this device runs and how it is used, over MQTT v5.

``edgellm agent --config device.toml`` runs it; in Python::

    agent = Agent(load_device_config("device.toml"))
    model.usage_hook = agent.usage.record       # the runtime counts every generate()
    agent.start()                               # connect (background reconnects), birth
    ...                                         # agent.report() runs every report_interval_s
    agent.stop()                                # death certificate, clean disconnect

Public API: ``Agent(cfg, *, adapter=None)`` with ``start()``, ``stop()``, ``run(once=False)``,
``report()`` (take usage into the queue, then drain), ``drain(timeout)``, ``offer_example(text,
rating=None)``, ``wait_connected(timeout)``, and the attributes ``usage`` (UsageRecorder),
``queue`` (ReportQueue), ``bd_seq``, ``stats`` (counters).

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
from ..errors import BrokerConnectError
from . import protocol
from .device_config import DeviceConfig
from .privacy import redact
from .queue import ReportQueue
from .usage import UsageRecorder

__all__ = ["Agent"]

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 24 * 3600
WINDOW = 200  # reports published before waiting for their PUBACKs
_PACKET_OVERHEAD = 64  # fixed header, topic length, packet id, properties of a PUBLISH


class Agent:
    """One device's fleet agent (see the module docstring)."""

    def __init__(self, cfg: DeviceConfig, *, adapter: str | None = None,
                 keepalive: int = 30, reconnect_max_s: int = 60) -> None:
        self.cfg = cfg
        self.adapter = adapter
        self.keepalive = keepalive
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

    def _birth(self) -> bytes:
        return protocol.encode({
            "type": "birth", "device": self.cfg.device_id, "bdSeq": self.bd_seq,
            "hour": protocol.current_hour(), "board": self.cfg.board,
            "node": self.cfg.node or "none", "version": self.cfg.version,
            "adapter": self.adapter, "runtime": __version__})

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

    def run(self, once: bool = False) -> None:
        """Report every report_interval_s until interrupted (once: one report, then stop)."""
        self.start()
        try:
            if once:
                self.wait_connected(30)
                self.report(timeout=30)
                return
            next_at = time.monotonic() + self.cfg.report_interval_s
            while True:
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at += self.cfg.report_interval_s * random.uniform(0.95, 1.05)
                self.report()
        finally:
            self.stop()

    # -- reports --------------------------------------------------------------------------------
    def report(self, timeout: float = 10.0, *, hour: int | None = None) -> int:
        """Queue the usage since the last report, then drain the queue; returns its seq."""
        fields = self.usage.take(protocol.current_hour() if hour is None else hour)
        fields.update(type="usage", device=self.cfg.device_id, node=self.cfg.node or "none",
                      version=self.cfg.version, adapter=self.adapter)
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
                               "hour": protocol.current_hour(), "node": self.cfg.node or "none",
                               "text": clean, "delete_tag": secrets.token_hex(8)}
        if rating is not None:
            msg["rating"] = max(-1, min(1, int(rating)))
        info = self._client.publish(self._topic("examples"), protocol.encode(msg), qos=1)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._track(info, None)
        self.stats["examples"] += 1
        return True
