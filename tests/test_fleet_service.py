# SPDX-License-Identifier: MIT
"""The hub service: sequence accounting in SQLite, then the service against a real mosquitto."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from edgellm.errors import InvalidArgumentError
from edgellm.fleet import protocol, store

HOUR = 490_000  # a fixed Unix hour for the pure store tests
NOW = HOUR * 3600.0 + 60


def usage_msg(device: str, seq: int, *, bd_seq: int = 0, hour: int = HOUR, node: str = "en/med",
              version: int = 1, requests: int = 10, lat: float = 100.0, tps: float = 20.0,
              dropped: int | None = None, errors: int = 0, up: int = 0, down: int = 0
              ) -> dict[str, Any]:
    """A valid usage report, through the protocol's own encoder and decoder."""
    msg: dict[str, Any] = {
        "type": "usage", "device": device, "bdSeq": bd_seq, "seq": seq, "hour": hour,
        "periods": 1, "node": node, "version": version, "adapter": None,
        "requests": requests, "prompt_tokens": 5 * requests, "gen_tokens": 7 * requests,
        "errors": errors, "ratings_up": up, "ratings_down": down,
        "latency_ms": {"p50": lat, "p90": 2 * lat, "p99": 3 * lat},
        "tokens_per_s": {"p50": tps, "p90": tps + 1, "p99": tps + 2}, "peak_rss_mb": 300.0}
    if dropped is not None:
        msg["dropped"] = dropped
    return protocol.decode(protocol.encode(msg), expect="usage")


def birth_msg(device: str, bd_seq: int, *, board: str = "rpi5", node: str = "en/med",
              version: int = 1) -> dict[str, Any]:
    return protocol.decode(protocol.encode({
        "type": "birth", "device": device, "bdSeq": bd_seq, "hour": HOUR, "board": board,
        "node": node, "version": version, "adapter": None, "runtime": "edgellm-0.1"}))


def death_msg(device: str, bd_seq: int) -> dict[str, Any]:
    return protocol.decode(protocol.encode({"type": "death", "device": device, "bdSeq": bd_seq}))


@pytest.fixture
def mem() -> tuple[sqlite3.Connection, store.FleetStore]:
    conn = store.connect(":memory:")
    return conn, store.FleetStore(conn)


def feed(fs: store.FleetStore, device: str, seqs: list[int], now: float = NOW,
         **kw: Any) -> list[str]:
    with fs.conn:
        return [fs.usage(device, usage_msg(device, s, **kw), now) for s in seqs]


def gap_list(conn: sqlite3.Connection, device: str) -> list[tuple[int, int, str]]:
    return [(g["first_seq"], g["last_seq"], g["state"]) for g in store.gaps(conn, device)]


# ------------------------------------------------------------------------------------------
# Pure SQLite: gaps, duplicates, reordering, drops, births and deaths

def test_in_order_stream_has_no_gaps(mem: Any) -> None:
    conn, fs = mem
    assert feed(fs, "dev-a", list(range(50))) == ["stored"] * 50
    acc = store.accounting(conn, "dev-a")
    assert acc["reports"] == 50 and acc["next_seq"] == 50
    assert acc["gap_open"] == acc["gap_lost"] == acc["duplicates"] == acc["unaccounted"] == 0


def test_gaps_are_ranges_and_reordering_closes_them(mem: Any) -> None:
    conn, fs = mem
    feed(fs, "dev-a", [0, 1, 5, 6, 10])
    assert gap_list(conn, "dev-a") == [(2, 4, "open"), (7, 9, "open")]
    assert feed(fs, "dev-a", [3]) == ["filled"]  # splits 2..4
    assert gap_list(conn, "dev-a") == [(2, 2, "open"), (4, 4, "open"), (7, 9, "open")]
    feed(fs, "dev-a", [2, 4, 7, 8, 9])
    assert gap_list(conn, "dev-a") == []
    acc = store.accounting(conn, "dev-a")
    assert (acc["reports"], acc["reordered"], acc["late"], acc["unaccounted"]) == (11, 6, 0, 0)


