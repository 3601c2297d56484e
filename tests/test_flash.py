# SPDX-License-Identifier: MIT
"""The flash package: make, pack (deterministic), unpack (safe), install (verified, atomic)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from support.fleet import make_home
from support.releases import DEMO_LEAF_Q4, DEMO_LEAF_Q8

from edgellm.errors import FlashIdentityError, FlashPackageError
from edgellm.flash.package import (
    install_package,
    installed_info,
    make_package,
    pack,
    read_package,
    unpack,
    verify_package,
)
from edgellm.flash.progress import Progress
from edgellm.fleet.device_config import load_device_config
from edgellm.fleet.slots import SlotStore
from edgellm.formats.bundle import read_manifest

ROOT = Path(__file__).resolve().parents[1]
B1, B2 = DEMO_LEAF_Q4, DEMO_LEAF_Q8
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def ident(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub home with one device (dev-001, board rpi5, no node yet): its identity folder."""
    home = make_home(tmp_path_factory.mktemp("hub"))
    return home.add_device("dev-001", board="rpi5")


def install_refused_disk_full(pkg: Path, dev: Path) -> None:
    """install_package(pkg, dev) in a child process whose files may not grow past 200 kB
    (RLIMIT_FSIZE): it must refuse with FlashDiskFullError."""
    code = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from edgellm.errors import FlashDiskFullError
from edgellm.flash.package import install_package
try:
    install_package({str(pkg)!r}, {str(dev)!r})
except FlashDiskFullError as exc:
    print("refused:", exc)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       timeout=60)
    assert r.returncode == 0 and "refused:" in r.stdout, (r.stdout, r.stderr)


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with (size, mtime_ns, inode): any write shows up."""
    out = {}
    for p in sorted(root.rglob("*")) if root.exists() else []:
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def test_make_pack_unpack_install_and_again_noop(tmp_path: Path, ident: Path) -> None:
    pkg = make_package(tmp_path / "pkg", bundle_dir=B1, identity_dir=ident, board="rpi5")
    info = verify_package(pkg)
    b = read_manifest(B1)
    assert (info.device_id, info.board, info.node, info.version) == (
        "dev-001", "rpi5", "en/medical/cardiology", 1)
    assert info.model_sha256 == b.file("model.gguf").sha256
    tuf = {"identity/provisioned-root.json"} if (ident / "provisioned-root.json").is_file() \
        else set()
    assert set(info.files) == {"bundle/model.gguf", "bundle/bundle.json", "identity/device.toml",
                               "identity/device.crt", "identity/device.key",
                               "identity/server-ca.crt", *tuf}
    cfg = load_device_config(pkg / "identity" / "device.toml")  # rewritten for this build
    assert (cfg.node, cfg.version, cfg.board) == ("en/medical/cardiology", 1, "rpi5")
    assert cfg.state_dir == (pkg / "identity" / "state").absolute()

    a1, a2 = pack(pkg, tmp_path / "a.elpkg"), pack(pkg, tmp_path / "b.elpkg")
    assert a1.read_bytes() == a2.read_bytes()  # deterministic
    with tarfile.open(a1) as tf:
        members = tf.getmembers()
    assert members[0].name == "flash.json" and all(m.isreg() and m.mtime == 0 for m in members)

    un = unpack(a1, tmp_path / "un")
    assert verify_package(un).digest == info.digest

    dev = tmp_path / "device"
    active = install_package(un, dev)
    assert (active.model_sha256, active.node, active.version) == (
        info.model_sha256, "en/medical/cardiology", 1)
    assert SlotStore(dev / "models").resolve() == (active, "current")
    cfg = load_device_config(dev / "device.toml")
    assert cfg.device_id == "dev-001" and cfg.state_dir == dev / "state"
    assert (dev / "device.key").stat().st_mode & 0o777 == 0o600
    assert (dev / "device.key").read_bytes() == (ident / "device.key").read_bytes()
    assert installed_info(dev) == info

    before = snapshot(dev)
    assert install_package(un, dev) == active  # the same package again: nothing written
    assert snapshot(dev) == before


def test_second_build_goes_through_the_updater(tmp_path: Path, ident: Path) -> None:
    dev = tmp_path / "device"
    install_package(make_package(tmp_path / "p1", bundle_dir=B1, identity_dir=ident,
                                 board="rpi5"), dev)
    p2 = make_package(tmp_path / "p2", bundle_dir=B2, identity_dir=ident, board="rpi5")
    a2 = install_package(p2, dev)
    store = SlotStore(dev / "models")
    assert a2.model_sha256 == read_manifest(B2).file("model.gguf").sha256
    assert store.read_pointer("current") == a2 == store.read_pointer("last_good")
    assert store.reports() == []  # a flash is not a rollout: nothing queued for the hub
    assert [p.name for p in store.bundles.iterdir()] == [a2.model_sha256]  # old one collected
    assert store.read_json("journal")["state"] == "idle"
    assert installed_info(dev) == read_package(p2)


@pytest.fixture(scope="module")
def hubs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Identity folders: dev-001 and dev-002 of hub A, dev-001 of hub B (its own CA and TUF
    root: what an attacker's hub issues), and A's dev-001 with B's TUF root swapped in."""
    d = tmp_path_factory.mktemp("hubs")
    a, b = make_home(d / "a", tuf=True), make_home(d / "b", tuf=True)
    out = {"a1": a.add_device("dev-001", board="rpi5"), "a2": a.add_device("dev-002", board="rpi5"),
           "b1": b.add_device("dev-001", board="rpi5")}
    out["a1_root_b"] = d / "a1-root-b"
    shutil.copytree(out["a1"], out["a1_root_b"])
    shutil.copyfile(out["b1"] / "provisioned-root.json",
                    out["a1_root_b"] / "provisioned-root.json")
    return out


