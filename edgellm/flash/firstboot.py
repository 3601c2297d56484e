# SPDX-License-Identifier: MIT
"""The SD card target (``dir:``) and first boot: provision a device from files on its card.

On the host, ``write_boot(package_dir, boot_dir)`` (what ``edgellm flash --to dir:PATH``
calls) puts a flash package (edgellm.flash.package) and a one-shot hook on a mounted card:

- Raspberry Pi OS (board profiles whose SoC is a Broadcom/Raspberry Pi one): PATH is the FAT
  boot partition (``bootfs``, mounted at /boot/firmware on the device). It gets
  ``edgellm/`` (the package), ``edgellm-firstrun.sh``, and cmdline.txt gains Raspberry Pi
  Imager's own first-boot words pointing at that script: ``systemd.run=/boot/firmware/
  edgellm-firstrun.sh systemd.run_success_action=reboot systemd.unit=kernel-command-line.
  target``. A hook that was there already (Imager's ``firstrun.sh``: Wi-Fi, user, SSH) is
  chained: our script runs it first. Images that use cloud-init instead (a ``user-data`` file
  on bootfs) also get a MIME part in user-data that runs the same script once.
- Jetson (L4T, no cloud-init): PATH is the mounted root file system (APP partition). It gets
  /boot/edgellm/, /boot/edgellm-firstrun.sh and ``edgellm-firstboot.service``, a oneshot
  unit enabled the way ``systemctl enable`` does it (a multi-user.target.wants symlink).

On the device the hook runs ``edgellm firstboot --boot DIR``: ``run_firstboot(boot_dir,
sysroot)`` installs the package into SYSROOT/var/lib/edgellm through
``package.install_package`` (verified, atomic, idempotent), writes and enables
``edgellm-agent.service`` with ``enable_agent`` (no systemctl needed, so it works on a
mounted image too), records firstboot.json and then neutralises the hook: the cmdline.txt
words, the script, the oneshot unit's symlink and the package folder (it holds the device
key, and a FAT partition has no permissions) are removed. Every step can run again.

Public API: ``write_boot``, ``run_firstboot``, ``enable_agent``, ``agent_unit``,
``firstboot_platform``, ``default_exe``, ``FIRSTRUN_SH``, ``FIRSTBOOT_UNIT_TEXT``,
``DEVICE_ROOT``. The first-boot script and the Jetson unit are files beside this module
(edgellm-firstrun.sh, edgellm-firstboot.service: package data, linked from firmware_tools/);
the agent unit is rendered here (firmware_tools/ holds it for the default paths, a test keeps
the two equal).

.. versionadded:: 0.1
"""

from __future__ import annotations

import datetime as dt
import email
import errno
import json
import os
import shlex
import shutil
import sys
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any, Union

from .._fsutil import atomic_write, fsync_dir
from ..errors import FlashDiskFullError, FlashError, FlashPackageError, FlashTargetError
from .package import FLASH_JSON, install_package, read_package

__all__ = ["AGENT_UNIT", "DEVICE_ROOT", "FIRSTBOOT_UNIT", "FIRSTBOOT_UNIT_TEXT", "FIRSTRUN_SH",
           "HOOK_WORDS", "SCRIPT",
           "agent_unit", "default_exe", "enable_agent", "firstboot_platform", "run_firstboot",
           "write_boot"]

PathLike = Union[str, "os.PathLike[str]"]
DEVICE_ROOT = "/var/lib/edgellm"  # the device layout's root (docs/flash.md)
PKG_DIR = "edgellm"  # the package folder beside the hook script
SCRIPT = "edgellm-firstrun.sh"
CHAIN = "edgellm-chain.txt"  # the systemd.run script that was there before ours (Imager's)
AGENT_UNIT = "edgellm-agent.service"
FIRSTBOOT_UNIT = "edgellm-firstboot.service"
UNIT_DIR = "etc/systemd/system"
DONE = "firstboot.json"  # in the device root: first boot completed (what, when)
RPI_BOOT = "/boot/firmware"  # where Raspberry Pi OS Bookworm and later mount bootfs
HOOK_WORDS = (f"systemd.run={RPI_BOOT}/{SCRIPT}", "systemd.run_success_action=reboot",
              "systemd.unit=kernel-command-line.target")
