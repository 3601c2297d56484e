# SPDX-License-Identifier: MIT
"""Patch files: a GGUF delta (version N -> N+1 by tensors) and an adapter patch, compressed.

A patch is a small self-describing container, made at the hub and applied on a device with
standard-library codecs only (zlib or lzma; numpy for the XOR):

    offset 0   b"EDGEPTCH"                      magic, 8 bytes
    offset 8   u32 format (1), u32 header_len   little-endian
    offset 16  header: header_len bytes of UTF-8 JSON (at most MAX_HEADER_BYTES)
    then       the compressed blobs, back to back, in the header's order; nothing after them

The header (``"format": 1``) says ``kind`` ("delta" or "adapter"), ``node``, ``codec``,
``base`` and ``result`` (each ``{"sha256", "size"}``), ``blobs`` (each ``{"name", "size",
"zsize", "sha256"}``: raw size, compressed size and raw sha256) and, for a delta, ``head``
and ``tensors``. ``head`` rebuilds the result's bytes before its first tensor (GGUF header,
metadata, tensor infos, padding) as a list of segments ``{"src": "base", "base_offset",
"nbytes"}`` (bytes of the base's own header: the common prefix and suffix, usually nearly all
of it, vocabulary included) or ``{"src": "patch", "blob", "nbytes"}`` (the changed middle).
``tensors`` lists the result's tensors in file order, each ``{"name", "offset", "nbytes",
"sha256", "src"}`` where src is

- ``"base"``: the bytes are the base file's ``[base_offset, base_offset + nbytes)`` (an
  unchanged tensor, found by its sha256 anywhere in the base);
- ``"patch"``: the bytes are blob ``blob``;
- ``"xor"``: the bytes are blob ``blob`` XOR the base's range at ``base_offset`` (a fine-tuned
  tensor: its sign and exponent bytes mostly cancel, so the XOR compresses better).

Every byte between tensors and after the last one is zero: that is how write_gguf lays files
out (alignment padding), and make_delta refuses a new file whose padding is not. So the device
rebuilds the hub's N+1 file byte for byte; the result's sha256 is checked as it streams out,
each tensor's sha256 too, and the base's sha256 before the first byte is written.

An adapter patch carries one blob, the adapter GGUF, bound (``base``) to the model it was
trained for; its ``tensors`` list the adapter's tensor names.

Public API:

- ``make_delta(base, new, node=..., codec="lzma") -> bytes``
- ``make_adapter_patch(adapter, base, node=..., codec="lzma") -> bytes``
- ``read_patch(path) -> Patch``: parse and validate (sizes bounded; PatchError otherwise)
- ``apply_patch(patch, base, write) -> str``: stream the result into ``write``, verify, return
  its sha256 (PatchBaseError for the wrong base, PatchError for anything else)

.. versionadded:: 0.1
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np

from ..errors import EdgeLLMError, PatchBaseError, PatchError
from ..formats.bundle import sha256_file

__all__ = ["CODECS", "MAGIC", "Blob", "Patch", "Segment", "TensorOp", "apply_patch", "make_adapter_patch",
           "make_delta", "read_patch", "sha256_path"]

MAGIC = b"EDGEPTCH"
FORMAT = 1
CODECS = ("zlib", "lzma")
KINDS = ("delta", "adapter")
SOURCES = ("base", "patch", "xor")
MAX_HEADER_BYTES = 16 << 20  # a 70B GGUF's ~720 tensor entries take ~150 KB of JSON
MAX_ENTRIES = 1 << 16  # tensors and blobs, as GGUF's own tensor cap
MAX_SIZE = 1 << 42  # 4 TiB: any size field above this is hostile (all sizes are 64-bit)
MAX_NAME = 256
MAX_HEAD_SEGMENTS = 64
CHUNK = 1 << 20  # streaming unit: bounded memory on a 1 GiB board
_PRELUDE = struct.Struct("<8sII")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_ZEROS = bytes(CHUNK)


sha256_path = sha256_file  # hex sha256 of a file's bytes (streamed); one implementation


# --------------------------------------------------------------------------------------
# The parsed form


@dataclass(frozen=True)
class Blob:
    """One compressed payload: its name, raw and compressed size, raw sha256, file offset."""

    name: str
    size: int
    zsize: int
    sha256: str
    offset: int  # absolute offset of the compressed bytes in the patch file


@dataclass(frozen=True)
class TensorOp:
    """How one tensor of the result is made (see the module docstring)."""

    name: str
    offset: int
    nbytes: int
    sha256: str
    src: str  # "base", "patch" or "xor"
    base_offset: int | None
    blob: int | None


@dataclass(frozen=True)
class Segment:
    """A piece of the result's head: base bytes at base_offset, or a blob."""

    src: str  # "base" or "patch"
    nbytes: int
    base_offset: int | None
    blob: int | None