def test_provisioned_device_refuses_another_identity_unless_reprovision(
        tmp_path: Path, hubs: dict[str, Path]) -> None:
    """SECURITY: an unsigned package (a cable) cannot re-anchor a provisioned device's trust."""
    dev = tmp_path / "device"
    install_package(make_package(tmp_path / "a1", bundle_dir=B1, identity_dir=hubs["a1"],
                                 board="rpi5"), dev)  # a blank device: provisioning is allowed
    before = snapshot(dev)
    for name, what in (("a2", "device.toml"), ("b1", "device.toml"),
                       ("a1_root_b", "provisioned-root.json")):
        pkg = make_package(tmp_path / name, bundle_dir=B2, identity_dir=hubs[name], board="rpi5")
        with pytest.raises(FlashIdentityError, match=f"already provisioned.*{what}"):
            install_package(pkg, dev)
        assert snapshot(dev) == before, name  # nothing written, not even the lock file
    # the device's own identity with another build needs no reprovision
    a = install_package(make_package(tmp_path / "a1b2", bundle_dir=B2, identity_dir=hubs["a1"],
                                     board="rpi5"), dev)
    assert a.model_sha256 == read_manifest(B2).file("model.gguf").sha256
    # an operator's explicit reprovision replaces root, key and CA
    install_package(tmp_path / "b1", dev, reprovision=True)
    for n in ("provisioned-root.json", "device.key", "device.crt", "server-ca.crt"):
        assert (dev / n).read_bytes() == (hubs["b1"] / n).read_bytes(), n
    with pytest.raises(FlashIdentityError):  # and now A's identity is the foreign one
        install_package(tmp_path / "a1", dev)
    # a provisioned device whose device.toml does not read refuses too (fails closed)
    (dev / "device.toml").write_text("not toml [")
    with pytest.raises(FlashIdentityError, match="does not read"):
        install_package(tmp_path / "b1", dev)


