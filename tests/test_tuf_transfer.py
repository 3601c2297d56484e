# SPDX-License-Identifier: MIT
"""Resumable TUF target transfers over MQTT (SECURITY C3, D6): broker kill -9 mid-transfer,
device power cuts, corrupt partial chunks, bounded retries; the conformance client's CLI.

Everything runs against a real mosquitto (TLS, ACLs) on loopback, a real TufRepo and the real
device Updater. Served bytes are counted at the hub, per (target, chunk offset).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import queue
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support.bundles import write_bundle_manifest
from support.fleet import close, make_home, running_broker
from support.random_gguf import Shape, write_random_gguf
from tuf.api import exceptions as tufx

from edgellm.errors import BrokerError
from edgellm.fleet import protocol
from edgellm.fleet.broker import Broker
from edgellm.fleet.home import HubHome
from edgellm.fleet.tuf_client import download, refresh, trusted_client
from edgellm.fleet.tuf_mqtt import CHUNK, MqttFetcher, TufResponder
from edgellm.fleet.tuf_repo import TufRepo
from edgellm.fleet.updater import Update, Updater
from edgellm.formats.bundle import Bundle

NODE = "en/medical"
BOARD = "rpi5"


# --------------------------------------------------------------------------------------
# MQTT clients that reconnect (support.fleet's clients do not: they test refusals)


def reconnecting_client(home: HubHome, certfile: Path, keyfile: Path, client_id: str,
                        timeout: float = 10.0) -> mqtt.Client:
    """A TLS MQTT v5 client whose network loop reconnects (0.05 s to 0.25 s back-off)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(home.server_ca_cert))
    ctx.load_cert_chain(str(certfile), str(keyfile))
    c.tls_set_context(ctx)
    c.reconnect_delay_set(0.05, 0.25)  # type: ignore[arg-type]  # floats work; the hint says int
    c.connect("127.0.0.1", home.port, keepalive=10)
    c.loop_start()
    deadline = time.monotonic() + timeout
    while not c.is_connected():
        assert time.monotonic() < deadline, f"{client_id} did not connect"
        time.sleep(0.01)
    return c


def restart(broker: Broker) -> list[str]:
    """Start the killed broker again on its port; returns the failed attempts' errors.

    A loaded machine may need longer than usual, and a client reconnecting while the port
    is free can briefly hold it (a TCP self-connect), so a failed start is tried again.
    """
    errors: list[str] = []
    for _ in range(20):
        try:
            broker.start(timeout=30)
            return errors
        except BrokerError as exc:
            errors.append(str(exc).splitlines()[0])
            time.sleep(0.2)
    raise BrokerError(f"the broker did not come back: {errors}")


def device_conn(home: HubHome, device_id: str) -> mqtt.Client:
    d = home.device_dir(device_id)
    return reconnecting_client(home, d / "device.crt", d / "device.key", device_id)


def cut(client: mqtt.Client) -> None:
    """The device loses power: its network loop stops and its socket dies (no DISCONNECT)."""
    client.loop_stop()
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


# --------------------------------------------------------------------------------------
# The hub: a TufRepo, a responder on a reconnecting client, a ledger of served chunks


