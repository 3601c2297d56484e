# SPDX-License-Identifier: MIT
"""Releases end to end against a real mosquitto (issue 6): `hub release` -> the hub service's
offers, TUF fetches and wave logic -> 20 simulated devices (Agent + DeviceUpdates + Updater,
real health checks in child processes) -> update reports -> the next wave.

- a stories260K-sized model (Q8_0, 345 kB) goes v1 -> v2 as a delta to 20 devices;
- then a v3 whose signed golden tokens are wrong: the canary wave rolls back, the rollout
  halts, and none of the other 18 devices is offered anything;
- the demo tree's leaf (en/medical/cardiology, 1.4 MB q4_0_mixed -> 2.0 MB q8_0) reaches
  20 devices as a full bundle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.fleet import make_home, running_broker
from support.releases import DEMO_LEAF_Q4, DEMO_LEAF_Q8, restamp, stories_bundles

from edgellm.fleet import rollout, store
from edgellm.fleet.agent import Agent
from edgellm.fleet.device_config import load_device_config
from edgellm.fleet.health import HealthSpec
from edgellm.fleet.home import HubHome
from edgellm.fleet.release import publish_release
from edgellm.fleet.service import HubService
from edgellm.fleet.slots import SlotStore
from edgellm.formats.bundle import Bundle
from edgellm.runtime.model import Model

N_DEVICES = 20
LEAF = "en/medical/cardiology"


class Fleet:
    """A hub home with a TUF repository, its broker and hub service, and N agents, each
    ticked by its own thread (as `edgellm agent` does, every 50 ms here)."""

    def __init__(self, tmp: Path, node: str, v1: Bundle, n: int = N_DEVICES) -> None:
        self.home: HubHome = make_home(tmp, tuf=True)
        self.node = node
        self.devices = [f"dev-{i:03d}" for i in range(n)]
        self.folders = {}
        for d in self.devices:
            folder = self.home.add_device(d, board="rpi5", node=node)
            SlotStore(folder / "models").provision(v1.folder)
            self.folders[d] = folder
        self.agents: dict[str, Agent] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    @contextlib.contextmanager
    def running(self) -> Iterator[HubService]:
        with running_broker(self.home):
            svc = HubService(self.home, offer_interval=0.05, batch_interval=0.02)
            svc.start()
            try:
                for d in self.devices:
                    cfg = load_device_config(self.folders[d] / "device.toml")
                    cfg = dataclasses.replace(cfg, host="127.0.0.1", idle_s=0.0)
                    agent = Agent(cfg, fetch_timeout=10.0)
                    assert agent.updates is not None, "updates are off on a provisioned device"
                    agent.start(timeout=10)
                    self.agents[d] = agent
                for agent in self.agents.values():
                    t = threading.Thread(target=self._loop, args=(agent,), daemon=True)
                    t.start()
                    self._threads.append(t)
                yield svc
            finally:
                self._stop.set()
                for t in self._threads:
                    t.join(30)
                for agent in self.agents.values():
                    agent.stop()
                svc.stop()
        assert not self.errors, self.errors

    def _loop(self, agent: Agent) -> None:
        while not self._stop.is_set():
            try:
                agent.tick()
            except BaseException as exc:  # the test fails on it, after the fleet stopped
                self.errors.append(exc)
                return
            self._stop.wait(0.05)

    def status(self, rid: int) -> dict[str, Any]:
        conn = store.connect(self.home.registry_db)
        try:
            return rollout.status(conn, rid)
        finally:
            conn.close()

    def wait(self, rid: int, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = self.status(rid)
            if st["state"] in states:
                return st
            assert not self.errors, self.errors
            time.sleep(0.1)
        raise AssertionError(f"rollout {rid} still {self.status(rid)['state']} after "
                             f"{timeout} s: {self.status(rid)['counts']}")

    def active_sha(self, device: str) -> str:
        updater = self.agents[device].updater
        assert updater is not None and updater.active is not None
        return updater.active.model_sha256


def sha(b: Bundle) -> str:
    return b.file("model.gguf").sha256


def offered_after_reports(home: HubHome, rid: int) -> None:
    """Every device of wave k+1 was offered only after all of wave k had reported."""
    conn = store.connect(home.registry_db)
    try:
        rows = conn.execute("SELECT wave, max(reported_at), min(offered_at) FROM "
                            "fleet_rollout_devices WHERE rollout = ? GROUP BY wave ORDER BY wave",
                            (rid,)).fetchall()
    finally:
        conn.close()
    for (_, last_report, _), (_, _, first_offer) in zip(rows, rows[1:]):
        assert first_offer >= last_report, rows


@pytest.fixture(scope="module")
def stories(tmp_path_factory: pytest.TempPathFactory) -> list[Bundle]:
    return stories_bundles(tmp_path_factory.mktemp("stories"), node="stories", versions=3)


def test_stories_delta_reaches_20_devices_then_a_failing_canary_halts(
        tmp_path: Path, stories: list[Bundle]) -> None:
    b1, b2, b3 = stories
    fleet = Fleet(tmp_path, "stories", b1)
    # v1 is what the devices were provisioned with: published so v2 can be a delta from it
    publish_release(fleet.home, "stories", 1, bundle=b1.folder, start_rollout=False)
    with fleet.running() as svc:
        t0 = time.monotonic()
        rel = publish_release(fleet.home, "stories", 2, bundle=b2.folder, delta_from=1,
                              canary=0.1, halt_at=0.2)
        assert rel.waves == [2, 20] and "delta" in rel.targets
        st = fleet.wait(int(rel.rollout or 0), ("done", "halted"), 90)
        took = time.monotonic() - t0
        assert st["state"] == "done", st
        assert st["counts"] == {"committed": N_DEVICES}, st["counts"]
        assert [w["reported"] for w in st["waves"]] == [2, 18]
        offered_after_reports(fleet.home, int(rel.rollout or 0))
        for d in fleet.devices:
            assert fleet.active_sha(d) == sha(b2)
        print(f"\nstories260K v1 -> v2 (delta {rel.sizes['delta']:,} B) reached "
              f"{N_DEVICES} devices in {took:.1f} s")

        # v3 with wrong golden tokens: the canary rolls back, the rollout halts
        good = HealthSpec.from_dict(dict(rel.health.to_dict())) if rel.health else None
        assert good is not None
        wrong = dataclasses.replace(good, expected=tuple((t + 1) % 512 for t in good.expected))
        bad = publish_release(fleet.home, "stories", 3, bundle=b3.folder, health=wrong,
                              canary=0.1, halt_at=0.2)
        st = fleet.wait(int(bad.rollout or 0), ("halted", "done"), 60)
        assert st["state"] == "halted", st
        canary = [d for d in st["devices"] if d["wave"] == 1]
        rest = [d for d in st["devices"] if d["wave"] == 2]
        assert len(canary) == 2 and len(rest) == 18
        assert any(d["state"] == "rolled_back" and d["reason"] == "wrong_output"
                   for d in canary), canary
        time.sleep(1.0)  # the service looks for due offers every 50 ms: none may come
        st = fleet.status(int(bad.rollout or 0))
        assert all(d["state"] == "waiting" and d["offers"] == 0 for d in st["devices"]
                   if d["wave"] == 2), st["devices"]
        assert st["waves"][1]["offered"] == 0
        for d in fleet.devices:  # everyone still runs v2, and it answers
            assert fleet.active_sha(d) == sha(b2), d
        for d in (c["device"] for c in canary):
            updater = fleet.agents[d].updater
            assert updater is not None
            with Model(updater.model_path()) as m:
                assert m.generate("Once upon a time", max_tokens=4, temperature=0)
        # the other 18 never heard of release 3
        for d in (r["device"] for r in rest):
            sent = fleet.agents[d].updates.sent  # type: ignore[union-attr]
            assert all(m.get("release") != 3 for m in sent), sent
        assert svc.stats["offers"] >= N_DEVICES + 2


def test_demo_leaf_reaches_20_devices(tmp_path: Path) -> None:
    v1 = restamp(DEMO_LEAF_Q4, tmp_path / "leaf1", version=1)
    v2 = restamp(DEMO_LEAF_Q8, tmp_path / "leaf2", version=2)
    fleet = Fleet(tmp_path, LEAF, v1)
    with fleet.running():
        t0 = time.monotonic()
        rel = publish_release(fleet.home, LEAF, 2, bundle=v2.folder, prompt="The heart",
                              canary=0.1, halt_at=0.2)
        st = fleet.wait(int(rel.rollout or 0), ("done", "halted"), 90)
        took = time.monotonic() - t0
        assert st["state"] == "done" and st["counts"] == {"committed": N_DEVICES}, st
        offered_after_reports(fleet.home, int(rel.rollout or 0))
        for d in fleet.devices:
            assert fleet.active_sha(d) == sha(v2)
        conn = store.connect(fleet.home.registry_db)
        try:
            deadline = time.monotonic() + 10  # the births after the commit name version 2
            while time.monotonic() < deadline:
                rows = conn.execute("SELECT node, version, count(*) FROM fleet_devices "
                                    "GROUP BY node, version").fetchall()
                if [tuple(r) for r in rows] == [(LEAF, 2, N_DEVICES)]:
                    break
                time.sleep(0.1)
            assert [tuple(r) for r in rows] == [(LEAF, 2, N_DEVICES)]
        finally:
            conn.close()
        print(f"\ndemo leaf v1 -> v2 ({rel.sizes['model']:,} B bundle) reached {N_DEVICES} "
              f"devices in {took:.1f} s")