def test_first_report_after_zero_opens_a_gap_from_zero(mem: Any) -> None:
    conn, fs = mem
    feed(fs, "dev-a", [4])
    assert gap_list(conn, "dev-a") == [(0, 3, "open")]


def test_duplicates_are_counted_not_stored(mem: Any) -> None:
    conn, fs = mem
    out = feed(fs, "dev-a", [0, 1, 1, 2, 0, 2, 2])
    assert out == ["stored", "stored", "duplicate", "stored", "duplicate", "duplicate",
                   "duplicate"]
    acc = store.accounting(conn, "dev-a")
    assert (acc["reports"], acc["duplicates"]) == (3, 4)
    assert conn.execute("SELECT count(*) FROM fleet_usage").fetchone()[0] == 3


def test_streams_are_per_device(mem: Any) -> None:
    conn, fs = mem
    feed(fs, "dev-a", [0, 1, 2])
    assert feed(fs, "dev-b", [0, 2]) == ["stored", "stored"]
    assert gap_list(conn, "dev-a") == [] and gap_list(conn, "dev-b") == [(1, 1, "open")]


def test_reorder_timeout_makes_gaps_final_and_asks_for_rebirth_once(mem: Any) -> None:
    conn, fs = mem
    feed(fs, "dev-a", [0, 3], now=NOW)
    feed(fs, "dev-b", [0, 1], now=NOW)
    feed(fs, "dev-a", [7], now=NOW + 5)  # a second gap, 4..6
    with conn:
        assert fs.expire_gaps(NOW + 5, timeout=10) == []
        assert fs.expire_gaps(NOW + 10, timeout=10) == ["dev-a"]
    assert gap_list(conn, "dev-a") == [(1, 2, "lost"), (4, 6, "open")]
    with conn:  # 4..6 is final now, but dev-a was asked 5 s ago: no second rebirth yet
        assert fs.expire_gaps(NOW + 15, timeout=10) == []
    assert gap_list(conn, "dev-a") == [(1, 2, "lost"), (4, 6, "lost")]
    feed(fs, "dev-a", [9], now=NOW + 16)
    with conn:
        assert fs.expire_gaps(NOW + 26, timeout=10) == ["dev-a"]
    # a late arrival into a final gap is stored and counted as late
    assert feed(fs, "dev-a", [2]) == ["filled"]
    acc = store.accounting(conn, "dev-a")
    assert (acc["late"], acc["gap_lost"], acc["unaccounted"]) == (1, 5, 0)
    assert store.devices(conn)[0]["rebirths_sent"] == 2


def test_declared_drops_explain_the_oldest_gap(mem: Any) -> None:
    conn, fs = mem
    feed(fs, "dev-a", list(range(10)))
    # offline: the device dropped 10..59 (oldest first), then sends 60.., and reports the
    # count on a later report (61)
    feed(fs, "dev-a", [60])
    assert gap_list(conn, "dev-a") == [(10, 59, "open")]
    feed(fs, "dev-a", [61], dropped=50)
    assert gap_list(conn, "dev-a") == [(10, 59, "dropped")]
    with conn:
        assert fs.expire_gaps(NOW + 1000, timeout=10) == []  # nothing to ask a rebirth for
    acc = store.accounting(conn, "dev-a")
    assert (acc["dropped_declared"], acc["gap_dropped"], acc["gap_open"]) == (50, 50, 0)


def test_declared_drops_split_gaps_and_keep_credit(mem: Any) -> None:
    conn, fs = mem
    feed(fs, "dev-a", [0, 5, 9])  # gaps 1..4 and 6..8
    feed(fs, "dev-a", [10], dropped=6)
    assert gap_list(conn, "dev-a") == [(1, 4, "dropped"), (6, 7, "dropped"), (8, 8, "open")]
    # drops declared before their gap is visible are credited to the next gap
    feed(fs, "dev-b", [0], dropped=2)
    feed(fs, "dev-b", [3])
    assert gap_list(conn, "dev-b") == [(1, 2, "dropped")]
    assert store.devices(conn)[1]["drop_credit"] == 0


