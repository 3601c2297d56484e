# SPDX-License-Identifier: MIT
"""The device's update flow through the real agent, a real mosquitto and a real TUF repository:
full bundle (with the child-process health check), delta, delta falling back to the bundle,
adapter (also onto another base), already installed, the maintenance window and the session
lock, the release counter and attack flag across restarts, device.toml's update fields."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.fleet import wait_until
from support.updates import NODE, PROMPT, Models, UpdateHub, build_models, greedy, read_json

from edgellm.errors import DeviceConfigError
from edgellm.fleet.agent import Agent
from edgellm.fleet.device_config import load_device_config, write_device_config
from edgellm.fleet.health import record_golden
from edgellm.fleet.patch import sha256_path
from edgellm.fleet.release import health_custom
from edgellm.fleet.tuf_mqtt import CHUNK
from edgellm.fleet.updater import UpdatePolicy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def hub(tmp_path: Path, models: Models) -> Iterator[UpdateHub]:
    with UpdateHub(tmp_path, models) as h:
        yield h


def _served(hub: UpdateHub) -> list[str]:
    """Paths the hub served chunks of (TufResponder.on_served)."""
    out: list[str] = []
    hub.responder.on_served = lambda dev, path, off, n: out.append(path)
    return out


def _downloads(agent: Agent) -> list[str]:
    d = agent.cfg.state_dir / "tuf" / "targets"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_full_bundle_with_health_check(hub: UpdateHub) -> None:
    m = hub.models
    agent = hub.agent("dev-000")
    assert hub.births("dev-000") or wait_until(lambda: hub.births("dev-000"))
    assert hub.births("dev-000")[0]["version"] == 1 and hub.births("dev-000")[0]["attack"] is False
    spec = record_golden(m.b2.folder / "model.gguf", PROMPT, 8)
    stale = agent.cfg.state_dir / "tuf" / "partial" / ("ab" * 32)  # a withdrawn release's
    stale.mkdir(parents=True)
    (stale / "total").write_text("1000")
    r = hub.offer_and_wait(agent, hub.publish(m.b2, release=2, health=health_custom(spec)))
    assert r["outcome"] == "committed" and r["reason"] == "ok" and r["attack"] is False
    assert not stale.exists()  # an offer prunes partial downloads of targets it does not name
    assert (r["node"], r["version"], r["release"], r["rollout"]) == (NODE, 2, 1 + 1, 1)
    u = agent.updater
    assert u is not None and u.active is not None and u.active.model_sha256 == Models.sha(m.b2)
    assert u.log[-1]["health"]["measured"]["tokens"] == list(spec.expected)  # the child ran it
    assert greedy(agent.model_path()) == greedy(m.b2.folder / "model.gguf")
    assert wait_until(lambda: hub.births("dev-000")[-1]["version"] == 2)
    assert agent.updates is not None and agent.updates.installed is not None
    assert agent.updates.installed.release == 2
    hub.settle(agent)
    assert _downloads(agent) == []  # the verified downloads go once installed
    # the same release again: already installed, nothing fetched but metadata
    served = _served(hub)
    r = hub.offer_and_wait(agent, hub.publish(m.b2, release=2, tag="b"))
    assert r["outcome"] == "already_installed" and r["reason"] == "already_installed"
    assert served and all(p.startswith("metadata/") for p in served), served


def test_delta_then_adapter(hub: UpdateHub) -> None:
    m = hub.models
    agent = hub.agent("dev-000")
    served = _served(hub)
    r = hub.offer_and_wait(agent, hub.publish(m.b2, release=2, delta=m.delta12))
    assert r["outcome"] == "committed" and r["id"].startswith("delta-v2"), r
    assert not [p for p in served if p.endswith(".gguf")], served  # the model never came
    u = agent.updater
    assert u is not None and u.active is not None and u.active.model_sha256 == Models.sha(m.b2)
    # an adapter for v1 on a device running v2: the base bundle first, then the adapter
    names = hub.publish(m.b1, release=3, adapter=True)
    first = hub.offer_and_wait(agent, names)
    assert first["outcome"] == "committed" and first["id"].startswith("bundle-v1"), first
    rollout = first["rollout"]
    second = None
    end = time.monotonic() + 20
    while second is None and time.monotonic() < end:
        agent.tick()
        second = next((x for x in hub.updates("dev-000") if x["rollout"] == rollout
                       and x["id"].startswith("adapter-")), None)
    assert second is not None and second["outcome"] == "committed", hub.updates("dev-000")
    assert u.active is not None and u.active.adapter_sha256 == sha256_path(m.adapter)
    assert u.active.model_sha256 == Models.sha(m.b1)
    assert wait_until(lambda: hub.births("dev-000")[-1]["adapter"] == sha256_path(m.adapter))


def test_delta_falls_back_to_the_bundle(hub: UpdateHub) -> None:
    m = hub.models
    agent = hub.agent("dev-000")
    # 1. a delta for a base this device does not run (v3): the full bundle instead
    r = hub.offer_and_wait(agent, hub.publish(m.b2, release=2, delta=m.delta32,
                                              delta_base=Models.sha(m.b3)))
    assert r["outcome"] == "committed" and r["id"].startswith("bundle-v2") and not r["attack"]
    # 2. the delta is missing at the hub (404): the full bundle instead
    agent2 = hub.agent("dev-001")
    names = hub.publish(m.b2, release=2, delta=m.delta12, tag="m")
    p = hub.repo.target_file(names["delta"])
    assert p is not None
    p.unlink()
    r = hub.offer_and_wait(agent2, names)
    assert r["outcome"] == "committed" and r["id"].startswith("bundle-v2") and not r["attack"]
    # 3. no delta offered at all
    agent3 = hub.agent("dev-002")
    r = hub.offer_and_wait(agent3, {k: v for k, v in names.items() if k != "delta"})
    assert r["outcome"] == "committed" and r["id"].startswith("bundle-v2")
    for a in (agent, agent2, agent3):
        assert a.updater is not None and a.updater.active is not None
        assert a.updater.active.model_sha256 == Models.sha(m.b2)


def test_window_and_session_lock(hub: UpdateHub) -> None:
    m = hub.models
    # idle for an hour needed, no window: staged at once, but no swap
    agent = hub.agent("dev-000", idle_s=3600.0)
    u = agent.updater
    assert u is not None
    rollout = hub.offer("dev-000", hub.publish(m.b2, release=2))
    assert wait_until(lambda: agent.tick() is None and u.journal()["state"] == "installed", 10)
    for _ in range(10):
        agent.tick()
    assert u.active is not None and u.active.model_sha256 == Models.sha(m.b1)
    assert not [r for r in hub.updates("dev-000") if r["rollout"] == rollout]
    # the policy allows it now, but a clinician's session holds the lock: still no swap
    u.scheduler.policy = UpdatePolicy()
    with u.lock.session():
        for _ in range(10):
            agent.tick()
        assert u.active.model_sha256 == Models.sha(m.b1)
    r = hub.wait_report(agent, rollout)  # after unlock: the first poll swaps
    assert r["outcome"] == "committed" and u.active.model_sha256 == Models.sha(m.b2)
    # a maintenance window around now (device local time) lets a swap through at once
    now = time.localtime()
    start = (now.tm_hour * 60 + now.tm_min - 1) % 1440
    end = (start + 3) % 1440
    window = f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"
    agent2 = hub.agent("dev-001", idle_s=3600.0, window=window)
    r = hub.offer_and_wait(agent2, hub.publish(m.b2, release=2, tag="w"))
    assert r["outcome"] == "committed", r


def test_counter_and_attack_flag_survive_a_restart(hub: UpdateHub) -> None:
    m = hub.models
    agent = hub.agent("dev-000")
    r = hub.offer_and_wait(agent, hub.publish(m.b2, board="jetson-orin-nano", release=2))
    assert r["outcome"] == "refused" and r["reason"] == "wrong_board" and r["attack"] is True
    hub.settle(agent)
    agent.stop()
    hub.agents.remove(agent)
    again = Agent(agent.cfg, fetch_timeout=5.0)
    again.start(timeout=10)
    hub.agents.append(again)
    assert wait_until(lambda: hub.births("dev-000")[-1]["bdSeq"] == 1)
    assert hub.births("dev-000")[-1]["attack"] is True  # durable until the next commit
    r = hub.offer_and_wait(again, hub.publish(m.b2, release=4))
    assert r["outcome"] == "committed"
    assert wait_until(lambda: hub.births("dev-000")[-1]["attack"] is False)
    hub.settle(again)
    again.stop()
    hub.agents.remove(again)
    third = Agent(agent.cfg)
    assert third.updates is not None and third.updates.installed is not None
    assert third.updates.installed.release == 4 and not third.updates.attack
    assert third.updater is not None and third.updater.active is not None
    assert third.updater.active.version == 2
    third.queue.close()


def test_agent_cli_once_with_a_store(hub: UpdateHub) -> None:
    hub.agent("dev-000").stop()  # provisions dev-000 (store with v1); the CLI runs it now
    hub.agents.clear()
    folder = hub.home.device_dir("dev-000")
    cfg = load_device_config(folder / "device.toml")
    write_device_config(folder / "device.toml", dataclasses.replace(cfg, host="127.0.0.1"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = len(hub.births("dev-000"))
    out = subprocess.run([sys.executable, "-m", "edgellm", "agent", "--config",
                          str(folder / "device.toml"), "--once"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert wait_until(lambda: len(hub.births("dev-000")) > before)
    birth = hub.births("dev-000")[-1]
    assert birth["version"] == 1 and birth["node"] == NODE and birth["attack"] is False


def test_device_toml_update_fields(tmp_path: Path, hub: UpdateHub) -> None:
    folder = hub.home.add_device("dev-009", board="rpi5", node=NODE)
    path = folder / "device.toml"
    cfg = load_device_config(path)
    assert cfg.models_dir == folder / "models" and cfg.tuf_root == folder / "provisioned-root.json"
    assert cfg.window == "" and cfg.idle_s == 900.0
    # a file written before [update] and models_dir existed still loads, with the defaults
    old = "\n".join(line for line in path.read_text().splitlines()
                    if not line.startswith(("models_dir", "[update]", "tuf_root", "window",
                                            "idle_s")))
    path.write_text(old)
    assert load_device_config(path) == cfg
    custom = dataclasses.replace(cfg, window="22:30-02:00", idle_s=60.0,
                                 models_dir=tmp_path / "elsewhere")
    write_device_config(path, custom)
    assert load_device_config(path) == custom
    for bad, field in (('window = "25:00-01:00"', "window"), ("idle_s = -1", "idle_s"),
                       ('idle_s = "x"', "idle_s")):
        text = path.read_text()
        key = bad.split(" ")[0]
        line = next(x for x in text.splitlines() if x.startswith(key + " "))
        path.write_text(text.replace(line, bad))
        with pytest.raises(DeviceConfigError, match=rf"\[update\] {field}"):
            load_device_config(path)
        path.write_text(text)


def test_target_policy_rules() -> None:
    from edgellm.errors import UpdateRefusedError
    from edgellm.fleet.slots import Active
    from edgellm.fleet.target_policy import (
        DeviceFacts,
        Installed,
        SignedTarget,
        check,
        check_release,
    )

    a, b, c = "a" * 64, "b" * 64, "c" * 64
    dev = DeviceFacts("dev-000", "rpi5", Active(a, NODE, 1), Installed(NODE, 4, a))
    ok = {"node": NODE, "version": 2, "release": 5, "board": "*", "kind": "model",
          "model_sha256": b}
    assert check(ok, dev, name="m").release == 5
    assert check({**ok, "release": 4, "model_sha256": a}, dev, name="m").version == 2  # reinstall

    def reason(custom: dict[str, object], slot: str | None = None) -> str:
        with pytest.raises(UpdateRefusedError) as err:
            check(custom, dev, name="t", slot=slot)
        assert err.value.attack is True
        return err.value.reason

    assert reason({**ok, "node": "en/other"}) == "wrong_node"
    assert reason({**ok, "board": "rpi4"}) == "wrong_board"
    assert reason({**ok, "devices": ["dev-001"]}) == "wrong_device"
    assert reason({**ok, "release": 4}) == "release_downgrade"  # same counter, other bytes
    # a freshly flashed device (nothing installed via TUF): the active version is the floor
    fresh = DeviceFacts("dev-000", "rpi5", Active(a, NODE, 2), None)
    for custom in ({**ok, "version": 1}, {**ok, "version": 2}):  # lower; same, other model
        with pytest.raises(UpdateRefusedError) as err:
            check(custom, fresh, name="t")
        assert err.value.reason == "release_downgrade" and err.value.attack is True
    assert check({**ok, "version": 2, "model_sha256": a}, fresh, name="m").version == 2
    assert check({**ok, "version": 3}, fresh, name="m").version == 3
    assert reason({**ok, "release": 3, "model_sha256": a}) == "release_downgrade"
    assert reason({**ok, "kind": "delta", "base_sha256": c}) == "base_mismatch"
    assert reason({**ok, "kind": "adapter", "base_sha256": a, "adapter_sha256": c}) == "invalid"
    assert reason(ok, slot="manifest") == "invalid"
    for bad in ({**ok, "release": -1}, {**ok, "release": True}, {**ok, "model_sha256": "x"},
                {**ok, "kind": "firmware"}, {**ok, "devices": "dev-000"},
                {**ok, "health": {"prompt": "x"}}, {k: v for k, v in ok.items() if k != "node"}):
        assert reason(bad) == "invalid", bad
    m = SignedTarget.from_custom("m", ok, sha256=b)
    j = SignedTarget.from_custom("j", {**ok, "kind": "manifest"})
    check_release({"model": m, "manifest": j})
    for other in ({**ok, "kind": "manifest", "release": 6}, {**ok, "kind": "manifest",
                                                              "model_sha256": c}):
        with pytest.raises(UpdateRefusedError, match="not one release"):
            check_release({"model": m, "manifest": SignedTarget.from_custom("j", other)})
    with pytest.raises(UpdateRefusedError, match="bytes"):
        check_release({"model": SignedTarget.from_custom("m", ok, sha256=c), "manifest": j})


def test_agent_tells_systemd_ready_and_watchdog(hub: UpdateHub, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        agent = hub.agent("dev-000", idle_s=3600.0)  # connected: READY=1 after the CONNACK
        agent.tick()  # WATCHDOG=1 every loop turn
        got = {sock.recv(64).decode() for _ in range(2)}
        assert got == {"READY=1", "WATCHDOG=1"}
        # and after every chunk of a transfer: one tick downloads a multi-chunk model
        names = hub.publish(hub.models.b2, release=2)
        chunks = -(-(hub.models.b2.folder / "model.gguf").stat().st_size // CHUNK)
        assert chunks >= 3
        pings: list[str] = []
        sock.settimeout(0.5)  # the reader stops once the pings stop
        reader = threading.Thread(target=_drain, args=(sock, pings), daemon=True)
        reader.start()
        u = agent.updater
        assert u is not None
        hub.offer("dev-000", names)
        ticks = 0
        while u.journal()["state"] == "idle" and ticks < 200:
            agent.tick()
            ticks += 1
            time.sleep(0.02)
        assert u.journal()["state"] != "idle"
        reader.join(5)
        assert pings.count("WATCHDOG=1") >= ticks + chunks, (ticks, chunks, len(pings))
    finally:
        sock.close()


def _drain(sock: Any, out: list[str]) -> None:
    """Collect the notify datagrams until the socket stays silent (its timeout)."""
    while True:
        try:
            out.append(sock.recv(64).decode())
        except OSError:
            return


def test_no_space_refused_before_and_during_the_download(
        hub: UpdateHub, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import edgellm.fleet.tuf_mqtt as tm

    m = hub.models
    agent = hub.agent("dev-000")
    assert agent.updates is not None
    size = (m.b2.folder / "model.gguf").stat().st_size
    # free space for the download but not the staged copy on top: refused up front
    agent.updates.free_bytes = lambda p: 3 * size
    served = _served(hub)
    r = hub.offer_and_wait(agent, hub.publish(m.b2, release=2))
    assert (r["outcome"], r["reason"], r["attack"]) == ("refused", "no_space", False), r
    assert served and all(p.startswith("metadata/") for p in served), served
    # the disk fills up during the transfer (ENOSPC at chunk 2): a refusal, chunks dropped
    agent.updates.free_bytes = lambda p: 1 << 40
    real = tm.atomic_write

    def full(path: Any, data: bytes) -> None:
        if Path(path).name.startswith("00000002."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(tm, "atomic_write", full)
    r = hub.offer_and_wait(agent, hub.publish(m.b2, release=3))
    assert (r["outcome"], r["reason"], r["attack"]) == ("refused", "no_space", False), r
    assert agent.updates._fetcher is not None and agent.updates._fetcher.partials() == []
    assert _downloads(agent) == [] and agent.updates.attack is False


def test_a_replaced_pending_offer_leaves_no_files(hub: UpdateHub) -> None:
    m = hub.models
    agent = hub.agent("dev-000", idle_s=3600.0)  # staged, never swapped
    u, upd = agent.updater, agent.updates
    assert u is not None and upd is not None
    hub.offer("dev-000", hub.publish(m.b2, release=2))
    assert wait_until(lambda: agent.tick() is None and u.journal()["state"] == "installed", 10)
    hub.offer("dev-000", hub.publish(m.b3, release=3))  # waits behind v2: pending
    assert wait_until(lambda: agent.tick() is None and u.pending is not None, 10)
    assert u.pending is not None and u.pending.version == 3
    old_txn, old_files = u.pending.txn, [Path(p) for p in u.pending.files.values()]
    assert old_files and all(p.is_file() for p in old_files)
    hub.offer("dev-000", hub.publish(m.b2, release=4))  # replaces the pending v3
    assert wait_until(lambda: agent.tick() is None and u.pending is not None
                      and u.pending.version == 2, 10)
    assert not any(p.exists() for p in old_files)
    assert old_txn not in read_json(agent.cfg.state_dir / "updates.json")["txns"]
