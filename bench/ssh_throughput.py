# SPDX-License-Identifier: MIT
"""SSH flash throughput on loopback: how fast `edgellm flash --to ssh://` moves bytes.

A real sshd (tests/support/sshd.py: OpenSSH in the foreground, own keys, loopback port) and
the flash target's own code (edgellm.flash.ssh) measure, per file size and cipher:

- ``stream``: what flash's copy step does: the archive streamed through ssh's stdin into
  the device's python, which writes, fsyncs and hashes it (sha256 compared), MB/s of payload;
- ``scp``: OpenSSH's scp of the same file with the same options, for reference;
- ``flash``: the whole `edgellm flash` of a demo bundle (probe, copy, verify, receive,
  enable) and the second, no-op flash of the same build (probe only), in seconds.

Both ends are this machine, so each number is the CPU cost of SSH's encryption and MAC plus
the pipes, not a network: a ward network or a Pi's CPU is the limit in the field.

    python bench/ssh_throughput.py                        # 16, 64, 256 MB; 3 repetitions
    python bench/ssh_throughput.py --sizes-mb 64 --reps 5 --ciphers chacha20-poly1305@openssh.com

One JSON line per measurement goes to stdout and bench/out/ssh_throughput-<time>.jsonl (git
SHA, machine); a summary table to stderr.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # puts this checkout's edgellm first on sys.path

sys.path.insert(0, str(common.REPO / "tests"))
from support.fleet import make_home
from support.sshd import running_sshd

from edgellm.flash import ssh as flash_ssh
from edgellm.flash.targets import flash

DEFAULT_CIPHERS = ("chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com")


def _target(s: Any, cipher: str, sysroot: Path) -> flash_ssh.SshTarget:
    return flash_ssh.SshTarget.from_uri(
        f"ssh://{getpass.getuser()}@127.0.0.1:{s.port}/var/lib/edgellm",
        known_hosts=s.known_hosts, key=s.key, sysroot=str(sysroot),
        remote_python=f"env PYTHONPATH={common.REPO} {sys.executable}",
        options=(f"Ciphers={cipher}",))


def _scp(t: flash_ssh.SshTarget, src: Path, dest: str) -> None:
    argv = ["scp", "-q", "-P", str(t.port), "-i", str(t.key), "-o", "IdentitiesOnly=yes"]
    for o in ("BatchMode=yes", "StrictHostKeyChecking=yes", f"UserKnownHostsFile={t.known_hosts}",
              "GlobalKnownHostsFile=/dev/null", *t.options):
        argv += ["-o", o]
    subprocess.run([*argv, str(src), f"{t.user}@{t.host}:{dest}"], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ciphers", nargs="+", default=list(DEFAULT_CIPHERS))
    ap.add_argument("--no-flash", action="store_true", help="skip the whole-flash timing")
    a = ap.parse_args()
    out = common.JsonLines("ssh_throughput")
    ctx = {"git": common.git_sha(), "git_diff": common.git_diff_id(),
           "machine": common.machine(), "cpu": common.cpu_model(),
           "load_avg": common.load_avg()}  # other work on the machine slows both ends
    ver = subprocess.run(["ssh", "-V"], check=False, capture_output=True,
                         text=True).stderr.strip()
    common.log(f"{ver}; {ctx['cpu']}; loopback; {a.reps} repetitions, median; load "
               f"{ctx['load_avg']}")
    with tempfile.TemporaryDirectory(prefix="edgellm-sshbench-") as tmp:
        d = Path(tmp)
        with running_sshd(d / "sshd") as s:
            sysroot = d / "devfs"
            sysroot.mkdir()
            for cipher in a.ciphers:
                t = _target(s, cipher, sysroot)
                for mb in a.sizes_mb:
                    src = d / f"payload-{mb}.bin"
                    if not src.exists():
                        with open(src, "wb") as f:
                            for _ in range(mb):
                                f.write(os.urandom(1 << 20))
                    size = src.stat().st_size
                    times: dict[str, list[float]] = {"stream": [], "scp": []}
                    for _ in range(a.reps):
                        t0 = time.perf_counter()
                        _, folder = flash_ssh._send(t, src, str(d), None)  # checks the sha256
                        times["stream"].append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        _scp(t, src, f"{folder}/scp.bin")
                        times["scp"].append(time.perf_counter() - t0)
                        shutil.rmtree(folder)
                    for method, ts in times.items():
                        sec = common.median(ts)
                        row = {"bench": "ssh_throughput", "method": method, "cipher": cipher,
                               "bytes": size, "seconds": sec, "mb_per_s": size / sec / 1e6,
                               "reps": a.reps, "ssh": ver, **ctx}
                        out.write(row)
                        print(json.dumps(row, sort_keys=True))
                        common.log(f"{cipher:32s} {mb:5d} MB {method:14s} {sec:7.3f} s "
                                   f"{size / sec / 1e6:8.1f} MB/s")
            if not a.no_flash:
                _bench_flash(s, d, out, ctx)
    return 0


def _bench_flash(s: Any, d: Path, out: common.JsonLines, ctx: dict[str, Any]) -> None:
    """The whole `edgellm flash` of a demo bundle over SSH, then the no-op second flash."""
    home = make_home(d / "hubroot")
    sysroot = d / "flashfs"
    sysroot.mkdir()
    opts = {"known_hosts": s.known_hosts, "key": s.key, "sysroot": str(sysroot),
            "remote_python": f"env PYTHONPATH={common.REPO} {sys.executable}"}
    bundles = common.REPO / "edgellm" / "demo" / "bundles"
    for step in ("first", "again"):
        t0 = time.perf_counter()
        with open(os.devnull, "w") as quiet:
            res = flash(board="rpi5", device_id="dev-bench", target=f"ssh://{getpass.getuser()}@"
                        f"127.0.0.1:{s.port}/var/lib/edgellm", home=home.root,
                        need="en/medical/cardiology", bundles=bundles, ssh_options=opts,
                        show_progress=False, log=quiet)
        sec = time.perf_counter() - t0
        row = {"bench": "ssh_flash", "step": step, "seconds": sec, "skipped": res.skipped,
               "package_bytes": res.package_bytes, "bytes_sent": res.bytes_sent, **ctx}
        out.write(row)
        print(json.dumps(row, sort_keys=True))
        common.log(f"edgellm flash ({step}): {sec:.2f} s, {res.bytes_sent} bytes sent, "
                   f"skipped={res.skipped}")


if __name__ == "__main__":
    sys.exit(main())
