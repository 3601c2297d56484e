# SPDX-License-Identifier: MIT
"""Send a file over a serial line and receive it, verified and resumable (pyserial).

The flash link of ``serial:///dev/ttyUSB0`` and ``edgellm receive --serial``: a USB gadget
serial port or a UART adapter, where bytes can be corrupted, lost, duplicated or cut off
mid-transfer. The protocol (docs/flash.md, "Serial protocol"):

- **Framing.** Each frame is COBS-encoded and ends with one 0x00 byte, so a receiver finds
  the next frame boundary after any damage. Decoded, a frame is
  ``type u8 | session u16 | seq u32 | body | crc32 u32`` (little endian; the CRC covers
  everything before it). A frame whose CRC or length is wrong is dropped.
- **Handshake.** The sender opens a session (a random 16-bit number) with HELLO: protocol
  version, window, chunk size, file size, sha256, transfer id (the first 8 bytes of the
  sha256) and the file's name. The receiver answers WELCOME with the chunk to resume from:
  it keeps ``<dest>/<id>.part`` and a durable offset ``<dest>/<id>.json`` across restarts.
- **Data.** DATA frames carry chunk ``seq`` of the file; at most ``window`` chunks past the
  receiver's acknowledged offset are in flight.
- **Acknowledgements.** ACK carries a cumulative count of chunks that are *durable* on the
  receiver (the .part fsynced and the offset file written) and a selective bitmap of the
  window above it. Since the line is FIFO, a chunk that is still missing when one sent after
  it arrives is lost and is sent again at once; when no ACK comes for ``RTO`` (1 s) the
  oldest missing chunk is sent again. A receiver that does not know the session (restarted)
  answers NOSESSION and the sender starts a new handshake, resuming from the durable offset.
- **The end.** FIN asks for the verdict; the receiver hashes the whole .part and answers DONE
  (sha256 equal: renamed to ``<dest>/<name>``; different: removed, refused). BYE ends it.

Because acknowledged chunks are durable, killing either side (or pulling the cable) and
starting again re-sends at most one window.

Public API: ``send_file``, ``receive_file``, ``SendStats``, ``CHUNK``, ``WINDOW``,
``encode_frame``, ``decode_frame`` (the byte layout, for tests and tools).

.. versionadded:: 0.1
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import struct
import time
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import serial  # pyserial

from .._fsutil import atomic_write, fsync_dir, fsync_path
from ..errors import (
    FlashDiskFullError,
    FlashPortBusyError,
    FlashTargetError,
    ImageRejectedError,
    SerialLinkError,
)
from ..formats.bundle import sha256_file

__all__ = ["CHUNK", "WINDOW", "SendStats", "decode_frame", "encode_frame", "receive_file",
           "send_file"]

PathLike = Union[str, "os.PathLike[str]"]
VERSION = 1
CHUNK = 4096  # payload bytes a DATA frame: 0.7 % framing overhead, 44 ms of line at 921,600 baud
WINDOW = 32  # chunks in flight (128 KiB): keeps a pty busy; the most a cut ever re-sends
MAX_CHUNK = 1 << 16
MAX_WINDOW = 256
MAX_SIZE = 1 << 36  # 64 GiB: far above any edge model; bounds a hostile HELLO
RTO = 1.0  # s without any ACK before the oldest missing chunk is sent again
HELLO_RETRY = 0.5  # s between HELLOs (and FINs) while no answer comes
LINK_TIMEOUT = 30.0  # s without a valid frame from the peer: the link is gone
LINGER = 2.0  # s the receiver keeps answering FIN after DONE (the DONE may be lost)
_READ_TIMEOUT = 0.02  # s a blocking read waits: the loop's tick
_WRITE_TIMEOUT = 5.0  # s a write may block on a stalled line before the loop looks again

# frame types
HELLO, WELCOME, DATA, ACK, NOSESSION, FIN, DONE, BYE = range(1, 9)
_HEAD = struct.Struct("<BHI")  # type, session, seq
_CRC = struct.Struct("<I")
_HELLO = struct.Struct("<BHIQ32s8sB")  # version, window, chunk, size, sha256, id, name length
_WELCOME = struct.Struct("<BHI8s")  # status, window, resume chunk, id
_DONE = struct.Struct("<B32s")  # status, sha256 of what was received
# WELCOME / DONE status
OK, NO_SPACE, REFUSED, MISMATCH = 0, 1, 2, 3
_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


# --- framing: COBS + CRC32 ----------------------------------------------------------------


def _cobs_encode(data: bytes) -> bytes:
    """COBS: no 0x00 in the output; one code byte per zero-free run (at most 254 bytes)."""
    out = bytearray()
    for run in data.split(b"\x00"):
        while len(run) >= 254:  # a full block: code 0xFF, no zero implied after it
            out.append(0xFF)
            out += run[:254]
            run = run[254:]
        out.append(len(run) + 1)
        out += run
    return bytes(out)


def _cobs_decode(data: bytes) -> bytes | None:
    """Inverse of _cobs_encode; None when the input is not valid COBS (a damaged frame)."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == 0 or i + code > n:
            return None
        out += data[i + 1:i + code]
        i += code
        if code < 0xFF and i < n:
            out.append(0)
    return bytes(out)


