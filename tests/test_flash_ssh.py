# SPDX-License-Identifier: MIT
"""`edgellm flash` end to end: a real sshd on loopback, the agent's birth, and bad input.

The sshd is OpenSSH's (Debian openssh-server) started by the test in the foreground with its
own config, host key and authorized key, as the current user (UsePAM no, StrictModes no).
The "device" is a folder: flash installs into SYSROOT/var/lib/edgellm through
`edgellm receive` run over SSH, then the agent, started here with the flashed device.toml,
connects to a real Mosquitto with the new identity and publishes its birth.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fleet import Inbox, close, free_port, hub_client, make_home, running_broker
from support.sshd import Sshd, running_sshd

from edgellm.cli import main
from edgellm.errors import FlashConnectError, FlashHostKeyError
from edgellm.flash.targets import flash
from edgellm.fleet import protocol
from edgellm.fleet.agent import Agent
from edgellm.fleet.device_config import load_device_config
from edgellm.fleet.home import HubHome
from edgellm.fleet.slots import SlotStore

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "edgellm" / "demo" / "bundles"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
NEED = "en/medical/cardiology"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with running_sshd(tmp_path_factory.mktemp("sshd")) as s:
        yield s


def _uri(s: Sshd) -> str:
    return f"ssh://{getpass.getuser()}@127.0.0.1:{s.port}/var/lib/edgellm"


def _ssh_opts(s: Sshd, sysroot: Path, known_hosts: Path | None = None) -> dict[str, object]:
    return {"known_hosts": known_hosts or s.known_hosts, "key": s.key, "sysroot": str(sysroot),
            "remote_python": f"env PYTHONPATH={ROOT} {sys.executable}"}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*"))} if root.exists() else {}


def test_ssh_flash_installs_noop_again_and_agent_reports(tmp_path: Path, sshd: Sshd,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    home = make_home(tmp_path)
    sysroot = tmp_path / "devfs"
    sysroot.mkdir()
    rc = main(["flash", "--board", "rpi5", "--device", "dev-ssh", "--need", NEED, "--to",
               _uri(sshd), "--home", str(home.root), "--bundles", str(BUNDLES),
               "--known-hosts", str(sshd.known_hosts), "--ssh-key", str(sshd.key),
               "--remote-python", f"env PYTHONPATH={ROOT} {sys.executable}",
               "--sysroot", str(sysroot), "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "identity: issued dev-ssh" in out.err and "-> ssh://" in out.out
    dev = sysroot / "var" / "lib" / "edgellm"
    active, source = SlotStore(dev / "models").resolve()
    assert (active.node, source) == (NEED, "current")
    assert (dev / "device.key").read_bytes() == (home.device_dir("dev-ssh") / "device.key"
                                                 ).read_bytes()
    unit = sysroot / "etc" / "systemd" / "system" / "edgellm-agent.service"
    assert "/var/lib/edgellm" in unit.read_text()
    assert (unit.parent / "multi-user.target.wants" / unit.name).is_symlink()
    assert not list(Path("/tmp").glob("edgellm-flash-*/dev-ssh.elpkg"))  # remote temp removed

    before = snapshot(dev)
    res = flash(board="rpi5", device_id="dev-ssh", target=_uri(sshd), home=home.root, need=NEED,
                bundles=BUNDLES, ssh_options=_ssh_opts(sshd, sysroot), show_progress=False)
    assert res.skipped and res.bytes_sent == 0 and not res.identity_created
    assert snapshot(dev) == before  # nothing copied, nothing written

    # The flashed device's agent: a real broker, the new identity, its model in the birth.
    cfg = load_device_config(dev / "device.toml")
    assert (cfg.device_id, cfg.node, cfg.port) == ("dev-ssh", NEED, home.port)
    with running_broker(home):
        hub = hub_client(home)
        inbox = Inbox()
        hub.on_message = inbox
        hub.subscribe(protocol.topic("dev-ssh", "state"), qos=1)
        time.sleep(0.2)
        agent = Agent(cfg).start(timeout=10)
        try:
            assert inbox.wait_for(1, timeout=10)
            birth = json.loads(inbox.messages[0].payload)
            assert birth["type"] == "birth" and birth["device"] == "dev-ssh"
            assert (birth["node"], birth["version"], birth["board"]) == (NEED, 1, "rpi5")
        finally:
            agent.stop()
            close(hub)


def test_ssh_wrong_host_key_is_refused(tmp_path: Path, sshd: Sshd) -> None:
    home = make_home(tmp_path)
    sysroot = tmp_path / "devfs"
    sysroot.mkdir()
    with pytest.raises(FlashHostKeyError, match="host key"):
        flash(board="rpi5", device_id="dev-key", target=_uri(sshd), home=home.root, need=NEED,
              bundles=BUNDLES, show_progress=False,
              ssh_options=_ssh_opts(sshd, sysroot, sshd.wrong_known_hosts))
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(FlashHostKeyError):
        flash(board="rpi5", device_id="dev-key", target=_uri(sshd), home=home.root, need=NEED,
              bundles=BUNDLES, show_progress=False, ssh_options=_ssh_opts(sshd, sysroot, empty))
    assert list(sysroot.iterdir()) == [] and home.devices() == []  # nothing anywhere
    assert empty.read_text() == ""  # the unknown key was not learnt


def test_ssh_too_little_space_on_the_device_is_refused_before_the_copy(tmp_path: Path,
                                                                        sshd: Sshd) -> None:
    """The probe's free-space figures decide before any byte is sent."""
    import dataclasses

    from edgellm.errors import FlashDiskFullError
    from edgellm.flash import ssh
    from edgellm.flash.package import make_package, pack, read_package

    home = make_home(tmp_path)
    ident = home.add_device("dev-full", board="rpi5")
    pkg = make_package(tmp_path / "pkg", bundle_dir=BUNDLES / "en-medical-rpi5-q8_0",
                       identity_dir=ident, board="rpi5")
    archive = pack(pkg, tmp_path / "dev-full.elpkg")
    sysroot = tmp_path / "devfs"
    sysroot.mkdir()
    t = ssh.SshTarget.from_uri(_uri(sshd), **_ssh_opts(sshd, sysroot))
    with ssh.session(t) as st:
        state = ssh.probe(st)
        assert state.flash_sha256 is None and state.current is None and state.root_free > 0
        for short in ({"root_free": 1000}, {"tmp_free": 1000}):
            with pytest.raises(FlashDiskFullError, match="nothing was copied"):
                ssh.flash_ssh(st, archive, read_package(pkg),
                              state=dataclasses.replace(state, **short))
    assert list(sysroot.iterdir()) == []
    assert not list(Path(state.tmp).glob("edgellm-flash-*/dev-full.elpkg"))


