# SPDX-License-Identifier: MIT
"""SD card and first boot: sd_notify, write_boot, run_firstboot, the firmware_tools scripts."""

from __future__ import annotations

import email
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from support.fleet import make_home

from edgellm._sdnotify import notify
from edgellm.errors import FlashError, FlashPackageError, FlashTargetError
from edgellm.flash.firstboot import (
    AGENT_UNIT,
    FIRSTBOOT_UNIT,
    FIRSTBOOT_UNIT_TEXT,
    FIRSTRUN_SH,
    HOOK_WORDS,
    SCRIPT,
    agent_unit,
    enable_agent,
    run_firstboot,
    write_boot,
)
from edgellm.flash.package import make_package, read_package
from edgellm.fleet.device_config import load_device_config
from edgellm.fleet.home import HubHome
from edgellm.fleet.slots import Active, SlotStore
from edgellm.formats.bundle import read_manifest

ROOT = Path(__file__).resolve().parents[1]


# --- sd_notify ------------------------------------------------------------------------------


def test_notify_is_a_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify("READY=1") is False


def test_notify_sends_to_a_path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        srv.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1") is True
        assert notify("WATCHDOG=1\nSTATUS=serving") is True
        assert srv.recv(4096) == b"READY=1"
        assert srv.recv(4096) == b"WATCHDOG=1\nSTATUS=serving"


def test_notify_sends_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edgellm-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name)
        srv.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("WATCHDOG=1") is True
        assert srv.recv(4096) == b"WATCHDOG=1"


def test_notify_reports_a_missing_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # not a unix socket: not ours to reach
    assert notify("READY=1") is False


# --- the card: write_boot, first boot in a temporary root -------------------------------------

CMDLINE = ("console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 "
           "fsck.repair=yes rootwait quiet splash\n")
CONFIG_TXT = ("dtparam=audio=on\ncamera_auto_detect=1\n\n[cm4]\notg_mode=1\n\n[cm5]\n"
              "dtoverlay=dwc2,dr_mode=host\n\n[all]\narm_boost=1\n")
B1 = ROOT / "edgellm" / "demo" / "bundles" / "en-medical-cardiology-rpi5-q4_0_mixed"
EXE = "/usr/local/bin/edgellm"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> HubHome:
    return make_home(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="module")
def pkg(home: HubHome, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ident = home.add_device("dev-sd1", board="rpi5")
    return make_package(tmp_path_factory.mktemp("p") / "pkg", bundle_dir=B1, identity_dir=ident,
                        board="rpi5")


def bootfs(tmp_path: Path) -> Path:
    """A Raspberry Pi OS bootfs as a freshly written card has it (the files we touch)."""
    boot = tmp_path / "bootfs"
    boot.mkdir()
    (boot / "cmdline.txt").write_text(CMDLINE)
    (boot / "config.txt").write_text(CONFIG_TXT)
    return boot


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with (size, mtime_ns, inode): any write shows up."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns, p.lstat().st_ino)
            for p in sorted(root.rglob("*"))}


def assert_provisioned(sysroot: Path, device_id: str, exe: str) -> Active:
    """An installed, verified model, a loadable device.toml and an enabled agent unit."""
    dev = sysroot / "var/lib/edgellm"
    store = SlotStore(dev / "models")
    active = store.read_pointer("current")
    assert active is not None and store.read_pointer("last_good") == active
    store.verify(active)  # raises on any missing or altered byte
    assert active.model_sha256 == read_manifest(B1).file("model.gguf").sha256
    cfg = load_device_config(dev / "device.toml")
    assert (cfg.device_id, cfg.board, cfg.node) == (device_id, "rpi5", "en/medical/cardiology")
    assert cfg.cert.is_file() and (dev / "device.key").stat().st_mode & 0o077 == 0
    unit = sysroot / "etc/systemd/system" / AGENT_UNIT
    link = sysroot / "etc/systemd/system/multi-user.target.wants" / AGENT_UNIT
    assert link.is_symlink() and os.readlink(link) == "/etc/systemd/system/" + AGENT_UNIT
    text = unit.read_text()
    assert f"ExecStart={exe} agent --config /var/lib/edgellm/device.toml\n" in text
    assert "Type=notify" in text and "WatchdogSec=" in text and "StateDirectory=edgellm" in text
    return active