def encode_frame(ftype: int, session: int, seq: int, body: bytes = b"") -> bytes:
    """One frame as it goes on the line: COBS(head | body | crc32) + 0x00."""
    raw = _HEAD.pack(ftype, session, seq) + body
    return _cobs_encode(raw + _CRC.pack(zlib.crc32(raw))) + b"\x00"


def decode_frame(data: bytes) -> tuple[int, int, int, bytes] | None:
    """(type, session, seq, body) of one frame without its 0x00; None if damaged."""
    raw = _cobs_decode(data)
    if raw is None or len(raw) < _HEAD.size + _CRC.size:
        return None
    if zlib.crc32(raw[:-4]) != _CRC.unpack(raw[-4:])[0]:
        return None
    ftype, session, seq = _HEAD.unpack_from(raw)
    return ftype, session, seq, raw[_HEAD.size:-4]


# --- the port -------------------------------------------------------------------------------


class _Line:
    """A serial port opened exclusively, with frame reads and byte counters."""

    def __init__(self, port: str, baud: int) -> None:
        self.name = port
        try:
            self.ser = serial.Serial(port, baud, timeout=_READ_TIMEOUT,
                                     write_timeout=_WRITE_TIMEOUT, exclusive=True)
        except serial.SerialException as exc:
            raise _open_error(port, exc) from None
        except (ValueError, OSError) as exc:
            raise SerialLinkError(f"cannot open serial port {port} at {baud} baud: {exc}") from None
        self.buf = bytearray()
        self.bytes_out = self.bytes_in = self.bad_frames = 0

    def close(self) -> None:
        try:
            self.ser.close()
        except (serial.SerialException, OSError):
            pass

    def write(self, data: bytes) -> None:
        try:
            self.ser.write(data)
        except serial.SerialTimeoutException:
            pass  # a stalled line: the protocol's timeouts decide; a cut frame fails its CRC
        except (serial.SerialException, OSError) as exc:
            raise SerialLinkError(f"serial port {self.name}: write failed ({exc}); "
                                  "cable pulled or device gone?") from None
        self.bytes_out += len(data)

    def frames(self, block: bool) -> Iterator[tuple[int, int, int, bytes]]:
        """Valid frames from what has arrived; waits up to one tick for bytes if block."""
        try:
            n = self.ser.in_waiting
            data = self.ser.read(n) if n else (self.ser.read(1) if block else b"")
            if data and not n:
                more = self.ser.in_waiting
                if more:
                    data += self.ser.read(more)
        except (serial.SerialException, OSError) as exc:
            raise SerialLinkError(f"serial port {self.name}: read failed ({exc}); "
                                  "cable pulled or device gone?") from None
        if not data:
            return
        self.bytes_in += len(data)
        self.buf += data
        end = self.buf.rfind(0)
        if end < 0:
            if len(self.buf) > 4 * (MAX_CHUNK + 64):  # garbage without delimiters
                self.buf.clear()
                self.bad_frames += 1
            return
        parts = bytes(self.buf[:end]).split(b"\x00")
        del self.buf[:end + 1]
        for part in parts:
            if not part:
                continue
            frame = decode_frame(part)
            if frame is None:
                self.bad_frames += 1
            else:
                yield frame