def test_accounting_invariant_under_random_chaos(mem: Any) -> None:
    import random
    rng = random.Random(5)
    conn, fs = mem
    sent = list(range(2000))
    lost = set(rng.sample(sent, 20))  # 1 % drop
    stream = [s for s in sent if s not in lost]
    stream += rng.sample(stream, 20)  # 1 % duplication
    for _ in range(100):  # reordering: swap nearby reports
        i = rng.randrange(len(stream) - 5)
        j = i + rng.randrange(1, 5)
        stream[i], stream[j] = stream[j], stream[i]
    out = feed(fs, "dev-a", stream)
    assert out.count("duplicate") == 20
    acc = store.accounting(conn, "dev-a")
    last_missing = max(sent) in lost
    assert acc["reports"] == 2000 - 20
    missing = {s for g in store.gaps(conn, "dev-a")
               for s in range(g["first_seq"], g["last_seq"] + 1)}
    assert missing == lost - ({max(sent)} if last_missing else set())  # 100 % of gaps found
    assert acc["unaccounted"] == 0


def test_births_deaths_and_stale_deaths(mem: Any) -> None:
    conn, fs = mem
    with conn:
        fs.birth("dev-a", birth_msg("dev-a", 1), NOW)
        fs.birth("dev-a", birth_msg("dev-a", 1), NOW)  # retained replay: not a new birth
        assert fs.death("dev-a", death_msg("dev-a", 0), NOW) == "stale_death"
    d = store.devices(conn)[0]
    assert (d["online"], d["bd_seq"], d["births"], d["stale_deaths"]) == (1, 1, 1, 1)
    assert (d["board"], d["node"], d["version"], d["last_seen_hour"]) == ("rpi5", "en/med", 1,
                                                                          HOUR)
    with conn:
        # the Will of session 1 arriving after birth 2 (Sparkplug's case) is ignored
        fs.birth("dev-a", birth_msg("dev-a", 2, version=2), NOW)
        assert fs.death("dev-a", death_msg("dev-a", 1), NOW) == "stale_death"
        assert store.devices(conn)[0]["online"] == 1
        assert fs.death("dev-a", death_msg("dev-a", 2), NOW) == "death"
    d = store.devices(conn)[0]
    assert (d["online"], d["version"], d["births"], d["deaths"], d["stale_deaths"]) == \
        (0, 2, 2, 1, 2)


def test_rejects_are_counted_per_reason(mem: Any) -> None:
    conn, fs = mem
    with conn:
        for _ in range(3):
            fs.reject("not_json", "dev-a", "x", NOW)
        fs.reject("not_json", None, "x", NOW)
        fs.reject("oversized", "dev-b", "y" * 1000, NOW)
    assert store.rejects(conn) == {"not_json": 4, "oversized": 1}
    assert len(conn.execute("SELECT last_detail FROM fleet_rejects WHERE reason = 'oversized'"
                            ).fetchone()[0]) == 200


def test_parse_since() -> None:
    assert [store.parse_since(x) for x in ("1d", "12h", "2w", " 3D ")] == [24, 12, 336, 72]
    for bad in ("", "1", "d", "0d", "1y", "-1d"):
        with pytest.raises(InvalidArgumentError):
            store.parse_since(bad)


def test_weighted_quantile() -> None:
    assert store.weighted_quantile([3, 1, 2], [1, 1, 1], 0.5) == 2
    assert store.weighted_quantile([1, 100], [9, 1], 0.5) == 1
    assert store.weighted_quantile([1, 100], [1, 9], 0.5) == 100
    assert store.weighted_quantile([1, 2], [0, 0], 0.5) is None