FAT_MAX_FILE = (1 << 32) - 1  # FAT32 cannot hold a file of 4 GiB or more
_SLACK = 1 << 20  # room for the script, cmdline.txt and FAT's own clusters

AGENT_UNIT_TEXT = """\
# SPDX-License-Identifier: MIT
# edgellm device agent: model updates and usage reports over MQTT (docs/flash.md).
# Installed by `edgellm firstboot` (or copy to /etc/systemd/system and
# `systemctl enable --now edgellm-agent`). The agent says READY=1 once connected and
# WATCHDOG=1 on every loop; a hang past WatchdogSec or a crash restarts it.
[Unit]
Description=edgellm device agent (model updates, usage reports)
Wants=network-online.target time-sync.target
After=network-online.target time-sync.target
StartLimitIntervalSec=0

[Service]
Type=notify
NotifyAccess=main
ExecStart={exe} agent --config {root}/device.toml
Restart=on-failure
RestartSec=10
# 300 s: an update's verify and health check run inside one turn of the agent's loop.
WatchdogSec=300
TimeoutStartSec=300
TimeoutStopSec=30
# Hardening: no capabilities, a read-only system; writable only its state directory.
{writable}
UMask=0077
CapabilityBoundingSet=
AmbientCapabilities=
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service

[Install]
WantedBy=multi-user.target
"""

# The first-boot hook and Jetson's oneshot unit ship as files beside this module (package data
# in the wheel); firmware_tools/ links to the same two files.
_HERE = Path(__file__).resolve().parent
FIRSTBOOT_UNIT_TEXT = (_HERE / FIRSTBOOT_UNIT).read_text(encoding="utf-8")
FIRSTRUN_SH = (_HERE / SCRIPT).read_text(encoding="utf-8")

CLOUD_INIT_PART = f"""#!/bin/sh
# edgellm first boot (added by `edgellm flash --to dir:`): once per instance; a no-op after
for b in {RPI_BOOT} /boot; do
  if [ -f "$b/{SCRIPT}" ]; then exec /bin/bash "$b/{SCRIPT}"; fi
done
exit 0
"""
_MIME_BOUNDARY = "==edgellm-firstboot=="


# --- texts -----------------------------------------------------------------------------


def default_exe() -> str:
    """The command the agent unit runs: this edgellm launcher, else ``python -m edgellm``."""
    found = shutil.which("edgellm")
    if found:
        return os.path.abspath(found)
    return f"{sys.executable} -m edgellm"


def agent_unit(root: str = DEVICE_ROOT, exe: str | None = None) -> str:
    """The text of edgellm-agent.service for a device root (an absolute path on the device).

    A root under /var/lib/ becomes systemd's ``StateDirectory=`` (created 0700, writable
    under ``ProtectSystem=strict``); any other root is named in ``ReadWritePaths=``.

    Raises:
        FlashError: root is not an absolute path, or holds "..".
    """
    parts = root.rstrip("/").split("/")
    if not root.startswith("/") or ".." in parts or len(parts) < 2:
        raise FlashError(f"device root {root!r} must be an absolute path (not /)")
    root = root.rstrip("/")
    if root.startswith("/var/lib/"):
        writable = f"StateDirectory={root[len('/var/lib/'):]}\nStateDirectoryMode=0700"
    else:
        writable = f"ReadWritePaths={root}"
    return AGENT_UNIT_TEXT.format(exe=exe or default_exe(), root=root, writable=writable)


def firstboot_platform(board: str) -> str:
    """How a board's image does first boot: "raspberrypi" or "jetson", from its profile.

    Raises:
        UnknownBoardError: no such board profile (the message lists them).
        FlashTargetError: a board whose image this target does not know (say which do).
    """
    from ..boards import load_board

    prof = load_board(board)
    soc = prof.soc.lower()
    if prof.name.startswith("rpi") or "broadcom" in soc or "raspberry" in soc:
        return "raspberrypi"
    if prof.name.startswith("jetson") or soc.startswith("nvidia"):
        return "jetson"
    raise FlashTargetError(f"board {board} ({prof.soc}): the dir: target knows Raspberry Pi OS "
                           "and Jetson L4T images; use ssh:// or serial:// for this board")