def _open_error(port: str, exc: serial.SerialException) -> Exception:
    code = exc.errno
    if code == errno.ENOENT or (code is None and "No such file" in str(exc)):
        return FlashTargetError(f"serial port {port} does not exist (cable plugged in? "
                                "`ls /dev/ttyUSB* /dev/ttyACM* /dev/ttyGS*` lists the ports)")
    if code in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EBUSY):
        return FlashPortBusyError(f"serial port {port} is in use by another process "
                                  "(`fuser -v " + port + "` names it)")
    if code == errno.EACCES:
        return SerialLinkError(f"serial port {port}: permission denied (add the user to the "
                               "`dialout` group, then log in again)")
    return SerialLinkError(f"cannot open serial port {port}: {exc}")


# --- sender ---------------------------------------------------------------------------------


@dataclass
class SendStats:
    """What one send_file call did. Byte counts are on the line (COBS and framing included)
    unless named payload."""

    size: int  # bytes of the file
    sha256: str
    transfer_id: str
    chunk: int = CHUNK
    window: int = WINDOW
    resumed_from: int = 0  # byte offset the first handshake resumed from
    payload_bytes: int = 0  # DATA payload bytes written, retransmissions included
    line_bytes_out: int = 0  # every byte written to the port
    line_bytes_in: int = 0  # every byte read from the port
    frames: int = 0  # DATA frames written
    retransmits: int = 0  # DATA frames written again (lost, corrupted, timed out)
    bad_frames_in: int = 0  # frames from the receiver dropped as damaged
    handshakes: int = 0
    resent_after_resume: int = 0  # bytes sent before a re-handshake and again after it
    highest_sent: int = 0  # end offset of the furthest chunk written
    seconds: float = 0.0
    resumes: list[tuple[int, int]] = field(default_factory=list)  # (highest_sent, resume offset)

    @property
    def rate(self) -> float:
        """New payload bytes per second (what the resume skipped not counted)."""
        return (self.size - self.resumed_from) / self.seconds if self.seconds > 0 else 0.0