def test_usage_summary_suppresses_small_cells(mem: Any) -> None:
    conn, fs = mem
    with conn:
        for i, dev in enumerate(("dev-a", "dev-b")):
            fs.birth(dev, birth_msg(dev, 0, board=("rpi5", "rpi4")[i]), NOW)
    # rpi5: 12 reports of 10 requests (latency 100 or 300); rpi4: 10 reports (< k)
    feed(fs, "dev-a", list(range(6)), lat=100.0, tps=20.0, errors=1, up=2)
    feed(fs, "dev-a", list(range(6, 12)), lat=300.0, tps=10.0, requests=30, down=1)
    feed(fs, "dev-b", list(range(10)))
    feed(fs, "dev-b", [10], hour=HOUR - 30)  # outside a 1 d window
    rows = store.usage_summary(conn, 24, now=NOW)
    assert rows[0] == {"node": "en/med", "board": "rpi4", "version": 1, "reports": "<11",
                       "suppressed": True}
    a = rows[1]
    assert (a["board"], a["reports"], a["devices"], a["requests"]) == ("rpi5", 12, 1, 240)
    assert (a["prompt_tokens"], a["gen_tokens"], a["errors"], a["ratings_up"],
            a["ratings_down"]) == (1200, 1680, 6, 12, 6)
    # request-weighted medians: 180 of 240 requests saw the 300 ms periods
    assert a["latency_ms"] == {"p50": 300.0, "p90": 600.0, "p99": 900.0}
    assert a["tokens_per_s"] == {"p50": 10.0, "p90": 11.0, "p99": 12.0}
    with pytest.raises(InvalidArgumentError):
        store.usage_summary(conn, 24, k=5, now=NOW)
    assert [r["reports"] for r in store.usage_summary(conn, 48, now=NOW)] == [11, 12]


# ------------------------------------------------------------------------------------------
# The service against a real mosquitto (tests/support/fleet.py)

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import paho.mqtt.client as mqtt  # noqa: E402
from support.fleet import Inbox, close, device_client, make_home, running_broker, wait_until  # noqa: E402

from edgellm.cli import main  # noqa: E402
from edgellm.errors import StateError  # noqa: E402
from edgellm.fleet.home import HubHome  # noqa: E402
from edgellm.fleet.service import REJECT_REASONS, HubService, classify  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def publish(client: mqtt.Client, device: str, kind: str, payload: bytes | dict[str, Any],
            retain: bool = False) -> Any:
    data = payload if isinstance(payload, bytes) else protocol.encode(payload)
    info = client.publish(protocol.topic(device, kind), data, qos=1, retain=retain)
    info.wait_for_publish(5)
    return info


def live_usage(device: str, seq: int, **kw: Any) -> dict[str, Any]:
    return usage_msg(device, seq, hour=protocol.current_hour(), **kw)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[HubHome, Any]]:
    home = make_home(tmp_path, n_devices=3)
    with running_broker(home) as broker:
        yield home, broker


def db_of(home: HubHome) -> sqlite3.Connection:
    return store.connect(home.registry_db)


def test_service_accounts_for_every_gap_duplicate_and_reorder(fleet: Any) -> None:
    home, _ = fleet
    inbox = Inbox()
    dev = device_client(home, "dev-000")
    dev.on_message = inbox
    dev.subscribe(protocol.topic("dev-000", "cmd"), qos=1)
    other = device_client(home, "dev-001")
    with HubService(home, reorder_timeout=1.0) as svc:
        publish(dev, "dev-000", "state", birth_msg("dev-000", 7), retain=True)
        # 0..29 with 5 and 17..19 lost, 3 sent three times, 10 and 11 swapped, 25 late
        order = [s for s in range(30) if s not in (5, 17, 18, 19, 10, 11, 25)]
        order = order[:8] + [11, 10] + order[8:] + [3, 3, 25]
        for s in order:
            publish(dev, "dev-000", "usage", live_usage("dev-000", s))
        for s in (0, 2, 1, 0):  # another device's stream is its own
            publish(other, "dev-001", "usage", live_usage("dev-001", s))
        conn = db_of(home)
        assert wait_until(lambda: store.accounting(conn, "dev-000")["duplicates"] == 2)
        # the reorder timeout passes: the open gaps are final and a rebirth goes out, once
        assert inbox.wait_for(1, timeout=5)
        assert [json.loads(m.payload) for m in inbox.messages] == [{"type": "rebirth", "v": 1}]
        acc = store.accounting(conn, "dev-000")
        assert (acc["next_seq"], acc["reports"], acc["duplicates"], acc["gap_lost"],
                acc["unaccounted"]) == (30, 26, 2, 4, 0)
        assert acc["reordered"] == 3  # 9 and 10 arrived after 11, and 25 before the timeout
        assert [(g["first_seq"], g["last_seq"], g["state"]) for g in store.gaps(conn, "dev-000")] \
            == [(5, 5, "lost"), (17, 19, "lost")]
        acc1 = store.accounting(conn, "dev-001")
        assert (acc1["reports"], acc1["duplicates"], acc1["reordered"]) == (3, 1, 1)
        # a stale death (bdSeq of an earlier session) is ignored; the current one is not
        publish(dev, "dev-000", "state", death_msg("dev-000", 6), retain=True)
        assert wait_until(lambda: store.devices(conn)[0]["stale_deaths"] == 1)
        assert store.devices(conn)[0]["online"] == 1
        publish(dev, "dev-000", "state", death_msg("dev-000", 7), retain=True)
        assert wait_until(lambda: store.devices(conn)[0]["online"] == 0)
        d = store.devices(conn)[0]
        assert (d["board"], d["node"], d["version"], d["bd_seq"], d["last_seen_hour"]) == \
            ("rpi5", "en/med", 1, 7, protocol.current_hour())
        assert svc.stats["refused"] == 0 and store.rejects(conn) == {}
        conn.close()
    close(dev, other)