def test_ssh_flash_reprovisions_a_device_with_another_identity(tmp_path: Path,
                                                               sshd: Sshd) -> None:
    """The SSH login authenticated the operator: the receiver runs with --reprovision."""
    from edgellm.flash.package import install_package, make_package

    home = make_home(tmp_path)
    sysroot = tmp_path / "devfs"
    dev = sysroot / "var" / "lib" / "edgellm"
    old = home.add_device("dev-old", board="rpi5")  # provisioned before, as another device
    install_package(make_package(tmp_path / "old", bundle_dir=BUNDLES / "en-medical-rpi5-q8_0",
                                 identity_dir=old, board="rpi5"), dev)
    res = flash(board="rpi5", device_id="dev-new", target=_uri(sshd), home=home.root, need=NEED,
                bundles=BUNDLES, show_progress=False,
                ssh_options={**_ssh_opts(sshd, sysroot), "agent": "none"})
    assert not res.skipped and res.identity_created
    assert load_device_config(dev / "device.toml").device_id == "dev-new"
    assert (dev / "device.key").read_bytes() == (home.device_dir("dev-new") / "device.key"
                                                 ).read_bytes()


def _children(name: str) -> list[int]:
    """This process's child processes called name, running or not yet reaped (zombies)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:]
        if comm == name and int(rest.split()[1]) == os.getpid():
            out.append(int(stat.parent.name))
    return out


def test_ssh_copy_has_keepalives_and_leaves_no_ssh_when_progress_raises(tmp_path: Path,
                                                                       sshd: Sshd) -> None:
    from edgellm.flash import ssh

    t = ssh.SshTarget.from_uri(_uri(sshd), **_ssh_opts(sshd, tmp_path / "devfs"))
    argv = t.ssh_argv()
    assert "ServerAliveInterval=15" in argv and "ServerAliveCountMax=3" in argv
    archive = tmp_path / "x.elpkg"
    archive.write_bytes(os.urandom(3 * ssh.CHUNK))
    (tmp_path / "remote").mkdir()

    def interrupted(done: int, total: int) -> None:
        raise KeyboardInterrupt  # Ctrl-C during the progress bar

    assert _children("ssh") == []
    with pytest.raises(KeyboardInterrupt):
        ssh._send(t, archive, str(tmp_path / "remote"), interrupted)
    assert _children("ssh") == []  # killed and reaped, not left running or as a zombie


# -- bad input: clear errors, nothing half-installed -------------------------------------------


def _cli(home: HubHome, *args: str) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "edgellm", "flash", "--device", "dev-bad",
                        "--home", str(home.root), "--bundles", str(BUNDLES), "--no-progress",
                        *args], capture_output=True, text=True, env=ENV, timeout=60)
    return r.returncode, r.stderr


def test_bad_input_gives_clear_errors_and_changes_nothing(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    boot = tmp_path / "boot"
    boot.mkdir()
    rc, err = _cli(home, "--board", "rpi55", "--need", NEED, "--to", f"dir:{boot}")
    assert rc == 1 and "unknown board 'rpi55' (did you mean 'rpi5'?)" in err
    rc, err = _cli(home, "--board", "rpi4", "--model", "en-medical-rpi5-q8_0", "--to", f"dir:{boot}")
    assert rc == 1 and "cannot run on rpi4" in err and "dotprod" in err
    rc, err = _cli(home, "--board", "rpi5", "--need", NEED, "--to", f"dir:{tmp_path / 'nope'}")
    assert rc == 1 and f"target folder {tmp_path / 'nope'} does not exist" in err
    rc, err = _cli(home, "--board", "rpi5", "--need", NEED, "--to", "usb:/dev/sda")
    assert rc == 1 and "ssh://" in err and "serial://" in err
    rc, err = _cli(home, "--board", "rpi5", "--need", NEED, "--to", "serial:///dev/ttyNOPE9")
    assert rc == 1 and "serial port /dev/ttyNOPE9 does not exist" in err
    port = free_port()  # nothing listens there
    rc, err = _cli(home, "--board", "rpi5", "--need", NEED, "--to",
                   f"ssh://nobody@127.0.0.1:{port}/var/lib/edgellm", "--connect-timeout", "3")
    assert rc == 1 and "cannot reach the device over SSH" in err and "refused" in err
    with pytest.raises(FlashConnectError, match="resolve"):
        flash(board="rpi5", device_id="dev-bad", target="ssh://pi@no-such-host.invalid/var/lib/x",
              home=home.root, need=NEED, bundles=BUNDLES, show_progress=False)
    # a tflite build (Coral): its model.tflite would not travel in a flash package
    tfl = tmp_path / "coral-build"
    shutil.copytree(BUNDLES / "en-medical-cardiology-rpi5-q8_0", tfl)
    manifest = json.loads((tfl / "bundle.json").read_text())
    manifest.update(backend={"name": "tflite"}, isa_features=[], board="coral-dev-board")
    (tfl / "bundle.json").write_text(json.dumps(manifest))
    rc, err = _cli(home, "--board", "coral-dev-board", "--model", str(tfl), "--to", f"dir:{boot}")
    assert rc == 1 and "is a tflite build" in err and "GGUF bundles only" in err
    assert list(boot.iterdir()) == [] and home.devices() == []


def test_busy_serial_port_is_refused(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    master, slave = os.openpty()
    name = os.ttyname(slave)
    holder = os.open(name, os.O_RDWR | os.O_NOCTTY)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what pyserial's exclusive open takes
    try:
        rc, err = _cli(home, "--board", "rpi5", "--need", NEED, "--to", f"serial://{name}")
        assert rc == 1 and f"serial port {name} is in use by another process" in err
    finally:
        for fd in (holder, slave, master):
            os.close(fd)
    assert home.devices() == []


def test_full_target_disk_is_refused_before_writing(tmp_path: Path) -> None:
    """A 64 KiB tmpfs as the SD card's boot partition (a private mount namespace)."""
    home = make_home(tmp_path)
    card = tmp_path / "card"
    card.mkdir()
    code = f"""
import os, subprocess, sys
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", {str(card)!r}], check=True)
for n in ("cmdline.txt", "config.txt"):
    open(os.path.join({str(card)!r}, n), "w").write("console=tty1\\n")
from edgellm.cli import main
rc = main(["flash", "--board", "rpi5", "--device", "dev-full", "--need", {NEED!r}, "--to",
           "dir:{card}", "--home", {str(home.root)!r}, "--bundles", {str(BUNDLES)!r},
           "--no-progress"])
print("rc", rc, "left", sorted(os.listdir({str(card)!r})))
"""
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed for the full-disk test"
    r = subprocess.run([unshare, "--mount", "--map-root-user", sys.executable, "-c", code],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert "rc 1 left ['cmdline.txt', 'config.txt']" in r.stdout, (r.stdout, r.stderr)
    assert "are free (nothing was written)" in r.stderr


# -- the other targets, dispatched by the same command ----------------------------------------


def test_serial_target_sends_through_serial_link(tmp_path: Path) -> None:
    """A socat pty pair as the cable; serial_link.receive_file as the device end."""
    import threading

    from edgellm.flash.package import install_package, unpack
    from edgellm.flash.serial_link import receive_file

    home = make_home(tmp_path)
    a, b = tmp_path / "ttyA", tmp_path / "ttyB"
    socat = shutil.which("socat")
    assert socat, "socat is needed (apt-get install socat)"
    proc = subprocess.Popen([socat, f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"])
    got: list[Path] = []
    try:
        deadline = time.monotonic() + 10
        while not (a.exists() and b.exists()):
            assert time.monotonic() < deadline, "socat made no ptys"
            time.sleep(0.02)
        rx = threading.Thread(target=lambda: got.append(
            receive_file(str(b), tmp_path / "rx", idle_timeout=30)), daemon=True)
        rx.start()
        res = flash(board="rpi5", device_id="dev-ser", target=f"serial://{a}?baud=921600",
                    home=home.root, need=NEED, bundles=BUNDLES, show_progress=False)
        rx.join(30)
    finally:
        proc.terminate()
        proc.wait(10)
    assert got and got[0].name == "dev-ser.elpkg" and res.bytes_sent == got[0].stat().st_size
    active = install_package(unpack(got[0], tmp_path / "pkg"), tmp_path / "dev")
    assert active.node == NEED
    assert load_device_config(tmp_path / "dev" / "device.toml").device_id == "dev-ser"


def test_dir_target_writes_a_card_that_first_boot_installs(tmp_path: Path) -> None:
    from edgellm.flash.firstboot import run_firstboot

    home = make_home(tmp_path)
    boot, sysroot = tmp_path / "bootfs", tmp_path / "rootfs"
    boot.mkdir()
    sysroot.mkdir()
    (boot / "cmdline.txt").write_text("console=serial0,115200 root=PARTUUID=1 rootwait\n")
    (boot / "config.txt").write_text("[all]\n")
    rc = main(["flash", "--board", "rpi5", "--device", "dev-sd", "--need", NEED, "--to",
               f"dir:{boot}", "--home", str(home.root), "--bundles", str(BUNDLES),
               "--no-progress"])
    assert rc == 0
    active = run_firstboot(boot, sysroot)
    assert active.node == NEED
    dev = sysroot / "var" / "lib" / "edgellm"
    assert load_device_config(dev / "device.toml").device_id == "dev-sd"
    assert (sysroot / "etc/systemd/system/multi-user.target.wants/edgellm-agent.service"
            ).is_symlink()