class _Sender:
    def __init__(self, line: _Line, path: Path, stats: SendStats, name: str,
                 progress: Callable[[int, int], None] | None, link_timeout: float) -> None:
        self.line, self.st, self.name = line, stats, name
        self.progress, self.link_timeout = progress, link_timeout
        self.fd = os.open(path, os.O_RDONLY)
        self.n = (stats.size + stats.chunk - 1) // stats.chunk
        self.session = 0
        self.window = stats.window
        self.last_heard = time.monotonic()
        self.done: tuple[int, bytes] | None = None  # DONE's (status, sha256) once it came
        self.reported = -1  # the last done bytes given to progress (kept monotonic)
        self._reset(0)

    def _reset(self, resume: int) -> None:
        self.cum = resume  # chunks durable on the receiver
        self.next = resume  # next chunk never sent in this session
        self.delivered: set[int] = set()  # chunks >= cum that the receiver holds
        self.tx: dict[int, int] = {}  # chunk -> transmission number of its last send
        self.retx: deque[int] = deque()
        self.queued: set[int] = set()
        self.txno = 0
        self.last_ack = time.monotonic()

    def _heard(self) -> None:
        self.last_heard = time.monotonic()

    def _check_alive(self, what: str) -> None:
        if time.monotonic() - self.last_heard > self.link_timeout:
            raise SerialLinkError(f"serial port {self.line.name}: no answer from the receiver "
                                  f"for {self.link_timeout:g} s ({what}); is `edgellm receive "
                                  "--serial` running on the device, at the same baud rate?")

    def handshake(self) -> None:
        """HELLO until a WELCOME of this session; sets the resume point."""
        old = self.session
        while self.session == old:  # a new number: the old session's frames are ignored
            self.session = random.randrange(1, 1 << 16)
        st = self.st
        tid = bytes.fromhex(st.transfer_id)
        name = self.name.encode()
        body = _HELLO.pack(VERSION, st.window, st.chunk, st.size, bytes.fromhex(st.sha256),
                           tid, len(name)) + name
        hello = encode_frame(HELLO, self.session, 0, body)
        st.handshakes += 1
        sent_at = 0.0
        while True:
            self._check_alive("handshake")
            if time.monotonic() - sent_at > HELLO_RETRY:
                self.line.write(hello)
                sent_at = time.monotonic()
            for ftype, session, _seq, fbody in self.line.frames(block=True):
                if ftype != WELCOME or session != self.session or len(fbody) != _WELCOME.size:
                    continue
                self._heard()
                status, window, resume, rid = _WELCOME.unpack(fbody)
                if rid != tid:
                    continue
                if status == NO_SPACE:
                    raise FlashDiskFullError(f"the receiver on {self.line.name} has no room "
                                             f"for {st.size} bytes (nothing was sent)")
                if status != OK or not 1 <= window <= st.window or resume > self.n:
                    raise SerialLinkError(f"the receiver on {self.line.name} refused the "
                                          f"transfer (status {status}, window {window})")
                offset = min(resume * st.chunk, st.size)
                if st.handshakes == 1:
                    st.resumed_from = offset
                else:
                    st.resumes.append((st.highest_sent, offset))
                    st.resent_after_resume += max(0, st.highest_sent - offset)
                self.window = window
                self._reset(resume)
                self._report()
                return

    def _send_chunk(self, seq: int) -> None:
        st = self.st
        data = os.pread(self.fd, st.chunk, seq * st.chunk)
        self.txno += 1
        self.tx[seq] = self.txno
        self.line.write(encode_frame(DATA, self.session, seq, data))
        st.frames += 1
        st.payload_bytes += len(data)
        st.highest_sent = max(st.highest_sent, seq * st.chunk + len(data))

    def _report(self) -> None:
        done = max(self.reported, min(self.cum * self.st.chunk, self.st.size))
        if self.progress is not None and done != self.reported:
            self.progress(done, self.st.size)
        self.reported = done

    def _on_ack(self, cum: int, bitmap: bytes) -> None:
        self.last_ack = time.monotonic()
        newest = 0  # highest transmission number known to have arrived
        if cum > self.cum:
            for s in range(self.cum, min(cum, self.n)):
                newest = max(newest, self.tx.pop(s, 0))
                self.delivered.discard(s)
                self.queued.discard(s)
            self.cum = min(cum, self.n)
            self.next = max(self.next, self.cum)
            self._report()
        for i in range(min(len(bitmap) * 8, self.next - cum)):
            if bitmap[i >> 3] >> (i & 7) & 1:
                s = cum + i
                if s >= self.cum and s not in self.delivered:
                    self.delivered.add(s)
                    self.queued.discard(s)
                newest = max(newest, self.tx.get(s, 0))
        # FIFO line: a chunk sent before one that arrived, and still missing, is lost
        for s in range(self.cum, self.next):
            if s not in self.delivered and s not in self.queued and self.tx.get(s, 0) < newest:
                self.retx.append(s)
                self.queued.add(s)

    def _poll(self, block: bool) -> bool:
        """Read what the receiver sent; False when it lost our session (re-handshake)."""
        for ftype, session, seq, body in self.line.frames(block):
            if session != self.session:
                continue
            self._heard()
            if ftype == ACK:
                self._on_ack(seq, body)
            elif ftype == NOSESSION:
                return False
            elif ftype == DONE and len(body) == _DONE.size:
                self.done = _DONE.unpack(body)
        return True

    def run(self) -> None:
        self.handshake()
        fin_at = 0.0
        while True:
            self._check_alive("data")
            if self.retx:
                s = self.retx.popleft()
                self.queued.discard(s)
                if s >= self.cum and s not in self.delivered:
                    self._send_chunk(s)
                    self.st.retransmits += 1
            elif self.next < self.n and self.next < self.cum + self.window:
                self._send_chunk(self.next)
                self.next += 1
            elif len(self.delivered) + self.cum >= self.n:  # all there: ask for the verdict
                if time.monotonic() - fin_at > HELLO_RETRY:
                    self.line.write(encode_frame(FIN, self.session, 0))
                    fin_at = time.monotonic()
            elif time.monotonic() - self.last_ack > RTO:  # silence: resend the oldest missing
                missing = [s for s in range(self.cum, self.next) if s not in self.delivered]
                if missing and missing[0] not in self.queued:
                    self.retx.append(missing[0])
                    self.queued.add(missing[0])
                self.last_ack = time.monotonic()
            idle = not self.retx and (self.next >= self.n or self.next >= self.cum + self.window)
            if not self._poll(block=idle):
                self.handshake()
                fin_at = 0.0
                continue
            if self.done is not None:
                self.line.write(encode_frame(BYE, self.session, 0))
                return

    def close(self) -> None:
        os.close(self.fd)


