# SPDX-License-Identifier: MIT
"""Steps 4-5 and 8 of the guided demo: a hub, a device flashed from it, usage upstream, and
what the hub sees at the end (steps 6-7, the signed updates, are in update_step.py).

Kept apart from walkthrough.py because it needs the fleet stack (paho-mqtt, cryptography,
python-tuf, the mosquitto binary) while steps 1-3 need only the runtime.

Public API: ``step_fleet(work, bundle, board, questions)``, ``provision(home, bundle, board,
card)``, ``answer(agent, question)``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .walkthrough import DEMO, say

DEVICE_ID = "d-demobedside1"  # a pseudonym; `hub add-device` makes random ones


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def provision(home: Any, bundle: Any, board: str, card: Path) -> Path:
    """`edgellm flash --to dir:CARD/bootfs` and the device's first boot into CARD/rootfs;
    returns the device root (rootfs/var/lib/edgellm)."""
    from ..flash.firstboot import DEVICE_ROOT, run_firstboot
    from ..flash.targets import flash

    boot, rootfs = card / "bootfs", card / "rootfs"
    boot.mkdir(parents=True)
    rootfs.mkdir()
    # what Raspberry Pi OS puts on a card's boot partition (the two files flash checks for)
    (boot / "cmdline.txt").write_text("console=serial0,115200 console=tty1 root=PARTUUID="
                                      "4e639091-02 rootfstype=ext4 fsck.repair=yes rootwait\n")
    (boot / "config.txt").write_text("[all]\narm_64bit=1\n")
    log = io.StringIO()
    res = flash(board=board, device_id=DEVICE_ID, target=f"dir:{boot}", home=home.root,
                model=str(bundle.folder), show_progress=False, log=log)
    print(f"$ edgellm flash --board {board} --device {DEVICE_ID} --model {bundle.folder} "
          f"--to dir:{boot} --home {home.root}")
    print(log.getvalue().rstrip())
    print(res.line())
    active = run_firstboot(boot, rootfs, exe="edgellm")
    print(f"$ edgellm firstboot --boot {boot} --sysroot {rootfs}")
    hook = "still there" if "systemd.run=" in (boot / "cmdline.txt").read_text() else "removed"
    print(f"first boot: {active.node} v{active.version} installed in {rootfs}{DEVICE_ROOT}"
          f"/models, edgellm-agent.service enabled; the package and the cmdline.txt hook {hook}")
    return rootfs / DEVICE_ROOT.strip("/")


def answer(agent: Any, question: str, max_tokens: int = 24) -> str:
    """The device's answer with its active model, under the update lock (no swap mid-answer)."""
    from ..runtime.model import Model

    with agent.updater.lock.session(), Model(agent.model_path()) as m:
        m.usage_hook = agent.usage.record
        return str(m.generate(question, max_tokens=max_tokens, temperature=0))


def step_fleet(work: Path, bundle: Any, board: str, questions: Sequence[str]) -> None:
    """Hub home, a flashed device, Mosquitto, the hub service and the device's agent; usage
    upstream; the signed update and the forged one (update_step); then what the hub knows."""
    from ..fleet import rollout, store
    from ..fleet.agent import Agent
    from ..fleet.broker import Broker, find_mosquitto
    from ..fleet.device_config import load_device_config
    from ..fleet.home import HubHome
    from ..fleet.service import HubService
    from ..formats.bundle import list_bundles
    from .update_step import step_forged, step_release

    home_dir, card = work / "hub", work / "sdcard"
    for p in (home_dir, card):
        shutil.rmtree(p, ignore_errors=True)
    small = next(b for b in list_bundles(DEMO / "bundles")
                 if b.node == bundle.node and b.board == bundle.board and b.recipe == "q4_0_mixed")
    ppl = {b.recipe: b.scores["cardiology"].ppl for b in (small, bundle)}
    say("4. A hub, and a device flashed from it", f"""`edgellm hub init` makes a hub home: a
        certificate authority used only for devices, the broker's certificate, a Mosquitto
        config (TLS, a client certificate required, ACLs so a device reads and writes only its
        own topics) and a TUF repository whose keys sign every update. `edgellm flash` issues
        the device a certificate under a pseudonym -- never a serial number or a bed -- and
        packs it with a model into a flash package; `--to dir:` writes it onto an SD card's
        boot partition (a folder stands in for the card here), and the device installs it at
        its first boot. We flash the leaf's smaller 4-bit build ({small.recipe}, cardiology
        perplexity {ppl[small.recipe]:.2f}) so that step 6 has an improvement to deliver:
        the 8-bit build step 2 chose ({ppl[bundle.recipe]:.2f}).""")
    home = HubHome.init(home_dir, host="127.0.0.1", port=_free_port())
    dev_root = provision(home, small, board, card)
    # idle_s 0: swap as soon as no answer is running (a ward device waits 15 idle minutes or
    # for its maintenance window)
    cfg = dataclasses.replace(load_device_config(dev_root / "device.toml"), idle_s=0.0)
    with Broker(home) as broker, HubService(home, offer_interval=0.05) as service:
        print(f"mosquitto ({find_mosquitto()}) pid {broker.pid} on 127.0.0.1:{home.port}; "
              "hub service (`edgellm hub serve`) subscribed")
        agent = Agent(cfg, fetch_timeout=10.0)
        agent.start()
        if not agent.wait_connected(10):
            raise RuntimeError(f"the agent did not connect; broker log:\n{broker.log_tail()}")
        print(f"device agent (`edgellm agent --config {dev_root / 'device.toml'}`) connected; "
              f"it serves {agent.model_path()}")
        say("5. Usage goes upstream, text does not", """The runtime counts every generate()
            through Model.usage_hook; the agent batches the counts into a usage report --
            requests, tokens, latency and speed percentiles, errors, which node answered --
            stamped with the hour only, numbered so the hub can see a gap, queued on disk
            while offline. The questions and answers never leave the device: the report's
            schema has no field that could hold them.""")
        for q in questions:
            answer(agent, q, max_tokens=40)
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
            print("the hub stored this report:", json.dumps(dict(got), default=str))
        good = step_release(home, agent, bundle, questions[0])
        step_forged(home, agent, bundle, questions[0], good)
        agent.stop()
        time.sleep(0.5)  # the death certificate reaches the hub
        say("8. What the hub sees (`edgellm hub status`, `edgellm hub rollout status`)")
        with store.connect(home.registry_db) as conn:
            print(store.format_status(store.fleet_status(conn)))
            flags = [d["device"] for d in store.devices(conn) if d.get("attack")]
            print("devices flagged as attacked:", ", ".join(flags) or "none")
            print()
            print(rollout.format_status(rollout.rollouts(conn)))
        print(f"(hub service: {service.stats})")