# --- small file helpers -------------------------------------------------------------------


def _write_if_changed(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Atomic write unless path already holds exactly data; True when it wrote."""
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    try:
        os.chmod(path, mode)
    except OSError:  # FAT: permissions are the mount's
        pass
    return True


def _symlink(link: Path, target: str) -> bool:
    """Make link point at target (atomically replacing another link); True when it changed."""
    if link.is_symlink() and os.readlink(link) == target:
        return False
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)
    return True


def _enable(sysroot: Path, name: str, text: str, wanted_by: str = "multi-user.target"
            ) -> list[Path]:
    """Write /etc/systemd/system/NAME under sysroot and enable it as systemctl does."""
    unit = sysroot / UNIT_DIR / name
    link = sysroot / UNIT_DIR / f"{wanted_by}.wants" / name
    _write_if_changed(unit, text.encode())
    _symlink(link, f"/{UNIT_DIR}/{name}")  # systemctl enable writes absolute links
    return [unit, link]


def enable_agent(sysroot: PathLike, root: str = DEVICE_ROOT, *, exe: str | None = None
                 ) -> list[Path]:
    """Install edgellm-agent.service into sysroot and enable it (no systemd needed).

    Writes SYSROOT/etc/systemd/system/edgellm-agent.service and the symlink
    multi-user.target.wants/edgellm-agent.service -> /etc/systemd/system/edgellm-agent.service
    (what ``systemctl enable`` makes). Idempotent: unchanged files are not rewritten.

    Args:
        sysroot: the device's root file system ("/" on the device, a mount point on a host).
        root: the device root as the device sees it (device.toml is ROOT/device.toml).
        exe: the edgellm command line for ExecStart (default: ``default_exe()``).

    Returns:
        The unit file and the symlink.
    """
    return _enable(Path(sysroot), AGENT_UNIT, agent_unit(root, exe))


def _strip_words(line: str, words: tuple[str, ...]) -> str:
    return " ".join(w for w in line.split() if w not in words)


def _hook_words(line: str) -> list[str]:
    return [w for w in line.split() if w.startswith(("systemd.run=", "systemd.run_success_action=",
                                                     "systemd.unit=kernel-command-line"))]


# --- on the host: write the card -------------------------------------------------------


def _copy_file(src: Path, dst: Path) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())


def _copy_package(pkg: Path, dest: Path, names: list[str]) -> None:
    """Copy the package's files to dest via a temporary folder renamed into place."""
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name in names:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            _copy_file(pkg / name, tmp / name)
        for d in sorted({(tmp / n).parent for n in names}, reverse=True):
            fsync_dir(d)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _with_cloud_init_part(text: str) -> str | None:
    """user-data with our one-shot script added as a MIME part; None when it is there."""
    if SCRIPT in text:
        return None
    ours = MIMEText(CLOUD_INIT_PART, "x-shellscript", "us-ascii")
    ours.add_header("Content-Disposition", "attachment", filename="edgellm-firstboot.sh")
    if text.lstrip().lower().startswith(("content-type:", "mime-version:")):
        msg = email.message_from_string(text)
        if msg.is_multipart():
            msg.attach(ours)
            return msg.as_string()
    first = text.lstrip().split("\n", 1)[0]
    subtype = ("cloud-config" if first.startswith("#cloud-config") else
               "x-shellscript" if first.startswith("#!") else
               "cloud-boothook" if first.startswith("#cloud-boothook") else "x-not-multipart")
    theirs = MIMEText(text, subtype, "us-ascii" if text.isascii() else "utf-8")
    outer = MIMEMultipart("mixed", boundary=_MIME_BOUNDARY)
    outer.attach(theirs)
    outer.attach(ours)
    return outer.as_string()


def _check_space(boot: Path, need: int) -> None:
    free = shutil.disk_usage(boot).free
    if need + _SLACK > free:
        raise FlashDiskFullError(f"{boot}: the package needs {need + _SLACK} bytes, {free} are "
                                 "free (nothing was written)")


def write_boot(package_dir: PathLike, boot_dir: PathLike, *, wheels_dir: PathLike | None = None
               ) -> list[Path]:
    """Write a flash package and its first-boot hook onto a mounted card (the dir: target).

    Which files depends on the board in the package (``firstboot_platform``): see the module
    docstring. The package goes to a temporary folder renamed into place and the hook is armed
    last (cmdline.txt on a Pi), so an interrupted write never leaves a card that runs a half
    package. Writing the same package again gives the same card.

    Args:
        package_dir: a flash package folder (package.make_package).
        boot_dir: the mounted boot partition (Raspberry Pi) or root file system (Jetson).
        wheels_dir: optional folder of .whl files (edgellm and what it needs) copied to
            edgellm-wheels/, for images without edgellm: the script installs them offline.

    Returns:
        The files written or changed.

    Raises:
        FlashPackageError: package_dir is not a valid package.
        FlashTargetError: boot_dir does not exist or is not that board's kind of partition.
        FlashDiskFullError: not enough free space (checked before anything is written).
    """
    pkg, boot = Path(package_dir), Path(boot_dir)
    info = read_package(pkg)
    platform = firstboot_platform(info.board)
    if not boot.is_dir():
        raise FlashTargetError(f"dir:{boot} does not exist: mount the SD card's "
                               f"{'boot partition (bootfs)' if platform == 'raspberrypi' else 'root file system (APP)'} "
                               "and give its mount point")
    wheels = sorted(Path(wheels_dir).glob("*.whl")) if wheels_dir is not None else []
    names = [FLASH_JSON, *sorted(info.files)]
    need = sum((pkg / n).stat().st_size for n in names) + sum(w.stat().st_size for w in wheels)
    if platform == "raspberrypi":
        missing = [n for n in ("cmdline.txt", "config.txt") if not (boot / n).is_file()]
        if missing:
            raise FlashTargetError(f"dir:{boot} is not a Raspberry Pi boot partition (no "
                                   f"{' or '.join(missing)}); mount bootfs, the card's first "
                                   "(FAT) partition")
        big = [n for n in names if (pkg / n).stat().st_size > FAT_MAX_FILE]
        if big:
            raise FlashTargetError(f"{pkg / big[0]} is 4 GiB or more: FAT cannot hold it; "
                                   "flash over ssh:// or serial:// instead")
        base = boot
    else:
        if not ((boot / "etc").is_dir() and (boot / "boot").is_dir()):
            raise FlashTargetError(f"dir:{boot} is not a Jetson root file system (no etc/ and "
                                   "boot/); mount the card's APP partition")
        base = boot / "boot"
    _check_space(boot, need)
    written: list[Path] = []
    try:
        _copy_package(pkg, base / PKG_DIR, names)
        written += [base / PKG_DIR / n for n in names]
        if wheels:
            (base / "edgellm-wheels").mkdir(exist_ok=True)
            for w in wheels:
                _copy_file(w, base / "edgellm-wheels" / w.name)
                written.append(base / "edgellm-wheels" / w.name)
        if _write_if_changed(base / SCRIPT, FIRSTRUN_SH.encode(), 0o755):
            written.append(base / SCRIPT)
        if platform == "raspberrypi":
            written += _arm_raspberrypi(boot)
        else:
            written += _enable(boot, FIRSTBOOT_UNIT, FIRSTBOOT_UNIT_TEXT)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG):
            raise FlashDiskFullError(f"{boot}: no space left while writing ({exc.strerror}); "
                                     "the hook was not armed") from None
        raise
    return written