def send_file(port: str, path: PathLike, *, baud: int = 921600,
              progress: Callable[[int, int], None] | None = None, chunk: int = CHUNK,
              window: int = WINDOW, link_timeout: float = LINK_TIMEOUT) -> SendStats:
    """Send a file to ``receive_file`` on the other end of a serial port; resumes a cut one.

    Args:
        port: the serial device (``/dev/ttyUSB0``, ``/dev/ttyACM0``, a pty).
        path: the file to send; its name travels with it (the receiver stores it under it).
        baud: line rate; both ends must agree (a pty ignores it).
        progress: called as ``progress(bytes_acknowledged, total_bytes)`` as acks come in.
        chunk: payload bytes per frame (<= 65536).
        window: chunks in flight (<= 256); also the most a cut re-sends.
        link_timeout: seconds without an answer before the link counts as gone.

    Returns:
        SendStats of the transfer (bytes, retransmissions, resumes, time).

    Raises:
        FlashTargetError: the port does not exist.
        FlashPortBusyError: another process holds the port.
        SerialLinkError: the link failed or the receiver went silent; ``exc.stats`` holds
            the SendStats so far. Calling again resumes from the receiver's durable offset.
        ImageRejectedError: the receiver's sha256 of the whole file differs; it removed it.
        FlashDiskFullError: the receiver has no room for the file.
    """
    p = Path(path)
    if not 1 <= chunk <= MAX_CHUNK or not 1 <= window <= MAX_WINDOW:
        raise SerialLinkError(f"chunk must be 1..{MAX_CHUNK} and window 1..{MAX_WINDOW}")
    size = p.stat().st_size
    sha = sha256_file(p)
    name = p.name if _NAME_RE.match(p.name) else f"{sha[:16]}.bin"
    stats = SendStats(size=size, sha256=sha, transfer_id=sha[:16], chunk=chunk, window=window)
    line = _Line(port, baud)
    t0 = time.monotonic()
    sender = _Sender(line, p, stats, name, progress, link_timeout)
    try:
        sender.run()
    except SerialLinkError as exc:
        exc.stats = stats  # type: ignore[attr-defined]
        raise
    finally:
        stats.seconds = time.monotonic() - t0
        stats.line_bytes_out, stats.line_bytes_in = line.bytes_out, line.bytes_in
        stats.bad_frames_in = line.bad_frames
        sender.close()
        line.close()
    assert sender.done is not None
    status, got = sender.done
    if status != OK:
        raise ImageRejectedError(f"the receiver on {port} refused {p.name}: its sha256 "
                                 f"{got.hex()} differs from {sha}; it removed the image")
    return stats


# --- receiver -------------------------------------------------------------------------------


