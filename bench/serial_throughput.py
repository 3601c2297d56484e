# SPDX-License-Identifier: MIT
"""Serial flashing throughput over pseudo-terminals: raw, and paced like a 921,600 baud UART.

A pty moves bytes as fast as the kernel copies them and ignores the baud rate, so two kinds
of run are made, each with ``send_file`` here and ``receive_file`` in its own process:

- ``raw``: socat's pty pair, and tests/support/serial_relay.py unpaced (what the protocol
  and Python cost when the line is not the limit);
- ``paced``: the relay paced at 92,160 bytes/s each way (921,600 baud, 8N1: 10 bits a byte),
  clean and with 1 % of frames dropped and 1 % corrupted in each direction.

Figures per run: payload rate, its share of the line rate (92,160 bytes/s), payload
efficiency (file bytes / bytes the sender put on the line: framing, COBS, retransmissions),
retransmissions. One JSON line per run goes to bench/out/serial_throughput-<time>.jsonl
(with git SHA and machine); a table goes to stdout.

    python bench/serial_throughput.py                      # 50 MB raw, 2 MB + 1 MB paced
    python bench/serial_throughput.py --raw-mb 10 --paced-mb 0.5
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, JsonLines, context, log

from edgellm.flash.serial_link import CHUNK, DATA, WINDOW, encode_frame, send_file

RELAY = REPO / "tests" / "support" / "serial_relay.py"
LINE_BPS = 921_600 // 10  # 8N1: a start bit, 8 data bits, a stop bit
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
RECEIVE = ("import sys; from edgellm.flash.serial_link import receive_file; "
           "print(receive_file(sys.argv[1], sys.argv[2], idle_timeout=60))")


def _wait(*paths: Path) -> None:
    end = time.monotonic() + 10
    while not all(p.exists() for p in paths):
        if time.monotonic() > end:
            raise RuntimeError(f"{paths} did not appear")
        time.sleep(0.02)


def one_run(d: Path, src: Path, cable: str, relay_args: list[str]) -> dict[str, Any]:
    a, b = d / "host", d / "device"
    for p in (a, b):
        p.unlink(missing_ok=True)
    if cable == "socat":
        cab = subprocess.Popen(["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"])
    else:
        cab = subprocess.Popen([sys.executable, str(RELAY), "--a", str(a), "--b", str(b),
                                *relay_args], stdout=subprocess.DEVNULL, env=ENV)
    dest = d / "dest"
    shutil.rmtree(dest, ignore_errors=True)
    try:
        _wait(a, b)
        rx = subprocess.Popen([sys.executable, "-c", RECEIVE, str(b), str(dest)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # let the receiver start, so its start-up is not timed
        st = send_file(str(a), src)
        _out, err = rx.communicate(timeout=60)
        if rx.returncode != 0:
            raise RuntimeError(f"receiver failed: {err}")
    finally:
        cab.terminate()
        cab.wait(10)
    return {"size": st.size, "seconds": round(st.seconds, 3),
            "payload_Bps": round(st.rate), "line_share": round(st.rate / LINE_BPS, 4),
            "payload_efficiency": round(st.size / st.line_bytes_out, 4),
            "line_bytes_out": st.line_bytes_out, "line_bytes_in": st.line_bytes_in,
            "retransmits": st.retransmits, "frames": st.frames}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw-mb", type=float, default=50.0, help="file size of the raw runs (MB)")
    ap.add_argument("--paced-mb", type=float, default=2.0, help="file size of the paced runs (MB)")
    ap.add_argument("--damaged-mb", type=float, default=1.0,
                    help="file size of the paced run with dropped and corrupted frames (MB)")
    args = ap.parse_args()
    out = JsonLines("serial_throughput")
    ctx = context()
    frame = len(encode_frame(DATA, 1, 1, os.urandom(CHUNK)))
    log(f"chunk {CHUNK} B, window {WINDOW}, one DATA frame {frame} B on the line "
        f"({CHUNK / frame:.4f} payload), git {ctx['git']}, {ctx['machine']['cpu']}")
    runs = [("raw", "socat", args.raw_mb, []), ("raw", "relay", args.raw_mb, []),
            ("paced", "relay", args.paced_mb, ["--bps", str(LINE_BPS)]),
            ("paced, 1% dropped + 1% corrupted each way", "relay", args.damaged_mb,
             ["--bps", str(LINE_BPS), "--drop", "0.01", "--corrupt", "0.01", "--seed", "3"])]
    if not shutil.which("socat"):
        log("socat is not installed (apt-get install socat): its run is left out")
        runs = [r for r in runs if r[1] != "socat"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="serial-bench-") as tmp:
        d = Path(tmp)
        files: dict[float, Path] = {}
        for kind, cable, mb, relay_args in runs:
            if mb not in files:
                files[mb] = d / f"f{len(files)}.bin"
                files[mb].write_bytes(os.urandom(int(mb * 1e6)))
            log(f"{kind} over {cable}, {mb:g} MB ...")
            r = {"bench": "serial_throughput", "run": kind, "cable": cable, "chunk": CHUNK,
                 "window": WINDOW, "frame_bytes": frame, "baud": 921_600,
                 **one_run(d, files[mb], cable, relay_args), **ctx}
            out.write(r)
            rows.append(r)
    print("| run | cable | MB | s | payload MB/s | share of 92,160 B/s | payload / line bytes "
          "| retransmits |")
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['run']} | {r['cable']} | {r['size'] / 1e6:g} | {r['seconds']:.2f} | "
              f"{r['payload_Bps'] / 1e6:.3f} | {100 * r['line_share']:.1f} % | "
              f"{100 * r['payload_efficiency']:.2f} % | {r['retransmits']} |")
    log(f"wrote {out.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