def test_forged_reports_are_all_rejected(fleet: Any) -> None:
    home, _ = fleet
    liar = device_client(home, "dev-001")
    with HubService(home) as svc:
        for i in range(200):  # into its own topic (the broker allows that), claiming another id
            victim = ("dev-002", "dev-000", "dev-999")[i % 3]
            publish(liar, "dev-001", "usage", live_usage(victim, i))
        publish(liar, "dev-001", "state", birth_msg("dev-002", 1))
        # into another device's topic: the broker refuses it (PUBACK 0x87), the hub sees nothing
        info = liar.publish(protocol.topic("dev-002", "usage"),
                            protocol.encode(live_usage("dev-002", 500)), qos=1)
        info.wait_for_publish(5)
        conn = db_of(home)
        assert wait_until(lambda: store.rejects(conn).get("device_mismatch") == 201)
        time.sleep(0.3)
        assert svc.stats["refused"] == 201
    assert conn.execute("SELECT count(*) FROM fleet_usage").fetchone()[0] == 0
    assert [d["device"] for d in store.devices(conn)] == []  # nothing stored about anyone
    row = conn.execute("SELECT device, count FROM fleet_rejects").fetchone()
    assert tuple(row) == ("dev-001", 201)  # counted against the authenticated sender
    conn.close()
    close(liar)


def test_bad_input_is_refused_with_a_reason_and_the_service_goes_on(fleet: Any) -> None:
    home, _ = fleet
    dev = device_client(home, "dev-000")
    good = live_usage("dev-000", 0)
    cases: list[tuple[str, str, bytes]] = [
        ("not_json", "usage", b"{not json"),
        ("not_json", "usage", b"\xff\xfe\x00garbage"),
        ("not_json", "usage", b"[1, 2, 3]"),
        ("not_json", "usage", b'{"v": 1, "x": NaN}'),
        ("oversized", "usage", b"{" + b" " * (protocol.MAX_MESSAGE_BYTES + 10) + b"}"),
        ("schema_version", "usage", json.dumps({**good, "v": 2}).encode()),
        ("unknown_key", "usage", json.dumps({**good, "prompt": "chest pain"}).encode()),
        ("missing_key", "usage", json.dumps({k: v for k, v in good.items() if k != "seq"}).encode()),
        ("bad_value", "usage", json.dumps({**good, "seq": "7"}).encode()),
        ("bad_value", "usage", json.dumps({**good, "seq": -1}).encode()),
        ("bad_value", "usage", json.dumps({**good, "requests": True}).encode()),
        ("wrong_type", "usage", protocol.encode(birth_msg("dev-000", 1))),
        ("wrong_type", "state", protocol.encode(good)),
        ("wrong_type", "state", b'{"v": 1}'),
        ("unhandled", "req", b'{"v": 1, "type": "fetch"}'),
    ]
    with HubService(home) as svc:
        for _, kind, payload in cases:
            publish(dev, "dev-000", kind, payload)
        for i in range(1000):  # a flood of garbage (QoS 0 and 1)
            dev.publish(protocol.topic("dev-000", "usage"), b"x" * (i % 50), qos=i % 2)
        publish(dev, "dev-000", "usage", good)  # still ingested
        conn = db_of(home)
        assert wait_until(lambda: store.accounting(conn, "dev-000")["reports"] == 1, 20)
        want: dict[str, int] = {}
        for reason, _, _ in cases:
            want[reason] = want.get(reason, 0) + 1
        want["not_json"] += 1000
        assert wait_until(lambda: store.rejects(conn) == want)
        assert set(want) <= set(REJECT_REASONS)
        assert svc._thread is not None and svc._thread.is_alive()
        conn.close()
    close(dev)