class _Transfer:
    """One file being received: <dest>/<id>.part + <dest>/<id>.json (the durable offset)."""

    def __init__(self, dest: Path, tid: str, size: int, sha: str, chunk: int, name: str) -> None:
        self.dest, self.tid, self.size, self.sha, self.chunk = dest, tid, size, sha, chunk
        self.name = name
        self.n = (size + chunk - 1) // chunk
        self.part = dest / f"{tid}.part"
        self.state = dest / f"{tid}.json"
        self.meta = {"id": tid, "size": size, "sha256": sha, "chunk": chunk, "name": name}
        durable = 0
        try:
            old = json.loads(self.state.read_text())
            if {k: old.get(k) for k in self.meta} == self.meta and self.part.is_file():
                durable = int(old["chunks"])
                if not 0 <= durable <= self.n or self.part.stat().st_size < min(
                        durable * chunk, size):
                    durable = 0
        except (OSError, ValueError, KeyError, TypeError):
            durable = 0
        self.f = open(self.part, "r+b" if durable else "wb")  # noqa: SIM115 (closed in close())
        self.f.truncate(min(durable * chunk, size))  # bytes past the durable offset are unknown
        self.f.seek(0, os.SEEK_END)
        self.durable = self.contig = durable
        self.pending: dict[int, bytes] = {}
        if not durable:
            self.persist()

    def persist(self) -> None:
        """Make chunks [0, contig) durable: fsync the .part, then write the offset file."""
        self.f.flush()
        os.fsync(self.f.fileno())
        atomic_write(self.state, json.dumps({**self.meta, "chunks": self.contig}).encode())
        self.durable = self.contig

    def put(self, seq: int, data: bytes, window: int) -> None:
        want = min(self.chunk, self.size - seq * self.chunk) if seq < self.n else -1
        if len(data) != want or seq < self.contig or seq >= self.durable + window:
            return  # wrong length, a duplicate, or past the window
        if seq != self.contig:
            self.pending[seq] = data
            return
        self.f.write(data)
        self.contig += 1
        while self.contig in self.pending:
            self.f.write(self.pending.pop(self.contig))
            self.contig += 1

    def bitmap(self, window: int) -> bytes:
        bits = bytearray((window + 7) // 8)
        for i in range(window):
            s = self.durable + i
            if s < self.contig or s in self.pending:
                bits[i >> 3] |= 1 << (i & 7)
        return bytes(bits)

    def finish(self) -> tuple[bool, str]:
        """Hash the whole .part; equal: rename to <name>; else remove it. (ok, sha256 got)."""
        self.close()
        got = sha256_file(self.part)
        if got == self.sha and self.part.stat().st_size == self.size:
            final = self.dest / self.name
            os.replace(self.part, final)
            self.state.unlink(missing_ok=True)
            fsync_dir(self.dest)
            return True, got
        self.part.unlink(missing_ok=True)
        self.state.unlink(missing_ok=True)
        fsync_dir(self.dest)
        return False, got

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


def _drop_other_partials(dest: Path, keep: str) -> None:
    """A new transfer replaces an unfinished older one (a device keeps one partial image)."""
    for p in dest.glob("*.part"):
        if p.stem != keep and _ID_RE.match(p.stem):
            p.unlink(missing_ok=True)
            (dest / f"{p.stem}.json").unlink(missing_ok=True)


class _Receiver:
    def __init__(self, line: _Line, dest: Path) -> None:
        self.line, self.dest = line, dest
        self.session = 0
        self.window = WINDOW
        self.xfer: _Transfer | None = None
        self.verdict: tuple[bool, str, Path] | None = None  # set once DONE was decided
        self.persist_every = WINDOW // 2

    def _hello(self, session: int, body: bytes) -> None:
        def answer(status: int, resume: int = 0, tid: bytes = b"\0" * 8) -> None:
            self.line.write(encode_frame(WELCOME, session, 0,
                                         _WELCOME.pack(status, self.window, resume, tid)))

        if len(body) < _HELLO.size:
            return
        version, window, chunk, size, sha, tid_b, nlen = _HELLO.unpack_from(body)
        name = body[_HELLO.size:_HELLO.size + nlen].decode("ascii", "replace")
        tid = tid_b.hex()
        if (version != VERSION or not 1 <= window <= MAX_WINDOW or not 1 <= chunk <= MAX_CHUNK
                or size > MAX_SIZE or tid != sha[:8].hex() or not _NAME_RE.match(name)):
            answer(REFUSED, 0, tid_b)
            return
        if self.verdict is not None:  # finished: a sender that missed DONE asks again
            if self.xfer is not None and self.xfer.tid == tid:
                self.session = session
                answer(OK, self.xfer.n, tid_b)
            return
        x = self.xfer
        if x is not None and x.tid == tid and x.chunk == chunk:
            if x.contig > x.durable:
                x.persist()  # a sender restart: resume from everything in order so far
            x.pending.clear()
        else:
            if x is not None:
                x.persist()
                x.close()
            _drop_other_partials(self.dest, tid)
            if size > shutil.disk_usage(self.dest).free + (
                    (self.dest / f"{tid}.part").stat().st_size
                    if (self.dest / f"{tid}.part").exists() else 0):
                answer(NO_SPACE, 0, tid_b)
                return
            x = self.xfer = _Transfer(self.dest, tid, size, sha.hex(), chunk, name)
        self.session = session
        self.window = min(window, MAX_WINDOW)
        self.persist_every = max(1, self.window // 2)
        answer(OK, x.durable, tid_b)

    def _fin(self) -> None:
        x = self.xfer
        if x is None:
            return
        if self.verdict is None:
            if x.contig < x.n:
                self._ack()
                return
            if x.durable < x.contig:
                x.persist()
            ok, got = x.finish()
            self.verdict = (ok, got, x.dest / x.name)
        ok, got, _ = self.verdict
        self.line.write(encode_frame(DONE, self.session, 0,
                                     _DONE.pack(OK if ok else MISMATCH, bytes.fromhex(got))))

    def _ack(self) -> None:
        x = self.xfer
        assert x is not None
        self.line.write(encode_frame(ACK, self.session, x.durable, x.bitmap(self.window)))

    def run(self, idle_timeout: float | None) -> tuple[bool, str, Path]:
        last = time.monotonic()
        done_at: float | None = None
        while True:
            now = time.monotonic()
            if done_at is not None and now - done_at > LINGER:
                break
            if idle_timeout is not None and now - last > idle_timeout:
                raise SerialLinkError(f"serial port {self.line.name}: no sender for "
                                      f"{idle_timeout:g} s")
            got_data = False
            for ftype, session, seq, body in self.line.frames(block=True):
                last = time.monotonic()
                if ftype == HELLO:
                    self._hello(session, body)
                    continue
                if session != self.session or self.xfer is None:
                    if ftype in (DATA, FIN):
                        self.line.write(encode_frame(NOSESSION, session, 0))
                    continue
                if ftype == DATA and self.verdict is None:
                    self.xfer.put(seq, body, self.window)
                    got_data = True
                elif ftype == FIN:
                    self._fin()
                    if self.verdict is not None:
                        done_at = time.monotonic()
                elif ftype == BYE and self.verdict is not None:
                    done_at = 0.0
            x = self.xfer
            if got_data and x is not None:
                if x.contig >= x.durable + self.persist_every or (
                        x.contig == x.n and x.durable < x.n):
                    x.persist()
                self._ack()
        assert self.verdict is not None
        return self.verdict

    def close(self) -> None:
        if self.xfer is not None:
            self.xfer.close()


def receive_file(port: str, dest_dir: PathLike, *, baud: int = 921600,
                 idle_timeout: float | None = None) -> Path:
    """Receive one file that ``send_file`` sends; returns its path, verified by sha256.

    Resumes an unfinished transfer of the same file from ``dest_dir/<id>.part``. Returns a
    short while (``LINGER``) after the verdict, so a sender that missed it can ask again.

    Args:
        port: the serial device (``/dev/ttyGS0`` on a Pi 5 in USB gadget mode, a pty).
        dest_dir: where the file lands, under the name the sender gave it.
        baud: line rate; both ends must agree (a pty and USB gadget serial ignore it).
        idle_timeout: give up after this many seconds without a valid frame (None: wait).

    Raises:
        FlashTargetError, FlashPortBusyError: the port is missing or held by another process.
        SerialLinkError: the port failed (cable pulled) or idle_timeout passed; the
            acknowledged part stays on disk and the next call resumes it.
        ImageRejectedError: the whole file's sha256 differs from the sender's; the file was
            removed (nothing of it is kept).
    """
    dest = Path(dest_dir)
    line = _Line(port, baud)  # first: a missing or busy port leaves no trace on disk
    rx = _Receiver(line, dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        ok, got, path = rx.run(idle_timeout)
    finally:
        rx.close()
        line.close()
    if not ok:
        assert rx.xfer is not None
        raise ImageRejectedError(f"received {rx.xfer.name} has sha256 {got}, the sender "
                                 f"announced {rx.xfer.sha}: refused and removed")
    fsync_path(path)
    return path
