# SPDX-License-Identifier: MIT
"""Release scale: how long a release takes to reach N simulated devices, all committed.

One hub home with a TUF repository, one loopback Mosquitto, the hub service in its own
process (``python -m edgellm hub serve``: offers, TUF fetches, wave logic), and N devices,
each a real ``Agent`` (its own certificate, paho client, model store, ``DeviceUpdates``,
``Updater``) ticked by its own thread, spread over ``--workers`` processes. Every device is
provisioned with stories260K Q8_0 v1; the release is v2 (two tensors changed), offered as a
delta with the full bundle as fallback, canary 10 % first, then the rest.

The clock starts when ``publish_release`` is called (the release is signed and the rollout
row written inside it) and stops at the hub's last ``committed`` report (its
``reported_at``), so the figure covers signing, offers, TUF refresh and download per device,
delta apply, verify, install, the health check and the report back. By default devices run
the files-only check (``--health`` adds the golden-prompt check in a child process per
device: that measures fork and model load on this machine more than the fleet).

    python bench/release_scale.py --devices 200 > release.json
    python bench/release_scale.py --devices 20 --health --no-delta      # a quick look
    python bench/release_scale.py --health --waves 10%,20%,30%,40%,50%,60%,70%,80%,90%

All N devices of a wave run on this one machine at once: with ``--health`` that is N child
processes loading the model together, so keep waves small there (a real device has its CPU
to itself).

Prints one JSON object (with git commit, machine and settings) on stdout, a summary on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's edgellm, not an installed copy
sys.path.insert(0, str(ROOT / "tests"))  # support.releases builds the bundles

from edgellm.fleet import rollout, store  # noqa: E402
from edgellm.fleet.broker import Broker  # noqa: E402
from edgellm.fleet.home import HubHome  # noqa: E402
from edgellm.fleet.slots import SlotStore  # noqa: E402

NODE = "stories"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker(home_dir: str, devices: list[str]) -> int:
    """Run the agents of devices until SIGTERM; prints "ready" once all are connected."""
    from edgellm.fleet.agent import Agent
    from edgellm.fleet.device_config import load_device_config

    home = HubHome.open(home_dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    agents = []
    for d in devices:
        cfg = load_device_config(home.device_dir(d) / "device.toml")
        agent = Agent(dataclasses.replace(cfg, host="127.0.0.1", idle_s=0.0),
                      fetch_timeout=60.0, reconnect_max_s=5)
        agent.start(timeout=60)
        agents.append(agent)

    def loop(agent: Any) -> None:
        while not stop.is_set():
            agent.tick()
            stop.wait(0.1)

    threads = [threading.Thread(target=loop, args=(a,), daemon=True) for a in agents]
    for t in threads:
        t.start()
    print("ready", flush=True)
    stop.wait()
    for t in threads:
        t.join(30)
    for a in agents:
        a.stop()
    return 0


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2, help="device processes (default 2)")
    ap.add_argument("--canary", default="10%")
    ap.add_argument("--waves", default=None, help="cumulative wave shares, e.g. 10%%,20%%,...")
    ap.add_argument("--health", action="store_true",
                    help="golden-prompt check in a child process per device (default: files)")
    ap.add_argument("--no-delta", action="store_true", help="offer the full bundle only")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--work", default=None, help="folder to work in (default: a temporary one)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker is not None:
        home_dir, devs = a.worker.split(":", 1)
        return worker(home_dir, devs.split(","))

    from support.releases import stories_bundles

    from edgellm.fleet.release import publish_release

    work = Path(a.work or tempfile.mkdtemp(prefix="edgellm-release-scale-"))
    t = time.perf_counter()
    home = HubHome.init(work / "home", host="127.0.0.1", port=_free_port())
    b1, b2 = stories_bundles(work / "bundles", node=NODE)
    devices = [f"d-{i:05d}" for i in range(a.devices)]
    for d in devices:
        folder = home.add_device(d, board="rpi5", node=NODE)
        SlotStore(folder / "models").provision(b1.folder)
    print(f"provisioned {a.devices} devices in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    publish_release(home, NODE, 1, bundle=b1.folder, start_rollout=False)
    broker = Broker(home)
    broker.start(10)
    procs: list[subprocess.Popen[str]] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fds: list[int] = []

    def log_to(name: str) -> int:  # the child's stderr, for a look after a failure
        fds.append(os.open(work / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        return fds[-1]

    hub = subprocess.Popen([sys.executable, "-m", "edgellm", "hub", "serve", "--home",
                            str(home.root), "--batch-interval", "0.02"], env=env,
                           stdout=subprocess.DEVNULL,
                           stderr=log_to("hub.log"))
    try:
        t = time.perf_counter()
        for w in range(a.workers):
            mine = devices[w::a.workers]
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--worker", f"{home.root}:{','.join(mine)}"],
                env=env, stdout=subprocess.PIPE,
                stderr=log_to(f"worker{w}.log"), text=True))
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise SystemExit(f"a worker failed to start; see {work}/worker*.log")
        print(f"{a.devices} agents connected in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
        time.sleep(2.0)  # births stored
        t0 = time.time()
        rel = publish_release(home, NODE, 2, bundle=b2.folder,
                              delta_from=None if a.no_delta else 1, health=a.health,
                              canary=rollout.parse_share(a.canary),
                              waves=rollout.parse_waves(a.waves) if a.waves else None)
        rid = int(rel.rollout or 0)
        conn = store.connect(home.registry_db)
        st = rollout.status(conn, rid)
        while st["state"] == "active" and time.time() - t0 < a.timeout:
            time.sleep(0.5)
            st = rollout.status(conn, rid)
        waves = conn.execute(
            "SELECT wave, count(*), min(offered_at), max(reported_at) FROM fleet_rollout_devices "
            "WHERE rollout = ? GROUP BY wave ORDER BY wave", (rid,)).fetchall()
        conn.close()
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        hub.send_signal(signal.SIGTERM)
        hub.wait(30)
        broker.stop()
        for fd in fds:
            os.close(fd)
    done = st["counts"].get("committed", 0) + st["counts"].get("already_installed", 0)
    last = max((w[3] for w in waves if w[3] is not None), default=None)
    out = {
        "bench": "release_scale", "commit": _git_commit(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "devices": a.devices, "workers": a.workers,
        "model_bytes": rel.sizes["model"], "delta_bytes": rel.sizes.get("delta"),
        "health": "golden" if a.health else "files", "waves": rel.waves,
        "state": st["state"], "committed": done, "counts": st["counts"],
        "time_to_all_committed_s": round(last - t0, 2) if last is not None and
        done == a.devices else None,
        "per_wave": [{"wave": int(w[0]) + 1, "devices": int(w[1]),
                      "first_offer_s": round(w[2] - t0, 2) if w[2] else None,
                      "last_report_s": round(w[3] - t0, 2) if w[3] else None} for w in waves],
    }
    print(json.dumps(out))
    print(f"release v2 of {NODE} to {a.devices} devices ({'delta' if not a.no_delta else 'bundle'}"
          f", {out['health']} check): {st['state']}, {done} committed, all committed after "
          f"{out['time_to_all_committed_s']} s; waves {out['per_wave']}", file=sys.stderr)
    return 0 if done == a.devices else 1


if __name__ == "__main__":
    sys.exit(main())