def test_classify_covers_every_decode_refusal() -> None:
    good = protocol.encode(usage_msg("dev-000", 0))
    for payload, reason in ((b"x" * (protocol.MAX_MESSAGE_BYTES + 1), "oversized"),
                            (b"{", "not_json"), (b'"s"', "not_json"),
                            (b'{"v": 0}', "schema_version"),
                            (b'{"v": 1, "type": "nope"}', "wrong_type"),
                            (good.replace(b'"seq":0', b'"seq":0.5'), "bad_value")):
        with pytest.raises(protocol.ProtocolError) as e:
            protocol.decode(payload, expect="usage")
        assert classify(e.value) == reason, payload[:40]


def test_one_service_per_home_and_a_clean_stop_acknowledges_everything(fleet: Any) -> None:
    home, _ = fleet
    dev = device_client(home, "dev-000")
    with HubService(home) as svc:
        with pytest.raises(StateError, match="another hub service"):
            HubService(home).run()
        t0 = time.monotonic()
        with pytest.raises(StateError, match="another hub service"):
            HubService(home).start()  # the thread's error, at once
        assert time.monotonic() - t0 < 5
        for s in range(20):
            publish(dev, "dev-000", "usage", live_usage("dev-000", s))
        conn = db_of(home)
        assert wait_until(lambda: store.accounting(conn, "dev-000")["reports"] == 20)
    # stop() right after the last COMMIT: its PUBACKs still leave before the DISCONNECT
    assert svc._thread is not None and not svc._thread.is_alive()
    # the next run finds its session (subscriptions kept) and nothing re-sent: all were acked
    with HubService(home) as svc2:
        publish(dev, "dev-000", "usage", live_usage("dev-000", 20))
        assert wait_until(lambda: store.accounting(conn, "dev-000")["reports"] == 21)
        time.sleep(0.3)
    assert store.accounting(conn, "dev-000")["duplicates"] == 0
    assert svc2.stats["duplicate"] == 0
    conn.close()
    close(dev)