def _arm_raspberrypi(boot: Path) -> list[Path]:
    """cloud-init user-data (if the image uses it), the chain file, then cmdline.txt."""
    out: list[Path] = []
    ud = boot / "user-data"
    if ud.is_file():
        new = _with_cloud_init_part(ud.read_text(encoding="utf-8", errors="replace"))
        if new is not None and _write_if_changed(ud, new.encode()):
            out.append(ud)
    cmdline = boot / "cmdline.txt"
    raw = cmdline.read_text(encoding="utf-8", errors="replace")
    line = raw.strip().split("\n", 1)[0].strip()  # the kernel reads the first line only
    theirs = [w for w in _hook_words(line) if w not in HOOK_WORDS]
    prev = [w.split("=", 1)[1] for w in theirs if w.startswith("systemd.run=")]
    if prev:  # chain the hook that was there (only one systemd.run= can be given)
        atomic_write(boot / CHAIN, (prev[0] + "\n").encode())
        out.append(boot / CHAIN)
    words = [w for w in line.split() if w not in theirs and w not in HOOK_WORDS]
    new_line = " ".join([*words, *HOOK_WORDS]) + "\n"
    if new_line != raw:
        atomic_write(cmdline, new_line.encode())
        out.append(cmdline)
    return out


# --- on the device: first boot ----------------------------------------------------------


