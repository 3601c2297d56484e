# SPDX-License-Identifier: MIT
"""TUF release metadata over MQTT (issue 6, part 3): real mosquitto, real python-tuf ngclient."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from securesystemslib.signer import CryptoSigner
from support.fleet import close, device_client, hub_client, make_home, running_broker, wait_until
from tuf.api import exceptions as tufx
from tuf.api.metadata import Metadata

from edgellm.fleet import protocol
from edgellm.fleet.tuf_client import PROVISIONED_ROOT, download, refresh, trusted_client
from edgellm.fleet.tuf_mqtt import TARGETS_URL, MqttFetcher, TufResponder
from edgellm.fleet.tuf_repo import TufRepo

CUSTOM = {"node": "en/medical", "version": 2, "release": 7, "board": "rpi5", "kind": "model"}


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.home = make_home(tmp_path, n_devices=0)
        self.repo = TufRepo.init(self.home)
        # provisioning copies the root into the device bundle; the device keeps state there
        self.state = self.home.add_device("dev-000", board="rpi5", node="en/medical")
        assert (self.state / PROVISIONED_ROOT).read_bytes() == \
            (self.repo.metadata_dir / "1.root.json").read_bytes()
        self.tmp = tmp_path
        self.fetcher: MqttFetcher
        self.responder: TufResponder

    def publish(self, size: int = 300_000, name: str = "model.bin") -> bytes:
        data = os.urandom(size)
        src = self.tmp / name
        src.write_bytes(data)
        self.repo.add_target(src, CUSTOM)
        return data

    def updater(self) -> Any:
        return trusted_client(self.state, self.fetcher)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    with running_broker(e.home):
        hub = hub_client(e.home)
        e.responder = TufResponder(e.repo, hub)
        e.responder.attach()
        dev = device_client(e.home, "dev-000")
        e.fetcher = MqttFetcher(dev, "dev-000", timeout=5.0)
        try:
            yield e
        finally:
            close(dev, hub)


def test_refresh_and_download_300kb(env: Env) -> None:
    data = env.publish()
    up = env.updater()
    refresh(up)
    path = download(up, "model.bin")
    assert path.read_bytes() == data
    info = up.get_targetinfo("model.bin")
    assert info is not None and info.custom == CUSTOM
    assert (env.state / "tuf" / "metadata" / "timestamp.json").is_file()


def test_missing_object_is_404(env: Env) -> None:
    with pytest.raises(tufx.DownloadHTTPError) as err:
        b"".join(env.fetcher.fetch(TARGETS_URL + "0" * 64 + ".nope.bin"))
    assert err.value.status_code == 404
    with pytest.raises(tufx.DownloadHTTPError) as err:  # outside tuf/: never served
        b"".join(env.fetcher.fetch("mqtt-tuf:metadata/../../hub.toml"))
    assert err.value.status_code == 404
    env.publish(1000)
    up = env.updater()
    missing = env.responder.stats["missing"]
    refresh(up)  # the root walk asked for 2.root.json and took the 404 as "no newer root"
    assert env.responder.stats["missing"] == missing + 1
    with pytest.raises(tufx.RepositoryError):
        download(up, "absent.bin")


def test_root_rotation_is_followed(env: Env) -> None:
    env.repo.rotate_root()
    data = env.publish(5000)
    up = env.updater()
    refresh(up)
    assert up._trusted_set.root.version == 2
    assert download(up, "model.bin").read_bytes() == data


def test_byte_flip_in_target_refused(env: Env) -> None:
    env.publish()
    stored = next(env.repo.targets_dir.glob("*.model.bin"))
    raw = bytearray(stored.read_bytes())
    raw[-1] ^= 1
    stored.write_bytes(bytes(raw))
    up = env.updater()
    refresh(up)
    with pytest.raises(tufx.LengthOrHashMismatchError):
        download(up, "model.bin")
    assert not list((env.state / "tuf" / "targets").glob("*model.bin"))


def test_replayed_timestamp_refused(env: Env) -> None:
    old = (env.repo.metadata_dir / "timestamp.json").read_bytes()
    env.publish(1000)
    refresh(env.updater())
    (env.repo.metadata_dir / "timestamp.json").write_bytes(old)
    with pytest.raises(tufx.BadVersionNumberError):
        refresh(env.updater())


def test_expired_timestamp_refused(env: Env) -> None:
    env.repo.refresh_timestamp(expires=dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
                               - dt.timedelta(hours=1))
    with pytest.raises(tufx.ExpiredMetadataError):
        refresh(env.updater())


def test_wrongly_signed_targets_refused(env: Env) -> None:
    env.publish(1000)
    targets = env.repo.load("targets")
    targets.signed.version += 1
    rogue = CryptoSigner.generate_ed25519()
    targets.signatures.clear()
    targets.sign(rogue)
    env.repo._write(targets, sign=False)
    env.repo._publish_snapshot(targets.signed.version)
    with pytest.raises(tufx.UnsignedMetadataError):
        refresh(env.updater())
    unsigned: Metadata[Any] = env.repo.load("targets")
    unsigned.signed.version += 1
    unsigned.signatures.clear()
    env.repo._write(unsigned, sign=False)
    env.repo._publish_snapshot(unsigned.signed.version)
    with pytest.raises(tufx.UnsignedMetadataError):
        refresh(env.updater())


def test_fetch_schema_is_strict() -> None:
    good = {"type": "fetch", "device": "dev-000", "path": "metadata/timestamp.json"}
    assert protocol.decode(protocol.encode(good), expect="fetch")["path"] == good["path"]
    for bad in ({**good, "path": "a b"}, {**good, "offset": -1}, {**good, "extra": 1},
                {**good, "path": "x" * 200}):
        with pytest.raises(protocol.ProtocolError):
            protocol.encode(bad)


def test_responder_answers_only_own_one_level_topic(env: Env) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    responder = TufResponder(env.repo, env.fetcher.client)  # never publishes when refusing
    req = protocol.encode({"type": "fetch", "device": "dev-000", "path": "metadata/1.root.json"})
    for resp in ("edgellm/v1/dev/dev-000/resp/a/b", "edgellm/v1/dev/dev-001/resp/tuf",
                 "edgellm/v1/dev/dev-000/resp/cmd", None):
        props = Properties(PacketTypes.PUBLISH)
        if resp is not None:
            props.ResponseTopic = resp
        props.CorrelationData = b"x"
        assert not responder.handle(protocol.topic("dev-000", "req"), req, props)
    assert responder.stats["refused"] == 4
    assert env.repo.read("metadata/../../hub.toml") is None


def test_silent_hub_is_a_download_error(tmp_path: Path) -> None:
    home = make_home(tmp_path, n_devices=1)
    with running_broker(home):
        dev = device_client(home, "dev-000")
        try:
            fetcher = MqttFetcher(dev, "dev-000", timeout=0.3)
            with pytest.raises(tufx.DownloadError) as err:
                b"".join(fetcher.fetch("mqtt-tuf:metadata/timestamp.json"))
            assert not isinstance(err.value, tufx.DownloadHTTPError)
        finally:
            close(dev)


def test_targets_rollback_refused(env: Env) -> None:
    env.publish(1000)
    env.publish(1000, name="second.bin")
    refresh(env.updater())  # the device now trusts targets v3
    snap = env.repo.load("snapshot")
    snap.signed.version += 1
    snap.signed.meta["targets.json"].version = 2  # a validly signed pointer to older targets
    env.repo._write(snap)
    env.repo.refresh_timestamp(snapshot_version=snap.signed.version)
    with pytest.raises(tufx.BadVersionNumberError):
        refresh(env.updater())


def test_progress_callback_fires_for_every_chunk(env: Env) -> None:
    """The agent's watchdog keepalive: on_progress runs during a multi-chunk transfer."""
    data = env.publish()  # 300 kB: 5 chunks
    ticks: list[int] = []
    env.fetcher.on_progress = lambda: ticks.append(env.responder.stats["served"])
    up = env.updater()
    refresh(up)
    before = len(ticks)
    assert download(up, "model.bin").read_bytes() == data
    assert len(ticks) - before == 5
    assert len(set(ticks[before:])) == 5  # one per chunk, while the transfer went on