@dataclass(frozen=True)
class Patch:
    """A validated patch file; the blobs stay on disk until apply_patch streams them.

    - ``p = read_patch(path)``; ``p.kind``, ``p.node``, ``p.base_sha256``, ``p.result_sha256``;
    - ``apply_patch(p, base_path, write)`` rebuilds the result.
    """

    path: Path
    kind: str
    node: str
    codec: str
    base_sha256: str
    base_size: int
    result_sha256: str
    result_size: int
    blobs: tuple[Blob, ...]
    tensors: tuple[TensorOp, ...]
    head: tuple[Segment, ...]  # delta: the bytes before the first tensor
    extra: dict[str, Any]  # informational keys (versions), never used to apply
    size: int  # bytes of the patch file


# --------------------------------------------------------------------------------------
# Reading and validating


def _int(v: Any, what: str, hi: int = MAX_SIZE) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
        raise PatchError(f"patch header: {what} must be an integer in [0, {hi}], got {v!r}")
    return v


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v or len(v) > MAX_NAME:
        raise PatchError(f"patch header: {what} must be a non-empty string of at most "
                         f"{MAX_NAME} characters")
    return v


def _sha(v: Any, what: str) -> str:
    if not isinstance(v, str) or not _SHA_RE.match(v):
        raise PatchError(f"patch header: {what} is not a lowercase hex sha256")
    return v


