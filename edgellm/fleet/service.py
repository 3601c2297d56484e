# SPDX-License-Identifier: MIT
"""The hub service: collects the fleet's births, deaths, usage and update reports from the
broker into the hub's SQLite file, serves TUF metadata and targets, and sends release offers
(`edgellm hub serve`).

Usage flow:

- ``svc = HubService(home)``; ``svc.run()`` blocks until ``svc.stop()`` (or SIGINT/SIGTERM
  when the CLI runs it); ``svc.start()`` runs it in a thread and waits for the broker's
  CONNACK and SUBACK; ``svc.stats`` counts what it received, stored and refused.
- It connects with the hub's client certificate (``HubHome.mqtt_tls_hub()``) over MQTT v5
  with a persistent session (``clean_start=False`` plus a Session Expiry Interval) and
  subscribes to ``protocol.HUB_SUBSCRIPTIONS`` at QoS 1.
- The network thread only queues messages. The service thread decodes each one
  (``protocol.decode``), checks the payload's ``device`` against the topic's (the broker's
  ACL makes the topic's id the authenticated one) and writes batches (every ``batch_interval``
  seconds or ``batch_max`` messages) in one transaction through ``store.FleetStore``. Only
  after the COMMIT does it send the PUBACKs (paho ``manual_ack``), so a hub crash loses
  nothing: the broker re-sends every unacknowledged message when the hub reconnects.
- A refused message is counted per (reason, device) in ``fleet_rejects``, logged (rate
  limited) and acknowledged; nothing a device sends stops the service. Reasons:
  REJECT_REASONS.
- Gaps in a device's ``seq`` stream that stay unfilled for ``reorder_timeout`` seconds become
  final and the device gets a ``rebirth`` command on its ``cmd`` topic.
- Releases (issue 6): the service answers devices' TUF ``fetch`` requests (``req`` topic,
  MQTT v5 response topic + correlation data) from the home's TUF repository with
  ``tuf_mqtt.TufResponder.handle`` on its own client, as soon as it dequeues them. ``update``
  reports (state topic) are stored once per id and move rollouts on (rollout.py: waves,
  halting); a few times a second it publishes the offers that are due (QoS 1, ``cmd``) and it
  re-sends a device's unanswered offers when that device's birth arrives. It also re-signs
  the TUF timestamp before it expires (release.keep_fresh).

.. versionadded:: 0.1
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..errors import BrokerConnectError, EdgeLLMError, StateError
from . import protocol, rollout, store
from .broker import _dial
from .protocol import ProtocolError

__all__ = ["REJECT_REASONS", "HubService", "classify"]

log = logging.getLogger("edgellm.fleet.service")

REJECT_REASONS = {
    "bad_topic": "the topic is not edgellm/v1/dev/<valid id>/<up kind>",
    "oversized": f"more than protocol.MAX_MESSAGE_BYTES ({protocol.MAX_MESSAGE_BYTES}) bytes",
    "not_json": "not a UTF-8 JSON object",
    "schema_version": "its 'v' is not the version this hub speaks",
    "wrong_type": "a message type the topic does not carry (or none)",
    "unknown_key": "a key the schema does not allow",
    "missing_key": "a required key is missing",
    "bad_value": "a value of the wrong type or out of range",
    "invalid": "refused by protocol.decode for another reason",
    "device_mismatch": "the payload's device is not the sender's (the topic's) id",
    "unhandled": "a request the hub has no handler for (no TUF repository in the home)",
    "internal": "storing it failed (a hub bug; the message is dropped, the service goes on)",
}

# protocol.decode's reasons, from the start of its ProtocolError messages (most specific first)
_DECODE_REASONS = (
    ("message of ", "oversized"), ("not a UTF-8 JSON", "not_json"),
    ("not a JSON object", "not_json"), ("schema version", "schema_version"),
    ("type ", "wrong_type"), ("unknown message type", "wrong_type"),
)
_SCHEMA_REASONS = (("unknown key", "unknown_key"), ("missing key", "missing_key"),
                   ("bad value", "bad_value"))
_EXPECT = {"usage": "usage", "examples": "example", "state": None}


def classify(exc: ProtocolError) -> str:
    """The reject reason (a REJECT_REASONS key) of a ProtocolError from protocol.decode."""
    text = str(exc)
    for prefix, reason in _DECODE_REASONS:
        if text.startswith(prefix):
            return reason
    for part, reason in _SCHEMA_REASONS:
        if f": {part}" in text:
            return reason
    return "invalid"


class _Refused(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class _Item:
    topic: str
    payload: bytes
    mid: int
    qos: int
    gen: int  # the connection it arrived on: a PUBACK only goes back on that one
    properties: Any = None  # MQTT v5 properties (a fetch's response topic, correlation data)
    answered: _Refused | str | None = None  # a request answered as it was dequeued


class HubService:
    """The hub's fleet service (see the module docstring for the flow).

    Args:
        home: a HubHome (edgellm/fleet/home.py) or the path of one.
        reorder_timeout: seconds a seq gap may wait for a late (reordered) report before it
            is final and the device is sent a rebirth command.
        batch_interval: most seconds a received message waits for its batch's COMMIT.
        batch_max: most messages in one transaction.
        receive_maximum: MQTT v5 Receive Maximum: unacknowledged messages the broker may
            send the hub at once (mosquitto's own default is 20, too few to batch).
        session_expiry: seconds the broker keeps the hub's session (subscriptions and queued
            messages) while the hub is away.
        db_path: the SQLite file (default: the home's registry.db).
        on_request: handles messages on devices' ``req`` topics, ``(device, payload) -> None``,
            in place of the TUF responder (tests); without either they are refused as
            "unhandled".
        offer_interval: seconds between looks for offers that are due (new rollouts, waves).
        serve_tuf: answer TUF fetch requests from the home's repository (when it has one).
    """

    def __init__(self, home: Any, *, reorder_timeout: float = 60.0,
                 batch_interval: float = 0.1, batch_max: int = 500,
                 receive_maximum: int = 2000, session_expiry: int = 7 * 24 * 3600,
                 keepalive: int = 30, db_path: str | os.PathLike[str] | None = None,
                 on_request: Callable[[str, bytes], None] | None = None,
                 offer_interval: float = 0.2, serve_tuf: bool = True) -> None:
        if not isinstance(home, _home_class()):
            home = _home_class().open(home)
        self.home = home
        self.reorder_timeout = float(reorder_timeout)
        self.batch_interval = float(batch_interval)
        self.batch_max = int(batch_max)
        self.receive_maximum = int(receive_maximum)
        self.session_expiry = int(session_expiry)
        self.keepalive = int(keepalive)
        self.db_path = Path(db_path) if db_path is not None else Path(home.registry_db)
        self.on_request = on_request
        self.offer_interval = float(offer_interval)
        self.serve_tuf = serve_tuf
        self.responder: Any = None  # tuf_mqtt.TufResponder once run() connected
        # committed messages; outcomes (stored, filled, duplicate, birth, death, stale_death,
        # example, request, update, refused); batches, rebirths and offers sent, connects
        self.stats: dict[str, int] = {"committed": 0, "stored": 0, "duplicate": 0,
                                      "refused": 0, "batches": 0, "rebirths": 0, "offers": 0,
                                      "connects": 0}
        self._births: set[str] = set()  # devices born in the batch being written
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._gen = 0
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._error: BaseException | None = None
        self._logged: dict[str, int] = {}
        self._next_log_at: dict[str, float] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> HubService:
        """Run the service in a thread; return once the broker granted its subscriptions.

        Raises:
            BrokerConnectError: no CONNACK and SUBACK within timeout (broker down, certificate
                refused).
            EdgeLLMError: what stopped run() first (StateError: another service holds the
                home; DatabaseError: the hub database).
        """
        if self._thread is not None:
            raise StateError("this HubService was already started")
        thread = threading.Thread(target=self._run_guarded, name="edgellm-hub-service",
                                  daemon=True)
        self._thread = thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not self._connected.wait(0.05):
            if not thread.is_alive() and self._error is not None:
                raise self._error
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerConnectError(
                    f"hub service: no CONNACK and SUBACK from {self.home.host}:"
                    f"{self.home.port} in {timeout:g} s")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Commit and acknowledge what was received, disconnect, and end run()."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wait_connected(self, timeout: float) -> bool:
        """True once the broker has granted the hub's subscriptions."""
        return self._connected.wait(timeout)

    def __enter__(self) -> HubService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run_guarded(self) -> None:
        try:
            self.run()
        except Exception as exc:  # re-raised by start(); the thread must not die silently
            self._error = exc
            log.error("hub service stopped: %s", exc, exc_info=not isinstance(exc, EdgeLLMError))

    def run(self) -> None:
        """Serve until stop(): connect, subscribe, ingest, commit, acknowledge."""
        lock = _lock(Path(self.home.hub_cert).parent / "serve.lock")
        conn = store.connect(self.db_path)
        try:
            fleet = store.FleetStore(conn)
            client = self._make_client()
            self._client = client
            self.responder = self._make_responder(client)
            client.connect_async(_dial(self.home.host), self.home.port, keepalive=self.keepalive,
                                 clean_start=False, properties=self._connect_properties())
            client.loop_start()
            try:
                self._serve(conn, fleet, client)
            finally:
                client.disconnect()
                client.loop_stop()
                log.info("stopped: %s", " ".join(f"{k}={v}" for k, v in self.stats.items()))
        finally:
            conn.close()
            lock.close()

    # -- MQTT ----------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.home.hub_id,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        client.tls_set(**self.home.mqtt_tls_hub())
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _make_responder(self, client: mqtt.Client) -> Any:
        if not self.serve_tuf or self.on_request is not None:
            return None
        from .tuf_mqtt import TufResponder
        from .tuf_repo import TufRepo

        if not (Path(self.home.root) / "tuf" / "metadata" / "1.root.json").is_file():
            log.warning("no TUF repository in %s: update fetch requests are refused",
                        self.home.root)
            return None
        return TufResponder(TufRepo.open(self.home), client)

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry  # with clean_start=False: persistent
        props.ReceiveMaximum = self.receive_maximum
        return props

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the hub: %s", reason)
            return
        self._gen += 1
        self.stats["connects"] += 1
        if self.responder is not None:
            from .tuf_mqtt import set_tcp_nodelay
            set_tcp_nodelay(client)  # request/response is latency-bound
        opts = SubscribeOptions(qos=1)
        client.subscribe([(t, opts) for t in protocol.HUB_SUBSCRIPTIONS])
        log.info("connected to %s:%s (session present: %s)", self.home.host, self.home.port,
                 flags.session_present)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        bad = [str(r) for r in reasons if r.is_failure]
        if bad:
            log.error("the broker refused the hub's subscriptions: %s", ", ".join(bad))
            return
        log.info("subscribed to %s", ", ".join(protocol.HUB_SUBSCRIPTIONS))
        self._connected.set()  # start() returns once messages can arrive

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        if not self._stop.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # network thread: queue only; the PUBACK waits for the COMMIT
        if log.isEnabledFor(logging.DEBUG):
            log.debug("received mid %d on %s (not yet committed)", msg.mid, msg.topic)
        self._queue.put(_Item(msg.topic, bytes(msg.payload), msg.mid, msg.qos, self._gen,
                              msg.properties))

    # -- the service loop ----------------------------------------------------------------------

    def _serve(self, conn: sqlite3.Connection, fleet: store.FleetStore,
               client: mqtt.Client) -> None:
        next_expiry = time.time() + min(1.0, self.reorder_timeout / 4)
        next_offers = 0.0
        next_fresh = 0.0
        while True:
            batch = self._collect()
            if batch:
                self._commit(conn, fleet, client, batch)
                next_offers = 0.0  # reports may have moved a rollout on: look now
            now = time.time()
            if now >= next_offers:
                self._offers(conn, client)
                next_offers = time.time() + self.offer_interval
            if now >= next_expiry:
                self._expire(conn, fleet, client)
                next_expiry = time.time() + min(1.0, self.reorder_timeout / 4)
            if now >= next_fresh and self.responder is not None:
                self._keep_fresh()
                next_fresh = time.time() + 600.0
            if self._stop.is_set():
                # commit what had arrived by now; later arrivals stay unacknowledged and the
                # broker re-sends them to the next run
                rest = []
                while True:
                    try:
                        rest.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                for i in range(0, len(rest), self.batch_max):
                    self._commit(conn, fleet, client, rest[i:i + self.batch_max])
                return

    def _collect(self) -> list[_Item]:
        try:
            first = self._queue.get(timeout=0.05)
        except queue.Empty:
            return []
        batch = [self._answer(first)]
        deadline = time.monotonic() + self.batch_interval
        while len(batch) < self.batch_max:
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.is_set():
                break
            try:
                batch.append(self._answer(self._queue.get(timeout=left)))
            except queue.Empty:
                break
        return batch

    def _answer(self, item: _Item) -> _Item:
        """Answer a request at once (a TUF fetch waits for no batch); it is acknowledged with
        its batch like any message."""
        try:
            kind = protocol.parse_topic(item.topic)[1]
        except ProtocolError:
            return item  # refused as bad_topic by _ingest
        if kind != "req":
            return item
        if self.on_request is not None:
            return item  # the caller's handler runs in _dispatch
        if self.responder is None:
            item.answered = _Refused("unhandled", "no TUF repository in this hub home")
        elif self.responder.handle(item.topic, item.payload, item.properties):
            item.answered = "request"
        else:
            item.answered = _Refused("invalid", "a fetch request the TUF responder refused "
                                                "(schema, device, response topic or correlation)")
        return item

    def _commit(self, conn: sqlite3.Connection, fleet: store.FleetStore, client: mqtt.Client,
                batch: list[_Item]) -> None:
        now = time.time()
        self._births.clear()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for item in batch:
                self._ingest(conn, fleet, item, now)
            conn.commit()
        except BaseException:
            conn.rollback()  # nothing is acknowledged: the broker re-sends it all
            raise
        self.stats["committed"] += len(batch)
        self.stats["batches"] += 1
        for item in batch:  # PUBACK in arrival order, and only on the connection it came on
            if item.qos > 0 and item.gen == self._gen:
                client.ack(item.mid, item.qos)
        for device in sorted(self._births):  # a device (re)connected: unanswered offers again
            self._send_offers(conn, client, rollout.resend_offers(conn, device))

    def _ingest(self, conn: sqlite3.Connection, fleet: store.FleetStore, item: _Item,
                now: float) -> None:
        device = None
        conn.execute("SAVEPOINT msg")
        try:
            try:
                device, kind = protocol.parse_topic(item.topic)
            except ProtocolError as exc:
                raise _Refused("bad_topic", str(exc)) from None
            outcome = self._dispatch(fleet, device, kind, item, now)
            self.stats[outcome] = self.stats.get(outcome, 0) + 1
        except _Refused as exc:
            conn.execute("ROLLBACK TO msg")
            self._refuse(fleet, exc.reason, device, str(exc), now)
        except Exception as exc:  # a bug must cost one message, not the service
            conn.execute("ROLLBACK TO msg")
            log.exception("storing a message from %s failed", device)
            self._refuse(fleet, "internal", device, f"{type(exc).__name__}: {exc}", now)
        conn.execute("RELEASE msg")

    def _dispatch(self, fleet: store.FleetStore, device: str, kind: str, item: _Item,
                  now: float) -> str:
        payload = item.payload
        if kind == "req":
            if isinstance(item.answered, _Refused):
                raise item.answered
            if item.answered is not None:
                return item.answered
            if self.on_request is None:
                raise _Refused("unhandled", "no request handler in this hub")
            self.on_request(device, payload)
            return "request"
        if kind not in _EXPECT:
            raise _Refused("bad_topic", f"the hub does not read {kind!r} topics")
        try:
            msg = protocol.decode(payload, expect=_EXPECT[kind])
        except ProtocolError as exc:
            raise _Refused(classify(exc), str(exc)) from None
        if msg.get("device", device) != device:  # an update report may leave it out
            raise _Refused("device_mismatch",
                           f"payload device {msg['device']!r} sent by {device!r}")
        if kind == "usage":
            return fleet.usage(device, msg, now)
        if kind == "examples":
            return fleet.example(device, msg, now)
        if msg["type"] == "birth":
            self._births.add(device)
            return fleet.birth(device, msg, now)
        if msg["type"] == "update":
            rid = rollout.match(fleet.conn, device, msg)
            outcome = fleet.update_report(device, msg, now, rid)
            if outcome == "update":
                what = rollout.on_report(fleet.conn, device, msg, rid, now)
                if what == "halt":
                    log.warning("rollout %s halted: %s", rid, rollout.status(
                        fleet.conn, int(rid or 0))["reason"])
                elif what:
                    log.info("rollout %s: %s", rid, "next wave" if what == "next" else what)
            return outcome
        if msg["type"] == "death":
            return fleet.death(device, msg, now)
        raise _Refused("wrong_type", f"type {msg['type']!r} on a state topic")

    def _refuse(self, fleet: store.FleetStore, reason: str, device: str | None, detail: str,
                now: float) -> None:
        self.stats["refused"] += 1
        fleet.reject(reason, device, detail, now)
        n = self._logged.get(reason, 0) + 1
        self._logged[reason] = n
        # the first 20 of each reason, then one line a minute: a flood cannot flood the log
        if n <= 20 or now >= self._next_log_at.get(reason, 0.0):
            if n > 20:
                self._next_log_at[reason] = now + 60.0
            log.warning("refused a message from %s (%s, %d so far): %s", device or "?", reason,
                        n, detail[:200])

    def _offers(self, conn: sqlite3.Connection, client: mqtt.Client) -> None:
        """Move rollouts on (wave timeouts) and publish the offers that are due."""
        now = time.time()
        with conn:
            for rid, what in rollout.tick(conn, now):
                log.info("rollout %d: %s", rid, what)
        due = rollout.due_offers(conn)
        if due:
            self._send_offers(conn, client, due)

    def _send_offers(self, conn: sqlite3.Connection, client: mqtt.Client,
                     offers: list[rollout.Offer]) -> None:
        if not offers:
            return
        for o in offers:  # published first: a crash before the UPDATE re-sends, never loses
            client.publish(protocol.topic(o.device, "cmd"),
                           protocol.encode(rollout.offer_message(o)), qos=1)
        with conn:
            rollout.mark_offered(conn, offers, time.time())
        self.stats["offers"] += len(offers)
        log.info("sent %d offer(s)", len(offers))

    def _keep_fresh(self) -> None:
        from .release import keep_fresh
        try:
            if keep_fresh(self.home) is None:  # a `hub release` is writing: next look
                log.info("TUF repository busy (a release is being published); re-signing "
                         "at the next look")
        except EdgeLLMError as exc:  # the next look (10 minutes) tries again
            log.error("could not re-sign the TUF timestamp: %s", exc)

    def _expire(self, conn: sqlite3.Connection, fleet: store.FleetStore,
                client: mqtt.Client) -> None:
        with conn:
            devices = fleet.expire_gaps(time.time(), self.reorder_timeout)
        for device in devices:
            log.info("%s: a seq gap outlived the reorder timeout; sending rebirth", device)
            client.publish(protocol.topic(device, "cmd"), protocol.encode({"type": "rebirth"}),
                           qos=1)
            self.stats["rebirths"] += 1


def _home_class() -> Any:
    from .home import HubHome  # the PKI engineer's module; imported late to keep this light
    return HubHome


class _Lock:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def _lock(path: Path) -> _Lock:
    """One hub service per home: a second would take over the first's MQTT session."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateError(f"another hub service is running for this home ({path} is locked)") \
            from None
    return _Lock(fd)