def test_hub_status_and_usage_print_the_numbers(tmp_path: Path, capsys: Any) -> None:
    home = make_home(tmp_path, n_devices=0)
    conn = store.connect(home.registry_db)
    fs = store.FleetStore(conn)
    now = time.time()
    h = protocol.current_hour(now)
    with conn:
        fs.birth("dev-000", {**birth_msg("dev-000", 1), "hour": h}, now)
        fs.birth("dev-001", {**birth_msg("dev-001", 1, board="rpi4", version=2), "hour": h}, now)
        fs.death("dev-001", death_msg("dev-001", 1), now)
        fs.reject("not_json", "dev-000", "x", now)
    # rpi5: 12 reports (10 x 10 requests at 20 tok/s, 2 x 30 at 30 tok/s); rpi4: 5 (< k)
    feed(fs, "dev-000", list(range(10)), now=now, hour=h, errors=1)
    feed(fs, "dev-000", [10, 11], now=now, hour=h, requests=30, tps=30.0, lat=50.0, up=3)
    feed(fs, "dev-000", [14], now=now, hour=h - 30)  # outside 1d; leaves 12..13 missing
    feed(fs, "dev-001", list(range(5)), now=now, hour=h, version=2)
    feed(fs, "dev-001", [4], now=now, hour=h, version=2)  # a duplicate
    conn.close()

    assert main(["hub", "status", "--home", str(home.root)]) == 0
    out = capsys.readouterr().out
    assert "devices: 2 (1 online, 1 offline, 0 no birth yet)" in out
    assert "reports: 18 stored, 1 duplicates; missing seqs: 2 waiting" in out
    assert "refused: not_json 1" in out
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.strip()}
    assert lines["dev-000"][:5] == ["dev-000", "online", "rpi5", "en/med", "1"]
    assert lines["dev-000"][-3:] == ["13", "0", "2"]  # reports, dups, missing
    assert lines["dev-001"][:5] == ["dev-001", "offline", "rpi4", "en/med", "2"]
    assert lines["rpi5"] == ["rpi5", "12", "1", "20.0", "21.0", "22.0"]
    assert lines["rpi4"] == ["rpi4", "<11"]

    assert main(["hub", "status", "--home", str(home.root), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["devices"], st["online"], st["reports"], st["duplicates"]) == (2, 1, 18, 1)
    assert st["versions"] == [{"node": "en/med", "version": 1, "devices": 1},
                              {"node": "en/med", "version": 2, "devices": 1}]

    assert main(["hub", "usage", "--home", str(home.root), "--since", "1d"]) == 0
    out = capsys.readouterr().out.splitlines()
    rpi5 = next(ln.split() for ln in out if " rpi5 " in ln)
    # node board version reports devices requests prompt gen errors up down lat*3 tps*3
    assert rpi5 == ["en/med", "rpi5", "1", "12", "1", "160", "800", "1120", "10", "6", "0",
                    "100.0", "200.0", "300.0", "20.0", "21.0", "22.0"]  # 100 of 160 requests
    assert next(ln.split() for ln in out if " rpi4 " in ln) == ["en/med", "rpi4", "2", "<11"]

    assert main(["hub", "usage", "--home", str(home.root), "--since", "2d", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert [(g["board"], g["reports"]) for g in groups] == [("rpi4", "<11"), ("rpi5", 13)]
    assert groups[1]["tokens_per_s"] == {"p50": 20.0, "p90": 21.0, "p99": 22.0}
    assert "requests" not in groups[0]
    assert main(["hub", "usage", "--home", str(home.root), "--k", "5"]) == 1


def test_crash_between_receipt_and_commit_loses_nothing(fleet: Any, tmp_path: Path) -> None:
    home, _ = fleet
    log = tmp_path / "serve.log"

    def serve(*extra: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        p = subprocess.Popen([sys.executable, "-m", "edgellm", "hub", "serve", "--home",
                              str(home.root), *extra], cwd=tmp_path, env=env,
                             stderr=log.open("ab"))
        assert wait_until(lambda: log.read_text().count("subscribed to") > n_started, 15), \
            log.read_text()
        return p

    n_started = 0
    hub = serve("--batch-interval", "60", "-v")  # holds what it receives for a minute
    n_started = 1
    dev = device_client(home, "dev-000")
    for s in range(50):
        publish(dev, "dev-000", "usage", live_usage("dev-000", s))
    # the hub has all 50 in memory (its debug log says so) and has committed none
    assert wait_until(lambda: log.read_text().count("(not yet committed)") == 50), log.read_text()
    conn = db_of(home)
    assert conn.execute("SELECT count(*) FROM fleet_usage").fetchone()[0] == 0
    hub.send_signal(signal.SIGKILL)  # received, not committed, not acknowledged
    hub.wait(10)
    for s in range(50, 60):  # the hub is away: the broker queues these in its session
        publish(dev, "dev-000", "usage", live_usage("dev-000", s))
    hub = serve()
    try:
        assert wait_until(lambda: store.accounting(conn, "dev-000")["reports"] == 60, 15)
        acc = store.accounting(conn, "dev-000")
        assert (acc["next_seq"], acc["gap_open"], acc["gap_lost"], acc["unaccounted"]) == \
            (60, 0, 0, 0)
    finally:
        hub.send_signal(signal.SIGTERM)  # a clean stop: commit, ack, exit 0
        assert hub.wait(15) == 0
        conn.close()
        close(dev)


def test_start_without_a_broker_raises_a_typed_error(tmp_path: Path) -> None:
    from edgellm.errors import BrokerConnectError
    home = make_home(tmp_path)  # no broker running on its port
    with pytest.raises(BrokerConnectError, match="no CONNACK"):
        HubService(home).start(timeout=1.0)
