# SPDX-License-Identifier: MIT
"""Step 4 of the guided demo: a hub, a local Mosquitto, and a device that reports its use.

Kept apart from walkthrough.py because it needs the fleet stack (paho-mqtt, cryptography,
the mosquitto binary) while steps 1-3 need only the runtime.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .walkthrough import say


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def step_fleet(home_dir: Path, bundle: Any, board: str, questions: Sequence[str]) -> None:
    """Create a hub home, start Mosquitto and the hub service, run a device agent beside the
    chosen model, answer questions, report, and print what the hub knows."""
    from ..fleet import store
    from ..fleet.agent import Agent
    from ..fleet.broker import Broker, find_mosquitto
    from ..fleet.device_config import load_device_config
    from ..fleet.home import HubHome
    from ..fleet.service import HubService
    from ..runtime.model import Model

    say("4. Connecting the device to a hub", f"""`edgellm hub init` makes a hub home: a
        certificate authority used only for devices, the broker's server certificate, a
        Mosquitto config (TLS 1.2+, a client certificate required, the certificate's name as
        username and client id, pattern ACLs so a device reads and writes only its own
        topics, no anonymous access) and the hub's SQLite database. `edgellm hub add-device`
        issues a device a certificate under a random pseudonym -- never a serial number or a
        bed -- and a device.toml. The broker is the Debian `mosquitto` ({find_mosquitto()}),
        started by edgellm on a loopback port.""")
    home = HubHome.init(home_dir, host="127.0.0.1", port=_free_port())
    dev = home.add_device(None, board=board, node=bundle.node, version=bundle.version)
    cfg = load_device_config(dev / "device.toml")
    print(f"hub home {home.root}; device {cfg.device_id} ({board}) provisioned in {dev}")
    with Broker(home) as broker, HubService(home) as service:
        print(f"mosquitto pid {broker.pid} on 127.0.0.1:{home.port}; hub service subscribed")
        agent = Agent(cfg)
        agent.start()
        if not agent.wait_connected(10):
            raise RuntimeError(f"the agent did not connect; broker log:\n{broker.log_tail()}")
        say("5. Usage goes upstream, text does not", """The runtime counts every generate()
            through Model.usage_hook; the agent batches the counts into a usage report --
            requests, tokens, latency and speed percentiles, errors, which node answered --
            stamped with the hour only, numbered so the hub can see a gap, queued on disk
            while offline. The questions and answers never leave the device: the report's
            schema has no field that could hold them.""")
        with Model(bundle.model_path) as m:
            m.usage_hook = agent.usage.record
            for q in questions:
                m.generate(q, max_tokens=40, temperature=0)
        seq = agent.report()
        deadline = time.monotonic() + 10
        with store.connect(home.registry_db) as conn:
            while time.monotonic() < deadline:
                row = conn.execute("SELECT count(*) FROM fleet_usage WHERE device = ?",
                                   (cfg.device_id,)).fetchone()
                if row[0] > seq:
                    break
                time.sleep(0.1)
            got = conn.execute("SELECT * FROM fleet_usage WHERE device = ? ORDER BY seq DESC "
                               "LIMIT 1", (cfg.device_id,)).fetchone()
            if got is not None:
                print("the hub stored this report:",
                      json.dumps(dict(got), default=str))
            agent.stop()
            time.sleep(0.5)  # the death certificate reaches the hub
            say("6. What the hub sees (`edgellm hub status`)")
            print(store.format_status(store.fleet_status(conn)))
        print(f"(hub service: {service.stats})")
