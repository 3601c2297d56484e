# SPDX-License-Identifier: MIT
"""GGUF v2/v3 model files: a validating, zero-copy (mmap) reader and an atomic writer."""

from __future__ import annotations

import enum
import mmap
import os
import stat
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

import numpy as np

if TYPE_CHECKING:  # annotations only: typing_extensions is not a runtime dependency
    from typing_extensions import Self

from ..errors import InvalidArgumentError, ModelFormatError, StateError, UnsupportedError
from . import quant
from .quant import GGML_BLOCK, RUNNABLE_TYPES, GGMLType, ggml_nbytes, ggml_type_name

__all__ = [
    "DEFAULT_ALIGNMENT", "GGML_BLOCK", "GGUF_MAGIC", "GGUF_VERSION", "RUNNABLE_TYPES",
    "GGMLType", "GGUFFile", "GGUFValue", "GGUFValueType", "ImportedModel", "LazyTensor",
    "RawTensor", "TensorInfo", "TensorSource", "check_runnable", "ggml_nbytes",
    "ggml_type_name", "read_gguf", "write_gguf",
]

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3  # what write_gguf writes; v2 has the same layout and is read too
DEFAULT_ALIGNMENT = 32  # used when general.alignment is absent (the GGUF spec's default)

# Caps that keep a hostile header from making us allocate or loop for long. Real models stay
# far below them (a 70B llama has ~720 tensors, ~30 keys, ~150k-entry token arrays).
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_ARRAY_LEN = 1 << 24
MAX_METADATA_ITEMS = 1 << 25  # all array elements of all keys together
MAX_KEY_BYTES = 65535  # GGUF spec: keys are at most 2**16 - 1 bytes
MAX_NAME_BYTES = 63  # ggml's GGML_MAX_NAME is 64 including the NUL; llama.cpp refuses longer
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 2  # an array may hold arrays, which may not hold arrays
MAX_ELEMENTS = 1 << 62  # per tensor; keeps byte counts inside int64 like ggml's int64_t
MAX_ALIGNMENT = 1 << 30


class GGUFValueType(enum.IntEnum):
    """Metadata value type ids of the GGUF spec."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Little-endian numpy dtype, and struct code, of each fixed-size value type.
_VALUE_DTYPE: dict[GGUFValueType, str] = dict(zip(
    (GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
     GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL,
     GGUFValueType.UINT64, GGUFValueType.INT64, GGUFValueType.FLOAT64),
    ("<u1", "<i1", "<u2", "<i2", "<u4", "<i4", "<f4", "<u1", "<u8", "<i8", "<f8")))
_STRUCT_CODE = {"<u1": "<B", "<i1": "<b", "<u2": "<H", "<i2": "<h", "<u4": "<I", "<i4": "<i",
                "<f4": "<f", "<u8": "<Q", "<i8": "<q", "<f8": "<d"}
_VALUE_STRUCT: dict[GGUFValueType, struct.Struct] = {
    t: struct.Struct(_STRUCT_CODE[d]) for t, d in _VALUE_DTYPE.items()}
_INT_RANGE: dict[GGUFValueType, tuple[int, int]] = {
    t: (int(np.iinfo(d).min), int(np.iinfo(d).max))
    for t, d in _VALUE_DTYPE.items() if d[1] in "ui" and t != GGUFValueType.BOOL}
_FLOAT_TYPES = (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64)
# Fewest bytes one array element of each type takes (a string is at least its u64 length).
_MIN_ITEM_BYTES = {**{t: np.dtype(d).itemsize for t, d in _VALUE_DTYPE.items()},
                   GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}


# numpy dtype for types whose elements are plain numbers (tensor_array shapes these).
_PLAIN_DTYPE: dict[GGMLType, str] = {
    GGMLType.F32: "<f4", GGMLType.F16: "<f2", GGMLType.F64: "<f8", GGMLType.I8: "<i1",
    GGMLType.I16: "<i2", GGMLType.I32: "<i4", GGMLType.I64: "<i8",
}


def check_runnable(info: TensorInfo) -> None:
    """Raise UnsupportedError unless edgellm's C core can run this tensor's type."""
    if info.type not in RUNNABLE_TYPES:
        raise UnsupportedError(
            f"tensor {info.name!r} has type {info.type_name}, which edgellm does not run "
            f"(supported: {', '.join(t.name for t in sorted(RUNNABLE_TYPES))}); "
            "requantise it with `edgellm convert --type q8_0`")


@dataclass(frozen=True)
class GGUFValue:
    """A metadata value with an explicit GGUF type (write_gguf honours it; the reader fills it).

    For ``ARRAY``, ``item_type`` is the element type and ``value`` a list or 1-D numpy array;
    for an array of arrays each element is itself a GGUFValue of type ARRAY.
    """

    type: GGUFValueType
    value: Any
    item_type: GGUFValueType | None = None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a GGUF file and what it holds."""

    name: str
    type: int  # ggml type id
    type_name: str  # "F32", "Q4_K", ...
    shape: tuple[int, ...]  # GGUF order: shape[0] = ne0, the innermost (contiguous) dim
    n_elements: int
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class RawTensor:
    """Already-encoded tensor data for write_gguf, with its shape in GGUF order (ne0 first)."""

    data: Any  # bytes-like: bytes, memoryview, or a C-contiguous numpy array
    shape: tuple[int, ...]