def _neutralise(boot: Path, sysroot: Path) -> None:
    """Remove every trace of the one-shot hook and the package from the boot side."""
    cmdline = boot / "cmdline.txt"
    if cmdline.is_file():
        raw = cmdline.read_text(encoding="utf-8", errors="replace")
        line = raw.strip().split("\n", 1)[0].strip()
        if any(w in HOOK_WORDS for w in line.split()):
            atomic_write(cmdline, (_strip_words(line, HOOK_WORDS) + "\n").encode())
    link = sysroot / UNIT_DIR / "multi-user.target.wants" / FIRSTBOOT_UNIT
    if link.is_symlink():
        link.unlink()
        fsync_dir(link.parent)
    for p in (boot / SCRIPT, boot / CHAIN):
        p.unlink(missing_ok=True)
    for d in (boot / PKG_DIR, boot / "edgellm-wheels"):
        shutil.rmtree(d, ignore_errors=True)
    fsync_dir(boot)


def run_firstboot(boot_dir: PathLike, sysroot: PathLike = "/", *, root: str = DEVICE_ROOT,
                  exe: str | None = None) -> Any:
    """First boot on the device: install the card's package, enable the agent, disarm.

    Args:
        boot_dir: the folder holding edgellm/ (the package) and the hook: /boot/firmware on
            Raspberry Pi OS, /boot on Jetson.
        sysroot: the device's root file system ("/" on the device; a folder in tests or
            when provisioning a mounted image).
        root: the device root as the device sees it (default /var/lib/edgellm).
        exe: the edgellm command line for the agent unit (default ``default_exe()``).

    Returns:
        The active model (fleet.slots.Active).

    Raises:
        FlashPackageError: no package on the card and this device was never provisioned, or
            the package fails verification (the hook stays; nothing was installed).
        FlashError: the device refused the model (install_package's errors).
    """
    boot, sysroot_p = Path(boot_dir), Path(sysroot)
    if not boot.is_dir():
        raise FlashTargetError(f"--boot {boot} does not exist (the boot partition: "
                               f"{RPI_BOOT} on Raspberry Pi OS, /boot on Jetson)")
    dev_root = sysroot_p / root.strip("/")
    pkg = boot / PKG_DIR
    installed = (pkg / FLASH_JSON).is_file() or not (dev_root / DONE).is_file()
    if installed:
        if not (pkg / FLASH_JSON).is_file():
            raise FlashPackageError(f"no flash package in {pkg} and {dev_root} was never "
                                    "provisioned: write one with edgellm flash --to dir:...")
        active = install_package(pkg, dev_root)
    else:  # already done (the hook ran twice: systemd.run and cloud-init); keep what is there
        from ..fleet.slots import SlotStore

        active, _ = SlotStore(dev_root / "models").resolve()
    enable_agent(sysroot_p, root, exe=exe)
    if installed:  # what this card installed, and when (doctor and people read it)
        done = {"device_id": _device_id(dev_root), "model": active.to_dict(),
                "exe": shlex.split(exe or default_exe())[0],
                "at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        atomic_write(dev_root / DONE, (json.dumps(done, indent=2) + "\n").encode())
    _neutralise(boot, sysroot_p)
    return active


def _device_id(dev_root: Path) -> str:
    try:
        return read_package(dev_root).device_id
    except FlashError:
        return ""