def _obj(v: Any, what: str, keys: set[str],
         optional: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise PatchError(f"patch header: {what} must be an object")
    missing = keys - v.keys()
    unknown = v.keys() - keys - optional
    if missing or unknown:
        raise PatchError(f"patch header: {what}: missing {sorted(missing)}, unknown "
                         f"{sorted(unknown)}")
    return v


def read_patch(path: str | os.PathLike[str]) -> Patch:
    """Read and validate a patch file's header against the file's real size.

    Raises:
        PatchError: a wrong magic or format, a header over its bounds or malformed, sizes
            that do not add up, ranges that overlap or fall outside base or result.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prelude = f.read(_PRELUDE.size)
            if len(prelude) < _PRELUDE.size:
                raise PatchError(f"{p}: truncated: {len(prelude)} bytes, not a patch")
            magic, fmt, hlen = _PRELUDE.unpack(prelude)
            if magic != MAGIC:
                raise PatchError(f"{p}: not an edgellm patch (magic {magic!r})")
            if fmt != FORMAT:
                raise PatchError(f"{p}: patch format {fmt}; this edgellm reads {FORMAT}")
            if hlen > MAX_HEADER_BYTES or hlen > file_size - _PRELUDE.size:
                raise PatchError(f"{p}: header of {hlen} bytes is over its bound or the file")
            raw = f.read(hlen)
    except OSError as exc:
        raise PatchError(f"{p}: cannot read it: {exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PatchError(f"{p}: the header is not UTF-8 JSON: {exc}") from None
    return _parse_header(p, header, _PRELUDE.size + hlen, file_size)


def _parse_header(p: Path, h: Any, payload_at: int, file_size: int) -> Patch:
    top = _obj(h, "the header", {"format", "kind", "node", "codec", "base", "result", "blobs",
                                 "tensors"}, {"head", "extra"})
    if top["format"] != FORMAT:
        raise PatchError(f"{p}: header format {top['format']!r}, expected {FORMAT}")
    kind, codec = top["kind"], top["codec"]
    if kind not in KINDS:
        raise PatchError(f"{p}: unknown patch kind {kind!r} (expected one of {KINDS})")
    if codec not in CODECS:
        raise PatchError(f"{p}: unknown codec {codec!r} (expected one of {CODECS})")
    node = _str(top["node"], "node")
    base = _obj(top["base"], "base", {"sha256", "size"})
    result = _obj(top["result"], "result", {"sha256", "size"})
    base_sha, base_size = _sha(base["sha256"], "base.sha256"), _int(base["size"], "base.size")
    res_sha, res_size = _sha(result["sha256"], "result.sha256"), _int(result["size"], "result.size")
    if not isinstance(top["blobs"], list) or len(top["blobs"]) > MAX_ENTRIES:
        raise PatchError(f"{p}: blobs must be a list of at most {MAX_ENTRIES}")
    blobs: list[Blob] = []
    at = payload_at
    for i, b in enumerate(top["blobs"]):
        b = _obj(b, f"blobs[{i}]", {"name", "size", "zsize", "sha256"})
        blob = Blob(_str(b["name"], f"blobs[{i}].name"), _int(b["size"], f"blobs[{i}].size"),
                    _int(b["zsize"], f"blobs[{i}].zsize"), _sha(b["sha256"], f"blobs[{i}].sha256"),
                    at)
        at += blob.zsize
        blobs.append(blob)
    if at != file_size:
        raise PatchError(f"{p}: the blobs take {at - payload_at} bytes, the file has "
                         f"{file_size - payload_at} after the header (truncated or extended)")
    extra = top.get("extra", {})
    if not isinstance(extra, dict):
        raise PatchError(f"{p}: extra must be an object")
    used: set[int] = set()

    def blob_ref(v: Any, what: str, size: int) -> int:
        i = _int(v, what, len(blobs) - 1) if blobs else -1
        if i < 0:
            raise PatchError(f"{p}: {what} refers to a blob, but the patch has none")
        if i in used:
            raise PatchError(f"{p}: blob {i} is used twice")
        if blobs[i].size != size:
            raise PatchError(f"{p}: {what}: blob {i} holds {blobs[i].size} bytes, {size} needed")
        used.add(i)
        return i

    ops: list[TensorOp] = []
    head: list[Segment] = []
    tensors = top["tensors"]
    if not isinstance(tensors, list) or len(tensors) > MAX_ENTRIES:
        raise PatchError(f"{p}: tensors must be a list of at most {MAX_ENTRIES}")
    if kind == "adapter":
        for i, name in enumerate(tensors):
            _str(name, f"tensors[{i}]")
        if len(blobs) != 1 or "head" in top:
            raise PatchError(f"{p}: an adapter patch carries exactly one blob and no head")
        blob_ref(0, "the adapter blob", res_size)
    else:
        if not isinstance(top.get("head"), list) or len(top["head"]) > MAX_HEAD_SEGMENTS:
            raise PatchError(f"{p}: a delta patch needs a head: a list of at most "
                             f"{MAX_HEAD_SEGMENTS} segments")
        for i, seg in enumerate(top["head"]):
            seg = _obj(seg, f"head[{i}]", {"src", "nbytes"}, {"base_offset", "blob"})
            n = _int(seg["nbytes"], f"head[{i}].nbytes")
            if seg["src"] == "base" and "blob" not in seg:
                bo = _int(seg.get("base_offset"), f"head[{i}].base_offset")
                if bo + n > base_size:
                    raise PatchError(f"{p}: head[{i}] reads past the {base_size}-byte base")
                head.append(Segment("base", n, bo, None))
            elif seg["src"] == "patch" and "base_offset" not in seg:
                head.append(Segment("patch", n, None, blob_ref(seg.get("blob"), f"head[{i}].blob", n)))
            else:
                raise PatchError(f"{p}: head[{i}] is neither a base range nor a blob")
        head_size = sum(seg.nbytes for seg in head)
        if head_size != (tensors[0].get("offset") if tensors and isinstance(tensors[0], dict)
                         else res_size):
            raise PatchError(f"{p}: the head makes {head_size} bytes, not the bytes before the "
                             "first tensor")
        pos = head_size
        for i, t in enumerate(tensors):
            t = _obj(t, f"tensors[{i}]", {"name", "offset", "nbytes", "sha256", "src"},
                     {"base_offset", "blob"})
            op = TensorOp(_str(t["name"], f"tensors[{i}].name"),
                          _int(t["offset"], f"tensors[{i}].offset"),
                          _int(t["nbytes"], f"tensors[{i}].nbytes"),
                          _sha(t["sha256"], f"tensors[{i}].sha256"), t["src"],
                          t.get("base_offset"), t.get("blob"))
            if op.src not in SOURCES:
                raise PatchError(f"{p}: tensors[{i}].src {op.src!r} is not one of {SOURCES}")
            if op.offset < pos or op.offset + op.nbytes > res_size:
                raise PatchError(f"{p}: tensor {op.name!r} [{op.offset}, "
                                 f"{op.offset + op.nbytes}) overlaps the previous one or runs "
                                 f"past the {res_size}-byte result")
            pos = op.offset + op.nbytes
            if op.src in ("base", "xor"):
                bo = _int(op.base_offset, f"tensors[{i}].base_offset")
                if bo + op.nbytes > base_size:
                    raise PatchError(f"{p}: tensor {op.name!r} reads past the {base_size}-byte "
                                     "base")
            elif op.base_offset is not None:
                raise PatchError(f"{p}: tensors[{i}] of src 'patch' has a base_offset")
            if op.src in ("patch", "xor"):
                blob_ref(op.blob, f"tensors[{i}].blob", op.nbytes)
            elif op.blob is not None:
                raise PatchError(f"{p}: tensors[{i}] of src 'base' has a blob")
            ops.append(op)
    if len(used) != len(blobs):
        raise PatchError(f"{p}: {len(blobs) - len(used)} blob(s) are not used by anything")
    return Patch(p, kind, node, codec, base_sha, base_size, res_sha, res_size, tuple(blobs),
                 tuple(ops), tuple(head), extra, file_size)


# --------------------------------------------------------------------------------------
# Applying


def _inflate(f: IO[bytes], blob: Blob, codec: str) -> Iterator[bytes]:
    """The blob's raw bytes in pieces of at most CHUNK; a bomb, junk or a bad hash raises."""
    f.seek(blob.offset)
    left = blob.zsize
    out = 0
    h = hashlib.sha256()
    zd = zlib.decompressobj() if codec == "zlib" else None
    xd = lzma.LZMADecompressor(format=lzma.FORMAT_XZ) if codec == "lzma" else None
    pending = b""
    try:
        while True:
            if zd is not None:
                if not pending and left:
                    pending = f.read(min(CHUNK, left))
                    left -= len(pending)
                piece = zd.decompress(pending, CHUNK)
                pending = zd.unconsumed_tail
                done, junk = zd.eof, zd.unused_data
                stuck = not piece and not pending and not left
            else:
                assert xd is not None
                data = b""
                if xd.needs_input and left:
                    data = f.read(min(CHUNK, left))
                    left -= len(data)
                stuck = xd.needs_input and not data and not left
                piece = xd.decompress(data, CHUNK)
                done, junk = xd.eof, xd.unused_data
                stuck = stuck and not piece
            out += len(piece)
            if out > blob.size:
                raise PatchError(f"blob {blob.name!r} inflates past its {blob.size} bytes")
            if piece:
                h.update(piece)
                yield piece
            if done:
                break
            if stuck:
                raise PatchError(f"blob {blob.name!r} is truncated")
    except (zlib.error, lzma.LZMAError, EOFError) as exc:
        raise PatchError(f"blob {blob.name!r} does not decompress: {exc}") from None
    if junk or pending or left:
        raise PatchError(f"blob {blob.name!r} has bytes after its compressed stream")
    if out != blob.size or h.hexdigest() != blob.sha256:
        raise PatchError(f"blob {blob.name!r}: {out} bytes with the wrong sha256 "
                         f"(expected {blob.size} bytes, sha256 {blob.sha256[:16]}...)")


def _base_range(f: IO[bytes], offset: int, n: int) -> Iterator[bytes]:
    f.seek(offset)
    while n:
        piece = f.read(min(CHUNK, n))
        if not piece:
            raise PatchError("the base file ended early")
        n -= len(piece)
        yield piece


def _xor(a: bytes, b: bytes) -> bytes:
    return np.bitwise_xor(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)).tobytes()