@dataclass(frozen=True)
class LazyTensor:
    """A float tensor for write_gguf that is loaded only when written (bounded memory)."""

    shape: tuple[int, ...]  # numpy order (rows first), as load() returns it
    load: Callable[[], np.ndarray]


TensorSource = Union[np.ndarray, RawTensor, LazyTensor]


@dataclass
class ImportedModel:
    """A model read by an importer (llama2c, hf), in GGUF terms but not yet written.

    convert() chooses each tensor's ggml type and adds the general.* and edgellm.* keys.
    """

    arch: str  # general.architecture
    name: str  # general.name
    metadata: dict[str, Any]  # architecture and tokenizer keys, values typed for llama.cpp
    tensors: list[tuple[str, LazyTensor]]  # GGUF name -> float data, numpy order
    source: str  # "hf:<folder>", "llama2c:<file>": becomes edgellm.source


# --------------------------------------------------------------------------------------
# Reading


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every failure is a ModelFormatError."""

    __slots__ = ("buf", "pos", "size")

    def __init__(self, buf: Any, size: int) -> None:
        self.buf = buf
        self.pos = 0
        self.size = size

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise ModelFormatError(
                f"GGUF truncated: {what} at offset {self.pos} needs {n} bytes, "
                f"the file has {self.size - self.pos} left")

    def scalar(self, t: GGUFValueType, what: str) -> Any:
        st = _VALUE_STRUCT[t]
        self.need(st.size, what)
        (v,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return v

    def u32(self, what: str) -> int:
        return int(self.scalar(GGUFValueType.UINT32, what))

    def u64(self, what: str) -> int:
        return int(self.scalar(GGUFValueType.UINT64, what))

    def string(self, what: str, max_len: int | None = None) -> str:
        start = self.pos
        n = self.u64(f"length of {what}")
        if max_len is not None and n > max_len:
            raise ModelFormatError(
                f"GGUF {what} at offset {start} is {n} bytes long, more than the {max_len} allowed")
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        try:
            s = str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise ModelFormatError(
                f"GGUF {what} at offset {self.pos} is not valid UTF-8 ({exc.reason} at byte "
                f"{exc.start})") from None
        self.pos += n
        return s


class _Budget:
    """Counts metadata array elements across all keys against MAX_METADATA_ITEMS."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_METADATA_ITEMS

    def take(self, n: int, key: str) -> None:
        self.left -= n
        if self.left < 0:
            raise ModelFormatError(
                f"GGUF metadata holds more than {MAX_METADATA_ITEMS} array elements (at {key!r})")


