# SPDX-License-Identifier: MIT
"""`edgellm doctor` on a provisioned device root, against a real mosquitto: pass and fail paths."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from support.fleet import make_home, running_broker

from edgellm.doctor import FAIL, PASS, Check, format_report, run_checks
from edgellm.flash.package import install_package, make_package
from edgellm.fleet import pki
from edgellm.fleet.home import HubHome
from edgellm.fleet.slots import SlotStore

ROOT = Path(__file__).resolve().parents[1]
B1 = ROOT / "edgellm" / "demo" / "bundles" / "en-medical-cardiology-rpi5-q4_0_mixed"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> HubHome:
    return make_home(tmp_path_factory.mktemp("hub"))


def device(home: HubHome, tmp: Path, device_id: str) -> Path:
    """A device root provisioned by a flash package; returns its device.toml."""
    pkg = make_package(tmp / "pkg", bundle_dir=B1, board="rpi5",
                       identity_dir=home.add_device(device_id, board="rpi5"))
    install_package(pkg, tmp / "dev")
    return tmp / "dev" / "device.toml"


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_broker_reachable_then_stopped(home: HubHome, tmp_path: Path) -> None:
    cfg = device(home, tmp_path, "dev-doc1")
    with running_broker(home):
        checks = by_name(run_checks(cfg, timeout=3))
        assert checks["broker"].status == PASS, checks["broker"]
        assert "TLS" in checks["broker"].detail
        assert "broker certificate valid until" in checks["clock"].detail
    for name in ("config", "model", "storage", "clock"):
        assert checks[name].status == PASS, checks[name]
    assert [c.name for c in run_checks(cfg, timeout=3)] == [
        "config", "cpu", "model", "memory", "storage", "clock", "broker"]

    stopped = by_name(run_checks(cfg, timeout=3))["broker"]
    assert stopped.status == FAIL and "cannot connect" in stopped.detail
    assert "edgellm hub broker" in stopped.fix
    r = subprocess.run([sys.executable, "-m", "edgellm", "doctor", "--config", str(cfg),
                        "--json", "--timeout", "3"], env=ENV, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1, r.stderr
    out = {c["name"]: c for c in json.loads(r.stdout)}
    assert out["broker"]["status"] == FAIL and out["broker"]["fix"]
    r = subprocess.run([sys.executable, "-m", "edgellm", "doctor", "--config", str(cfg)],
                       env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "FAIL  broker" in r.stdout and "fix: start" in r.stdout


def test_revoked_certificate_is_a_broker_fail(home: HubHome, tmp_path: Path) -> None:
    cfg = device(home, tmp_path, "dev-doc2")
    with running_broker(home):
        assert by_name(run_checks(cfg, timeout=3))["broker"].status == PASS
        home.revoke_device("dev-doc2", kick=False)  # the broker reloads its CRL (SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            broker = by_name(run_checks(cfg, timeout=3))["broker"]
            if broker.status == FAIL or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert broker.status == FAIL and "refused the device certificate" in broker.detail
    assert "revoked" in broker.fix


def test_bad_clock_fails(home: HubHome, tmp_path: Path) -> None:
    cfg = device(home, tmp_path, "dev-doc3")
    old = dt.datetime(2001, 1, 1, tzinfo=dt.timezone.utc)
    clock = by_name(run_checks(cfg, now=old, timeout=1))["clock"]
    assert clock.status == FAIL and "before this edgellm" in clock.detail and "NTP" in clock.fix
    # a certificate that starts tomorrow (today is after this edgellm's build or install, which
    # on a fresh checkout can be later than a certificate issued a minute ago, backdated)
    ca = pki.load_key(home.device_ca_key), pki.load_cert(home.device_ca_cert)
    key, later = pki.issue_client(*ca, "dev-doc3", days=30, not_before=dt.datetime.now(
        dt.timezone.utc) + dt.timedelta(days=1))
    pki.write_pem(tmp_path / "dev" / "device.crt", later)
    pki.write_key(tmp_path / "dev" / "device.key", key)
    clock = by_name(run_checks(cfg, timeout=1))["clock"]
    assert clock.status == FAIL and "before the device certificate is valid" in clock.detail
    cert = x509.load_pem_x509_certificate((tmp_path / "dev" / "device.crt").read_bytes())
    late = cert.not_valid_after_utc + dt.timedelta(days=1)
    clock = by_name(run_checks(cfg, now=late, timeout=1))["clock"]
    assert clock.status == FAIL and "expired" in clock.detail


def test_missing_or_altered_model_fails(home: HubHome, tmp_path: Path) -> None:
    cfg = device(home, tmp_path, "dev-doc4")
    store = SlotStore(tmp_path / "dev" / "models")
    active = store.read_pointer("current")
    assert active is not None and by_name(run_checks(cfg, timeout=1))["model"].status == PASS
    model = store.model_path(active)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    check = by_name(run_checks(cfg, timeout=1))["model"]
    assert check.status == FAIL and "sha256" in check.detail and check.fix
    model.unlink()
    check = by_name(run_checks(cfg, timeout=1))["model"]
    assert check.status == FAIL and check.fix
    assert store.read_pointer("current") == active  # doctor only looks: no repair


def test_no_config_fails_and_machine_checks_still_run(tmp_path: Path) -> None:
    checks = run_checks(tmp_path / "device.toml", board="rpi5")
    names = by_name(checks)
    assert names["config"].status == FAIL and "--config" in names["config"].fix
    assert set(names) == {"config", "cpu", "memory", "storage", "clock"}
    assert "neon" in names["cpu"].detail or names["cpu"].status == FAIL  # rpi5's needs, shown
    text = format_report(checks)
    assert text.splitlines()[0].startswith("FAIL  config") and "fix: " in text