def test_malformed_answer_is_a_download_error(tmp_path: Path) -> None:
    home = make_home(tmp_path, n_devices=1)
    with running_broker(home):
        hub = hub_client(home)
        dev = device_client(home, "dev-000")
        bad = [[("status", "2OO")], [("status", "200"), ("total", "many")]]

        def answer(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = msg.properties.CorrelationData
            props.UserProperty = bad[0]
            c.publish(msg.properties.ResponseTopic, b"x", qos=1, properties=props)

        hub.message_callback_add(protocol.topic("dev-000", "req"), answer)
        subscribed: list[int] = []
        hub.on_subscribe = lambda *a: subscribed.append(1)
        hub.subscribe(protocol.topic("dev-000", "req"), qos=1)
        assert wait_until(lambda: subscribed)
        try:
            fetcher = MqttFetcher(dev, "dev-000", timeout=2.0)
            for _ in range(2):
                with pytest.raises(tufx.DownloadError, match="malformed answer"):
                    b"".join(fetcher.fetch("mqtt-tuf:metadata/timestamp.json"))
                bad.pop(0)
        finally:
            close(dev, hub)


def test_failed_fetcher_does_not_stay_chained(tmp_path: Path) -> None:
    """A fetcher whose subscribe fails (no broker) detaches itself: no chain of dead hooks."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-000",
                    protocol=mqtt.MQTTv5)
    mine = c.on_connect
    for _ in range(2):
        with pytest.raises(tufx.DownloadError):
            MqttFetcher(c, "dev-000", timeout=0.1)
        assert c.on_connect is mine
    assert not list(c._on_message_filtered.iter_match(
        protocol.topic("dev-000", "resp", "tuf")))