def _rechunk(it: Iterator[bytes]) -> Iterator[bytes]:
    """Pieces of exactly CHUNK bytes (the last may be shorter), so two streams line up."""
    buf = b""
    for piece in it:
        buf += piece
        while len(buf) >= CHUNK:
            yield buf[:CHUNK]
            buf = buf[CHUNK:]
    if buf:
        yield buf


def _delta_pieces(patch: Patch, pf: IO[bytes], bf: IO[bytes]) -> Iterator[bytes]:
    pos = 0
    for seg in patch.head:
        if seg.src == "base":
            assert seg.base_offset is not None
            yield from _base_range(bf, seg.base_offset, seg.nbytes)
        else:
            assert seg.blob is not None
            yield from _inflate(pf, patch.blobs[seg.blob], patch.codec)
        pos += seg.nbytes
    for op in patch.tensors:
        gap = op.offset - pos
        while gap:
            n = min(gap, CHUNK)
            yield _ZEROS[:n]
            gap -= n
        h = hashlib.sha256()
        if op.src == "base":
            assert op.base_offset is not None
            pieces = _base_range(bf, op.base_offset, op.nbytes)
        elif op.src == "patch":
            assert op.blob is not None
            pieces = _inflate(pf, patch.blobs[op.blob], patch.codec)
        else:
            assert op.blob is not None and op.base_offset is not None
            base_it = _rechunk(_base_range(bf, op.base_offset, op.nbytes))
            delta_it = _rechunk(_inflate(pf, patch.blobs[op.blob], patch.codec))
            pieces = (_xor(a, b) for a, b in zip(base_it, delta_it))
        n = 0
        for piece in pieces:
            n += len(piece)
            h.update(piece)
            yield piece
        if n != op.nbytes or h.hexdigest() != op.sha256:
            raise PatchError(f"tensor {op.name!r} of the result does not match its sha256")
        pos = op.offset + op.nbytes
    tail = patch.result_size - pos
    while tail > 0:
        n = min(tail, CHUNK)
        yield _ZEROS[:n]
        tail -= n