class Hub:
    """The hub side of the tests: publishes releases, answers fetches, re-sends offers.

    ``served`` lists every chunk answered as (device, path, offset, nbytes, epoch), epoch
    being the number of broker kills so far; ``kill_at`` holds the counts of served target
    chunks at which ``on_kill`` is called (it kills the broker before the answer goes out).
    """

    def __init__(self, home: HubHome, repo: TufRepo) -> None:
        self.home = home
        self.repo = repo
        self.lock = threading.Lock()
        self.served: list[tuple[str, str, int, int, int]] = []
        self.epoch = 0
        self.target_chunks = 0
        self.kill_at: set[int] = set()
        self.on_kill: Any = None
        self.offers: dict[str, bytes] = {}  # device -> its pending offer, re-sent on reconnect
        self.client = reconnecting_client(home, home.hub_cert, home.hub_key, home.hub_id)
        self.client.on_connect = self._on_connect
        self.responder = TufResponder(repo, self.client, on_served=self._on_served)
        self.responder.attach()

    def _on_connect(self, *args: Any) -> None:
        with self.lock:
            pending = dict(self.offers)
        for device, msg in pending.items():
            self.client.publish(protocol.topic(device, "cmd"), msg, qos=1)

    def _on_served(self, device: str, path: str, offset: int, nbytes: int) -> None:
        with self.lock:
            self.served.append((device, path, offset, nbytes, self.epoch))
            if not path.startswith("targets/"):
                return
            self.target_chunks += 1
            kill = self.target_chunks in self.kill_at
        # on_kill returns False when the broker is down already (an answer to a request that
        # arrived before the cut): that is no new cut
        if kill and self.on_kill():
            with self.lock:
                self.epoch += 1

    def offer(self, device: str, version: int) -> None:
        """Offer release version to device (and again whenever the hub reconnects)."""
        msg = json.dumps({"type": "offer", "version": version,
                          "model": f"m.v{version}.gguf", "manifest": f"b.v{version}.json"}).encode()
        with self.lock:
            self.offers[device] = msg
        self.client.publish(protocol.topic(device, "cmd"), msg, qos=1)

    def release(self, bundle: Bundle) -> None:
        v = bundle.version
        sha = bundle.file("model.gguf").sha256
        common = {"node": NODE, "version": v, "release": v, "board": BOARD,
                  "model_sha256": sha}
        self.repo.add_target(bundle.folder / "model.gguf", {**common, "kind": "model"},
                             name=f"m.v{v}.gguf")
        self.repo.add_target(bundle.folder / "bundle.json", {**common, "kind": "manifest"},
                             name=f"b.v{v}.json")

    def duplicates(self, device: str) -> dict[int, int]:
        """Re-served target bytes per epoch for device (a chunk answered again)."""
        seen: set[tuple[str, int]] = set()
        dup: dict[int, int] = defaultdict(int)
        with self.lock:
            for dev, path, offset, nbytes, epoch in self.served:
                if dev != device or not path.startswith("targets/"):
                    continue
                if (path, offset) in seen:
                    dup[epoch] += nbytes
                seen.add((path, offset))
        return dict(dup)


def make_bundle(folder: Path, version: int, n_layers: int, dim: int, vocab: int) -> Bundle:
    """A bundle folder with a random q8_0 Llama GGUF of that shape (a real, parseable model)."""
    folder.mkdir(parents=True)
    shape = Shape(dim=dim, hidden_dim=2 * dim, n_layers=n_layers, n_heads=4, n_kv_heads=4,
                  vocab_size=vocab, seq_len=256)
    gguf = write_random_gguf(folder / "model.gguf", shape, "q8_0", seed=version)
    return write_bundle_manifest(folder, gguf, node=NODE, version=version, board="x86-host")


# --------------------------------------------------------------------------------------
# The device: offers in, TUF download (resumable), Updater.apply