def test_write_boot_then_first_boot_in_a_temporary_root(tmp_path: Path, pkg: Path) -> None:
    boot = bootfs(tmp_path)
    written = write_boot(pkg, boot)
    assert boot / "cmdline.txt" in written and boot / SCRIPT in written
    line = (boot / "cmdline.txt").read_text()
    assert line == CMDLINE.strip() + " " + " ".join(HOOK_WORDS) + "\n"
    assert (boot / SCRIPT).read_text() == (ROOT / "firmware_tools" / SCRIPT).read_text()
    assert read_package(boot / "edgellm").digest == read_package(pkg).digest
    assert not (boot / "user-data").exists()  # not a cloud-init image: none invented
    card = snapshot(boot)
    write_boot(pkg, boot)  # the same package again: the same card
    assert (boot / "cmdline.txt").read_text() == line
    assert {k: v[0] for k, v in snapshot(boot).items()} == {k: v[0] for k, v in card.items()}

    sysroot = tmp_path / "root"
    active = run_firstboot(boot, sysroot, exe=EXE)
    assert assert_provisioned(sysroot, "dev-sd1", EXE) == active
    # the hook is gone: cmdline.txt as it was, no script, no package (it held the key)
    assert (boot / "cmdline.txt").read_text() == CMDLINE
    assert sorted(p.name for p in boot.iterdir()) == ["cmdline.txt", "config.txt"]
    before = snapshot(sysroot)
    assert run_firstboot(boot, sysroot, exe=EXE) == active  # idempotent: nothing changes
    assert snapshot(sysroot) == before
    assert enable_agent(sysroot, exe=EXE) and snapshot(sysroot) == before


