# SPDX-License-Identifier: MIT
"""The hub's PKI and broker against a real mosquitto (SECURITY D1-D4, D8; docs/fleet.md).

Every test starts mosquitto on a free loopback port with the config `edgellm hub init`
generates and counts what is DELIVERED (mosquitto grants forbidden subscriptions and filters
at delivery), what PUBACK reason codes come back (0x87 = not authorised, MQTT v5 QoS 1) and
whether a CONNACK arrives at all (a refused certificate under TLS 1.3 shows as none).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from support.fleet import (
    Inbox,
    close,
    connect,
    device_client,
    hub_client,
    make_home,
    running_broker,
)

from edgellm.cli import main
from edgellm.errors import BrokerError, HubHomeError, MissingToolError, UnknownDeviceError
from edgellm.fleet import pki
from edgellm.fleet.broker import Broker, find_mosquitto
from edgellm.fleet.home import HubHome
from edgellm.fleet.protocol import HUB_SUBSCRIPTIONS, ProtocolError, topic

N_DEVICES = 10
NOT_AUTHORISED = 0x87
KINDS = ("usage", "state", "req", "examples", "cmd", "resp/x")  # a device's topic classes
WILDCARDS = ("#", "+", "$SYS/#", "edgellm/v1/#", "edgellm/v1/dev/+/+", "edgellm/v1/dev/+/resp/+")
REVOKE_LIMIT_S = 5.0  # SECURITY D4


def t(device: str, kind: str) -> str:
    """topic() with "resp/x" spelled as one kind."""
    return topic(device, *kind.split("/"))


def ids(n: int = N_DEVICES) -> list[str]:
    return [f"dev-{i:03d}" for i in range(n)]


class Acks:
    """PUBACK reason codes by message id (set as on_publish)."""

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.lock = threading.Lock()

    def __call__(self, c: mqtt.Client, u: Any, mid: int, rc: Any, props: Any) -> None:
        with self.lock:
            self.codes[mid] = int(rc.value)


def wait_until(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def durable() -> Properties:
    p = Properties(PacketTypes.CONNECT)
    p.SessionExpiryInterval = 3600
    return p


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    t0 = time.perf_counter()
    home = make_home(tmp_path_factory.mktemp("fleet"), N_DEVICES)
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    with running_broker(home) as broker:
        print(f"\n[fleet] hub init + {N_DEVICES} devices {made:.2f} s; broker start "
              f"{time.perf_counter() - t0:.3f} s")
        yield home, broker


# --------------------------------------------------------------------------------------
# D1: isolation


def test_isolation_matrix_zero_leaks(fleet: Any) -> None:
    home, _ = fleet
    devs = ids()
    t0 = time.perf_counter()
    hub = hub_client(home)
    hub_in = Inbox()
    hub.on_message = hub_in
    hub_acks = Acks()
    hub.on_publish = hub_acks
    hub.subscribe("edgellm/v1/#", qos=1)
    clients, inbox, acks = {}, {}, {}
    for a in devs:
        c = device_client(home, a)
        clients[a], inbox[a], acks[a] = c, Inbox(), Acks()
        c.on_message, c.on_publish = inbox[a], acks[a]
        # A subscribes to every other device's topics of every class, and to the wildcards.
        filters = [(t(b, k), 1) for b in devs if b != a for k in KINDS]
        filters += [(w, 1) for w in WILDCARDS]
        c.subscribe(filters)
    # Barrier and positive control: each device gets the hub's message on its own cmd topic.
    for a in devs:
        hub.publish(t(a, "cmd"), b"sync", qos=1)
    assert all(inbox[a].wait_for(1, 10) for a in devs), "a device never got its own cmd"

    # Attacks: A publishes (QoS 1) into every class of every other B, into its own down
    # topics, and into $SYS.
    attack: dict[str, dict[int, str]] = {a: {} for a in devs}
    for a in devs:
        targets = [t(b, k) for b in devs if b != a for k in KINDS]
        targets += [t(a, "cmd"), t(a, "resp/x"), "$SYS/broker/edgellm"]
        for tp in targets:
            attack[a][clients[a].publish(tp, f"attack {a}".encode(), qos=1).mid] = tp
    # Legitimate traffic on each B's topics: B writes its up topics, the hub its down topics
    # and (as it may) every other class too.
    legit: dict[str, list[int]] = {b: [] for b in devs}
    for b in devs:
        for k in ("usage", "state", "req", "examples"):
            legit[b].append(clients[b].publish(t(b, k), f"legit {b}".encode(), qos=1).mid)
        for k in KINDS:
            hub.publish(t(b, k), b"legit hub", qos=1)
    n_attacks = sum(len(v) for v in attack.values())
    assert wait_until(lambda: all(len(acks[a].codes) >= len(attack[a]) + len(legit[a])
                                  for a in devs), 30), "PUBACKs missing"
    assert hub_in.wait_for(N_DEVICES * (1 + 4 + len(KINDS)), 10)  # sync + ups + hub's own
    time.sleep(0.5)  # stragglers: a leak would arrive by now
    elapsed = time.perf_counter() - t0

    refused = [(a, tp, acks[a].codes.get(mid)) for a in devs for mid, tp in attack[a].items()]
    allowed = [(tp, code) for a, tp, code in refused if code != NOT_AUTHORISED]
    assert allowed == [], f"publishes into others' topics were accepted: {allowed[:5]}"
    assert all(acks[b].codes[mid] < 0x80 for b in devs for mid in legit[b])
    leaks = []
    for a in devs:
        own = {t(a, "cmd"), t(a, "resp/x")}
        got = set(inbox[a].topics())
        leaks += [(a, x) for x in got - own]
        assert got == own, f"{a} got {sorted(got)}"  # its own down topics only, both seen
    assert leaks == []
    assert not [m for m in hub_in.messages if m.payload.startswith(b"attack")]
    n_reads = N_DEVICES * ((N_DEVICES - 1) * len(KINDS) + len(WILDCARDS))
    print(f"\n[isolation] {N_DEVICES} devices: {n_attacks} publish attempts all 0x87, "
          f"{n_reads} read filters, 0 leaks, {elapsed:.2f} s")
    close(hub, *clients.values())


HOSTILE_CNS = ("evil+", "+", "#", "a#b", "dev-000/resp", "dev-000/resp/x", "dev-000/cmd",
               "/dev-000", "dev-000/", "d\u00e9v-000", "a\x00b")


def test_hostile_common_names_fail_closed(fleet: Any, tmp_path: Path) -> None:
    """Certificates whose CN bypassed check_device_id reach nothing of another device."""
    home, _ = fleet
    ca_key, ca = pki.load_key(home.device_ca_key), pki.load_cert(home.device_ca_cert)
    for cn in ("dev-000/resp", "evil+", "hub-x", "A"):  # add_device refuses each
        with pytest.raises(ProtocolError):
            home.add_device(cn, board="rpi5")
    victim = device_client(home, "dev-000")
    v_in = Inbox()
    victim.on_message = v_in
    victim.subscribe([(t("dev-000", "cmd"), 1), ("edgellm/v1/dev/dev-000/resp/+", 1)])
    hub = hub_client(home)
    h_in = Inbox()
    hub.on_message = h_in
    hub.subscribe([(f, 1) for f in HUB_SUBSCRIPTIONS])
    hostiles: dict[str, tuple[mqtt.Client, Inbox, Acks, list[int]]] = {}
    refused = []
    for i, cn in enumerate(HOSTILE_CNS):
        key, cert = pki.issue_client(ca_key, ca, cn, 1)
        pki.write_key(tmp_path / f"{i}.key", key)
        pki.write_pem(tmp_path / f"{i}.crt", cert)
        c, rc = connect(home, tmp_path / f"{i}.crt", tmp_path / f"{i}.key")
        if rc is None or rc.is_failure:  # type: ignore[union-attr]
            refused.append(cn)
            continue
        inbox, acks = Inbox(), Acks()
        c.on_message, c.on_publish = inbox, acks
        c.subscribe([("#", 1), ("edgellm/v1/dev/dev-000/#", 1), ("edgellm/v1/#", 1)])
        mids = []
        # Its own pattern topics (where the CN allows a topic name) and the victim's.
        own = [] if any(ch in cn for ch in "+#") else \
            [f"edgellm/v1/dev/{cn}/{k}" for k in ("state", "usage", "req", "examples")]
        for tp in own + [t("dev-000", k) for k in KINDS] + \
                ["edgellm/v1/dev/dev-000/resp/state", "edgellm/v1/dev/dev-000/resp/cmd"]:
            mids.append(c.publish(tp, f"hostile {cn}".encode(), qos=1).mid)
        hostiles[cn] = (c, inbox, acks, mids)
    time.sleep(0.3)  # subscriptions in place
    for k in ("cmd", "resp/x", "resp/y"):
        hub.publish(t("dev-000", k), b"legit hub", qos=1)
    for k in ("state", "usage", "req", "examples"):
        victim.publish(t("dev-000", k), b"legit dev-000", qos=1)
    assert v_in.wait_for(3, 5) and h_in.wait_for(4, 5)
    assert wait_until(lambda: all(len(a.codes) == len(m) for _, _, a, m in hostiles.values()), 10)
    time.sleep(0.5)
    assert sorted(v_in.topics()) == sorted(t("dev-000", k) for k in ("cmd", "resp/x", "resp/y"))
    for cn, (_c, inbox, _a, _m) in hostiles.items():
        assert inbox.topics() == [], f"CN {cn!r} received {inbox.topics()}"
    # The hub's protocol subscriptions got the victim's messages, and from a hostile CN at
    # most its own namespace (whose id the hub service refuses: not a valid device id).
    for m in h_in.messages:
        if m.payload.startswith(b"hostile"):
            cn = m.payload.decode()[len("hostile "):]
            assert m.topic.split("/")[3] == cn, (cn, m.topic)
    assert "a\x00b" in refused  # NUL: mosquitto refuses the username at CONNECT
    print(f"\n[hostile CNs] {len(HOSTILE_CNS)} CNs; refused at CONNECT: {refused}; "
          f"connected ones reached nothing of dev-000")
    close(victim, hub, *(c for c, *_ in hostiles.values()))


# --------------------------------------------------------------------------------------
# D3, D8: identity


def test_client_id_takeover_is_refused(fleet: Any) -> None:
    home, _ = fleet
    victims, attackers = ids()[:5], ids()[5:]
    vin: dict[str, Inbox] = {}
    dropped: list[str] = []
    vc = {}
    for v in victims:
        c = device_client(home, v, clean_start=False, properties=durable())
        vin[v] = Inbox()
        c.on_message = vin[v]
        c.on_disconnect = lambda *a, v=v: dropped.append(v)
        c.subscribe(t(v, "cmd"), qos=1)
        vc[v] = c
    hub = hub_client(home)
    for v in victims:
        hub.publish(t(v, "cmd"), b"before", qos=1)
    assert all(vin[v].wait_for(1) for v in victims)
    pairs = 0
    for a in attackers:
        for v in victims:
            c = device_client(home, a, client_id=v, clean_start=False, properties=durable())
            ain = Inbox()
            c.on_message = ain
            c.subscribe(t(v, "cmd"), qos=1)  # even with the victim's client id: not its topics
            n = len(vin[v].messages)
            hub.publish(t(v, "cmd"), f"during {a}".encode(), qos=1)
            assert vin[v].wait_for(n + 1)
            close(c)
            assert ain.messages == []
            pairs += 1
    for v in victims:
        hub.publish(t(v, "cmd"), b"after", qos=1)
    assert all(vin[v].wait_for(2 + len(attackers)) for v in victims)
    time.sleep(0.2)
    assert dropped == [], f"victims disconnected: {dropped}"
    assert all(vc[v].is_connected() for v in victims)
    assert all(vin[v].messages[-1].payload == b"after" for v in victims)
    print(f"\n[takeover] {pairs} attacker/victim pairs: 0 takeovers, 0 disconnects")
    close(hub, *vc.values())


def _tls_context(home: HubHome, device: str, max_version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(home.server_ca_cert))
    d = home.device_dir(device)
    ctx.load_cert_chain(str(d / "device.crt"), str(d / "device.key"))
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer old versions at all
    with warnings.catch_warnings():  # TLSv1 and TLSv1_1 are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = max_version
    return ctx


def test_bad_certificates_and_old_tls_are_refused(fleet: Any, tmp_path: Path) -> None:
    home, _ = fleet
    ca_key, ca = pki.load_key(home.device_ca_key), pki.load_cert(home.device_ca_cert)
    # An expired certificate of a real device id, from the right CA.
    key, cert = pki.issue_client(ca_key, ca, "dev-001", 1, not_before=dt.datetime.now(
        dt.timezone.utc) - dt.timedelta(days=10))
    pki.write_key(tmp_path / "exp.key", key)
    pki.write_pem(tmp_path / "exp.crt", cert)
    # A valid certificate for the same id from a foreign CA (and one from the server CA).
    f_key, f_ca = pki.make_ca("foreign CA")
    key, cert = pki.issue_client(f_key, f_ca, "dev-001", 30)
    pki.write_key(tmp_path / "for.key", key)
    pki.write_pem(tmp_path / "for.crt", cert)
    key, cert = pki.issue_client(pki.load_key(home.server_ca_key),
                                 pki.load_cert(home.server_ca_cert), "dev-001", 30)
    pki.write_key(tmp_path / "srv.key", key)
    pki.write_pem(tmp_path / "srv.crt", cert)
    results = {}
    for name in ("exp", "for", "srv"):
        c, rc = connect(home, tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
        results[name] = rc
        close(c)
    no_cert = ssl.create_default_context(cafile=str(home.server_ca_cert))
    results["no certificate"] = connect(home, "", "", tls_context=no_cert)[1]
    log_before = home.broker_log.stat().st_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old_versions = (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
    for v in old_versions:
        results[v.name] = connect(home, "", "", tls_context=_tls_context(home, "dev-001", v))[1]
    assert results == dict.fromkeys(results), results  # no CONNACK for any

    def log() -> str:
        return home.broker_log.read_bytes()[log_before:].decode(errors="replace")

    # The broker saw each old-version hello and refused it (not this client giving up).
    assert wait_until(lambda: log().count("unsupported protocol") >= 2, 5), log()
    # Controls: the same client settings succeed with TLS 1.2 and the real certificate.
    ok, rc = connect(home, "", "", tls_context=_tls_context(home, "dev-001", ssl.TLSVersion.TLSv1_2))
    assert rc is not None and not rc.is_failure  # type: ignore[union-attr]
    close(ok)
    print(f"\n[refused] {sorted(results)}: no CONNACK for any")


# --------------------------------------------------------------------------------------
# D4: revocation on a running broker


def test_revocation_takes_effect_within_5s(tmp_path: Path) -> None:
    home = make_home(tmp_path, 3)
    with running_broker(home):
        hub = hub_client(home)
        hub_in = Inbox()
        hub.on_message = hub_in
        hub.subscribe([(f, 1) for f in HUB_SUBSCRIPTIONS])
        got: dict[str, list[float]] = {d: [] for d in ids(3)}
        drops: dict[str, list[float]] = {d: [] for d in ids(3)}
        clients, acks = {}, {}
        for d in ids(3):
            c = device_client(home, d, clean_start=False, properties=durable(),
                              will=(t(d, "state"), f"will {d}".encode(), 1, True))
            c.publish(t(d, "state"), f"birth {d}".encode(), qos=1, retain=True)
            c.on_message = lambda *a, d=d: got[d].append(time.monotonic())
            c.on_disconnect = lambda *a, d=d: drops[d].append(time.monotonic())
            acks[d] = Acks()
            c.on_publish = acks[d]
            c.subscribe([(t(d, "cmd"), 1), (f"edgellm/v1/dev/{d}/resp/+", 1), ("#", 1)])
            clients[d] = c
        stop = threading.Event()

        def feed() -> None:  # the hub keeps sending to every device, every 20 ms
            while not stop.is_set():
                for d in ids(3):
                    hub.publish(t(d, "cmd"), b"tick", qos=1)
                    hub.publish(t(d, "resp/x"), b"tick", qos=1)
                time.sleep(0.02)

        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            assert wait_until(lambda: all(len(got[d]) > 5 for d in ids(3)), 5)
            # dev-000: revoked without the kick: the connection stays, but gets nothing.
            t0 = time.monotonic()
            assert home.revoke_device("dev-000", kick=False) is True
            revoke_call = time.monotonic() - t0
            time.sleep(1.5)
            cut0 = (got["dev-000"][-1] - t0) if got["dev-000"] and got["dev-000"][-1] > t0 else 0.0
            n_then = len(got["dev-000"])
            mid = clients["dev-000"].publish(t("dev-000", "usage"), b"after", qos=1).mid
            # dev-001: revoked with the kick: disconnected, session dropped.
            t1 = time.monotonic()
            home.revoke_device("dev-001")
            assert wait_until(lambda: bool(drops["dev-001"]), REVOKE_LIMIT_S)
            kicked = drops["dev-001"][0] - t1
            time.sleep(REVOKE_LIMIT_S - 3.5)
            cut1 = max([x - t1 for x in got["dev-001"] if x > t1], default=0.0)
            n_other = len(got["dev-002"])
            time.sleep(0.5)
        finally:
            stop.set()
            feeder.join()
        assert cut0 <= REVOKE_LIMIT_S and cut1 <= REVOKE_LIMIT_S
        assert len(got["dev-000"]) == n_then, "dev-000 still receives after revocation"
        assert drops["dev-000"] == [] and clients["dev-000"].is_connected()  # 2.0.11: not cut
        assert wait_until(lambda: mid in acks["dev-000"].codes, 5)
        assert acks["dev-000"].codes[mid] == NOT_AUTHORISED
        assert len(got["dev-002"]) > n_other and drops["dev-002"] == []  # others unaffected
        assert not [m for m in hub_in.messages if m.payload == b"after"]
        # New connections with the revoked certificates are refused; the CRL lists both.
        for d in ("dev-000", "dev-001"):
            c, rc = connect(home, home.device_dir(d) / "device.crt",
                            home.device_dir(d) / "device.key")
            assert rc is None, (d, rc)
        crl = pki.load_crl(home.crl)
        for d in ("dev-000", "dev-001"):
            serial = pki.load_cert(home.device_dir(d) / "device.crt").serial_number
            assert crl.get_revoked_certificate_by_serial_number(serial) is not None
        assert [r["id"] for r in home.devices() if r["revoked"]] == ["dev-000", "dev-001"]
        with pytest.raises(UnknownDeviceError, match="already revoked"):
            home.revoke_device("dev-000")
        # Wills: dev-000 (revoked, still connected) and dev-002 drop without DISCONNECT; only
        # dev-002's Will is delivered (dev-001's connection was closed by the kick: none).
        for d in ("dev-000", "dev-002"):
            clients[d].loop_stop()
            clients[d].socket().close()  # type: ignore[union-attr]
        assert hub_in.wait_for(1 + 3, 5)  # births (3) + the control's Will
        time.sleep(0.5)
        wills = [m.payload for m in hub_in.messages if m.payload.startswith(b"will")]
        assert wills == [b"will dev-002"]
        # Retained births of revoked devices are not delivered (check_retain_source).
        close(hub)
        hub = hub_client(home)
        retained = Inbox()
        hub.on_message = retained
        hub.subscribe("edgellm/v1/dev/+/state", qos=1)
        assert retained.wait_for(1, 5)
        time.sleep(0.3)
        assert [m.payload for m in retained.messages] == [b"will dev-002"]
        close(hub, clients["dev-001"])
    print(f"\n[revocation] revoke call {revoke_call * 1e3:.0f} ms; last delivery after revoke: "
          f"{cut0 * 1e3:.0f} ms (no kick: connection kept, nothing delivered, publish 0x87), "
          f"{cut1 * 1e3:.0f} ms with kick (disconnected after {kicked * 1e3:.0f} ms)")


# --------------------------------------------------------------------------------------
# D2: broken broker configs fail closed


def _locked_out(home: HubHome) -> tuple[dict[str, int], list[str]]:
    """Connect a device and the hub, subscribe to everything, publish: (PUBACKs, deliveries)."""
    d, h = device_client(home, "dev-000"), hub_client(home)
    inbox, acks = Inbox(), Acks()
    for c in (d, h):
        c.on_message, c.on_publish = inbox, acks
        c.subscribe([("#", 1), ("edgellm/v1/#", 1)])
    time.sleep(0.2)
    m1 = d.publish(t("dev-000", "usage"), b"x", qos=1).mid
    m2 = h.publish(t("dev-000", "cmd"), b"y", qos=1).mid
    assert wait_until(lambda: len(acks.codes) >= 1 + (m1 != m2), 5)
    time.sleep(0.3)
    close(d, h)
    return {"device": acks.codes.get(m1, -1), "hub": acks.codes.get(m2, -1)}, inbox.topics()


def _plain_connack(home: HubHome, port: int) -> Any:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                    reconnect_on_failure=False)
    got: list[Any] = []
    c.on_connect = lambda *a: got.append(a[3])
    try:
        c.connect("127.0.0.1", port, 5)
    except OSError:
        return "connection refused"
    c.loop_start()
    time.sleep(0.7)
    c.loop_stop()
    return got[0] if got else None


def test_generated_config_has_one_tls_listener(fleet: Any) -> None:
    home, _ = fleet
    lines = [ln.split() for ln in home.broker_conf.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    keys = [ln[0] for ln in lines]
    assert keys.count("listener") == 1 and "port" not in keys and "bind_address" not in keys
    after = keys[keys.index("listener"):]
    for opt in ("allow_anonymous", "certfile", "keyfile", "cafile", "crlfile",
                "require_certificate", "use_identity_as_username", "use_username_as_clientid",
                "tls_version", "acl_file"):
        assert opt in after, opt
    conf = {ln[0]: ln[1:] for ln in lines}
    assert conf["allow_anonymous"] == ["false"] and conf["require_certificate"] == ["true"]
    assert conf["tls_version"] == ["tlsv1.2"] and conf["check_retain_source"] == ["true"]
    assert conf["max_packet_size"] == [str(home.max_packet_size)]
    assert _plain_connack(home, home.port) is None  # plain MQTT on the TLS port: nothing


@pytest.mark.parametrize("case", ["empty acl", "comments-only acl", "no listener line",
                                  "allow_anonymous missing"])
def test_broken_config_fails_closed(tmp_path: Path, case: str) -> None:
    home = make_home(tmp_path, 1)
    conf = home.broker_conf.read_text()
    bad = tmp_path / "bad.conf"
    if case in ("empty acl", "comments-only acl"):
        home.acl_file.write_text("" if case == "empty acl" else "# nothing\n#user hub\n")
        bad.write_text(conf)
        with Broker(home, config=bad):
            codes, delivered = _locked_out(home)
        assert codes == {"device": NOT_AUTHORISED, "hub": NOT_AUTHORISED}
        assert delivered == []
    elif case == "no listener line":
        bad.write_text(conf.replace(f"listener {home.port} {home.host}\n", ""))
        # mosquitto 2.0.11 then opens its default port 1883 on every interface, with the TLS
        # options applied; Broker sees no listener on the configured address and stops it.
        with pytest.raises(BrokerError, match="did not listen"):
            Broker(home, config=bad).start(timeout=2)
        b = Broker(home, config=bad)
        b.proc = subprocess.Popen([str(find_mosquitto()), "-c", str(bad)])
        try:
            assert wait_until(lambda: _plain_connack(home, 1883) != "connection refused", 5)
            assert _plain_connack(home, 1883) is None  # plain: no CONNACK
            no_cert = ssl.create_default_context(cafile=str(home.server_ca_cert))
            home.config["broker"]["port"] = 1883
            assert connect(home, "", "", tls_context=no_cert)[1] is None  # anonymous TLS: no
        finally:
            b.stop()
    else:
        bad.write_text(conf.replace("allow_anonymous false\n", ""))
        no_cert = ssl.create_default_context(cafile=str(home.server_ca_cert))
        with Broker(home, config=bad):
            assert connect(home, "", "", tls_context=no_cert)[1] is None
        # ...and without client certificates at all, the 2.0 default still refuses anonymous.
        bad.write_text(conf.replace("allow_anonymous false\n", "").replace(
            "require_certificate true\n", "").replace("use_identity_as_username true\n", ""))
        with Broker(home, config=bad):
            c, rc = connect(home, "", "", tls_context=no_cert)
            assert rc is not None and rc.value == NOT_AUTHORISED  # type: ignore[union-attr]
            close(c)


# --------------------------------------------------------------------------------------
# The hub home, certificates and CLI


def test_certificates_and_key_files(fleet: Any) -> None:
    home, _ = fleet
    dca, sca = pki.load_cert(home.device_ca_cert), pki.load_cert(home.server_ca_cert)
    dev = pki.load_cert(home.device_dir("dev-003") / "device.crt")
    assert dev.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-003"
    assert dev.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    dev.verify_directly_issued_by(dca)
    key = pki.load_key(home.device_dir("dev-003") / "device.key")
    assert isinstance(key.curve, ec.SECP256R1)
    srv = pki.load_cert(home.server_cert)
    srv.verify_directly_issued_by(sca)
    with pytest.raises(ValueError):
        srv.verify_directly_issued_by(dca)  # the device CA never signs the server
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    hub = pki.load_cert(home.hub_cert)
    assert hub.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hub"
    hub.verify_directly_issued_by(dca)
    pki.load_crl(home.crl).is_signature_valid(dca.public_key())  # type: ignore[arg-type]
    keys = [home.device_ca_key, home.server_ca_key, home.server_key, home.hub_key,
            home.device_dir("dev-003") / "device.key"]
    assert all(stat.S_IMODE(os.stat(k).st_mode) == 0o600 for k in keys)
    assert all((home.keys_dir / r).is_dir() for r in ("root", "targets", "snapshot", "timestamp"))
    from edgellm.fleet.device_config import load_device_config

    cfg = load_device_config(home.device_dir("dev-003") / "device.toml")
    assert (cfg.device_id, cfg.board, cfg.node, cfg.host, cfg.port) == \
        ("dev-003", "rpi5", "en/medical", "127.0.0.1", home.port)
    assert cfg.cert == home.device_dir("dev-003") / "device.crt"
    assert cfg.ca.read_bytes() == home.server_ca_cert.read_bytes()


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_init_add_revoke_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    home_dir = tmp_path / "hub"
    t0 = time.perf_counter()
    assert main(["hub", "init", str(home_dir), "--port", "18884"]) == 0
    t_init = time.perf_counter() - t0
    before = _tree_digest(home_dir)
    assert main(["hub", "init", str(home_dir)]) == 1  # twice: an error, nothing changes
    assert "already holds a hub home" in capsys.readouterr().err
    assert _tree_digest(home_dir) == before
    with pytest.raises(HubHomeError):
        HubHome.init(home_dir)
    t0 = time.perf_counter()
    assert main(["hub", "add-device", "dev-aa1", "--home", str(home_dir), "--board", "rpi5",
                 "--node", "en/medical"]) == 0
    t_add = time.perf_counter() - t0
    assert main(["hub", "add-device", "--home", str(home_dir), "--board", "rpi5"]) == 0
    with pytest.raises(ProtocolError):
        HubHome.open(home_dir).add_device("-ab", board="rpi5")
    for bad in ("hub", "hub-2", "a+b", "a/b", "A1b", "x", "dev-aa1", "d\u00e9v"):
        assert main(["hub", "add-device", bad, "--home", str(home_dir), "--board", "rpi5"]) == 1
        err = capsys.readouterr().err
        assert "error:" in err and ("hub" in err or "use 3-63" in err or "never reused" in err)
    assert main(["hub", "revoke-device", "nope", "--home", str(home_dir)]) == 1
    assert "no device 'nope'" in capsys.readouterr().err
    assert main(["hub", "revoke-device", "dev-aa1", "--home", str(home_dir)]) == 0
    assert "no broker runs now" in capsys.readouterr().out
    assert main(["hub", "devices", "--home", str(home_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and rows[0]["id"] == "dev-aa1" and rows[0]["revoked"]
    assert rows[1]["id"].startswith("d-") and len(rows[1]["id"]) == 14
    assert "user dev-aa1\ntopic deny #" in (home_dir / "broker" / "acl").read_text()
    # A missing mosquitto is a typed error with the install command.
    monkeypatch.setenv("EDGELLM_MOSQUITTO", str(tmp_path / "no-such-mosquitto"))
    assert main(["hub", "broker", "--home", str(home_dir)]) == 1
    assert "sudo apt install mosquitto" in capsys.readouterr().err
    with pytest.raises(MissingToolError, match="sudo apt install mosquitto"):
        Broker(HubHome.open(home_dir)).start()
    monkeypatch.delenv("EDGELLM_MOSQUITTO")
    with pytest.raises(MissingToolError, match="sudo apt install mosquitto"):
        find_mosquitto(search_path=str(tmp_path))
    assert find_mosquitto().name == "mosquitto"
    with pytest.raises(HubHomeError, match="hub init"):
        HubHome.open(tmp_path / "nowhere")
    print(f"\n[cli] hub init {t_init * 1e3:.0f} ms, add-device {t_add * 1e3:.0f} ms")


def test_cli_broker_runs_in_foreground_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    home = make_home(tmp_path, 1)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, "-m", "edgellm", "hub", "broker", "--home",
                          str(home.root)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", home.port), 0.2).close()
            except OSError:
                return False
            return home.broker_pid.exists()

        assert wait_until(listening, 20)
        dev = device_client(home, "dev-000")  # it serves the home's config
        close(dev)
        pid = int(home.broker_pid.read_text())
        with pytest.raises(BrokerError, match="already runs"):
            Broker(home).start()  # one broker per home
        p.send_signal(signal.SIGINT)
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
    assert not Path(f"/proc/{pid}").exists() and not home.broker_pid.exists()
    assert "Ctrl-C stops it" in (p.stderr.read() if p.stderr else "")
