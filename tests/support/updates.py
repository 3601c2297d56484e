# SPDX-License-Identifier: MIT
"""Signed-update test fixtures: stories260K releases, a hub with a TUF repository behind a real
mosquitto, and agents with a model store (tests/test_tamper.py, tests/test_device_updates.py).

Usage (tests/ is on sys.path)::

    from support.updates import Models, build_models, UpdateHub
    models = build_models(tmp)                 # m1 (v1), m2 (v2), m3 (v3), deltas, adapter
    with UpdateHub(tmp_path, models) as hub:   # home + TUF (root threshold 2) + broker + hub
        agent = hub.agent("dev-000")           # provisioned with v1, connected, idle_s = 0
        names = hub.publish(models.b2, release=2)       # {"model": ..., "manifest": ...}
        report = hub.offer_and_wait(agent, names)       # the "update" message the hub got

The hub side is one MQTT client (the hub's certificate): it answers TUF fetches
(TufResponder) and records every message on the devices' state topics.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from edgellm.fleet import protocol
from edgellm.fleet.agent import Agent
from edgellm.fleet.broker import Broker
from edgellm.fleet.device_config import load_device_config
from edgellm.fleet.home import HubHome
from edgellm.fleet.patch import make_adapter_patch, make_delta, sha256_path
from edgellm.fleet.slots import SlotStore
from edgellm.fleet.tuf_mqtt import TufResponder
from edgellm.fleet.tuf_repo import TufRepo
from edgellm.formats.bundle import Bundle
from edgellm.formats.convert import convert
from edgellm.runtime.model import Model

from .bundles import make_bundle, small_adapter, tweak_gguf
from .fleet import close, free_port, hub_client

__all__ = ["NODE", "PROMPT", "Models", "UpdateHub", "build_models", "greedy"]

DATA = Path(__file__).resolve().parents[1] / "data" / "stories260K"
NODE = "en/medical"
PROMPT = "Once upon a time"


def greedy(model_path: Path, n: int = 6) -> str:
    """The model's greedy continuation of PROMPT: it loads and answers."""
    with Model(model_path) as m:
        return str(m.generate(PROMPT, max_tokens=n, temperature=0))


@dataclasses.dataclass
class Models:
    """Three versions of one node, their bundles, patches and an adapter."""

    root: Path
    b1: Bundle
    b2: Bundle
    b3: Bundle
    delta12: Path  # turns v1 into v2
    delta32: Path  # turns v3 into v2: "a delta built against the wrong base" for a v1 device
    adapter: Path  # the adapter GGUF (for v1)
    adapter_patch: Path  # its patch, bound to v1
    golden1: str  # v1's greedy answer to PROMPT

    @staticmethod
    def sha(b: Bundle) -> str:
        return b.file("model.gguf").sha256


def build_models(root: Path) -> Models:
    root.mkdir(parents=True, exist_ok=True)
    m1 = convert(DATA / "stories260K.bin", root / "m1.gguf", type="q8_0",
                 tokenizer=DATA / "tok512.bin", log=None)
    m2 = tweak_gguf(m1, root / "m2.gguf", ("blk.0.attn_q.weight", "blk.1.ffn_up.weight"),
                    np.random.default_rng(1))
    m3 = tweak_gguf(m1, root / "m3.gguf", ("blk.2.attn_k.weight",), np.random.default_rng(2))
    b1, b2, b3 = (make_bundle(root / f"b{i}", m, node=NODE, version=i)
                  for i, m in ((1, m1), (2, m2), (3, m3)))
    delta12 = root / "v1-v2.patch"
    delta12.write_bytes(make_delta(m1, m2, node=NODE))
    delta32 = root / "v3-v2.patch"
    delta32.write_bytes(make_delta(m3, m2, node=NODE))
    adapter = small_adapter(m1, root / "adapter.gguf", np.random.default_rng(0))
    apatch = root / "adapter.patch"
    apatch.write_bytes(make_adapter_patch(adapter, m1, node=NODE))
    return Models(root, b1, b2, b3, delta12, delta32, adapter, apatch, greedy(m1))