def test_firstrun_script_under_bash_chains_imager_and_cloud_init(tmp_path: Path, pkg: Path) -> None:
    boot = bootfs(tmp_path)
    imager = "systemd.run=/boot/firstrun.sh systemd.run_success_action=reboot " \
             "systemd.unit=kernel-command-line.target"
    (boot / "cmdline.txt").write_text(CMDLINE.strip() + " " + imager + "\n")
    (boot / "firstrun.sh").write_text('#!/bin/bash\necho imager >"$(dirname "$0")/imager.ran"\n'
                                      "rm -f /boot/firstrun.sh\nexit 0\n")
    (boot / "user-data").write_text("#cloud-config\nhostname: bedside-01\n")
    write_boot(pkg, boot)
    write_boot(pkg, boot)
    words = (boot / "cmdline.txt").read_text().split()
    assert words.count(HOOK_WORDS[0]) == 1 and "systemd.run=/boot/firstrun.sh" not in words
    assert (boot / "edgellm-chain.txt").read_text() == "/boot/firstrun.sh\n"
    ud = email.message_from_string((boot / "user-data").read_text())
    parts = [(p.get_content_type(), p.get_payload()) for p in ud.get_payload()]
    assert parts[0] == ("text/cloud-config", "#cloud-config\nhostname: bedside-01\n")
    assert [t for t, _ in parts] == ["text/cloud-config", "text/x-shellscript"]  # added once
    assert SCRIPT in parts[1][1]

    sysroot = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGELLM_SYSROOT": str(sysroot),
           "EDGELLM": f"{sys.executable} -m edgellm"}
    r = subprocess.run(["bash", str(boot / SCRIPT)], env=env, capture_output=True, text=True,
                       timeout=60)
    log = (boot / "edgellm-firstboot.log").read_text()
    assert r.returncode == 0 and "done: edgellm-agent.service is enabled" in log, log + r.stderr
    assert (boot / "imager.ran").read_text() == "imager\n"  # the chained hook ran first...
    assert not (boot / "firstrun.sh").exists()  # ...once (it may hold Wi-Fi keys)
    assert_provisioned(sysroot, "dev-sd1", f"{sys.executable} -m edgellm")
    assert (boot / "cmdline.txt").read_text() == CMDLINE
    assert not (boot / SCRIPT).exists() and not (boot / "edgellm").exists()
    # cloud-init's copy of the hook (the next boot) finds nothing to do
    before = snapshot(sysroot)
    r = subprocess.run(["bash", str(ROOT / "firmware_tools" / SCRIPT)],
                       env={**env, "EDGELLM_BOOT": str(boot)}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "already provisioned" in (boot / "edgellm-firstboot.log").read_text()
    assert snapshot(sysroot) == before


def test_jetson_rootfs_gets_a_oneshot_unit(tmp_path: Path, home: HubHome) -> None:
    ident = home.add_device("dev-jet1", board="jetson-orin-nano")
    pkg = make_package(tmp_path / "pkg", bundle_dir=B1, identity_dir=ident,
                       board="jetson-orin-nano")
    rootfs = tmp_path / "APP"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "boot" / "extlinux").mkdir(parents=True)
    write_boot(pkg, rootfs)
    unit = rootfs / "etc/systemd/system" / FIRSTBOOT_UNIT
    link = rootfs / "etc/systemd/system/multi-user.target.wants" / FIRSTBOOT_UNIT
    assert unit.read_text() == (ROOT / "firmware_tools" / FIRSTBOOT_UNIT).read_text()
    assert os.readlink(link) == "/etc/systemd/system/" + FIRSTBOOT_UNIT
    assert (rootfs / "boot/edgellm/flash.json").is_file() and (rootfs / "boot" / SCRIPT).is_file()
    run_firstboot(rootfs / "boot", rootfs, exe=EXE)  # what the unit's script runs on the device
    dev = rootfs / "var/lib/edgellm"
    assert load_device_config(dev / "device.toml").device_id == "dev-jet1"
    assert os.readlink(rootfs / "etc/systemd/system/multi-user.target.wants" / AGENT_UNIT) \
        == "/etc/systemd/system/" + AGENT_UNIT
    assert not link.exists() and not (rootfs / "boot/edgellm").exists()  # disarmed


def test_bad_targets_are_refused_before_writing(tmp_path: Path, pkg: Path, home: HubHome) -> None:
    with pytest.raises(FlashTargetError, match="does not exist"):
        write_boot(pkg, tmp_path / "no-such-mount")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("x")
    with pytest.raises(FlashTargetError, match="not a Raspberry Pi boot partition"):
        write_boot(pkg, plain)
    assert sorted(p.name for p in plain.iterdir()) == ["notes.txt"]
    x86 = make_package(tmp_path / "x86", bundle_dir=B1, identity_dir=home.add_device(
        "dev-x86", board="x86-host"), board="x86-host")
    with pytest.raises(FlashTargetError, match="ssh://"):
        write_boot(x86, bootfs(tmp_path))
    with pytest.raises(FlashPackageError, match="never provisioned"):
        run_firstboot(plain, tmp_path / "root")
    with pytest.raises(FlashTargetError, match="does not exist"):
        run_firstboot(tmp_path / "no-such-boot", tmp_path / "root")
    assert not (tmp_path / "root").exists()


# --- firmware_tools -----------------------------------------------------------------------

TOOLS = ROOT / "firmware_tools"