class Device:
    """One device: its MQTT client, fetcher (partial store in its state folder), Updater."""

    def __init__(self, home: HubHome, device_id: str, first: Bundle) -> None:
        self.id = device_id
        self.state = home.device_dir(device_id)
        self.offers: queue.Queue[dict[str, Any]] = queue.Queue()
        self.client = device_conn(home, device_id)
        self.cmd = protocol.topic(device_id, "cmd")
        self.client.on_connect = self._on_connect
        self.client.message_callback_add(self.cmd, self._on_cmd)
        self.client.subscribe(self.cmd, qos=1)
        self.fetcher = MqttFetcher(self.client, device_id, timeout=10.0)
        self.updater = Updater(self.state / "models")
        self.updater.store.provision(first.folder)
        self.updater.boot()
        self.stale = 0
        self.errors: list[str] = []

    def _on_connect(self, *args: Any) -> None:
        self.client.subscribe(self.cmd, qos=1)

    def _on_cmd(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.offers.put(json.loads(msg.payload))

    def handle(self, offer: dict[str, Any]) -> dict[str, Any] | None:
        """One offer: refresh, download both targets (retrying), apply through the Updater."""
        assert self.updater.active is not None
        if offer["version"] < self.updater.active.version:
            self.stale += 1  # an older re-sent offer: the release counter refuses it
            return None
        up = trusted_client(self.state, self.fetcher)
        refresh(up)
        model = download(up, offer["model"], retries=5, backoff=0.2)
        manifest = download(up, offer["manifest"], retries=5, backoff=0.2)
        info = up.get_targetinfo(offer["model"])
        assert info is not None
        upd = Update("bundle", NODE, int(offer["version"]), info.custom["model_sha256"],
                     {"model.gguf": model, "bundle.json": manifest})
        return self.updater.apply(upd)

    def run(self, until: int, stop: threading.Event) -> None:
        """Handle offers until version until is active (or stop is set)."""
        while not stop.is_set():
            assert self.updater.active is not None
            if self.updater.active.version >= until and self.offers.empty():
                return
            try:
                offer = self.offers.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self.handle(offer)
            except Exception as exc:  # recorded; the test fails on any
                self.errors.append(f"{type(exc).__name__}: {exc}")
                return

    def committed(self) -> Counter[int]:
        """Commits per version, from the outbox (never acknowledged here, so all are kept)."""
        return Counter(r["target"]["version"] for r in self.updater.store.reports()
                       if r["outcome"] == "committed")


# --------------------------------------------------------------------------------------
# Fixture: one hub home, releases v2..v6 of 3 to ~100 chunks (plus a 1-chunk manifest each)

# (n_layers, dim, vocab): model.gguf sizes of about 3, 10, 30, 60 and 100 chunks of 64 KiB
SHAPES = {2: (1, 64, 900), 3: (2, 128, 1024), 4: (3, 192, 2048), 5: (4, 256, 2048),
          6: (5, 288, 2800)}


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.home = make_home(tmp_path, n_devices=0)
        self.repo = TufRepo.init(self.home)
        for d in ("dev-000", "dev-001"):
            self.home.add_device(d, board=BOARD, node=NODE)
        self.v1 = make_bundle(tmp_path / "b1", 1, 1, 64, 600)
        self.bundles = [make_bundle(tmp_path / f"b{v}", v, *s) for v, s in SHAPES.items()]
        self.hub: Hub
        self.broker: Broker


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    with running_broker(e.home) as broker:
        e.broker = broker
        e.hub = Hub(e.home, e.repo)
        for b in e.bundles:
            e.hub.release(b)
        try:
            yield e
        finally:
            close(e.hub.client)


def chunks_of(b: Bundle) -> int:
    return -(-b.file("model.gguf").size // CHUNK)


def roll_out(env: Env, dev: Device, timeout: float = 90.0) -> float:
    """Offer every release in turn to dev; returns the seconds it took."""
    stop = threading.Event()
    last = env.bundles[-1].version
    worker = threading.Thread(target=dev.run, args=(last, stop), daemon=True)
    t0 = time.monotonic()
    worker.start()
    try:
        for b in env.bundles:
            env.hub.offer(dev.id, b.version)
            deadline = time.monotonic() + timeout
            while dev.committed()[b.version] == 0:
                assert not dev.errors, dev.errors
                assert time.monotonic() < deadline, f"v{b.version} never landed"
                time.sleep(0.02)
        worker.join(timeout)
        return time.monotonic() - t0
    finally:
        stop.set()
        worker.join(5)


def test_sizes_span_3_to_100_chunks(env: Env) -> None:
    sizes = [chunks_of(b) for b in env.bundles]
    assert min(sizes) == 3 and 95 <= max(sizes) <= 110, sizes


def test_broker_kill9_during_transfers(env: Env) -> None:
    """D6: >= 20 kill -9s of the broker at random served chunks; every release lands once."""
    # nominal: another device, same releases, no cuts
    nominal_dev = Device(env.home, "dev-001", env.v1)
    nominal = roll_out(env, nominal_dev)
    assert not nominal_dev.errors and nominal_dev.updater.active is not None
    assert nominal_dev.updater.active.version == env.bundles[-1].version
    assert env.hub.duplicates("dev-001") == {}  # no cut, nothing served twice
    close(nominal_dev.client)

    total = sum(chunks_of(b) + 1 for b in env.bundles)  # + the 1-chunk manifests
    start = env.hub.target_chunks
    rng = random.Random(6)
    kills = sorted(rng.sample(range(1, total), 50))  # D6: >= 50 random points
    env.hub.kill_at = {start + k for k in kills}
    outages: list[float] = []
    restart_errors: list[str] = []
    killed = threading.Event()
    done = threading.Event()

    def kill() -> bool:  # on the hub's network thread, before the chunk's answer goes out
        proc = env.broker.proc
        assert proc is not None
        if killed.is_set() or proc.poll() is not None:
            return False  # killed already, not restarted yet
        os.kill(proc.pid, signal.SIGKILL)
        killed.set()
        return True

    def restarter() -> None:
        while not done.is_set():
            if not killed.wait(0.05):
                continue
            killed.clear()
            t0 = time.monotonic()
            assert env.broker.proc is not None
            env.broker.proc.wait()
            time.sleep(rng.uniform(0.0, 0.3))  # an outage of 0 to 0.3 s, then the same port
            restart_errors.extend(restart(env.broker))
            outages.append(time.monotonic() - t0)

    env.hub.on_kill = kill
    rt = threading.Thread(target=restarter, daemon=True)
    rt.start()
    dev = Device(env.home, "dev-000", env.v1)
    try:
        elapsed = roll_out(env, dev)
    finally:
        done.set()
        rt.join(10)
    assert not dev.errors, dev.errors

    # every cut happened, during a target transfer
    assert env.hub.epoch >= 20 and len(outages) == env.hub.epoch
    # every release verified (TUF) and landed exactly once
    assert dev.updater.active is not None
    assert dev.updater.active.version == env.bundles[-1].version
    assert dev.updater.journal()["state"] == "idle"
    assert dev.committed() == Counter({b.version: 1 for b in env.bundles})
    assert dev.updater.model_path().read_bytes() == \
        (env.bundles[-1].folder / "model.gguf").read_bytes()
    # at most one chunk re-fetched per cut, none without a cut
    dup = env.hub.duplicates("dev-000")
    assert dup.get(0, 0) == 0, dup
    assert all(n <= CHUNK for n in dup.values()), dup
    assert dev.fetcher.partials() == []  # every partial store went once its target verified
    outage = sum(outages)
    figures = {"cuts": env.hub.epoch, "target_chunks": total,
               "refetched_bytes": sum(dup.values()), "refetched_chunks_max_per_cut":
               max(dup.values(), default=0) / CHUNK, "cuts_with_refetch": len(dup),
               "seconds": round(elapsed, 2), "nominal_s": round(nominal, 2),
               "outage_s": round(outage, 2), "restart_errors": restart_errors,
               "fetcher": dev.fetcher.stats}
    print("\nD6 figures:", json.dumps(figures))
    # D6 asks for <= 2 x nominal + outage; a reconnect (0.1 s back-off) and one re-send
    # interval (1 s) per cut come on top of the broker's own outage here
    assert elapsed <= 2 * nominal + outage + 1.5 * env.hub.epoch, figures
    close(dev.client)


# --------------------------------------------------------------------------------------
# Device power cut, corrupt partial chunks, retries (one 30-chunk target)


class PowerCut(BaseException):
    """The device lost power (a BaseException: nothing may catch it on the way out)."""


class CuttingFetcher(MqttFetcher):
    """Loses power when the hub's answer for the target's chunk `at` arrives (not stored);
    drops the TCP connection (paho reconnects) just before it asks for a chunk in `net`."""

    at = -1
    net: frozenset[int] = frozenset()

    def _answer(self, path: str, offset: int) -> tuple[bytes, int]:
        target = path.startswith("targets/")
        if target and offset // CHUNK in self.net:
            self.net = self.net - {offset // CHUNK}
            sock = self.client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        got = super()._answer(path, offset)
        if target and offset == self.at * CHUNK:
            raise PowerCut
        return got


def power_cut_download(env: Env, b: Bundle, at: int) -> Path:
    """dev-000 downloads b's model until the power goes as chunk `at` arrives (chunks before it
    are stored); returns the partial store's folder."""
    c1 = device_conn(env.home, "dev-000")
    f1 = CuttingFetcher(c1, "dev-000", timeout=5.0)
    f1.at = at
    state = env.home.device_dir("dev-000")
    with pytest.raises(PowerCut):
        download(trusted_client(state, f1), f"m.v{b.version}.gguf")
    cut(c1)
    return state / "tuf" / "partial" / b.file("model.gguf").sha256


def test_fifty_random_cuts_refetch_at_most_a_chunk_each(env: Env) -> None:
    """C3: 50 cuts at random chunks of a 95-chunk target, each a device power cut (a new
    process on the same state folder) or a dropped TCP connection; the hub serves each chunk
    once, plus at most once more per cut at it."""
    b = env.bundles[-1]
    n = chunks_of(b)
    state = env.home.device_dir("dev-000")
    rng = random.Random(3)
    points = sorted(rng.sample(range(1, n), 50))
    kinds = {k: rng.choice(("power", "network")) for k in points}
    power = [k for k in points if kinds[k] == "power"]
    net = frozenset(k for k in points if kinds[k] == "network")
    name = f"m.v{b.version}.gguf"
    md_before = sum(nb for _, p, _, nb, _ in env.hub.served if p.startswith("metadata/"))
    t0 = time.monotonic()
    path = None
    for i in range(len(power) + 1):
        client = device_conn(env.home, "dev-000")
        f = CuttingFetcher(client, "dev-000", timeout=5.0)
        f.at = power[i] if i < len(power) else -1
        f.net = frozenset(k for k in net if (i == 0 or k > power[i - 1])
                          and (i == len(power) or k < power[i]))
        up = trusted_client(state, f)
        try:
            path = download(up, name)
        except PowerCut:
            assert i < len(power)
            cut(client)
            continue
        close(client)
    elapsed = time.monotonic() - t0
    assert path is not None and path.read_bytes() == (b.folder / "model.gguf").read_bytes()
    served = Counter(o // CHUNK for _, p, o, _, _ in env.hub.served if p.startswith("targets/"))
    assert sorted(served) == list(range(n))
    assert all(k <= 1 + (c in kinds) for c, k in served.items()), served
    for c in power:
        assert served[c] == 2  # answered, then the power went before it was stored
    refetched = sum(served.values()) - n
    md = sum(nb for _, p, _, nb, _ in env.hub.served if p.startswith("metadata/")) - md_before
    print("\nC3 figures:", json.dumps({"cuts": len(points), "power": len(power),
                                        "network": len(net), "chunks": n,
                                        "refetched_chunks": refetched,
                                        "metadata_bytes": md, "seconds": round(elapsed, 2)}))
    assert refetched <= len(points)


def test_device_power_cut_resumes_and_corrupt_chunks_are_refetched(env: Env) -> None:
    b = env.bundles[2]  # ~30 chunks
    n = chunks_of(b)
    state = env.home.device_dir("dev-000")
    sha = b.file("model.gguf").sha256
    store = power_cut_download(env, b, 17)
    stored = sorted(p.name for p in store.iterdir() if not p.name.startswith(".")
                    and p.name != "total")
    assert len(stored) == 17  # chunks 0..16 durable, 17 answered but not stored
    # flip one byte of stored chunk 5: its sha256 no longer matches its name
    victim = store / stored[5]
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 0xFF
    victim.write_bytes(bytes(raw))

    c2 = device_conn(env.home, "dev-000")  # the device boots again: new client, same state
    f2 = MqttFetcher(c2, "dev-000", timeout=5.0, state_dir=state)
    (store.parent / ("0" * 64)).mkdir()  # a withdrawn release's leftover
    assert f2.partials() == sorted([sha, "0" * 64])
    assert f2.prune_partials(keep={sha}) == 1 and f2.partials() == [sha]
    path = download(trusted_client(state, f2), f"m.v{b.version}.gguf")
    assert path.read_bytes() == (b.folder / "model.gguf").read_bytes()
    assert f2.stats["reused_chunks"] == 16 and f2.stats["dropped_chunks"] == 1
    assert f2.stats["fetched_chunks"] == n - 16
    served = Counter((p, o) for d, p, o, _, _ in env.hub.served if p.startswith("targets/"))
    twice = sorted(o // CHUNK for (_, o), k in served.items() if k == 2)
    assert twice == [5, 17] and max(served.values()) == 2  # the corrupt one and the cut one
    assert not store.exists()  # verified: the partial store is gone
    close(c2)


def test_power_cut_before_the_target_is_durable_keeps_its_chunks(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The partial store goes only after the verified copy's fsync: a power cut between the
    copy and its fsync resumes from the stored chunks (none fetched again)."""
    import edgellm.fleet.tuf_client as tc

    b = env.bundles[0]
    n = chunks_of(b)
    state = env.home.device_dir("dev-000")
    sha = b.file("model.gguf").sha256
    real = tc.fsync_dir

    def cut_at_fsync(path: str | os.PathLike[str]) -> None:  # the copy's folder entry
        if Path(path).name == "targets":
            raise PowerCut(str(path))
        real(path)

    c1 = device_conn(env.home, "dev-000")
    f1 = MqttFetcher(c1, "dev-000", timeout=5.0, state_dir=state)
    monkeypatch.setattr(tc, "fsync_dir", cut_at_fsync)
    with pytest.raises(PowerCut):
        download(trusted_client(state, f1), f"m.v{b.version}.gguf")
    assert f1.partials() == [sha]  # still there: the copy was not durable yet
    monkeypatch.setattr(tc, "fsync_dir", real)
    close(c1)
    c2 = device_conn(env.home, "dev-000")
    f2 = MqttFetcher(c2, "dev-000", timeout=5.0, state_dir=state)
    (state / "tuf" / "targets").joinpath(f"m.v{b.version}.gguf").unlink()  # lost in the cut
    path = download(trusted_client(state, f2), f"m.v{b.version}.gguf")
    assert path.read_bytes() == (b.folder / "model.gguf").read_bytes()
    assert f2.stats["reused_chunks"] == n and f2.stats["fetched_chunks"] == 0
    assert f2.partials() == []  # durable now: the store went
    close(c2)


def test_forged_partial_fails_the_final_hash_and_is_dropped(env: Env) -> None:
    """A partial chunk replaced by other bytes under their own sha256 passes the chunk check;
    the target's signed hash catches it, the store goes, the next download starts over."""
    b = env.bundles[1]  # ~10 chunks
    n = chunks_of(b)
    state = env.home.device_dir("dev-000")
    store = power_cut_download(env, b, 6)
    victim = sorted(p for p in store.iterdir() if p.name.startswith("00000002."))[0]
    forged = os.urandom(CHUNK)
    victim.unlink()
    (store / f"00000002.{hashlib.sha256(forged).hexdigest()}").write_bytes(forged)

    c2 = device_conn(env.home, "dev-000")
    f2 = MqttFetcher(c2, "dev-000", timeout=5.0)
    sleeps: list[float] = []
    up = trusted_client(state, f2)
    with pytest.raises(tufx.LengthOrHashMismatchError):
        download(up, f"m.v{b.version}.gguf", sleep=sleeps.append)
    assert sleeps == []  # a verification error is never retried
    assert not store.exists()
    before = len(env.hub.served)
    path = download(up, f"m.v{b.version}.gguf")
    assert path.read_bytes() == (b.folder / "model.gguf").read_bytes()
    again = [o for _, p, o, _, _ in env.hub.served[before:] if p.startswith("targets/")]
    assert len(again) == n  # a full re-fetch
    close(c2)


def test_download_retries_while_the_broker_is_down(env: Env) -> None:
    """A broker down longer than the fetcher's timeout: download() backs off and resumes."""
    b = env.bundles[1]
    n = chunks_of(b)
    state = env.home.device_dir("dev-000")
    c = device_conn(env.home, "dev-000")
    f = MqttFetcher(c, "dev-000", timeout=0.5)
    up = trusted_client(state, f)
    refresh(up)
    env.hub.kill_at = {env.hub.target_chunks + 4}
    downtime = 1.6

    def kill() -> bool:
        assert env.broker.proc is not None
        os.kill(env.broker.proc.pid, signal.SIGKILL)

        def later() -> None:
            assert env.broker.proc is not None
            env.broker.proc.wait()
            time.sleep(downtime)
            restart(env.broker)
        threading.Thread(target=later, daemon=True).start()
        return True

    env.hub.on_kill = kill
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        time.sleep(s)

    path = download(up, f"m.v{b.version}.gguf", retries=6, backoff=0.2, sleep=sleep)
    assert path.read_bytes() == (b.folder / "model.gguf").read_bytes()
    assert 1 <= len(sleeps) <= 6 and sleeps == [0.2 * 2 ** i for i in range(len(sleeps))]
    assert f.stats["reused_chunks"] >= 3 and f.stats["fetched_chunks"] <= n + 1
    assert sum(env.hub.duplicates("dev-000").values()) <= CHUNK
    close(c)


# --------------------------------------------------------------------------------------
# The tuf-conformance client CLI (CLIENT-CLI.md), driven against our own TufRepo over HTTP


def test_conformance_cli_init_refresh_download(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    repo = TufRepo.init(home)
    data = os.urandom(3 * CHUNK + 5)  # 4 chunks over MQTT
    (tmp_path / "model.bin").write_bytes(data)
    repo.add_target(tmp_path / "model.bin", {"node": NODE, "version": 1, "release": 1,
                                             "board": BOARD, "kind": "model"})

    class Handler(http.server.SimpleHTTPRequestHandler):
        gets: ClassVar[list[str]] = []  # every GET's path, in order

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(repo.root_dir), **kw)

        def do_GET(self) -> None:
            self.gets.append(self.path)
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    md, tg, bridge = tmp_path / "md", tmp_path / "tg", tmp_path / "bridge"
    md.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cli = [sys.executable, "-m", "edgellm.fleet.conformance_client", "--bridge-dir", str(bridge)]
    fetch = ["--metadata-dir", str(md), "--metadata-url", f"{base}/metadata"]
    get = [*fetch, "--target-name", "model.bin", "--target-base-url", f"{base}/targets",
           "--target-dir", str(tg), "download"]

    def run(*args: str) -> int:
        return subprocess.run([*cli, *args], env=env, timeout=60).returncode

    try:
        assert run("--metadata-dir", str(md), "init", str(repo.metadata_dir / "1.root.json")) == 0
        assert Handler.gets == []  # init makes no request
        assert run(*fetch, "refresh") == 0
        assert sorted(p.name for p in md.glob("*.json")) == \
            ["root.json", "snapshot.json", "targets.json", "timestamp.json"]
        assert "/metadata/2.root.json" in Handler.gets  # the root walk ended on a 404
        assert run(*get) == 0
        assert (tg / "model.bin").read_bytes() == data
        target_gets = [g for g in Handler.gets if g.startswith("/targets/")]
        assert len(target_gets) == 1  # one GET per fetch; its 4 chunks came over MQTT
        assert run(*get) == 0  # cached: verified locally, not fetched again
        assert [g for g in Handler.gets if g.startswith("/targets/")] == target_gets
        log = (bridge / "bridge.log").read_text()
        assert f"{base}{target_gets[0]} 200 {len(data)}" in log  # it went through the bridge
        # a tampered target on the server: the download fails (exit status 1)
        stored = next(repo.targets_dir.glob("*.model.bin"))
        stored.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        (tg / "model.bin").unlink()
        assert run(*get) == 1
        assert not (tg / "model.bin").exists()
        assert run(*fetch, "--target-name", "absent.bin", "--target-base-url",
                   f"{base}/targets", "--target-dir", str(tg), "download") == 1
    finally:
        run("stop")
        srv.shutdown()


def test_transient_errors_and_bridge_names() -> None:
    from edgellm.fleet.conformance_client import decode_name, encode_name
    from edgellm.fleet.tuf_client import is_transient

    assert is_transient(tufx.DownloadError("broker gone"))
    assert is_transient(tufx.DownloadHTTPError("busy", 503))
    for final in (tufx.DownloadHTTPError("missing", 404), tufx.DownloadLengthMismatchError("x"),
                  tufx.LengthOrHashMismatchError("x"), tufx.BadVersionNumberError("x"),
                  tufx.RepositoryError("x")):
        assert not is_transient(final)
    for name in ("1.%2E%2E%2Fdelegatedrole.json", "a b/c?d#e@f+g", "wildcard[*]/ü.txt", ""):
        enc = encode_name(name)
        assert decode_name(enc) == name
        assert enc == "" or protocol.encode({"type": "fetch", "device": "conformance",
                                             "path": "k/" + enc})
