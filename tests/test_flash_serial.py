# SPDX-License-Identifier: MIT
"""Serial flashing over real pseudo-terminals: framing, damage, cable pulls, refusal, ports.

The device side runs as its own process (``receive_file`` or ``edgellm receive --serial``);
between the two ends is either socat (a clean cable) or tests/support/serial_relay.py, a relay
process between two pty pairs that drops, duplicates and corrupts frames and can be killed
(a pulled cable).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import serial
from hypothesis import given, settings
from hypothesis import strategies as hs
from support.fleet import make_home
from support.releases import DEMO_BUNDLES, DEMO_LEAF_Q4, DEMO_LEAF_Q8

from edgellm.errors import (
    FlashPortBusyError,
    FlashTargetError,
    ImageRejectedError,
    SerialLinkError,
)
from edgellm.flash.package import installed_info, make_package, pack
from edgellm.flash.receive import INCOMING
from edgellm.flash.serial_link import (
    CHUNK,
    DATA,
    WINDOW,
    SendStats,
    _cobs_decode,
    _cobs_encode,
    decode_frame,
    encode_frame,
    send_file,
)
from edgellm.fleet.slots import SlotStore
from edgellm.formats.bundle import read_manifest, sha256_file

ROOT = Path(__file__).resolve().parents[1]
RELAY = ROOT / "tests" / "support" / "serial_relay.py"
B1, B2 = DEMO_LEAF_Q4, DEMO_LEAF_Q8
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ONE_WINDOW = WINDOW * CHUNK
RECEIVE_FILE = ("import sys; from edgellm.flash.serial_link import receive_file; "
                "print(receive_file(sys.argv[1], sys.argv[2], idle_timeout=30))")


# --- the cable: socat, or the damaging relay --------------------------------------------------


def _wait_for_link(*paths: Path, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert time.monotonic() < end, f"{paths} did not appear"
        time.sleep(0.02)


@contextmanager
def socat_cable(d: Path) -> Iterator[tuple[str, str]]:
    """Two linked pty ends made by socat (the tool a developer would use)."""
    assert shutil.which("socat"), "socat is not installed (apt-get install socat; .ci/setup)"
    a, b = d / "host", d / "device"
    p = subprocess.Popen(["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
                         stderr=subprocess.PIPE)
    try:
        _wait_for_link(a, b)
        yield str(a), str(b)
    finally:
        p.terminate()
        p.wait(10)


class Relay:
    """tests/support/serial_relay.py as a process; stats() after stop()."""

    def __init__(self, d: Path, *args: str) -> None:
        self.a, self.b, self.stats_file = d / "host", d / "device", d / "relay.json"
        for p in (self.a, self.b, self.stats_file):
            p.unlink(missing_ok=True)
        self.p = subprocess.Popen([sys.executable, str(RELAY), "--a", str(self.a), "--b",
                                   str(self.b), "--stats", str(self.stats_file), *args],
                                  stdout=subprocess.PIPE, text=True, env=ENV)
        assert self.p.stdout is not None and self.p.stdout.readline().strip() == "ready"

    def stop(self) -> dict[str, dict[str, int]]:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        self.p.wait(10)
        return json.loads(self.stats_file.read_text()) if self.stats_file.exists() else {}


def receiver(port: str, dest: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", RECEIVE_FILE, port, str(dest)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def device_receive(port: str, root: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "edgellm", "receive", "--serial", port,
                             "--root", str(root), "--timeout", "30"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=30)
    return p.returncode, out, err


def random_file(path: Path, size: int, seed: int) -> str:
    import numpy as np

    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return hashlib.sha256(path.read_bytes()).hexdigest()


def durable_chunks(dest: Path) -> int:
    for p in dest.glob("*.json"):
        try:
            return int(json.loads(p.read_text())["chunks"])
        except (ValueError, KeyError, OSError):
            pass
    return 0


# --- framing ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(hs.binary(max_size=2000))
def test_cobs_and_frames_round_trip_without_zero_bytes(data: bytes) -> None:
    enc = _cobs_encode(data)
    assert b"\x00" not in enc and _cobs_decode(enc) == data
    frame = encode_frame(DATA, 7, 123456, data)
    assert frame.endswith(b"\x00") and frame.count(0) == 1
    assert decode_frame(frame[:-1]) == (DATA, 7, 123456, data)


def test_a_damaged_frame_is_dropped() -> None:
    frame = bytearray(encode_frame(DATA, 1, 5, bytes(range(256)) * 4)[:-1])
    for i in (0, 3, len(frame) // 2, len(frame) - 1):
        bad = bytearray(frame)
        bad[i] = (bad[i] + 1) % 256 or 1
        assert decode_frame(bytes(bad)) is None
    assert decode_frame(bytes(frame[:-5])) is None  # cut short


# --- transfers ------------------------------------------------------------------------------


def test_50mb_flashes_and_verifies_over_socat(tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    sha = random_file(src, 50_000_000, 1)
    dest = tmp_path / "dev"
    seen: list[tuple[int, int]] = []
    with socat_cable(tmp_path) as (host, dev):
        rx = receiver(dev, dest)
        st = send_file(host, src, progress=lambda d, t: seen.append((d, t)))
        rc, out, err = finish(rx)
    assert rc == 0, err
    assert Path(out.strip()) == dest / "model.bin" and sha256_file(dest / "model.bin") == sha
    assert sorted(p.name for p in dest.iterdir()) == ["model.bin"]  # no .part or offset left
    assert (st.size, st.sha256, st.resumed_from, st.handshakes) == (50_000_000, sha, 0, 1)
    assert st.retransmits == 0 and st.payload_bytes == st.size
    assert seen[-1] == (st.size, st.size) and all(a[0] < b[0] for a, b in zip(seen, seen[1:]))
    assert 0.99 < st.size / st.line_bytes_out < 1.0  # framing costs < 1 %


def test_damaged_line_still_delivers_the_right_bytes(tmp_path: Path) -> None:
    src = tmp_path / "bundle.bin"
    sha = random_file(src, 6_000_000, 2)
    dest = tmp_path / "dev"
    relay = Relay(tmp_path, "--drop", "0.03", "--dup", "0.03", "--corrupt", "0.03", "--seed", "5")
    rx = receiver(str(relay.b), dest)
    st = send_file(str(relay.a), src)
    rc, _, err = finish(rx)
    stats = relay.stop()
    assert rc == 0, err
    assert sha256_file(dest / "bundle.bin") == sha
    for way in ("a->b", "b->a"):  # data and acknowledgements were both damaged
        assert all(stats[way][k] > 0 for k in ("dropped", "duplicated", "corrupted")), stats
    assert st.retransmits >= stats["a->b"]["dropped"] // 2 > 0
    assert st.bad_frames_in > 0  # corrupted ACKs were seen and dropped


def test_cable_pull_resumes_within_one_window(tmp_path: Path) -> None:
    src = tmp_path / "bundle.bin"
    sha = random_file(src, 8_000_000, 3)
    dest = tmp_path / "dev"
    relay = Relay(tmp_path, "--die-after", "3000000")  # the cable is pulled after ~3 MB
    rx = receiver(str(relay.b), dest)
    with pytest.raises(SerialLinkError, match="cable pulled") as ei:
        send_file(str(relay.a), src)
    first: SendStats = ei.value.stats  # type: ignore[attr-defined]
    rc, _, err = finish(rx)
    assert rc == 1 and "SerialLinkError" in err  # the device side saw the cut too
    assert first.highest_sent >= 3_000_000 > durable_chunks(dest) * CHUNK > 0
    relay.p.wait(10)

    relay = Relay(tmp_path)  # plugged in again: new ptys, a new receiver process
    rx = receiver(str(relay.b), dest)
    st = send_file(str(relay.a), src)
    rc, _, err = finish(rx)
    relay.stop()
    assert rc == 0, err
    assert sha256_file(dest / "bundle.bin") == sha
    assert 0 < st.resumed_from <= first.highest_sent
    assert first.highest_sent - st.resumed_from <= ONE_WINDOW  # re-sent at most one window
    assert st.payload_bytes == st.size - st.resumed_from


def test_receiver_killed_mid_transfer_resumes_in_the_same_send(tmp_path: Path) -> None:
    src = tmp_path / "bundle.bin"
    sha = random_file(src, 8_000_000, 4)
    dest = tmp_path / "dev"
    relay = Relay(tmp_path, "--bps", "4000000")  # paced so the kill lands mid-transfer
    rx = receiver(str(relay.b), dest)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(st=send_file(str(relay.a), src)))
    t.start()
    end = time.monotonic() + 30
    while durable_chunks(dest) < 400:
        assert time.monotonic() < end and t.is_alive()
        time.sleep(0.01)
    rx.send_signal(signal.SIGKILL)  # power cut on the device side: no clean shutdown
    rx.wait(10)
    time.sleep(0.5)
    rx = receiver(str(relay.b), dest)  # reboots, same port; the sender never stopped
    t.join(60)
    rc, _, err = finish(rx)
    relay.stop()
    assert not t.is_alive() and rc == 0, err
    st: SendStats = out["st"]
    assert sha256_file(dest / "bundle.bin") == sha
    assert st.handshakes == 2 and len(st.resumes) == 1
    sent_before, resumed_at = st.resumes[0]
    assert resumed_at >= 400 * CHUNK
    assert 0 <= st.resent_after_resume == sent_before - resumed_at <= ONE_WINDOW


def test_host_killed_mid_transfer_a_new_send_resumes(tmp_path: Path) -> None:
    src = tmp_path / "bundle.bin"
    sha = random_file(src, 6_000_000, 5)
    dest = tmp_path / "dev"
    relay = Relay(tmp_path, "--bps", "4000000")
    rx = receiver(str(relay.b), dest)
    host = subprocess.Popen([sys.executable, "-c", "import sys; from edgellm.flash.serial_link "
                             "import send_file; send_file(sys.argv[1], sys.argv[2])",
                             str(relay.a), str(src)], env=ENV)
    end = time.monotonic() + 30
    while durable_chunks(dest) < 300:
        assert time.monotonic() < end and host.poll() is None
        time.sleep(0.01)
    host.send_signal(signal.SIGKILL)  # Ctrl-C'd flash, crashed laptop
    host.wait(10)
    at_kill = durable_chunks(dest)
    st = send_file(str(relay.a), src)  # run again: the device never stopped
    rc, _, err = finish(rx)
    relay.stop()
    assert rc == 0, err
    assert sha256_file(dest / "bundle.bin") == sha
    assert st.handshakes == 1 and st.resumed_from >= at_kill * CHUNK
    assert st.payload_bytes == st.size - st.resumed_from  # nothing sent twice in this run


def test_a_frame_forged_with_a_valid_crc_is_caught_by_the_final_sha256(tmp_path: Path) -> None:
    src = tmp_path / "bundle.bin"
    random_file(src, 500_000, 6)
    dest = tmp_path / "dev"
    relay = Relay(tmp_path, "--forge", "20")  # the 20th frame host -> device: DATA, re-signed
    rx = receiver(str(relay.b), dest)
    with pytest.raises(ImageRejectedError, match="removed the image"):
        send_file(str(relay.a), src)
    rc, _, err = finish(rx)
    assert relay.stop()["a->b"].get("forged") == 1
    assert rc == 1 and "ImageRejectedError" in err
    assert list(dest.iterdir()) == []  # neither the image nor its partial is kept


# --- the device: install, refuse, keep ----------------------------------------------------


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pkgs")
    ident = make_home(d / "hub").add_device("dev-001", board="rpi5")
    out = []
    for i, b in enumerate((B1, B2)):
        pkg = make_package(d / f"p{i}", bundle_dir=b, identity_dir=ident, board="rpi5")
        (d / f"a{i}").mkdir()
        out.append(pack(pkg, d / f"a{i}" / "dev-001.elpkg"))
    return out[0], out[1]


def test_receive_installs_then_a_corrupted_image_is_refused_and_the_model_kept(
        tmp_path: Path, archives: tuple[Path, Path]) -> None:
    a1, a2 = archives
    root = tmp_path / "devroot"
    m1 = read_manifest(B1).file("model.gguf").sha256
    with socat_cable(tmp_path) as (host, dev):  # first flash: B1 installs
        rx = device_receive(dev, root)
        send_file(host, a1)
        rc, out, err = finish(rx)
    assert rc == 0, err
    assert "installed en/medical/cardiology@1" in out
    store = SlotStore(root / "models")
    active = store.read_pointer("current")
    assert active is not None and active.model_sha256 == m1
    info1 = installed_info(root)
    assert not list((root / INCOMING).iterdir())  # the archive is gone once installed

    # second flash, B2: cut mid-way, then the partial on the device's disk rots (one bit)
    relay = Relay(tmp_path, "--die-after", str(a2.stat().st_size // 2))
    rx = device_receive(str(relay.b), root)
    with pytest.raises(SerialLinkError):
        send_file(str(relay.a), a2)
    assert finish(rx)[0] == 1
    relay.p.wait(10)
    part = next((root / INCOMING).glob("*.part"))
    assert durable_chunks(root / INCOMING) > 0
    with open(part, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0x10]))

    relay = Relay(tmp_path)
    rx = device_receive(str(relay.b), root)
    with pytest.raises(ImageRejectedError, match="removed the image"):
        send_file(str(relay.a), a2)  # resumes, finishes, and the whole-file sha256 differs
    rc, _, err = finish(rx)
    relay.stop()
    assert rc == 1 and "the sender announced" in err and "refused and removed" in err
    assert store.read_pointer("current") == active  # the device keeps its previous model
    assert sha256_file(store.bundles / m1 / "model.gguf") == m1
    assert installed_info(root) == info1
    assert not list((root / INCOMING).iterdir())  # the refused image is not kept

    # and a clean retry installs B2 through the update path
    with socat_cable(tmp_path) as (host, dev):
        rx = device_receive(dev, root)
        st = send_file(host, a2)
        rc, out, err = finish(rx)
    assert rc == 0, err
    assert st.resumed_from == 0
    new = store.read_pointer("current")
    assert new is not None and new.model_sha256 == read_manifest(B2).file("model.gguf").sha256


def test_edgellm_flash_to_serial_installs_on_the_receiving_device(tmp_path: Path) -> None:
    home = make_home(tmp_path / "hub")
    root = tmp_path / "devroot"
    with socat_cable(tmp_path) as (host, dev):
        rx = device_receive(dev, root)
        r = subprocess.run([sys.executable, "-m", "edgellm", "flash", "--board", "rpi5",
                            "--device", "dev-ser", "--need", "en/medical/cardiology", "--to",
                            f"serial://{host}?baud=921600", "--home", str(home.root),
                            "--bundles", str(DEMO_BUNDLES), "--no-progress"], env=ENV,
                           capture_output=True, text=True, timeout=60)
        rc, out, err = finish(rx)
    assert r.returncode == 0, r.stderr
    assert rc == 0, err
    active, source = SlotStore(root / "models").resolve()
    assert (active.node, source) == ("en/medical/cardiology", "current")
    assert (root / "device.key").read_bytes() == (home.device_dir("dev-ser") / "device.key"
                                                  ).read_bytes()
    assert f"installed {active.describe()}" in out


def test_a_cable_cannot_replace_a_provisioned_devices_trust_root(
        tmp_path: Path, archives: tuple[Path, Path]) -> None:
    """SECURITY: `edgellm receive --serial` (the unit's command, no --reprovision) refuses a
    package from another hub for the same device id: its TUF root, CA, key and model stay."""
    from edgellm.flash.package import install_package, unpack

    root = tmp_path / "devroot"
    install_package(unpack(archives[0], tmp_path / "mine"), root)  # provisioned by its hub
    attacker = make_home(tmp_path / "evil", tuf=True).add_device("dev-001", board="rpi5")
    pkg = make_package(tmp_path / "evil-pkg", bundle_dir=B2, identity_dir=attacker, board="rpi5")
    (tmp_path / "out").mkdir()
    evil = pack(pkg, tmp_path / "out" / "dev-001.elpkg")
    keep = {n: (root / n).read_bytes() for n in ("device.toml", "device.key", "device.crt",
                                                 "server-ca.crt", "flash.json", "models/current")}
    with socat_cable(tmp_path) as (host, dev):
        rx = device_receive(dev, root)
        send_file(host, evil)  # the transfer itself is fine: the install refuses
        rc, _, err = finish(rx)
    assert rc == 1 and "already provisioned" in err and "--reprovision" in err, err
    assert {n: (root / n).read_bytes() for n in keep} == keep
    assert not (root / "provisioned-root.json").exists()  # no root was planted either
    assert not list((root / INCOMING).iterdir())  # the refused archive is not kept


def test_receive_file_installs_and_refuses_a_truncated_archive(
        tmp_path: Path, archives: tuple[Path, Path]) -> None:
    a1, a2 = archives
    root = tmp_path / "devroot"
    cmd = [sys.executable, "-m", "edgellm", "receive", "--root", str(root), "--file"]
    r = subprocess.run([*cmd, str(a1)], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    active = SlotStore(root / "models").read_pointer("current")
    cut = tmp_path / "cut.elpkg"
    cut.write_bytes(a2.read_bytes()[: a2.stat().st_size // 2])
    r = subprocess.run([*cmd, str(cut)], env=ENV, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("edgellm receive: error:"), r.stderr
    assert SlotStore(root / "models").read_pointer("current") == active
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.elpkg", "devroot"]  # no unpack left


# --- ports --------------------------------------------------------------------------------


def test_busy_and_missing_ports_give_typed_errors(tmp_path: Path) -> None:
    from edgellm.flash.serial_link import receive_file

    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    master, slave = os.openpty()
    try:
        name = os.ttyname(slave)
        held = serial.Serial(name, 921600, exclusive=True)  # another flasher holds it
        try:
            with pytest.raises(FlashPortBusyError, match=f"{name} is in use"):
                send_file(name, src)
            with pytest.raises(FlashPortBusyError, match="in use by another process"):
                receive_file(name, tmp_path / "dest")
        finally:
            held.close()
    finally:
        os.close(master)
        os.close(slave)
    missing = str(tmp_path / "ttyUSB9")
    with pytest.raises(FlashTargetError, match="ttyUSB9 does not exist"):
        send_file(missing, src)
    with pytest.raises(FlashTargetError, match="does not exist"):
        receive_file(missing, tmp_path / "dest")
    r = subprocess.run([sys.executable, "-m", "edgellm", "receive", "--serial", missing,
                        "--root", str(tmp_path / "root")], env=ENV, capture_output=True,
                       text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"edgellm receive: error: serial port {missing} does not exist")
    assert not (tmp_path / "root").exists()  # nothing written


def test_a_silent_receiver_times_out_with_a_clear_error(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"y" * 5000)
    with socat_cable(tmp_path) as (host, _dev):  # nobody on the device end
        t0 = time.monotonic()
        with pytest.raises(SerialLinkError, match="no answer from the receiver"):
            send_file(host, src, link_timeout=1.0)
        assert time.monotonic() - t0 < 5