def test_firmware_tools_match_what_first_boot_writes() -> None:
    assert (TOOLS / AGENT_UNIT).read_text() == agent_unit(exe=EXE)
    other = agent_unit("/srv/edgellm", exe=EXE)  # a root outside /var/lib: named writable
    assert "ReadWritePaths=/srv/edgellm\n" in other and "StateDirectory" not in other
    for bad in ("var/lib/edgellm", "/", "/var/lib/../etc"):
        with pytest.raises(FlashError):
            agent_unit(bad, exe=EXE)
    # the first-boot script and unit ship once, in the package; firmware_tools/ links to them
    shipped = ROOT / "edgellm" / "flash"
    for name, text in ((FIRSTBOOT_UNIT, FIRSTBOOT_UNIT_TEXT), (SCRIPT, FIRSTRUN_SH)):
        assert (TOOLS / name).is_symlink(), name
        assert (TOOLS / name).resolve() == (shipped / name).resolve(), name
        assert (shipped / name).read_text() == text and text.strip(), name
    readme = (TOOLS / "README.md").read_text()
    for f in sorted(TOOLS.iterdir()):
        assert f.name == "README.md" or f"`{f.name}`" in readme, f"README.md omits {f.name}"


def test_shell_scripts_pass_bash_n_and_shellcheck() -> None:
    scripts = sorted(TOOLS.glob("*.sh"))
    assert len(scripts) >= 2
    assert shutil.which("shellcheck"), "shellcheck is not installed (.ci/setup installs it)"
    for s in scripts:
        assert os.access(s, os.X_OK), f"{s} is not executable"
        r = subprocess.run(["bash", "-n", str(s)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze is not installed (apt: systemd)"
    names = []
    for u in sorted(TOOLS.glob("*.service")):
        text = u.read_text().replace(EXE, "/bin/true").replace("/bin/bash /boot/" + SCRIPT,
                                                               "/bin/true")
        name = u.name.replace("@.service", "@ttyGS0.service")
        (tmp_path / name).write_text(text)
        names.append(f"./{name}")
    assert len(names) == 3
    r = subprocess.run(["systemd-analyze", "verify", *names], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr


def gadget(boot: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(TOOLS / "enable-usb-gadget-serial.sh"), str(boot)],
                          capture_output=True, text=True, timeout=30)


def test_usb_gadget_serial_script_edits_a_boot_dir_idempotently(tmp_path: Path) -> None:
    boot = bootfs(tmp_path)
    r = gadget(boot)
    assert r.returncode == 0, r.stderr
    assert (boot / "cmdline.txt").read_text() == CMDLINE.replace(
        "rootwait", "rootwait modules-load=dwc2,g_serial")
    cfg = (boot / "config.txt").read_text()
    assert cfg.startswith(CONFIG_TXT)  # appended: the stock [cm5] host-mode line stays
    added = [ln for ln in cfg[len(CONFIG_TXT):].splitlines() if ln and not ln.startswith("#")]
    assert added == ["[all]", "dtoverlay=dwc2,dr_mode=peripheral"]
    card = {p.name: p.read_bytes() for p in boot.iterdir()}
    r = gadget(boot)
    assert r.returncode == 0 and "already" in r.stdout
    assert {p.name: p.read_bytes() for p in boot.iterdir()} == card  # idempotent
    # an existing modules-load= word is merged into; an active [all] dwc2 overlay counts
    (boot / "cmdline.txt").write_text("root=/dev/mmcblk0p2 modules-load=i2c-dev,dwc2 rootwait\n")
    (boot / "config.txt").write_text("dtoverlay=dwc2\n[pi4]\nx=1\n")
    assert gadget(boot).returncode == 0
    assert (boot / "cmdline.txt").read_text() == \
        "root=/dev/mmcblk0p2 modules-load=i2c-dev,dwc2,g_serial rootwait\n"
    assert (boot / "config.txt").read_text() == "dtoverlay=dwc2\n[pi4]\nx=1\n"
    r = gadget(tmp_path / "missing")
    assert r.returncode == 1 and "does not exist" in r.stderr