def _value_type(raw: int, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise ModelFormatError(f"GGUF {what} has unknown value type id {raw}") from None


def _read_value(cur: _Cursor, t: GGUFValueType, key: str, depth: int,
                budget: _Budget) -> GGUFValue:
    """One metadata value of type t at the cursor (arrays recurse at most MAX_ARRAY_DEPTH)."""
    if t == GGUFValueType.STRING:
        return GGUFValue(t, cur.string(f"string value of {key!r}"))
    if t != GGUFValueType.ARRAY:
        v = cur.scalar(t, f"value of {key!r}")
        if t == GGUFValueType.BOOL:
            if v > 1:
                raise ModelFormatError(f"GGUF bool {key!r} holds {v}, not 0 or 1")
            v = bool(v)
        return GGUFValue(t, v)
    if depth >= MAX_ARRAY_DEPTH:
        raise ModelFormatError(f"GGUF array {key!r} nests deeper than {MAX_ARRAY_DEPTH} levels")
    it = _value_type(cur.u32(f"array item type of {key!r}"), f"array {key!r}")
    start = cur.pos
    n = cur.u64(f"array length of {key!r}")
    if n > MAX_ARRAY_LEN:
        raise ModelFormatError(
            f"GGUF array {key!r} at offset {start} claims {n} items, more than {MAX_ARRAY_LEN}")
    # Every item takes at least _MIN_ITEM_BYTES, so a length the file can't hold fails here.
    cur.need(n * _MIN_ITEM_BYTES[it], f"{n} items of array {key!r}")
    budget.take(n, key)
    if it in _VALUE_DTYPE:
        dt = np.dtype(_VALUE_DTYPE[it])
        arr = np.frombuffer(cur.buf, dtype=dt, count=n, offset=cur.pos).astype(
            dt.newbyteorder("="), copy=True)  # an owned copy: metadata outlives the mapping
        cur.pos += n * dt.itemsize
        if it == GGUFValueType.BOOL:
            if n and int(arr.max()) > 1:
                raise ModelFormatError(f"GGUF bool array {key!r} holds a value other than 0/1")
            arr = arr.astype(bool)
        return GGUFValue(t, arr, it)
    items: list[Any] = []
    if it == GGUFValueType.STRING:
        buf, unpack = cur.buf, _VALUE_STRUCT[GGUFValueType.UINT64].unpack_from
        pos, size = cur.pos, cur.size
        for i in range(n):
            if size - pos < 8:
                cur.pos = pos
                cur.need(8, f"length of item {i} of {key!r}")
            (ln,) = unpack(buf, pos)
            pos += 8
            if ln > size - pos:
                cur.pos = pos
                cur.need(ln, f"item {i} of {key!r}")
            try:
                items.append(str(buf[pos : pos + ln], "utf-8"))
            except UnicodeDecodeError as exc:
                raise ModelFormatError(
                    f"GGUF string {i} of array {key!r} at offset {pos} is not valid UTF-8 "
                    f"({exc.reason})") from None
            pos += ln
        cur.pos = pos
    else:  # arrays of arrays
        for i in range(n):
            sub = _read_value(cur, GGUFValueType.ARRAY, f"{key}[{i}]", depth + 1, budget)
            items.append(sub)
    return GGUFValue(t, items, it)


def _plain(v: GGUFValue) -> Any:
    """The python value of a GGUFValue: strings stay str, numeric arrays stay numpy."""
    if v.type == GGUFValueType.ARRAY and v.item_type == GGUFValueType.ARRAY:
        return [_plain(x) for x in v.value]
    return v.value


class GGUFFile:
    """A GGUF file mapped read-only; tensors are zero-copy views of the mapping.

    - ``f = read_gguf(path)`` (or ``with read_gguf(path) as f:``) validates the whole header.
    - ``f.metadata["llama.block_count"]``, ``f.tensors["token_embd.weight"].shape``.
    - ``f.tensor_array(name)`` / ``f.tensor_bytes(name)`` give views of the mapping; pass them
      to C with ``ffi.from_buffer`` and keep them (or this object) alive while C uses them.
    - ``f.close()`` drops this object's hold on the mapping; views handed out keep it alive
      until they are released too.

    Not thread-safe for close(); reads of the views are.

    .. versionadded:: 0.1
    """

    def __init__(self, path: Path, mm: mmap.mmap, version: int, fields: dict[str, GGUFValue],
                 tensors: dict[str, TensorInfo], alignment: int, data_offset: int) -> None:
        self.path = path
        self.version = version
        self.fields = fields  # key -> GGUFValue: the values with their stored types
        self.metadata: dict[str, Any] = {k: _plain(v) for k, v in fields.items()}
        self.tensors = tensors  # name -> TensorInfo, in file order
        self.alignment = alignment
        self.data_offset = data_offset  # absolute offset of the tensor data section
        self._mm: mmap.mmap | None = mm
        self._view: memoryview | None = memoryview(mm)

    @property
    def architecture(self) -> str:
        """The ``general.architecture`` string ("llama", "qwen2", ...)."""
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFormatError(f"{self.path}: general.architecture is missing or not a string")
        return arch

    @property
    def closed(self) -> bool:
        return self._view is None

    def _info(self, name: str) -> tuple[TensorInfo, memoryview]:
        if self._view is None:
            raise StateError(f"{self.path} is closed")
        info = self.tensors.get(name)
        if info is None:
            raise InvalidArgumentError(f"{self.path} has no tensor named {name!r}")
        return info, self._view[info.offset : info.offset + info.nbytes]

    def tensor_bytes(self, name: str) -> memoryview:
        """The raw bytes of a tensor: a read-only, zero-copy slice of the mapping."""
        return self._info(name)[1]

    def tensor_array(self, name: str) -> np.ndarray:  # -> [..., ne1, ne0] or [n_rows, row_bytes]
        """A zero-copy read-only numpy view of a tensor.

        F32/F16 (and other plain number types) come shaped in numpy order (the GGUF shape
        reversed: [..., rows, ne0]); block-quantised types come as raw uint8
        [n_rows, row_bytes] where n_rows = n_elements / ne0.
        """
        info, raw = self._info(name)
        t = GGMLType(info.type)
        if t in _PLAIN_DTYPE:
            return np.frombuffer(raw, dtype=_PLAIN_DTYPE[t]).reshape(info.shape[::-1])
        n_rows = info.n_elements // info.shape[0]
        return np.frombuffer(raw, dtype=np.uint8).reshape(n_rows, info.nbytes // n_rows)

    def close(self) -> None:
        """Release this object's hold on the mapping (idempotent)."""
        view, mm = self._view, self._mm
        self._view = self._mm = None
        if view is not None:
            try:
                view.release()
            except BufferError:  # pragma: no cover - only slices are handed out
                pass
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # Views handed out still export the buffer; the mapping goes when they do.
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (f"<GGUFFile {str(self.path)!r} v{self.version} {len(self.tensors)} tensors "
                f"{len(self.fields)} keys {state}>")


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Map a GGUF v2/v3 file read-only and validate its header, metadata and tensor infos.

    Args:
        path: the .gguf file.

    Returns:
        The open GGUFFile (close it, or use it as a context manager).

    Raises:
        ModelFormatError: truncated, wrong magic or version, inconsistent sizes or offsets,
            invalid UTF-8, duplicate keys or tensor names.
        UnsupportedError: a tensor type id ggml does not define (or has removed), or a
            big-endian file.
        InvalidArgumentError: the path does not exist or is not a regular file.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InvalidArgumentError(f"no such file: {p}") from None
    # Checked before opening: opening a FIFO would block, a folder can't be mapped.
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgumentError(f"{p} is a directory, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgumentError(f"{p} is not a regular file")
    fd = os.open(p, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size == 0:
            raise ModelFormatError(f"{p} is empty, not a GGUF file")
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    try:
        return _parse(p, mm)
    except BaseException:
        mm.close()
        raise


def _parse(path: Path, mm: mmap.mmap) -> GGUFFile:
    size = len(mm)
    cur = _Cursor(mm, size)
    cur.need(4, "magic")
    magic = bytes(mm[0:4])
    if magic != GGUF_MAGIC:
        raise ModelFormatError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.u32("version")
    if version not in (2, 3):
        if version & 0xFFFF == 0 and (version >> 24) in (2, 3):
            raise UnsupportedError(f"{path}: big-endian GGUF is not supported")
        hint = " (GGUF v1 is obsolete: re-convert the model)" if version == 1 else ""
        raise ModelFormatError(f"{path}: unsupported GGUF version {version}, "
                               f"edgellm reads 2 and 3{hint}")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata key count")
    # Bounds: an absolute cap, then the fewest bytes each entry could take.
    if n_tensors > MAX_TENSORS:
        raise ModelFormatError(f"{path}: tensor count {n_tensors} exceeds {MAX_TENSORS}")
    if n_kv > MAX_KV:
        raise ModelFormatError(f"{path}: metadata key count {n_kv} exceeds {MAX_KV}")
    cur.need(n_kv * 13 + n_tensors * 25, f"{n_kv} keys and {n_tensors} tensor infos")

    budget = _Budget()
    fields: dict[str, GGUFValue] = {}
    for i in range(n_kv):
        key = cur.string(f"key {i}", MAX_KEY_BYTES)
        if not key:
            raise ModelFormatError(f"{path}: metadata key {i} is empty")
        if key in fields:
            raise ModelFormatError(f"{path}: duplicate metadata key {key!r}")
        t = _value_type(cur.u32(f"value type of {key!r}"), f"key {key!r}")
        fields[key] = _read_value(cur, t, key, 0, budget)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in fields:
        a = fields["general.alignment"]
        if a.type != GGUFValueType.UINT32:
            raise ModelFormatError(f"{path}: general.alignment must be UINT32, not {a.type.name}")
        alignment = int(a.value)
        if alignment <= 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
            raise ModelFormatError(
                f"{path}: general.alignment {alignment} is not a power of two <= {MAX_ALIGNMENT}")

    infos: list[tuple[str, int, tuple[int, ...], int, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        at = cur.pos
        name = cur.string(f"name of tensor {i}", MAX_NAME_BYTES)
        if not name:
            raise ModelFormatError(f"{path}: tensor {i} at offset {at} has an empty name")
        if name in names:
            raise ModelFormatError(f"{path}: duplicate tensor name {name!r}")
        names.add(name)
        n_dims = cur.u32(f"n_dims of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ModelFormatError(f"{path}: tensor {name!r} has {n_dims} dims (1..{MAX_DIMS})")
        shape = tuple(cur.u64(f"dim {d} of {name!r}") for d in range(n_dims))
        n_el = 1
        for d in shape:
            if d < 1:
                raise ModelFormatError(f"{path}: tensor {name!r} has a zero dim in {shape}")
            n_el *= d
            if n_el > MAX_ELEMENTS:
                raise ModelFormatError(f"{path}: tensor {name!r} shape {shape} is too large")
        type_id = cur.u32(f"type of {name!r}")
        if type_id not in GGML_BLOCK:
            raise UnsupportedError(
                f"{path}: tensor {name!r} has {ggml_type_name(type_id)}, which edgellm "
                "cannot read")
        block, block_bytes = GGML_BLOCK[GGMLType(type_id)]
        if shape[0] % block:
            raise ModelFormatError(
                f"{path}: tensor {name!r} ({GGMLType(type_id).name}) has row length {shape[0]}, "
                f"not a multiple of the block size {block}")
        rel = cur.u64(f"data offset of {name!r}")
        if rel % alignment:
            raise ModelFormatError(
                f"{path}: tensor {name!r} data offset {rel} is not a multiple of the "
                f"alignment {alignment}")
        infos.append((name, type_id, shape, n_el, rel))

    data_offset = -(-cur.pos // alignment) * alignment
    if infos and data_offset > size:
        raise ModelFormatError(
            f"{path}: GGUF truncated: tensor data would start at {data_offset}, "
            f"past the end of the {size}-byte file")
    tensors: dict[str, TensorInfo] = {}
    for name, type_id, shape, n_el, rel in infos:
        block, block_bytes = GGML_BLOCK[GGMLType(type_id)]
        nbytes = n_el // block * block_bytes
        start = data_offset + rel
        if start + nbytes > size:
            raise ModelFormatError(
                f"{path}: tensor {name!r} data [{start}, {start + nbytes}) runs past the end of "
                f"the {size}-byte file (truncated?)")
        tensors[name] = TensorInfo(name, type_id, GGMLType(type_id).name, shape, n_el, start,
                                   nbytes)
    # Tensors may come in any order but must not share bytes.
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise ModelFormatError(f"{path}: tensors {first!r} and {second!r} overlap")
    return GGUFFile(path, mm, version, fields, tensors, alignment, data_offset)


# --------------------------------------------------------------------------------------
# Writing


def _check_int(key: str, t: GGUFValueType, v: Any) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise InvalidArgumentError(f"metadata {key!r}: {t.name} needs an int, got {v!r}")
    lo, hi = _INT_RANGE[t]
    if not lo <= int(v) <= hi:
        raise InvalidArgumentError(f"metadata {key!r}: {v} does not fit {t.name}")
    return int(v)


def _infer(key: str, v: Any) -> GGUFValue:
    """The GGUF type of a python value (see write_gguf for the rules)."""
    if isinstance(v, GGUFValue):
        return v
    if isinstance(v, (bool, np.bool_)):
        return GGUFValue(GGUFValueType.BOOL, bool(v))
    if isinstance(v, (int, np.integer)):
        v = int(v)
        if 0 <= v < 2**32:
            return GGUFValue(GGUFValueType.UINT32, v)
        if -(2**31) <= v < 0:
            return GGUFValue(GGUFValueType.INT32, v)
        if -(2**63) <= v < 2**63:
            return GGUFValue(GGUFValueType.INT64, v)
        return GGUFValue(GGUFValueType.UINT64, v)
    if isinstance(v, (float, np.floating)):
        return GGUFValue(GGUFValueType.FLOAT32, float(v))
    if isinstance(v, str):
        return GGUFValue(GGUFValueType.STRING, v)
    if isinstance(v, np.ndarray):
        if v.ndim != 1:
            raise InvalidArgumentError(f"metadata {key!r}: arrays must be 1-D, got {v.shape}")
        if v.dtype == np.bool_:
            return GGUFValue(GGUFValueType.ARRAY, v, GGUFValueType.BOOL)
        if np.issubdtype(v.dtype, np.floating):
            return GGUFValue(GGUFValueType.ARRAY, v, GGUFValueType.FLOAT32)
        if np.issubdtype(v.dtype, np.integer):
            return GGUFValue(GGUFValueType.ARRAY, v, GGUFValueType.INT32)
        raise InvalidArgumentError(f"metadata {key!r}: no GGUF type for numpy {v.dtype}")
    if isinstance(v, (list, tuple)):
        if not v:
            raise InvalidArgumentError(
                f"metadata {key!r}: an empty list has no element type; pass "
                "GGUFValue(GGUFValueType.ARRAY, [], item_type)")
        if all(isinstance(x, str) for x in v):
            return GGUFValue(GGUFValueType.ARRAY, list(v), GGUFValueType.STRING)
        if all(isinstance(x, (bool, np.bool_)) for x in v):
            return GGUFValue(GGUFValueType.ARRAY, list(v), GGUFValueType.BOOL)
        if all(isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))
               for x in v):
            return GGUFValue(GGUFValueType.ARRAY, list(v), GGUFValueType.INT32)
        if all(isinstance(x, (int, float, np.integer, np.floating))
               and not isinstance(x, (bool, np.bool_)) for x in v):
            return GGUFValue(GGUFValueType.ARRAY, list(v), GGUFValueType.FLOAT32)
        raise InvalidArgumentError(f"metadata {key!r}: a list must hold only str, int, float "
                                   "or bool values")
    raise InvalidArgumentError(f"metadata {key!r}: no GGUF type for {type(v).__name__}")


def _pack_string(key: str, s: Any) -> bytes:
    if not isinstance(s, str):
        raise InvalidArgumentError(f"metadata {key!r}: STRING needs a str, got {s!r}")
    try:
        b = s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(f"metadata {key!r}: string is not encodable as UTF-8 "
                                   f"({exc.reason})") from None
    return struct.pack("<Q", len(b)) + b


def _pack_value(key: str, gv: GGUFValue, out: list[bytes], depth: int = 0) -> None:
    """Append the encoding of gv's payload (not its type id) to out."""
    t = GGUFValueType(gv.type)
    if t == GGUFValueType.STRING:
        out.append(_pack_string(key, gv.value))
    elif t == GGUFValueType.BOOL:
        if not isinstance(gv.value, (bool, np.bool_)):
            raise InvalidArgumentError(f"metadata {key!r}: BOOL needs a bool, got {gv.value!r}")
        out.append(b"\x01" if gv.value else b"\x00")
    elif t in _INT_RANGE:
        out.append(_VALUE_STRUCT[t].pack(_check_int(key, t, gv.value)))
    elif t in _FLOAT_TYPES:
        if isinstance(gv.value, (bool, np.bool_)) or not isinstance(
                gv.value, (int, float, np.integer, np.floating)):
            raise InvalidArgumentError(f"metadata {key!r}: {t.name} needs a number")
        out.append(_VALUE_STRUCT[t].pack(float(gv.value)))
    elif t == GGUFValueType.ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise InvalidArgumentError(f"metadata {key!r}: arrays nest too deep")
        if gv.item_type is None:
            raise InvalidArgumentError(f"metadata {key!r}: ARRAY needs an item_type")
        it = GGUFValueType(gv.item_type)
        items = gv.value
        out.append(struct.pack("<IQ", int(it), len(items)))
        if it in _VALUE_DTYPE:
            out.append(_pack_numeric_array(key, it, items))
        elif it == GGUFValueType.STRING:
            out.extend(_pack_string(key, s) for s in items)
        else:
            for x in items:
                if not isinstance(x, GGUFValue) or x.type != GGUFValueType.ARRAY:
                    raise InvalidArgumentError(
                        f"metadata {key!r}: items of an array of arrays must be GGUFValue(ARRAY)")
                _pack_value(key, x, out, depth + 1)
    else:  # pragma: no cover - GGUFValueType is closed
        raise InvalidArgumentError(f"metadata {key!r}: unknown type {t}")


def _pack_numeric_array(key: str, it: GGUFValueType, items: Any) -> bytes:
    dt = np.dtype(_VALUE_DTYPE[it])
    src = np.asarray(items)
    if src.ndim != 1:
        raise InvalidArgumentError(f"metadata {key!r}: arrays must be 1-D")
    if it == GGUFValueType.BOOL:
        if src.size and src.dtype != np.bool_:
            raise InvalidArgumentError(f"metadata {key!r}: BOOL arrays need bool values")
        return src.astype(dt).tobytes()
    if it in _INT_RANGE:
        if src.size and not (np.issubdtype(src.dtype, np.integer) and src.dtype != np.bool_):
            raise InvalidArgumentError(f"metadata {key!r}: {it.name} arrays need int values")
        lo, hi = _INT_RANGE[it]
        if src.size and (int(src.min()) < lo or int(src.max()) > hi):
            raise InvalidArgumentError(f"metadata {key!r}: a value does not fit {it.name}")
        return src.astype(dt).tobytes()
    numeric = np.issubdtype(src.dtype, np.floating) or np.issubdtype(src.dtype, np.integer)
    if src.size and (not numeric or src.dtype == np.bool_):
        raise InvalidArgumentError(f"metadata {key!r}: {it.name} arrays need numbers")
    return src.astype(dt).tobytes()


def _numpy_shape_of(src: TensorSource) -> tuple[int, ...]:
    shape = src.shape[::-1] if isinstance(src, RawTensor) else src.shape  # RawTensor: GGUF order
    return tuple(int(d) for d in shape)


def write_gguf(path: str | os.PathLike[str], metadata: Mapping[str, Any],
               tensors: Iterable[tuple[str, TensorSource, int]], *,
               alignment: int = DEFAULT_ALIGNMENT,
               progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write a GGUF v3 file atomically (temporary file, fsync, rename, fsync of the folder).

    Metadata types are inferred: bool -> BOOL; int -> UINT32 if 0 <= v < 2**32, INT32 if
    negative and fits, else INT64; float -> FLOAT32; str -> STRING; list[str] ->
    ARRAY[STRING]; list[float] / float numpy arrays -> ARRAY[FLOAT32]; list[int] / int numpy
    arrays -> ARRAY[INT32]; bool lists/arrays -> ARRAY[BOOL]. A GGUFValue forces a type.

    Args:
        path: the output file.
        metadata: key -> value, written in this order.
        tensors: (name, data, ggml_type) triples, written in this order. data is a numpy
            float array [..., ne0] (numpy order; encoded to ggml_type, Q8_0/Q4_0 through
            edgellm.formats.quant), a LazyTensor (the same, loaded when written), or a
            RawTensor of already-encoded bytes with its GGUF-order shape.
        alignment: tensor data alignment (a power of two); written as general.alignment when
            it is not the default 32.
        progress: called as progress(i, n, name) after each tensor is written.

    Returns:
        The path written.

    Raises:
        InvalidArgumentError: a value that does not fit its type, a bad tensor name or
            shape, byte data whose length does not match its shape.
        UnsupportedError: a ggml type id that ggml does not define, or an array given for a
            type edgellm cannot encode.
    """
    out_path = Path(path)
    if alignment <= 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
        raise InvalidArgumentError(f"alignment {alignment} is not a power of two")
    meta: dict[str, GGUFValue] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or len(key.encode("utf-8")) > MAX_KEY_BYTES:
            raise InvalidArgumentError(f"metadata key {key!r} must be a non-empty str")
        meta[key] = _infer(key, value)
    if alignment != DEFAULT_ALIGNMENT:
        meta["general.alignment"] = GGUFValue(GGUFValueType.UINT32, alignment)
    elif "general.alignment" in meta:
        ga = meta["general.alignment"]
        if ga.type != GGUFValueType.UINT32 or ga.value != alignment:
            raise InvalidArgumentError(
                f"general.alignment {ga.value!r} disagrees with alignment={alignment}")

    # First pass: shapes, types and sizes, so the header (with offsets) precedes the data.
    plan: list[tuple[str, TensorSource, int, tuple[int, ...], int, int]] = []
    seen: set[str] = set()
    rel = 0
    for entry in tensors:
        if len(entry) != 3:
            raise InvalidArgumentError("each tensor is a (name, data, ggml_type) triple")
        name, src, type_id = entry
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"tensor name {name!r} must be a non-empty str")
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise InvalidArgumentError(
                f"tensor name {name!r} is longer than {MAX_NAME_BYTES} bytes (ggml's limit)")
        if name in seen:
            raise InvalidArgumentError(f"duplicate tensor name {name!r}")
        seen.add(name)
        type_id = int(type_id)
        if type_id not in GGML_BLOCK:
            raise UnsupportedError(f"tensor {name!r}: {ggml_type_name(type_id)}")
        if not isinstance(src, (np.ndarray, RawTensor, LazyTensor)):
            raise InvalidArgumentError(
                f"tensor {name!r}: data must be a numpy array, LazyTensor or RawTensor, "
                f"not {type(src).__name__}")
        if not isinstance(src, RawTensor) and type_id not in RUNNABLE_TYPES:
            raise UnsupportedError(
                f"tensor {name!r}: edgellm cannot encode {ggml_type_name(type_id)}; pass "
                "RawTensor bytes")
        gshape = _numpy_shape_of(src)[::-1]
        if not 1 <= len(gshape) <= MAX_DIMS:
            raise InvalidArgumentError(f"tensor {name!r} has {len(gshape)} dims (1..{MAX_DIMS})")
        try:
            nbytes = ggml_nbytes(type_id, gshape)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"tensor {name!r}: {exc}") from None
        if isinstance(src, RawTensor):
            got = memoryview(src.data).nbytes
            if got != nbytes:
                raise InvalidArgumentError(
                    f"tensor {name!r}: {got} bytes given, shape {gshape} of "
                    f"{ggml_type_name(type_id)} needs {nbytes}")
        plan.append((name, src, type_id, gshape, nbytes, rel))
        rel += -(-nbytes // alignment) * alignment

    header: list[bytes] = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(plan), len(meta))]
    for key, gv in meta.items():
        header.append(_pack_string(key, key))
        header.append(struct.pack("<I", int(gv.type)))
        _pack_value(key, gv, header)
    for name, _, type_id, gshape, _, off in plan:
        header.append(_pack_string(name, name))
        header.append(struct.pack(f"<I{len(gshape)}QIQ", len(gshape), *gshape, type_id, off))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a model file is meant to be shared
        with os.fdopen(fd, "wb") as f:
            pos = 0
            for b in header:
                f.write(b)
                pos += len(b)
            f.write(b"\0" * (-pos % alignment))
            for i, (name, src, type_id, gshape, nbytes, _) in enumerate(plan):
                written = 0
                if isinstance(src, RawTensor):
                    f.write(src.data)
                    written = nbytes
                else:
                    arr = src.load() if isinstance(src, LazyTensor) else src
                    if not isinstance(arr, np.ndarray) or tuple(arr.shape) != gshape[::-1]:
                        raise InvalidArgumentError(
                            f"tensor {name!r}: loaded data has shape "
                            f"{getattr(arr, 'shape', None)}, expected {gshape[::-1]}")
                    try:
                        for chunk in quant.encode_rows(arr, type_id):
                            f.write(chunk.data)
                            written += chunk.nbytes
                    except InvalidArgumentError as exc:
                        raise InvalidArgumentError(f"tensor {name!r}: {exc}") from None
                if written != nbytes:  # an internal invariant: the encoder's size is fixed
                    raise InvalidArgumentError(
                        f"tensor {name!r}: encoded {written} bytes, expected {nbytes}")
                f.write(b"\0" * (-nbytes % alignment))
                if progress is not None:
                    progress(i + 1, len(plan), name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(out_path.parent)
    return out_path


def _fsync_dir(d: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders can't be opened."""
    try:
        dfd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