def apply_patch(patch: Patch, base: str | os.PathLike[str] | None,
                write: Callable[[bytes], object], *, base_sha256: str | None = None) -> str:
    """Stream a patch's result into write(chunk) and verify it.

    Args:
        patch: from read_patch.
        base: the base GGUF (a delta reads its unchanged tensors from it; an adapter patch
            only checks it). None means the device has no base: PatchBaseError.
        write: called with each piece of the result, in order (the caller writes and fsyncs).
        base_sha256: the base's sha256 when the caller verified it already (else it is hashed).

    Returns:
        The result's sha256 (equal to patch.result_sha256).

    Raises:
        PatchBaseError: no base, or a base of another sha256 or size; nothing was written.
        PatchError: a blob or tensor that fails its check, a result of the wrong sha256
            (some pieces may have been written: the caller discards them).
    """
    if base is None:
        raise PatchBaseError(f"{patch.path}: this device has no base model for the patch "
                             f"(needs sha256 {patch.base_sha256[:16]}...)")
    bp = Path(base)
    try:
        size = bp.stat().st_size
    except OSError:
        raise PatchBaseError(f"{patch.path}: the base {bp} is missing") from None
    got = base_sha256 or sha256_path(bp)
    if size != patch.base_size or got != patch.base_sha256:
        raise PatchBaseError(
            f"{patch.path}: built against base sha256 {patch.base_sha256[:16]}... "
            f"({patch.base_size} bytes); this device's base is {got[:16]}... ({size} bytes)")
    h = hashlib.sha256()
    n = 0
    with open(patch.path, "rb") as pf, open(bp, "rb") as bf:
        if patch.kind == "adapter":
            pieces = _inflate(pf, patch.blobs[0], patch.codec)
        else:
            pieces = _delta_pieces(patch, pf, bf)
        for piece in pieces:
            n += len(piece)
            if n > patch.result_size:
                raise PatchError(f"{patch.path}: the result grows past {patch.result_size} bytes")
            h.update(piece)
            write(piece)
    digest = h.hexdigest()
    if n != patch.result_size or digest != patch.result_sha256:
        raise PatchError(f"{patch.path}: the result is {n} bytes with sha256 {digest[:16]}..., "
                         f"expected {patch.result_size} bytes, {patch.result_sha256[:16]}...")
    return digest