class UpdateHub:
    """A hub home with a TUF repository (root threshold 2), its broker, and one hub client
    that serves TUF fetches and records the devices' state messages."""

    def __init__(self, tmp: Path, models: Models, *, root_keys: int = 2) -> None:
        self.tmp = tmp
        self.models = models
        self.home = HubHome.init(tmp / "hub", host="127.0.0.1", port=free_port(), tuf=False)
        self.repo = TufRepo.init(self.home, keys={"root": root_keys},
                                 thresholds={"root": root_keys})
        self.broker = Broker(self.home)
        self.client: mqtt.Client | None = None
        self.messages: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.agents: list[Agent] = []
        self._rollout = 0

    def __enter__(self) -> UpdateHub:
        self.broker.start(10)
        c = hub_client(self.home)
        self.client = c
        self.responder = TufResponder(self.repo, c)
        self.responder.attach()
        c.message_callback_add(f"{protocol.PREFIX}/dev/+/state", self._on_state)
        done = threading.Event()
        c.on_subscribe = lambda *a: done.set()
        c.subscribe(f"{protocol.PREFIX}/dev/+/state", qos=1)
        done.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        for a in self.agents:
            a.stop()
        if self.client is not None:
            close(self.client)
        self.broker.stop()

    def _on_state(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        obj = protocol.decode(bytes(msg.payload))
        with self._cond:
            self.messages.append(obj)
            self._cond.notify_all()

    def updates(self, device: str) -> list[dict[str, Any]]:
        with self._cond:
            return [m for m in self.messages if m["type"] == "update"
                    and m.get("device", device) == device]

    def births(self, device: str) -> list[dict[str, Any]]:
        with self._cond:
            return [m for m in self.messages if m["type"] == "birth" and m["device"] == device]

    # -- devices ------------------------------------------------------------------------

    def agent(self, device: str, *, board: str = "rpi5", bundle: Bundle | None = None,
              **cfg_kw: Any) -> Agent:
        """Provision device (certificate, TUF root, a store holding bundle, default v1),
        then start its agent (updates allowed at once: idle_s = 0)."""
        folder = self.home.add_device(device, board=board, node=NODE)
        SlotStore(folder / "models").provision((bundle or self.models.b1).folder)
        cfg = load_device_config(folder / "device.toml")
        cfg = dataclasses.replace(cfg, host="127.0.0.1", **{"idle_s": 0.0, **cfg_kw})
        agent = Agent(cfg, fetch_timeout=5.0)
        assert agent.updates is not None, "no DeviceUpdates: store or TUF root missing"
        agent.updates.backoff = 0.05
        agent.start(timeout=10)
        self.agents.append(agent)
        return agent

    # -- releases -----------------------------------------------------------------------

    def publish(self, bundle: Bundle, *, release: int, board: str = "rpi5",
                devices: list[str] | None = None, delta: Path | None = None,
                delta_base: str | None = None, adapter: bool = False,
                health: dict[str, Any] | None = None, tag: str = "") -> dict[str, str]:
        """Publish one release (one targets version); returns the offer's target names."""
        m = self.models
        sha = Models.sha(bundle)
        common: dict[str, Any] = {"node": NODE, "version": bundle.version, "release": release,
                                  "board": board, "model_sha256": sha}
        if devices is not None:
            common["devices"] = devices
        if health is not None:
            common["health"] = health
        stem = f"en-medical.v{bundle.version}.r{release}{tag}"
        items: list[tuple[Path, dict[str, Any], str]] = [
            (bundle.folder / "model.gguf", {**common, "kind": "model"}, f"{stem}.gguf"),
            (bundle.folder / "bundle.json", {**common, "kind": "manifest"}, f"{stem}.json")]
        names = {"model": f"{stem}.gguf", "manifest": f"{stem}.json"}
        if delta is not None:
            base = delta_base or Models.sha(m.b1)
            items.append((delta, {**common, "kind": "delta", "base_sha256": base},
                          f"{stem}.delta"))
            names["delta"] = f"{stem}.delta"
        if adapter:
            items.append((m.adapter_patch, {**common, "kind": "adapter", "base_sha256": sha,
                                            "adapter_sha256": sha256_path(m.adapter)},
                          f"{stem}.adapter"))
            names["adapter"] = f"{stem}.adapter"
        self.repo.add_targets(items)
        return names

    def offer(self, device: str, names: dict[str, str]) -> int:
        """Send an offer on device's cmd topic; returns its rollout id."""
        assert self.client is not None
        self._rollout += 1
        msg = protocol.encode({"type": "offer", "rollout": self._rollout, "targets": names})
        self.client.publish(protocol.topic(device, "cmd"), msg, qos=1).wait_for_publish(5)
        return self._rollout

    def wait_report(self, agent: Agent, rollout: int, timeout: float = 30.0,
                    outcome: str | None = None) -> dict[str, Any]:
        """Tick agent until the hub got an update report of rollout (and outcome)."""
        device = agent.cfg.device_id
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            agent.tick()
            for r in self.updates(device):
                if r["rollout"] == rollout and (outcome is None or r["outcome"] == outcome):
                    return r
            time.sleep(0.02)
        raise AssertionError(f"no update report for rollout {rollout} from {device} in "
                             f"{timeout} s; got {self.updates(device)}")

    def offer_and_wait(self, agent: Agent, names: dict[str, str], **kw: Any) -> dict[str, Any]:
        return self.wait_report(agent, self.offer(agent.cfg.device_id, names), **kw)

    def settle(self, agent: Agent, timeout: float = 5.0) -> None:
        """Tick until every report of agent left its outbox (acknowledged)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            agent.tick()
            if agent.updater is not None and not agent.updater.reports():
                return
            time.sleep(0.02)
        raise AssertionError(f"reports still in the outbox: {agent.updater and agent.updater.reports()}")


def read_json(path: Path) -> Any:
    return json.loads(path.read_bytes())