def test_receive_cli_refuses_another_identity_and_the_serial_unit_never_reprovisions(
        tmp_path: Path, hubs: dict[str, Path]) -> None:
    arch = {}
    for name in ("a1", "b1"):
        pkg = make_package(tmp_path / name, bundle_dir=B1, identity_dir=hubs[name], board="rpi5")
        (tmp_path / f"x{name}").mkdir()
        arch[name] = pack(pkg, tmp_path / f"x{name}" / "dev-001.elpkg")
    dev = tmp_path / "device"
    cmd = [sys.executable, "-m", "edgellm", "receive", "--root", str(dev), "--file"]
    r = subprocess.run([*cmd, str(arch["a1"])], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cmd, str(arch["b1"])], env=ENV, capture_output=True, text=True)
    assert r.returncode == 1 and "--reprovision" in r.stderr, r.stderr
    assert (dev / "device.key").read_bytes() == (hubs["a1"] / "device.key").read_bytes()
    r = subprocess.run([*cmd, str(arch["b1"]), "--reprovision"], env=ENV, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert (dev / "device.key").read_bytes() == (hubs["b1"] / "device.key").read_bytes()
    unit = (ROOT / "firmware_tools" / "edgellm-receive@.service").read_text()
    execs = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=")]
    assert len(execs) == 1 and "receive --serial" in execs[0]
    assert "--reprovision" not in execs[0]


AGENT = """
import sys, time
from pathlib import Path
from edgellm.fleet.health import check_files
from edgellm.fleet.updater import Update, Updater
from edgellm.formats.bundle import read_manifest

def slow(model, spec, adapter, scale):  # the agent's health check, mid-update
    print("trial", flush=True)
    time.sleep(1.5)
    return check_files(model, adapter=adapter, adapter_scale=scale)

store, folder = Path(sys.argv[1]), Path(sys.argv[2])
b = read_manifest(folder)
u = Updater(store, health=slow)
u.boot()
r = u.apply(Update("bundle", b.node, b.version, b.file("model.gguf").sha256,
                   {"model.gguf": folder / "model.gguf", "bundle.json": folder / "bundle.json"}))
print(r["outcome"], r["id"], time.time(), flush=True)
"""


def test_install_waits_for_the_agents_update_in_another_process(tmp_path: Path,
                                                                ident: Path) -> None:
    """RACE: the receiver's install never recovers a journal the agent is working on."""
    dev = tmp_path / "device"
    p1 = make_package(tmp_path / "p1", bundle_dir=B1, identity_dir=ident, board="rpi5")
    install_package(p1, dev)
    agent = subprocess.Popen([sys.executable, "-c", AGENT, str(dev / "models"), str(B2)],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None
        assert agent.stdout.readline().strip() == "trial"  # the agent's journal says trial
        assert SlotStore(dev / "models").read_json("journal")["state"] == "trial"
        active = install_package(p1, dev)  # B1 again: waits for the agent's lock
        done = time.time()
        outcome, rid, agent_done = agent.stdout.readline().split()
        assert agent.wait(30) == 0, agent.stderr.read() if agent.stderr else ""
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert outcome == "committed" and float(agent_done) <= done  # the agent finished first
    store = SlotStore(dev / "models")
    assert active.model_sha256 == read_manifest(B1).file("model.gguf").sha256
    assert store.read_pointer("current") == active == store.read_pointer("last_good")
    assert store.read_json("journal")["state"] == "idle"
    assert [r["id"] for r in store.reports()] == [rid]  # the agent's report stays for the hub
    assert list(store.staging.iterdir()) == []


def test_the_agents_updater_follows_a_flash_between_sessions(tmp_path: Path,
                                                            ident: Path) -> None:
    """A model installed by a receiver is served by the agent's Updater at its next poll,
    once no session holds the lock (verified, then on_swap so the server reloads)."""
    from edgellm.fleet.health import check_files
    from edgellm.fleet.updater import Updater

    dev = tmp_path / "device"
    install_package(make_package(tmp_path / "p1", bundle_dir=B1, identity_dir=ident,
                                 board="rpi5"), dev)
    swaps: list[str] = []
    agent = Updater(dev / "models", health=lambda m, s, a, x: check_files(m),
                    on_swap=lambda a: swaps.append(a.model_sha256))
    first = agent.boot()
    installed = install_package(make_package(tmp_path / "p2", bundle_dir=B2,
                                             identity_dir=ident, board="rpi5"), dev)
    assert installed != first and agent.active == first  # the receiver switched the pointer
    with agent.lock.session():  # a clinician's answer in progress: no swap
        agent.poll()
        assert agent.active == first and swaps == []
    agent.poll()
    assert agent.active == installed and swaps == [installed.model_sha256]
    assert agent.model_path() == SlotStore(dev / "models").model_path(installed)


def test_tampered_package_refused_before_any_write(tmp_path: Path, ident: Path) -> None:
    dev = tmp_path / "device"
    install_package(make_package(tmp_path / "p1", bundle_dir=B1, identity_dir=ident,
                                 board="rpi5"), dev)
    before = snapshot(dev)
    p2 = make_package(tmp_path / "p2", bundle_dir=B2, identity_dir=ident, board="rpi5")
    model = p2 / "bundle" / "model.gguf"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(FlashPackageError, match="sha256 differs"):
        install_package(p2, dev)
    assert snapshot(dev) == before
    # pack refuses a package whose file no longer has its listed size
    model.write_bytes(bytes(data[:-1]))
    with pytest.raises(FlashPackageError, match="bytes as flash.json says"):
        pack(p2, tmp_path / "x.elpkg")
    assert not (tmp_path / "x.elpkg").exists() and not (tmp_path / ".x.elpkg.tmp").exists()


def test_make_package_refuses_bad_inputs(tmp_path: Path, ident: Path) -> None:
    with pytest.raises(FlashPackageError, match="not a bundle"):
        make_package(tmp_path / "p", bundle_dir=tmp_path, identity_dir=ident, board="rpi5")
    with pytest.raises(FlashPackageError, match="identity"):
        make_package(tmp_path / "p", bundle_dir=B1, identity_dir=tmp_path / "none", board="rpi5")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FlashPackageError, match="not an empty folder"):
        make_package(tmp_path / "full", bundle_dir=B1, identity_dir=ident, board="rpi5")
    assert not (tmp_path / "p").exists()


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def _reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


@pytest.mark.parametrize("case", ["symlink", "dotdot", "absolute", "folder", "not_first",
                                  "unlisted", "size", "altered", "truncated", "duplicate",
                                  "missing", "not_tar", "huge_pax"])
def test_unpack_refuses_unsafe_archives(tmp_path: Path, ident: Path, case: str) -> None:
    pkg = make_package(tmp_path / "pkg", bundle_dir=B1, identity_dir=ident, board="rpi5")
    fj = (pkg / "flash.json").read_bytes()
    good = [(n, (pkg / n).read_bytes()) for n in sorted(read_package(pkg).files)]
    members = [_reg("flash.json", fj)] + [_reg(n, d) for n, d in good]
    if case == "symlink":
        ti = tarfile.TarInfo("identity/device.crt")
        ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
        members[1] = (ti, None)
    elif case == "dotdot":
        members.append(_reg("bundle/../../evil", b"x"))
    elif case == "absolute":
        members.append(_reg("/tmp/evil", b"x"))
    elif case == "folder":
        ti = tarfile.TarInfo("bundle")
        ti.type = tarfile.DIRTYPE
        members.insert(1, (ti, None))
    elif case == "not_first":
        members = members[1:] + members[:1]
    elif case == "unlisted":
        members.append(_reg("bundle/extra.bin", b"x"))
    elif case == "size":
        members[2] = _reg(members[2][0].name, (members[2][1] or b"") + b"\0")
    elif case == "altered":
        d = bytearray(members[2][1] or b"")
        d[-1] ^= 0xFF
        members[2] = _reg(members[2][0].name, bytes(d))
    elif case == "duplicate":
        members.append(members[1])
    elif case == "missing":
        members = members[:-1]
    arch = tmp_path / "bad.elpkg"
    if case == "huge_pax":  # a pax header claiming 1 GiB: refused before tarfile reads it
        hdr = tarfile.TarInfo("././@PaxHeader")
        hdr.type, hdr.size = tarfile.XHDTYPE, 1 << 30
        arch.write_bytes(hdr.tobuf(tarfile.USTAR_FORMAT) + b"30 path=flash.json\n")
    elif case == "not_tar":
        arch.write_bytes(b"this is not a tar archive" * 40)
    else:
        _tar(arch, members)
    if case == "truncated":
        data = arch.read_bytes()
        arch.write_bytes(data[: len(data) // 2])
    with pytest.raises(FlashPackageError,
                       match="extended tar header" if case == "huge_pax" else None):
        unpack(arch, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not Path("/tmp/evil").exists()


def test_unpack_and_install_full_disk(tmp_path: Path, ident: Path) -> None:
    """A 64 KiB tmpfs (private mount namespace): refused before writing, nothing left."""
    pkg = make_package(tmp_path / "pkg", bundle_dir=B1, identity_dir=ident, board="rpi5")
    arch = pack(pkg, tmp_path / "p.elpkg")
    small = tmp_path / "small"
    small.mkdir()
    code = f"""
import os, subprocess, sys
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", {str(small)!r}], check=True)
from edgellm.errors import FlashDiskFullError
from edgellm.flash.package import install_package, unpack
for fn, arg in ((unpack, {str(arch)!r}), (install_package, {str(pkg)!r})):
    try:
        fn(arg, {str(small / "dev")!r})
    except FlashDiskFullError as exc:
        print("refused:", exc)
    else:
        sys.exit("no error")
    print("left:", os.listdir({str(small)!r}))
"""
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed for the full-disk test"
    r = subprocess.run([unshare, "--mount", "--map-root-user", sys.executable, "-c", code],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("refused:") == 2 and "are free" in r.stdout
    assert r.stdout.count("left: []") == 2


def test_install_cut_mid_copy_leaves_old_model_and_identity(tmp_path: Path, ident: Path) -> None:
    """A write limit (RLIMIT_FSIZE) below the model size: the copy fails part way."""
    dev = tmp_path / "device"
    install_package(make_package(tmp_path / "p1", bundle_dir=B1, identity_dir=ident,
                                 board="rpi5"), dev)
    (dev / "device.toml").write_text((dev / "device.toml").read_text() + "# local edit\n")
    before = {p: (dev / p).read_bytes() for p in ("device.toml", "models/current", "flash.json")}
    p2 = make_package(tmp_path / "p2", bundle_dir=B2, identity_dir=ident, board="rpi5")
    install_refused_disk_full(p2, dev)
    assert {p: (dev / p).read_bytes() for p in before} == before
    assert not list(dev.glob(".*flash-new"))
    store = SlotStore(dev / "models")
    assert list(store.staging.iterdir()) == [] and store.reports() == []
    assert store.resolve()[0].model_sha256 == read_manifest(B1).file("model.gguf").sha256
    active = install_package(p2, dev)  # with room again it installs
    assert active.model_sha256 == read_manifest(B2).file("model.gguf").sha256


def test_progress_shows_bytes_rate_and_eta() -> None:
    buf = io.StringIO()
    with Progress("ssh d-1", 4_000_000, stream=buf, enabled=True) as p:
        p(1_000_000, 4_000_000)
        eta = p.eta()
        assert eta is not None and eta > 0 and p.rate > 0
        p(4_000_000, 4_000_000)
    text = buf.getvalue()
    assert "ssh d-1" in text and "4.00M/4.00M" in text and "B/s" in text and "<" in text
    assert p.done == 4_000_000 and p.summary().startswith("4.0 MB in ")
    quiet = io.StringIO()
    with Progress("x", 10, stream=quiet) as q:  # not a terminal: no bar, still counted
        q(10, 10)
    assert quiet.getvalue() == "" and q.done == 10


def test_first_install_cut_mid_copy_leaves_nothing(tmp_path: Path, ident: Path) -> None:
    """A new device (provision path) with a write limit: no pointer, no identity, no copy."""
    dev = tmp_path / "device"
    pkg = make_package(tmp_path / "p", bundle_dir=B1, identity_dir=ident, board="rpi5")
    install_refused_disk_full(pkg, dev)
    left = sorted(str(p.relative_to(dev)) for p in dev.rglob("*") if p.is_file())
    assert left == ["models/.updater.lock"]  # the store's empty lock file; no model, pointer,
    assert (dev / "models" / ".updater.lock").stat().st_size == 0  # identity or flash.json
    assert install_package(pkg, dev).node == "en/medical/cardiology"  # with room it installs