# --------------------------------------------------------------------------------------
# Making (hub side)


def _compress(data: bytes, codec: str) -> bytes:
    if codec == "zlib":
        return zlib.compress(data, 9)
    return lzma.compress(data, format=lzma.FORMAT_XZ, preset=6)


def _container(header: dict[str, Any], payloads: list[bytes]) -> bytes:
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return b"".join([_PRELUDE.pack(MAGIC, FORMAT, len(raw)), raw, *payloads])


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise PatchError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def make_delta(base: str | os.PathLike[str], new: str | os.PathLike[str], *,
               node: str = "master", codec: str = "lzma", xor: bool = True,
               extra: dict[str, Any] | None = None) -> bytes:
    """A delta patch that turns the GGUF file base into the GGUF file new.

    Args:
        base: version N, as the devices hold it.
        new: version N+1.
        node: the node path both belong to (recorded, checked by the device's updater).
        codec: "lzma" (smaller) or "zlib" (faster).
        xor: also try each changed tensor as an XOR against the base's tensor of the same
            name and size, keeping whichever compresses smaller.
        extra: informational keys for the header (versions, release counter).

    Returns:
        The patch file's bytes.

    Raises:
        PatchError: new's padding is not zero (it was not laid out by write_gguf), or a file
            is not valid GGUF.
    """
    from ..formats.gguf import read_gguf

    _check_codec(codec)
    bpath, npath = Path(base), Path(new)
    try:
        bf, nf = read_gguf(bpath), read_gguf(npath)
    except EdgeLLMError as exc:
        raise PatchError(f"cannot make a delta: {exc}") from None
    try:
        braw, nraw = bpath.read_bytes(), npath.read_bytes()
        by_sha: dict[str, int] = {}
        by_name: dict[str, tuple[int, int]] = {}
        for t in bf.tensors.values():
            by_sha.setdefault(hashlib.sha256(braw[t.offset:t.offset + t.nbytes]).hexdigest(),
                              t.offset)
            by_name[t.name] = (t.offset, t.nbytes)
        order = sorted(nf.tensors.values(), key=lambda t: t.offset)
        head_end = order[0].offset if order else len(nraw)
        bhead = braw[:min((t.offset for t in bf.tensors.values()), default=len(braw))]
        blobs: list[dict[str, Any]] = []
        payloads: list[bytes] = []

        def add_blob(name: str, data: bytes) -> int:
            z = _compress(data, codec)
            blobs.append({"name": name, "size": len(data), "zsize": len(z),
                          "sha256": hashlib.sha256(data).hexdigest()})
            payloads.append(z)
            return len(blobs) - 1

        head = _head_segments(bhead, nraw[:head_end], add_blob)
        ops: list[dict[str, Any]] = []
        pos = head_end
        for t in order:
            if any(nraw[pos:t.offset]):
                raise PatchError(f"{npath}: the bytes before tensor {t.name!r} are not zero "
                                 "padding: ship the full bundle")
            data = nraw[t.offset:t.offset + t.nbytes]
            sha = hashlib.sha256(data).hexdigest()
            op: dict[str, Any] = {"name": t.name, "offset": t.offset, "nbytes": t.nbytes,
                                  "sha256": sha}
            if sha in by_sha:
                op.update(src="base", base_offset=by_sha[sha])
            else:
                same = by_name.get(t.name)
                x = None
                if xor and same is not None and same[1] == t.nbytes:
                    x = _xor(data, braw[same[0]:same[0] + t.nbytes])
                    # Big tensors: choose with a fast zlib pass, compress the winner only.
                    if t.nbytes > CHUNK and len(zlib.compress(x, 1)) >= len(zlib.compress(data, 1)):
                        x = None
                z_plain = _compress(data, codec) if x is None or t.nbytes <= CHUNK else b""
                z_xor = _compress(x, codec) if x is not None else None
                if z_xor is not None and same is not None and (
                        not z_plain or len(z_xor) < len(z_plain)):
                    assert x is not None
                    blobs.append({"name": t.name, "size": t.nbytes, "zsize": len(z_xor),
                                  "sha256": hashlib.sha256(x).hexdigest()})
                    payloads.append(z_xor)
                    op.update(src="xor", base_offset=same[0], blob=len(blobs) - 1)
                else:
                    if not z_plain:
                        z_plain = _compress(data, codec)
                    blobs.append({"name": t.name, "size": t.nbytes, "zsize": len(z_plain),
                                  "sha256": sha})
                    payloads.append(z_plain)
                    op.update(src="patch", blob=len(blobs) - 1)
            ops.append(op)
            pos = t.offset + t.nbytes
        if any(nraw[pos:]):
            raise PatchError(f"{npath}: the bytes after the last tensor are not zero padding")
        header = {"format": FORMAT, "kind": "delta", "node": node, "codec": codec,
                  "base": {"sha256": hashlib.sha256(braw).hexdigest(), "size": len(braw)},
                  "result": {"sha256": hashlib.sha256(nraw).hexdigest(), "size": len(nraw)},
                  "head": head, "blobs": blobs, "tensors": ops, "extra": dict(extra or {})}
        return _container(header, payloads)
    finally:
        bf.close()
        nf.close()


