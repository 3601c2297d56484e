# SPDX-License-Identifier: MIT
"""A serial "cable" between two pseudo-terminal pairs that can damage, pace and cut the line.

Run as a process (the tests and bench/serial_throughput.py do)::

    python tests/support/serial_relay.py --a /tmp/x/host --b /tmp/x/device \\
        [--drop P] [--dup P] [--corrupt P] [--seed N] [--bps 92160] [--die-after BYTES] \\
        [--forge N] [--stats FILE]

It opens two pty pairs, links ``--a`` and ``--b`` to their slave ends (as socat's
``link=``) and copies bytes between the masters. Frames are cut at each 0x00 (the serial
link's COBS delimiter); each one, in either direction, is dropped with probability ``--drop``,
sent twice with ``--dup``, or has one byte replaced with ``--corrupt``. ``--bps`` paces each
direction to that many bytes per second, like a UART (921,600 baud 8N1 = 92,160 bytes/s), with
a small buffer so a fast writer blocks as on a real line. ``--die-after`` exits (a pulled
cable) once that many bytes went from a to b. ``--forge N`` changes a payload byte of the Nth
frame from a to b and gives it a valid CRC again (what only the final sha256 can catch). SIGTERM writes the counters to ``--stats``
(JSON) and exits; the ready line ``ready`` goes to stdout once both links exist.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import sys
import time
import tty
from typing import Any

_BUF_FAST = 1 << 18  # bytes a direction may hold unpaced before the relay stops reading
_BUF_PACED = 4096  # about a UART's FIFO plus a tty flip buffer share: a writer soon blocks


class _Dir:
    """One direction: frames in from a master, (damaged) bytes out to the other master."""

    def __init__(self, src: int, dst: int, args: argparse.Namespace, rng: random.Random,
                 name: str) -> None:
        self.src, self.dst, self.args, self.rng, self.name = src, dst, args, rng, name
        self.partial = bytearray()
        self.out = bytearray()
        self.cap = _BUF_PACED if args.bps else _BUF_FAST
        self.credit = 0.0
        self.t = time.monotonic()
        self.stats = {"bytes_in": 0, "bytes_out": 0, "frames": 0, "dropped": 0, "duplicated": 0,
                      "corrupted": 0}

    def take(self, data: bytes) -> None:
        st, a = self.stats, self.args
        st["bytes_in"] += len(data)
        self.partial += data
        end = self.partial.rfind(0)
        if end < 0:
            return
        frames = bytes(self.partial[:end + 1]).split(b"\x00")[:-1]
        del self.partial[:end + 1]
        for f in frames:
            frame = f + b"\x00"
            st["frames"] += 1
            r = self.rng.random()
            if a.forge and self.name == "a->b" and st["frames"] == a.forge:
                frame = _forge(f)
                st["forged"] = 1
                self.out += frame
                continue
            if r < a.drop:
                st["dropped"] += 1
                continue
            if r < a.drop + a.corrupt and len(f) > 1:
                b = bytearray(frame)
                i = self.rng.randrange(len(f))
                b[i] = (b[i] + self.rng.randrange(1, 256)) % 256
                frame = bytes(b)
                st["corrupted"] += 1
            elif r < a.drop + a.corrupt + a.dup:
                frame = frame + frame
                st["duplicated"] += 1
            self.out += frame

    def budget(self) -> int:
        """Bytes the pacing allows now (all of them when unpaced)."""
        if not self.args.bps:
            return len(self.out)
        now = time.monotonic()
        self.credit = min(self.credit + (now - self.t) * self.args.bps,
                          max(256.0, self.args.bps * 0.005))  # no bursts past 5 ms of line
        self.t = now
        return min(len(self.out), int(self.credit))

    def flush(self) -> None:
        n = self.budget()
        if n <= 0:
            return
        try:
            w = os.write(self.dst, self.out[:n])
        except BlockingIOError:
            return
        except OSError:  # nobody at that end now (a peer restarting): the bytes are lost
            w = n
        if self.args.bps:
            self.credit -= w
        del self.out[:w]
        self.stats["bytes_out"] += w


def _forge(raw: bytes) -> bytes:
    """The frame with one payload byte changed and a CRC that matches again (a lying relay)."""
    from edgellm.flash.serial_link import decode_frame, encode_frame

    frame = decode_frame(raw)
    if frame is None or not frame[3]:
        return raw + b"\x00"
    ftype, session, seq, body = frame
    return encode_frame(ftype, session, seq, bytes([body[0] ^ 0x01]) + body[1:])


def _pty(link: str) -> tuple[int, int]:
    master, slave = os.openpty()
    tty.setraw(slave)  # no echo, no line editing, before any peer opens it
    os.set_blocking(master, False)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(os.ttyname(slave), link)
    return master, slave


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    for k in ("drop", "dup", "corrupt"):
        ap.add_argument(f"--{k}", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bps", type=float, default=0.0)
    ap.add_argument("--die-after", type=int, default=0)
    ap.add_argument("--stats", default="")
    ap.add_argument("--forge", type=int, default=0,
                    help="re-sign frame N from a to b after changing a payload byte")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    ma, _sa = _pty(args.a)  # the slave fds stay open: a peer may close and reopen its end
    mb, _sb = _pty(args.b)
    ab, ba = _Dir(ma, mb, args, rng, "a->b"), _Dir(mb, ma, args, rng, "b->a")

    def stop(*_: Any) -> None:
        if args.stats:
            with open(args.stats, "w") as f:
                json.dump({"a->b": ab.stats, "b->a": ba.stats}, f)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while True:
        rd = [d.src for d in (ab, ba) if len(d.out) < d.cap]
        wr = [d.dst for d in (ab, ba) if d.out and not d.args.bps]
        paced = any(d.out for d in (ab, ba)) and args.bps
        r, _w, _ = select.select(rd, wr, [], 0.002 if paced else 0.1)
        for d in (ab, ba):
            if d.src in r:
                try:
                    data = os.read(d.src, 65536)
                except (BlockingIOError, OSError):
                    data = b""
                if data:
                    d.take(data)
            if d.out:
                d.flush()
        if args.die_after and ab.stats["bytes_out"] >= args.die_after:
            os._exit(3)  # the cable is pulled: both ptys vanish with this process


if __name__ == "__main__":
    sys.exit(main())
