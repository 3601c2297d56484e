# SPDX-License-Identifier: MIT
"""The device agent against a real mosquitto: birth/death/bdSeq, offline queue, reconnect, no PHI."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from support.fleet import Inbox, close, hub_client, make_home, running_broker, wait_until

from edgellm.errors import DeviceConfigError
from edgellm.fleet import protocol, store
from edgellm.fleet.agent import Agent
from edgellm.fleet.device_config import DeviceConfig, load_device_config, write_device_config
from edgellm.fleet.home import HubHome
from edgellm.fleet.queue import ReportQueue
from edgellm.fleet.service import HubService
from edgellm.fleet.usage import UsageRecorder
from edgellm.runtime.model import GenerationStats

DEV = "dev-000"
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's edgellm in subprocesses


def _cfg(home: HubHome, device: str = DEV, **kw: Any) -> DeviceConfig:
    cfg = load_device_config(home.device_dir(device) / "device.toml")
    return replace(cfg, host="127.0.0.1", **kw)


def _watch(home: HubHome, pattern: str = "edgellm/v1/#") -> tuple[mqtt.Client, Inbox]:
    hub = hub_client(home)
    inbox = Inbox()
    hub.on_message = inbox
    hub.subscribe(pattern, qos=1)
    time.sleep(0.2)
    return hub, inbox


def _state(inbox: Inbox) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in inbox.messages if m.topic.endswith("/state")]


# -- device config ----------------------------------------------------------------------------

def test_add_device_output_loads_and_roundtrips(tmp_path: Path) -> None:
    home = make_home(tmp_path, n_devices=1)
    path = home.device_dir(DEV) / "device.toml"
    cfg = load_device_config(path)
    assert cfg.device_id == DEV and cfg.board == "rpi5" and cfg.node == "en/medical"
    assert cfg.ca == path.parent / "server-ca.crt" and cfg.ca.is_file()
    assert cfg.state_dir == path.parent / "state" and cfg.model_path is None
    assert cfg.share_examples is False and cfg.queue_max_bytes == 50_000_000
    other = tmp_path / "copy" / "device.toml"
    write_device_config(other, cfg)  # paths outside the folder stay absolute
    assert load_device_config(other) == cfg


@pytest.mark.parametrize(("section", "line", "bad", "field"), [
    ("broker", "port = ", "port = 70000", "port"),
    ("broker", "port = ", 'port = "x"', "port"),
    ("agent", "queue_max_bytes = ", "queue_max_bytes = 10", "queue_max_bytes"),
    ("agent", "share_examples = ", "share_examples = 1", "share_examples"),
    ("device", "id = ", 'id = "Bad/Id+"', "id"),
    ("broker", "ca = ", 'ca = "missing.crt"', "ca"),
    ("agent", "report_interval_s = ", "report_interval_s = -5", "report_interval_s"),
])
def test_bad_device_config_names_file_and_field(tmp_path: Path, section: str, line: str,
                                                 bad: str, field: str) -> None:
    home = make_home(tmp_path, n_devices=1)
    path = home.device_dir(DEV) / "device.toml"
    lines = [bad if ln.startswith(line) else ln for ln in path.read_text().splitlines()]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DeviceConfigError) as ei:
        load_device_config(path)
    msg = str(ei.value)
    assert str(path) in msg and f"[{section}] {field}" in msg


def test_missing_and_broken_config(tmp_path: Path) -> None:
    with pytest.raises(DeviceConfigError, match="no such device config"):
        load_device_config(tmp_path / "nope.toml")
    (tmp_path / "x.toml").write_text("[device\n")
    with pytest.raises(DeviceConfigError, match="not valid TOML"):
        load_device_config(tmp_path / "x.toml")


# -- usage recorder ---------------------------------------------------------------------------

def test_usage_recorder_counts_and_resets() -> None:
    r = UsageRecorder()
    for i in range(1, 1001):
        s = GenerationStats()
        s.prompt_tokens, s.generated_tokens, s.prefill_s, s.decode_s = 5, 10, 0.0, i / 1000
        r.record(s)
    r.rate(True)
    r.rate(False)
    r.error()
    out = r.take(123)
    assert out["requests"] == 1000 and out["gen_tokens"] == 10_000 and out["prompt_tokens"] == 5000
    assert (out["ratings_up"], out["ratings_down"], out["errors"]) == (1, 1, 1)
    assert out["latency_ms"]["p50"] == pytest.approx(500, rel=0.03)
    assert out["latency_ms"]["p99"] == pytest.approx(990, rel=0.03)
    assert out["tokens_per_s"]["p50"] == pytest.approx(20, rel=0.03)
    assert r.take(124)["requests"] == 0
    assert len(r._latency.counts) < 500  # fixed memory


def test_usage_recorder_is_thread_safe() -> None:
    import threading
    r = UsageRecorder()
    s = GenerationStats()
    s.prompt_tokens, s.generated_tokens, s.prefill_s, s.decode_s = 1, 2, 0.001, 0.01

    def work() -> None:
        for _ in range(2500):
            r.record(s)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = r.take(1)
    assert out["requests"] == 10_000 and out["gen_tokens"] == 20_000


def test_queue_survives_a_crash(tmp_path: Path) -> None:
    import subprocess
    import sys
    code = ("import os, sys; from edgellm.fleet.queue import ReportQueue\n"
            "q = ReportQueue(sys.argv[1], 1 << 20); q.next_bd_seq()\n"
            "for i in range(50): q.put({'requests': i, 'periods': 1})\n"
            "q.ack(0); os._exit(0)  # no close, no checkpoint\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60, env=ENV)
    q = ReportQueue(tmp_path, 1 << 20)
    assert q.next_seq == 50 and len(q) == 49 and q.bd_seq == 0
    assert [s for s, _ in q.peek(3)] == [1, 2, 3] and q.put({"periods": 1}) == 50
    assert q.next_bd_seq() == 1
    q.close()


# -- birth, death, bdSeq, rebirth, bad commands ----------------------------------------------

def test_birth_death_bdseq_rebirth_and_bad_commands(tmp_path: Path) -> None:
    home = make_home(tmp_path, n_devices=1)
    cfg = _cfg(home)
    with running_broker(home):
        hub, inbox = _watch(home)
        agent = Agent(cfg).start(timeout=10)
        assert inbox.wait_for(1)
        birth = _state(inbox)[0]
        assert inbox.messages[0].retain is False  # live delivery; retained flag checked below
        assert birth["type"] == "birth" and birth["bdSeq"] == 0 and birth["board"] == "rpi5"
        assert birth["node"] == "en/medical" and birth["version"] == 1
        assert birth["hour"] == protocol.current_hour() and "runtime" in birth
        protocol.decode(inbox.messages[0].payload)
        # retained: a new subscription gets it again, flagged retained
        hub.subscribe(protocol.topic(DEV, "state"), qos=1)
        assert inbox.wait_for(2) and inbox.messages[1].retain
        assert json.loads(inbox.messages[1].payload) == birth
        hub.unsubscribe(protocol.topic(DEV, "state"))
        time.sleep(0.2)
        inbox.messages.clear()
        # bad commands: oversized, not JSON, wrong version, unknown type -- then a rebirth
        cmd = protocol.topic(DEV, "cmd")
        for payload in (b"x" * (protocol.MAX_MESSAGE_BYTES + 1), b"\xff{", b'{"v":2,"type":"rebirth"}',
                        b'{"v":1,"type":"selfdestruct"}', b"[]"):
            hub.publish(cmd, payload, qos=1).wait_for_publish(5)
        hub.publish(cmd, protocol.encode({"type": "rebirth"}), qos=1).wait_for_publish(5)
        hub_ = wait_until(lambda: len(_state(inbox)) >= 1)
        assert hub_ and agent.stats["bad_commands"] == 5
        assert _state(inbox)[0]["type"] == "birth" and _state(inbox)[0]["bdSeq"] == 0
        assert agent.wait_connected(1)  # still running
        # abrupt loss: the broker publishes the Will with this connection's bdSeq
        agent.kill()
        assert wait_until(lambda: len(_state(inbox)) >= 2)
        assert _state(inbox)[1] == {"v": 1, "type": "death", "device": DEV, "bdSeq": 0}
        # restart: bdSeq + 1; clean stop publishes the death with it
        agent = Agent(cfg).start(timeout=10)
        assert wait_until(lambda: len(_state(inbox)) >= 3)
        assert _state(inbox)[2]["type"] == "birth" and _state(inbox)[2]["bdSeq"] == 1
        agent.stop()
        assert wait_until(lambda: len(_state(inbox)) >= 4)
        assert _state(inbox)[3] == {"v": 1, "type": "death", "device": DEV, "bdSeq": 1}
        close(hub)


# -- offline queue ----------------------------------------------------------------------------

def _fill(agent: Agent, n: int, hour0: int) -> None:
    for i in range(n):
        s = GenerationStats()
        s.prompt_tokens, s.generated_tokens, s.prefill_s, s.decode_s = 7, 11, 0.01, 0.1
        agent.usage.record(s)
        agent.report(hour=hour0 + i)


def test_offline_10000_reports_capped_then_drained_and_accounted(tmp_path: Path) -> None:
    home = make_home(tmp_path, n_devices=1)
    cap = 256 * 1024
    cfg = _cfg(home, queue_max_bytes=cap)
    agent = Agent(cfg)  # not started: offline
    hour0 = protocol.current_hour()
    t0 = time.perf_counter()
    peak = 0
    for k in range(10):
        _fill(agent, 1000, hour0 + 1000 * k)
        peak = max(peak, agent.queue.file_bytes())
    put_s = time.perf_counter() - t0
    st = agent.queue.stats()
    assert st["next_seq"] == 10_000 and peak <= cap, (st, peak)
    rows = agent.queue.peek(100_000)
    seqs = [s for s, _ in rows]
    assert seqs == list(range(10_000 - len(seqs), 10_000))  # the OLDEST were merged away
    first = rows[0][1]
    assert first["dropped"] == 10_000 - len(seqs)  # every merged seq declared
    assert first["requests"] + sum(r["requests"] for _, r in rows[1:]) == 10_000  # nothing lost
    assert first["periods"] == first["dropped"] + 1
    with running_broker(home):
        service = HubService(home).start()
        t1 = time.perf_counter()
        agent.start(timeout=10)
        assert agent.drain(timeout=60) and len(agent.queue) == 0
        drain_s = time.perf_counter() - t1
        conn = store.connect(home.registry_db)
        ok = wait_until(lambda: store.accounting(conn, DEV)["next_seq"] == 10_000, 20)
        acc = store.accounting(conn, DEV)
        agent.stop()
        service.stop()
    assert ok, acc
    assert acc["unaccounted"] == 0 and acc["gap_open"] == 0 and acc["gap_lost"] == 0, acc
    assert acc["reports"] == len(seqs) and acc["gap_dropped"] == 10_000 - len(seqs), acc
    print(f"\nqueue: {len(seqs)} rows kept of 10000, peak {peak} B on disk (cap {cap}), "
          f"{st['payload_bytes'] / max(1, st['rows']):.0f} B/report payload; "
          f"put {put_s / 10_000 * 1e3:.2f} ms/report; drain {len(seqs) / drain_s:.0f} reports/s")


def test_drain_order_at_hub_subscriber_and_restart_persistence(tmp_path: Path) -> None:
    home = make_home(tmp_path, n_devices=1)
    cfg = _cfg(home)
    agent = Agent(cfg)
    _fill(agent, 300, 1000)
    agent.stop()  # never connected: nothing sent, state persisted
    q = ReportQueue(cfg.state_dir, cfg.queue_max_bytes)
    assert len(q) == 300 and q.next_seq == 300 and q.bd_seq == 0
    q.close()
    with running_broker(home):
        hub, inbox = _watch(home, protocol.topic(DEV, "usage"))
        agent = Agent(cfg)
        assert agent.bd_seq == 1  # +1 per connection, across restarts
        t1 = time.perf_counter()
        agent.start(timeout=10)
        assert agent.drain(30)
        assert inbox.wait_for(300, 10)
        rate = 300 / (time.perf_counter() - t1)
        seqs = [json.loads(m.payload)["seq"] for m in inbox.messages]
        first_seen = list(dict.fromkeys(seqs))
        assert first_seen == list(range(300))
        assert agent.report(hour=2000) == 300
        assert inbox.wait_for(301, 10) and json.loads(inbox.messages[-1].payload)["seq"] == 300
        agent.stop()
        close(hub)
    print(f"\ndrain with subscriber: {rate:.0f} reports/s")


def test_reconnect_after_broker_restart_delivers_queue(tmp_path: Path) -> None:
    home = make_home(tmp_path, n_devices=1)
    agent = Agent(_cfg(home), reconnect_max_s=2)
    with running_broker(home):
        agent.start(timeout=10)
        _fill(agent, 5, 100)
        assert len(agent.queue) == 0
    assert wait_until(lambda: not agent.wait_connected(0), 5)
    _fill(agent, 20, 200)  # offline now
    assert len(agent.queue) == 20
    with running_broker(home):
        hub, inbox = _watch(home, protocol.topic(DEV, "usage"))
        assert agent.wait_connected(15)
        assert agent.drain(15) and len(agent.queue) == 0
        assert inbox.wait_for(20, 10)
        seqs = sorted({json.loads(m.payload)["seq"] for m in inbox.messages})
        assert seqs == list(range(5, 25))
        assert agent.bd_seq >= 1
        agent.stop()
        close(hub)


def test_oversized_report_is_dropped_and_declared(tmp_path: Path) -> None:
    home = make_home(tmp_path, n_devices=1)
    with running_broker(home):
        hub, inbox = _watch(home, protocol.topic(DEV, "usage"))
        agent = Agent(_cfg(home)).start(timeout=10)
        agent.max_packet = 100  # as if the broker's CONNACK said so
        agent.report(hour=1)
        assert agent.stats["oversized"] == 1 and len(agent.queue) == 0
        agent.max_packet = protocol.MAX_MESSAGE_BYTES
        agent.report(hour=2)
        assert inbox.wait_for(1)
        msg = json.loads(inbox.messages[0].payload)
        assert msg["seq"] == 1 and msg["dropped"] == 1
        agent.stop()
        close(hub)


# -- the CLI ----------------------------------------------------------------------------------

def test_cli_agent_once(tmp_path: Path) -> None:
    import subprocess
    import sys
    home = make_home(tmp_path, n_devices=1)
    path = home.device_dir(DEV) / "device.toml"
    assert load_device_config(path).host == "127.0.0.1"
    with running_broker(home):
        hub, inbox = _watch(home)
        r = subprocess.run([sys.executable, "-m", "edgellm", "agent", "--config", str(path),
                            "--once"], capture_output=True, text=True, timeout=60, env=ENV)
        assert r.returncode == 0, r.stderr
        assert inbox.wait_for(3)
        kinds = [(m.topic.rsplit("/", 1)[1], json.loads(m.payload)["type"])
                 for m in inbox.messages]
        assert kinds == [("state", "birth"), ("usage", "usage"), ("state", "death")]
        assert json.loads(inbox.messages[1].payload)["seq"] == 0
        close(hub)
    path.write_text(path.read_text().replace("port = ", "port = -"))
    r = subprocess.run([sys.executable, "-m", "edgellm", "agent", "--config", str(path)],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 1 and "[broker] port" in r.stderr, r.stderr