def _common(a: bytes, b: bytes) -> int:
    """Length of the common prefix of a and b (by halving: memcmp-speed on big headers)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _head_segments(base: bytes, new: bytes,
                   add_blob: Callable[[str, bytes], int]) -> list[dict[str, Any]]:
    """The new head as base prefix + changed middle + base suffix (empty parts left out)."""
    pre = _common(base, new)
    suf = _common(base[pre:][::-1], new[pre:][::-1])
    segs: list[dict[str, Any]] = []
    if pre:
        segs.append({"src": "base", "base_offset": 0, "nbytes": pre})
    middle = new[pre:len(new) - suf]
    if middle:
        segs.append({"src": "patch", "blob": add_blob("head", middle), "nbytes": len(middle)})
    if suf:
        segs.append({"src": "base", "base_offset": len(base) - suf, "nbytes": suf})
    return segs


def make_adapter_patch(adapter: str | os.PathLike[str], base: str | os.PathLike[str], *,
                       node: str = "master", codec: str = "lzma",
                       extra: dict[str, Any] | None = None) -> bytes:
    """An adapter patch: the adapter GGUF, compressed, bound to the model file it adapts.

    Args:
        adapter: a LoRA adapter GGUF (validated with read_adapter).
        base: the model file the adapter was trained for (its sha256 is the binding).
        node, codec, extra: as for make_delta.

    Raises:
        PatchError: the adapter is not a valid adapter file.
    """
    from ..formats.adapter import read_adapter

    _check_codec(codec)
    try:
        with read_adapter(adapter) as lf:
            names = sorted(lf.gguf.tensors)
    except EdgeLLMError as exc:
        raise PatchError(f"cannot make an adapter patch: {exc}") from None
    data = Path(adapter).read_bytes()
    z = _compress(data, codec)
    sha = hashlib.sha256(data).hexdigest()
    header = {"format": FORMAT, "kind": "adapter", "node": node, "codec": codec,
              "base": {"sha256": sha256_path(base), "size": Path(base).stat().st_size},
              "result": {"sha256": sha, "size": len(data)},
              "blobs": [{"name": "adapter", "size": len(data), "zsize": len(z), "sha256": sha}],
              "tensors": names, "extra": dict(extra or {})}
    return _container(header, [z])
