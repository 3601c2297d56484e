# SPDX-License-Identifier: MIT
"""Fleet scale: one hub service and N simulated devices on one loopback Mosquitto.

Each simulated device has its own certificate (the broker's ACL binds topics to the CN), publishes
its birth (retained, QoS 1, with its death as the Will), then a usage report (QoS 1) every
``--interval`` seconds for ``--duration`` seconds; optionally every device then sends
``--burst`` reports back to back while the hub is paused (SIGSTOP), and the hub's drain rate
after SIGCONT is its ingest ceiling. One process drives all the
paho clients from one selector loop (no thread per device).

Measured (one JSON object on stdout, a summary on stderr):
- lost: reports the broker acknowledged to a device (PUBACK) but missing from the hub's SQLite,
  and every seq accounted for (``store.accounting``: stored or in a gap);
- delivery latency: device publish time -> the hub's ``stored_at`` (its batch's start), from
  the publish times recorded here per (device, seq) and ``fleet_usage.stored_at``;
- hub ingest rate (msg/s) in the steady phase and draining the burst backlog;
- CPU (% of one core) and peak RSS of the broker, the hub service and this simulator, from /proc.

    python bench/fleet_scale.py --devices 500 --duration 300 > fleet.json
    python bench/fleet_scale.py --devices 50 --duration 20 --burst 20   # a quick look

The hub runs as ``python -m edgellm hub serve`` in its own process, so its CPU and RSS are its own.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's edgellm, not an installed copy

from edgellm.fleet import protocol, store  # noqa: E402
from edgellm.fleet.broker import Broker  # noqa: E402
from edgellm.fleet.home import HubHome  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcStat:
    """CPU seconds and peak RSS of one process, read from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_mb = 0.0

    def cpu_s(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime

    def sample(self) -> None:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    self.peak_rss_mb = max(self.peak_rss_mb, int(line.split()[1]) / 1024)


def usage_payload(device: str, seq: int) -> bytes:
    return protocol.encode({
        "type": "usage", "device": device, "bdSeq": 0, "seq": seq, "hour": protocol.current_hour(),
        "periods": 1, "node": "en/medical/cardiology", "version": 3, "adapter": None,
        "requests": 4 + seq % 5, "prompt_tokens": 300, "gen_tokens": 500, "errors": int(seq % 17 == 0),
        "ratings_up": 1, "ratings_down": 0,
        "latency_ms": {"p50": 800.0, "p90": 1500.0, "p99": 2600.0},
        "tokens_per_s": {"p50": 11.5, "p90": 13.0, "p99": 14.0}, "peak_rss_mb": 410.0})


class Device:
    def __init__(self, home: HubHome, device_id: str, board: str) -> None:
        self.id = device_id
        self.board = board
        self.seq = 0
        self.acked: set[int] = set()
        self.pub_time: dict[int, float] = {}
        self._mid_seq: dict[int, int] = {}
        d = home.device_dir(device_id)
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        c.tls_set(ca_certs=str(d / "server-ca.crt"), certfile=str(d / "device.crt"),
                  keyfile=str(d / "device.key"))
        c.will_set(protocol.topic(device_id, "state"),
                   protocol.encode({"type": "death", "device": device_id, "bdSeq": 0}), qos=1,
                   retain=True)
        c.on_publish = self._on_publish
        self.client = c

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        seq = self._mid_seq.pop(mid, None)
        if seq is not None and not reason.is_failure:
            self.acked.add(seq)

    def birth(self) -> None:
        self.client.publish(protocol.topic(self.id, "state"), protocol.encode({
            "type": "birth", "device": self.id, "bdSeq": 0, "hour": protocol.current_hour(),
            "board": self.board, "node": "en/medical/cardiology", "version": 3, "adapter": None,
            "runtime": "edgellm-0.1"}), qos=1, retain=True)

    def report(self) -> None:
        seq = self.seq
        self.seq += 1
        payload = usage_payload(self.id, seq)
        self.pub_time[seq] = time.time()
        info = self.client.publish(protocol.topic(self.id, "usage"), payload, qos=1)
        self._mid_seq[info.mid] = seq


class Loop:
    """One selector over every device's socket: paho's external-loop API (no threads)."""

    def __init__(self, devices: list[Device]) -> None:
        self.devices = devices
        self.sel = selectors.DefaultSelector()
        self.last_misc = 0.0

    def register(self, dev: Device) -> None:
        self.sel.register(dev.client.socket(), selectors.EVENT_READ, dev)

    def step(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            c: mqtt.Client = key.data.client
            c.loop_read()
            sock = c.socket()
            while sock is not None and getattr(sock, "pending", lambda: 0)():
                c.loop_read()  # TLS may hold a whole record the selector cannot see
        now = time.monotonic()
        if now - self.last_misc > 0.05:
            self.last_misc = now
            for d in self.devices:
                if d.client.want_write():
                    d.client.loop_write()
                d.client.loop_misc()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of steady reporting")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between a device's reports")
    ap.add_argument("--burst", type=int, default=0, help="then reports per device, back to back")
    ap.add_argument("--batch-interval", type=float, default=0.1, help="the hub's batch interval (s)")
    ap.add_argument("--home", default=None, help="hub home to create (default: a temp dir)")
    a = ap.parse_args(argv)
    work = Path(a.home) if a.home else Path(tempfile.mkdtemp(prefix="fleet-scale-"))
    note = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)  # noqa: E731

    load_before = Path("/proc/loadavg").read_text().split()[:3]
    t0 = time.perf_counter()
    home = HubHome.init(work / "home", port=free_port())
    boards = ("rpi5", "rpi4", "jetson-orin-nano")
    ids = [f"sim-{i:05d}" for i in range(a.devices)]
    for i, dev_id in enumerate(ids):
        home.add_device(dev_id, board=boards[i % 3])
    issue_s = time.perf_counter() - t0
    note(f"home with {a.devices} device certificates in {issue_s:.1f} s")

    with Broker(home) as broker, open(work / "hub.log", "w") as hub_log:
        hub = subprocess.Popen([sys.executable, "-m", "edgellm", "hub", "serve", "--home",
                                str(home.root), "--batch-interval", str(a.batch_interval)],
                               cwd=ROOT, stderr=hub_log)
        procs = {"broker": ProcStat(int(broker.pid)), "hub": ProcStat(hub.pid),
                 "simulator": ProcStat(os.getpid())}
        conn = store.connect(home.registry_db)
        try:
            devices = [Device(home, dev_id, boards[i % 3]) for i, dev_id in enumerate(ids)]
            loop = Loop(devices)
            t0 = time.perf_counter()
            for d in devices:
                d.client.connect(home.host, home.port, keepalive=60)
                loop.register(d)
                loop.step(0)
            deadline = time.time() + 60
            while not all(d.client.is_connected() for d in devices) and time.time() < deadline:
                loop.step(0.05)
            connect_s = time.perf_counter() - t0
            note(f"{sum(d.client.is_connected() for d in devices)} devices connected in "
                 f"{connect_s:.1f} s")
            for d in devices:
                d.birth()
            # give the hub its birth certificates (and its session) before the clock starts
            wait_until(lambda: _count(conn, "SELECT count(*) FROM fleet_devices") >= a.devices,
                       60, lambda: loop.step(0.05))

            cpu0 = {k: p.cpu_s() for k, p in procs.items()}
            start = time.time() + 0.5
            due = [(start + a.interval * i / a.devices, i) for i in range(a.devices)]
            heapq.heapify(due)
            end = start + a.duration
            next_sample = 0.0
            while due[0][0] < end:
                now = time.time()
                while due and due[0][0] <= now:
                    t, i = heapq.heappop(due)
                    devices[i].report()
                    heapq.heappush(due, (t + a.interval, i))
                if now >= next_sample:
                    next_sample = now + 2.0
                    for p in procs.values():
                        p.sample()
                loop.step(max(0.0, min(0.01, due[0][0] - time.time())))
            steady_end = time.time()
            steady_s = steady_end - start
            cpu = {k: 100.0 * (p.cpu_s() - cpu0[k]) / steady_s for k, p in procs.items()}
            sent_steady = sum(d.seq for d in devices)
            note(f"steady phase: {sent_steady} reports in {steady_s:.0f} s; waiting for the hub")
            wait_until(lambda: _count(conn, "SELECT count(*) FROM fleet_usage") >= sent_steady,
                       120, lambda: loop.step(0.05))

            burst: dict[str, Any] = {}
            if a.burst:
                # the hub is paused (SIGSTOP) while every device sends its burst, so the broker
                # holds the whole backlog; after SIGCONT the drain rate is the hub's ceiling
                hub_cpu0 = procs["hub"].cpu_s()
                os.kill(hub.pid, signal.SIGSTOP)
                b0 = time.time()
                for _ in range(a.burst):
                    for d in devices:
                        d.report()
                    loop.step(0)
                total = sent_steady + a.burst * a.devices
                wait_until(lambda: sum(len(d.acked) for d in devices) >= total, 120,
                           lambda: loop.step(0.05))
                publish_s = time.time() - b0
                resumed = time.time()
                os.kill(hub.pid, signal.SIGCONT)
                wait_until(lambda: _count(conn, "SELECT count(*) FROM fleet_usage") >= total,
                           300, lambda: loop.step(0.05))
                last = conn.execute("SELECT max(stored_at) FROM fleet_usage").fetchone()[0]
                drain_s = last - resumed
                burst = {"reports": a.burst * a.devices, "publish_and_puback_s": round(publish_s, 2),
                         "hub_drain_s": round(drain_s, 2),
                         "hub_ingest_msg_per_s": round(a.burst * a.devices / drain_s, 1),
                         "hub_cpu_percent_during_drain": round(
                             100 * (procs["hub"].cpu_s() - hub_cpu0) / drain_s, 1)}
            for _ in range(20):  # let the last PUBACKs arrive
                loop.step(0.05)
            for p in procs.values():
                p.sample()

            # -- account for every report -------------------------------------------------------
            stored = {}
            for r in conn.execute("SELECT device, seq, stored_at FROM fleet_usage"):
                stored[(r[0], r[1])] = r[2]
            lat, lost, unacked, unaccounted = [], 0, 0, 0
            for d in devices:
                for seq, t in d.pub_time.items():
                    s = stored.get((d.id, seq))
                    if s is None:
                        lost += seq in d.acked
                        unacked += seq not in d.acked
                    elif seq < first_burst_seq(d, a.burst):
                        lat.append(s - t)
                acc = store.accounting(conn, d.id)
                unaccounted += acc["unaccounted"] + acc["gap_open"] + acc["gap_lost"]
            lat.sort()
            pct = lambda q: round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 1)  # noqa: E731
            result = {
                "bench": "fleet_scale", "commit": _git("rev-parse", "--short=12", "HEAD"),
                "git_diff": bool(_git("status", "--porcelain", "--untracked-files=no")),
                "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
                           f"{_cpu_model()}",
                "mosquitto": _mosquitto_version(), "paho": _paho_version(),
                "loadavg_before": load_before,
                "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
                "settings": {"devices": a.devices, "duration_s": a.duration,
                             "interval_s": a.interval, "burst": a.burst,
                             "hub_batch_interval_s": a.batch_interval},
                "cert_issue_s": round(issue_s, 1), "connect_s": round(connect_s, 1),
                "reports_sent": sum(d.seq for d in devices),
                "reports_acked_by_broker": sum(len(d.acked) for d in devices),
                "reports_stored": len(stored), "lost": lost, "unacked": unacked,
                "unaccounted_or_gap_seqs": unaccounted,
                "duplicates": _count(conn, "SELECT coalesce(sum(duplicates), 0) FROM fleet_devices"),
                "refused": store.rejects(conn),
                "offered_msg_per_s": round(sent_steady / steady_s, 1),
                # rows the hub committed during the steady phase, per second of it
                "hub_ingest_msg_per_s": round(_count(
                    conn, f"SELECT count(*) FROM fleet_usage WHERE stored_at BETWEEN {start} "
                          f"AND {steady_end}") / steady_s, 1),
                "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
                               "max": round(1000 * lat[-1], 1)} if lat else None,
                "cpu_percent_of_one_core": {k: round(v, 1) for k, v in cpu.items()},
                "peak_rss_mb": {k: round(p.peak_rss_mb, 1) for k, p in procs.items()},
                "burst": burst or None,
            }
            for d in devices:
                d.client.disconnect()
                loop.step(0)
        finally:
            conn.close()
            hub.terminate()
            try:
                hub.wait(30)
            except subprocess.TimeoutExpired:
                hub.kill()
    print(json.dumps(result))
    note(json.dumps(result, indent=1))
    return 0 if lost == 0 and unaccounted == 0 else 1


def first_burst_seq(d: Device, burst: int) -> int:
    return d.seq - burst


def wait_until(cond: Any, timeout: float, step: Any) -> None:
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        step()


def _count(conn: Any, sql: str) -> int:
    return int(conn.execute(sql).fetchone()[0])


def _git(*args: str) -> str:
    r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return r.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mosquitto_version() -> str:
    r = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False)
    return (r.stdout or r.stderr).splitlines()[0] if (r.stdout or r.stderr) else "?"


def _paho_version() -> str:
    from importlib.metadata import version
    return version("paho-mqtt")


if __name__ == "__main__":
    raise SystemExit(main())
