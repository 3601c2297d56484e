# SPDX-License-Identifier: MIT
"""edgellm's GGUF reader/writer and quantiser front-end, cross-checked against llama.cpp's gguf package."""

from __future__ import annotations

import gc
import os
import struct
from pathlib import Path
from typing import Any, Callable

import gguf as ggufpkg
import numpy as np
import pytest
from gguf.quants import quantize as gq_quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellm import _native
from edgellm.errors import (
    EdgeLLMError,
    InvalidArgumentError,
    ModelFormatError,
    StateError,
    UnsupportedError,
)
from edgellm.formats import quant
from edgellm.formats.gguf import (
    GGML_BLOCK,
    RUNNABLE_TYPES,
    GGMLType,
    GGUFValue,
    GGUFValueType,
    LazyTensor,
    RawTensor,
    check_runnable,
    read_gguf,
    write_gguf,
)

VT = ggufpkg.GGUFValueType
QT = ggufpkg.GGMLQuantizationType


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------
# Our writer -> gguf.GGUFReader


def _reader_value(field: Any) -> Any:
    """A GGUFReader field's value as python/numpy (strings decoded, arrays as lists)."""
    return field.contents()


def test_our_files_load_in_gguf_reader_with_identical_metadata_and_bytes(tmp_path: Path) -> None:
    rng = _rng(1)
    w32 = rng.standard_normal((3, 64)).astype(np.float32)  # [rows, ne0]
    w16 = rng.standard_normal((2, 3, 32)).astype(np.float32)
    wq8 = rng.standard_normal((4, 96)).astype(np.float32)
    wq4 = rng.standard_normal((5, 64)).astype(np.float32)
    q4k = rng.integers(0, 256, size=2 * 144, dtype=np.uint8)  # 2 Q4_K blocks, not run by us
    meta: dict[str, Any] = {
        "general.architecture": "llama",
        "t.u32": 7, "t.i32": -5, "t.i64": -(2**40), "t.big": 2**40, "t.f32": 0.25,
        "t.bool": True, "t.str": "héllo ✓", "t.strs": ["a", "", "ü"],
        "t.floats": [1.5, -2.0], "t.ints": [1, -2, 3], "t.npf": np.arange(4, dtype=np.float64),
        "t.npi": np.arange(5, dtype=np.int64), "t.bools": [True, False],
        "t.u64": GGUFValue(GGUFValueType.UINT64, 2**63 + 1),
        "t.f64": GGUFValue(GGUFValueType.FLOAT64, 1 / 3),
        "t.u8s": GGUFValue(GGUFValueType.ARRAY, [0, 255], GGUFValueType.UINT8),
        "t.empty": GGUFValue(GGUFValueType.ARRAY, [], GGUFValueType.STRING),
    }
    tensors = [
        ("w32", w32, GGMLType.F32),
        ("w16", w16, GGMLType.F16),
        ("wq8", wq8, GGMLType.Q8_0),
        ("wq4", LazyTensor(wq4.shape, lambda: wq4), GGMLType.Q4_0),
        ("q4k", RawTensor(q4k, (512,)), GGMLType.Q4_K),
    ]
    path = write_gguf(tmp_path / "m.gguf", meta, tensors)
    r = ggufpkg.GGUFReader(path)
    want_types = {
        "general.architecture": [VT.STRING], "t.u32": [VT.UINT32], "t.i32": [VT.INT32],
        "t.i64": [VT.INT64], "t.big": [VT.INT64], "t.f32": [VT.FLOAT32], "t.bool": [VT.BOOL],
        "t.str": [VT.STRING], "t.strs": [VT.ARRAY, VT.STRING],
        "t.floats": [VT.ARRAY, VT.FLOAT32], "t.ints": [VT.ARRAY, VT.INT32],
        "t.npf": [VT.ARRAY, VT.FLOAT32], "t.npi": [VT.ARRAY, VT.INT32],
        "t.bools": [VT.ARRAY, VT.BOOL], "t.u64": [VT.UINT64], "t.f64": [VT.FLOAT64],
        "t.u8s": [VT.ARRAY, VT.UINT8],
        "t.empty": [VT.ARRAY],  # GGUFReader lists no item type for an empty array
    }
    got_types = {k: list(f.types) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert got_types == want_types
    vals = {k: _reader_value(f) for k, f in r.fields.items()}
    assert vals["t.str"] == "héllo ✓" and vals["t.strs"] == ["a", "", "ü"]
    assert vals["t.i64"] == -(2**40) and vals["t.u64"] == 2**63 + 1 and vals["t.bool"] is True
    assert vals["t.f32"] == 0.25 and vals["t.f64"] == pytest.approx(1 / 3, abs=0)
    assert list(vals["t.npi"]) == [0, 1, 2, 3, 4] and list(vals["t.u8s"]) == [0, 255]
    assert list(vals["t.bools"]) == [True, False] and vals["t.empty"] == []
    empty = r.fields["t.empty"]
    assert int(empty.parts[3][0]) == VT.STRING and int(empty.parts[4][0]) == 0  # type, count

    by_name = {t.name: t for t in r.tensors}
    assert list(by_name) == ["w32", "w16", "wq8", "wq4", "q4k"]
    assert by_name["w16"].tensor_type == QT.F16 and list(by_name["w16"].shape) == [32, 3, 2]
    np.testing.assert_array_equal(by_name["w32"].data, w32)
    np.testing.assert_array_equal(by_name["w16"].data, w16.astype(np.float16))
    for name, src, qt in (("wq8", wq8, QT.Q8_0), ("wq4", wq4, QT.Q4_0)):
        assert by_name[name].tensor_type == qt
        assert bytes(by_name[name].data) == gq_quantize(src, qt).tobytes()
    assert by_name["q4k"].tensor_type == QT.Q4_K and bytes(by_name["q4k"].data) == q4k.tobytes()
    # Data offsets honour the default 32-byte alignment.
    assert all(t.data_offset % 32 == 0 for t in r.tensors)


def test_custom_alignment_is_written_and_honoured(tmp_path: Path) -> None:
    a = np.ones((2, 32), dtype=np.float32)
    path = write_gguf(tmp_path / "a.gguf", {"general.architecture": "llama"},
                      [("x", a[:1, :8].copy(), GGMLType.F32), ("y", a, GGMLType.F32)],
                      alignment=256)
    r = ggufpkg.GGUFReader(path)
    assert r.alignment == 256 and list(r.fields["general.alignment"].types) == [VT.UINT32]
    with read_gguf(path) as f:
        assert f.alignment == 256
        assert all(t.offset % 256 == 0 for t in f.tensors.values())
        np.testing.assert_array_equal(f.tensor_array("y"), a)


# --------------------------------------------------------------------------------------
# gguf.GGUFWriter -> our reader


def _writer_file(path: Path, *, alignment: int | None = None) -> dict[str, Any]:
    """A GGUF written by llama.cpp's gguf package; returns what went in."""
    rng = _rng(2)
    w = ggufpkg.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_string("general.name", "tiny ✓")
    w.add_array("tokenizer.ggml.tokens", ["<unk>", "a", "bc", "▁d"])
    w.add_key_value("tokenizer.ggml.scores", [0.0, -1.0, -2.5, 3.0], VT.ARRAY, VT.FLOAT32)
    w.add_key_value("tokenizer.ggml.token_type", [2, 1, 1, 1], VT.ARRAY, VT.INT32)
    w.add_key_value("t.u16", 65535, VT.UINT16)
    w.add_key_value("t.i8", -7, VT.INT8)
    w.add_key_value("t.u64", 2**64 - 1, VT.UINT64)
    w.add_key_value("t.f64", 0.1, VT.FLOAT64)
    w.add_key_value("t.i16s", [-3, 4], VT.ARRAY, VT.INT16)
    tensors = {
        "f32": rng.standard_normal((4, 32)).astype(np.float32),
        "f16": rng.standard_normal((3, 2, 64)).astype(np.float16),
    }
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    raw = {}
    for name, qt, shape in (("q8", QT.Q8_0, (6, 64)), ("q4", QT.Q4_0, (2, 96))):
        x = rng.standard_normal(shape).astype(np.float32)
        q = gq_quantize(x, qt)
        w.add_tensor(name, q, raw_dtype=qt)
        raw[name] = (q, qt, shape)
    q6k = rng.integers(0, 256, size=(2, 210), dtype=np.uint8)  # 2 rows of one Q6_K block
    w.add_tensor("q6k", q6k, raw_dtype=QT.Q6_K)  # byte shape [2, 210] -> [2, 256]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tensors": tensors, "raw": raw, "q6k": q6k}


@pytest.mark.parametrize("alignment", [None, 64])
def test_gguf_writer_files_load_in_our_reader_identically(tmp_path: Path,
                                                          alignment: int | None) -> None:
    path = tmp_path / "w.gguf"
    src = _writer_file(path, alignment=alignment)
    ref = ggufpkg.GGUFReader(path)
    with read_gguf(path) as f:
        assert f.version == 3 and f.architecture == "llama"
        assert f.alignment == (alignment or 32)
        for key, field in ref.fields.items():
            if key.startswith("GGUF."):
                continue
            ours = f.fields[key]
            assert int(ours.type) == int(field.types[0]), key
            if field.types[0] == VT.ARRAY:
                assert int(ours.item_type) == int(field.types[1]), key
                assert list(f.metadata[key]) == list(field.contents()), key
            else:
                assert f.metadata[key] == field.contents(), key
        assert isinstance(f.metadata["tokenizer.ggml.scores"], np.ndarray)
        assert f.metadata["tokenizer.ggml.scores"].dtype == np.float32
        assert f.metadata["t.u64"] == 2**64 - 1 and f.metadata["t.i8"] == -7
        assert list(f.tensors) == [t.name for t in ref.tensors]
        for t in ref.tensors:
            info = f.tensors[t.name]
            assert info.type == int(t.tensor_type) and info.shape == tuple(int(d) for d in t.shape)
            assert info.offset == t.data_offset and info.nbytes == t.n_bytes
            assert info.n_elements == t.n_elements
            assert bytes(f.tensor_bytes(t.name)) == bytes(t.data)
        for name, arr in src["tensors"].items():
            view = f.tensor_array(name)
            assert view.shape == arr.shape and view.dtype == arr.dtype
            np.testing.assert_array_equal(view, arr)
        for name, (q, qt, shape) in src["raw"].items():
            view = f.tensor_array(name)
            assert view.dtype == np.uint8 and view.shape == (shape[0], q.shape[1])
            np.testing.assert_array_equal(view, q)
            np.testing.assert_array_equal(
                quant.dequantize(f.tensor_bytes(name), int(qt), shape),
                ggufpkg.quants.dequantize(q, qt))
        assert f.tensors["q6k"].type_name == "Q6_K" and f.tensors["q6k"].shape == (256, 2)
        np.testing.assert_array_equal(f.tensor_array("q6k"), src["q6k"])
        with pytest.raises(UnsupportedError, match="Q6_K"):
            check_runnable(f.tensors["q6k"])
        check_runnable(f.tensors["q8"])


def test_v2_files_read(tmp_path: Path) -> None:
    path = tmp_path / "v2.gguf"
    _writer_file(path)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 and v3 share the layout (v3 added big-endian)
    path.write_bytes(bytes(data))
    with read_gguf(path) as f:
        assert f.version == 2 and f.tensors["q6k"].type_name == "Q6_K"


def test_tensor_views_are_zero_copy_and_read_only(tmp_path: Path) -> None:
    path = tmp_path / "w.gguf"
    _writer_file(path)
    f = read_gguf(path)
    arr = f.tensor_array("f32")
    raw = f.tensor_bytes("f32")
    assert raw.readonly and not arr.flags.writeable and not arr.flags.owndata
    with pytest.raises((ValueError, TypeError)):
        arr[0, 0] = 1.0
    # The runtime hands these to C: cffi must accept them, pointing into the mapping.
    ptr = _native.ffi.from_buffer(raw)
    assert _native.ffi.buffer(ptr, 8)[:] == bytes(raw[:8])
    before = arr.copy()
    f.close()
    f.close()  # idempotent
    assert f.closed
    with pytest.raises(StateError):
        f.tensor_bytes("f32")
    # Views taken before close stay valid: the mapping lives until they are released.
    np.testing.assert_array_equal(arr, before)
    assert bytes(raw) == before.tobytes()
    with pytest.raises(InvalidArgumentError, match="nope"):
        read_gguf(path).tensor_bytes("nope")
    del arr, raw, ptr
    gc.collect()


def test_ggml_type_table_matches_the_gguf_package() -> None:
    ours = {int(t): v for t, v in GGML_BLOCK.items()}
    theirs = {int(t): tuple(v) for t, v in ggufpkg.constants.GGML_QUANT_SIZES.items()}
    assert ours == theirs
    for t in GGMLType:
        assert t.name == QT(int(t)).name
    lib = _native.lib  # the C enum mirrors ggml's ids for the types edgellm runs
    assert (quant.F32, quant.F16, quant.Q8_0, quant.Q4_0) == (
        lib.EDGELLM_TYPE_F32, lib.EDGELLM_TYPE_F16, lib.EDGELLM_TYPE_Q8_0, lib.EDGELLM_TYPE_Q4_0)
    assert set(quant.TYPES.values()) == set(RUNNABLE_TYPES)
    for t in RUNNABLE_TYPES:  # and the C core agrees on their block layouts
        block, nbytes = GGML_BLOCK[t]
        assert _native.lib.edgellm_type_block_size(int(t)) == block
        assert _native.lib.edgellm_type_block_bytes(int(t)) == nbytes


# --------------------------------------------------------------------------------------
# Hand-built (hostile) files


def _s(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _ti(name: str | bytes, dims: tuple[int, ...], type_id: int, offset: int) -> bytes:
    return (_s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", type_id, offset))


ARCH_KV = _kv("general.architecture", 8, _s("llama"))
TI_A = _ti("a", (8, 2), 0, 0)  # F32 [2, 8]: 64 bytes at 0
TI_B = _ti("b", (32,), 8, 64)  # Q8_0 one block: 34 bytes at 64
DATA = bytes(range(64)) + bytes(34) + bytes(30)


def _file(kvs: list[bytes] | None = None, tis: list[bytes] | None = None, data: bytes = DATA,
          *, version: int = 3, n_tensors: int | None = None, n_kv: int | None = None,
          magic: bytes = b"GGUF", alignment: int = 32) -> bytes:
    kvs = [ARCH_KV] if kvs is None else kvs
    tis = [TI_A, TI_B] if tis is None else tis
    head = (magic + struct.pack("<IQQ", version, len(tis) if n_tensors is None else n_tensors,
                                len(kvs) if n_kv is None else n_kv)
            + b"".join(kvs) + b"".join(tis))
    return head + bytes(-len(head) % alignment) + data


def _write(tmp_path: Path, data: bytes, name: str = "f.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_hand_built_baseline_is_valid_for_both_readers(tmp_path: Path) -> None:
    p = _write(tmp_path, _file())
    ref = ggufpkg.GGUFReader(p)
    with read_gguf(p) as f:
        assert [t.name for t in ref.tensors] == list(f.tensors) == ["a", "b"]
        assert f.tensors["a"].offset == ref.tensors[0].data_offset
        assert f.tensors["b"].offset == ref.tensors[1].data_offset
        np.testing.assert_array_equal(f.tensor_array("a"), ref.tensors[0].data)
        assert f.tensors["b"].nbytes == 34 and f.tensor_array("b").shape == (1, 34)


U64_MAX = 2**64 - 1
BAD_FILES: dict[str, tuple[Callable[[], bytes], type[Exception], str]] = {
    "wrong magic": (lambda: _file(magic=b"GGUG"), ModelFormatError, "not a GGUF file"),
    "version 1": (lambda: _file(version=1), ModelFormatError, "version 1.*obsolete"),
    "version 4": (lambda: _file(version=4), ModelFormatError, "unsupported GGUF version 4"),
    "version 0": (lambda: _file(version=0), ModelFormatError, "unsupported GGUF version 0"),
    "big-endian": (lambda: _file(version=3 << 24), UnsupportedError, "big-endian"),
    "huge tensor count": (lambda: _file(n_tensors=U64_MAX), ModelFormatError, "tensor count"),
    "tensor count past file": (lambda: _file(n_tensors=60000), ModelFormatError, "truncated"),
    "huge kv count": (lambda: _file(n_kv=2**62), ModelFormatError, "key count"),
    "kv count past file": (lambda: _file(n_kv=50000), ModelFormatError, "truncated"),
    "huge key length": (
        lambda: _file([struct.pack("<Q", U64_MAX) + b"x" * 16]), ModelFormatError,
        "more than the 65535 allowed"),
    "huge string value": (
        lambda: _file([_s("k") + struct.pack("<IQ", 8, 2**62) + b"abc"]), ModelFormatError,
        "truncated: string value of 'k'"),
    "huge array length": (
        lambda: _file([_s("k") + struct.pack("<IIQ", 9, 4, 2**60)]), ModelFormatError,
        "claims 1152921504606846976 items"),
    "array length past file": (
        lambda: _file([_s("k") + struct.pack("<IIQ", 9, 8, 10**6)]), ModelFormatError,
        "truncated"),
    "huge string in array": (
        lambda: _file([_s("k") + struct.pack("<IIQ", 9, 8, 2) + _s("ok") + struct.pack("<Q", 2**63)]),
        ModelFormatError, "item 1 of 'k'"),
    "unknown value type": (lambda: _file([_kv("k", 13, b"")]), ModelFormatError,
                           "unknown value type id 13"),
    "unknown array item type": (lambda: _file([_kv("k", 9, struct.pack("<IQ", 77, 1))]),
                                ModelFormatError, "unknown value type id 77"),
    "nested arrays too deep": (
        lambda: _file([_kv("k", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 9, 1)
                           + struct.pack("<IQ", 4, 1) + b"\0" * 4)]),
        ModelFormatError, "nests deeper"),
    "bool not 0/1": (lambda: _file([_kv("k", 7, b"\x02")]), ModelFormatError, "bool 'k' holds 2"),
    "bool array not 0/1": (lambda: _file([_kv("k", 9, struct.pack("<IQ", 7, 2) + b"\x01\x05")]),
                           ModelFormatError, "bool array 'k'"),
    "non-UTF-8 key": (lambda: _file([_kv(b"gen\xffkey", 4, b"\0" * 4)]), ModelFormatError,
                      "key 0 at offset 32 is not valid UTF-8 .*at byte 3"),
    "non-UTF-8 string value": (lambda: _file([_kv("general.name", 8, _s(b"ab\xc3("))]),
                               ModelFormatError, "string value of 'general.name'.*UTF-8"),
    "non-UTF-8 string array item": (
        lambda: _file([_kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + _s("a")
                           + _s(b"\xed\xa0\x80"))]),
        ModelFormatError, "string 1 of array 'tokenizer.ggml.tokens'.*UTF-8"),
    "non-UTF-8 tensor name": (lambda: _file(tis=[_ti(b"\xfe", (8,), 0, 0)]), ModelFormatError,
                              "name of tensor 0.*UTF-8"),
    "empty key": (lambda: _file([_kv("", 4, b"\0" * 4)]), ModelFormatError, "key 0 is empty"),
    "duplicate key": (lambda: _file([ARCH_KV, ARCH_KV]), ModelFormatError,
                      "duplicate metadata key 'general.architecture'"),
    "duplicate tensor names": (lambda: _file(tis=[TI_A, _ti("a", (8,), 0, 64)]),
                               ModelFormatError, "duplicate tensor name 'a'"),
    "tensor name too long": (lambda: _file(tis=[_ti("n" * 64, (8,), 0, 0)]), ModelFormatError,
                             "more than the 63 allowed"),
    "n_dims 5": (lambda: _file(tis=[_ti("a", (1, 1, 1, 1, 8), 0, 0)]), ModelFormatError,
                 "has 5 dims"),
    "n_dims 0": (lambda: _file(tis=[_ti("a", (), 0, 0)]), ModelFormatError, "has 0 dims"),
    "zero dim": (lambda: _file(tis=[_ti("a", (8, 0), 0, 0)]), ModelFormatError, "zero dim"),
    "huge dims": (lambda: _file(tis=[_ti("a", (2**40, 2**40), 0, 0)]), ModelFormatError,
                  "too large"),
    "huge dim past file": (lambda: _file(tis=[_ti("a", (2**33,), 0, 0)]), ModelFormatError,
                           "runs past the end"),
    "unknown type id": (lambda: _file(tis=[_ti("a", (8,), 99, 0)]), UnsupportedError,
                        "tensor 'a' has unknown ggml type 99"),
    "removed type id": (lambda: _file(tis=[_ti("a", (32,), 4, 0)]), UnsupportedError,
                        "Q4_2 \\(removed from ggml\\)"),
    "row not a block multiple": (lambda: _file(tis=[_ti("a", (48,), 8, 0)]), ModelFormatError,
                                 "row length 48, not a multiple of the block size 32"),
    "misaligned offset": (lambda: _file(tis=[_ti("a", (8,), 0, 4)]), ModelFormatError,
                          "offset 4 is not a multiple of the alignment 32"),
    "tensor past end": (lambda: _file(tis=[TI_A, _ti("b", (32,), 8, 2**20)]),
                        ModelFormatError, "tensor 'b' data .* runs past the end"),
    "tensor offset overflows": (lambda: _file(tis=[_ti("a", (8,), 0, 2**64 - 32)]),
                                ModelFormatError, "runs past the end"),
    "overlapping tensors": (lambda: _file(tis=[TI_A, _ti("b", (32,), 8, 32)]),
                            ModelFormatError, "overlap"),
    "alignment not a power of two": (
        lambda: _file([ARCH_KV, _kv("general.alignment", 4, struct.pack("<I", 48))]),
        ModelFormatError, "alignment 48 is not a power of two"),
    "alignment zero": (
        lambda: _file([ARCH_KV, _kv("general.alignment", 4, struct.pack("<I", 0))]),
        ModelFormatError, "alignment 0"),
    "alignment wrong type": (
        lambda: _file([ARCH_KV, _kv("general.alignment", 10, struct.pack("<Q", 32))]),
        ModelFormatError, "must be UINT32"),
    "data section missing": (lambda: _file(data=b""), ModelFormatError, "runs past the end"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_raises_the_specific_error(tmp_path: Path, case: str) -> None:
    make, exc, pattern = BAD_FILES[case]
    p = _write(tmp_path, make())
    with pytest.raises(exc, match=pattern):
        read_gguf(p)


def test_truncation_at_every_header_byte_and_inside_the_data(tmp_path: Path) -> None:
    path = tmp_path / "w.gguf"
    _writer_file(path)
    full = path.read_bytes()
    with read_gguf(path) as f:
        data_start = f.data_offset
        ends = sorted(t.offset + t.nbytes for t in f.tensors.values())
    cuts = list(range(data_start + 1)) + [data_start + 5, ends[0] - 1, ends[-1] - 1]
    cut_path = tmp_path / "cut.gguf"
    for n in cuts:
        cut_path.write_bytes(full[:n])
        with pytest.raises(ModelFormatError) as info:
            read_gguf(cut_path)
        msg = str(info.value)
        assert ("truncated" in msg or "empty" in msg or "past the end" in msg
                or "not a GGUF" in msg), (n, msg)


def test_files_that_are_not_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="no such file"):
        read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(InvalidArgumentError, match="directory"):
        read_gguf(tmp_path)
    with pytest.raises(ModelFormatError, match="empty"):
        read_gguf(_write(tmp_path, b""))
    os.mkfifo(tmp_path / "fifo")  # opening it would block: refused before any open
    with pytest.raises(InvalidArgumentError, match="not a regular file"):
        read_gguf(tmp_path / "fifo")


def test_a_file_without_tensors_needs_no_data_section(tmp_path: Path) -> None:
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + ARCH_KV  # no padding, no data
    with read_gguf(_write(tmp_path, head)) as f:
        assert f.tensors == {} and f.architecture == "llama"
    no_arch = b"GGUF" + struct.pack("<IQQ", 3, 0, 0)
    with read_gguf(_write(tmp_path, no_arch, "n.gguf")) as f, \
            pytest.raises(ModelFormatError, match="general.architecture"):
        _ = f.architecture


# --------------------------------------------------------------------------------------
# Fuzzing: mutated files raise only EdgeLLMError subclasses (or load)


def _exercise(path: Path) -> None:
    """Read a possibly hostile file and touch everything it claims to hold."""
    try:
        f = read_gguf(path)
    except EdgeLLMError:
        return
    with f:
        _ = dict(f.metadata), repr(f)
        for name, info in f.tensors.items():
            raw = f.tensor_bytes(name)
            assert len(raw) == info.nbytes
            arr = f.tensor_array(name)
            assert arr.nbytes == info.nbytes
            _ = bytes(raw[-1:])


@pytest.fixture(scope="module")
def fuzz_seed(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    p = tmp_path_factory.mktemp("fuzz") / "seed.gguf"
    _writer_file(p)
    return p.read_bytes()


def test_every_header_byte_set_to_extremes_is_handled(tmp_path: Path, fuzz_seed: bytes) -> None:
    with read_gguf(_write(tmp_path, fuzz_seed, "seed.gguf")) as f:
        data_start = f.data_offset
    p = tmp_path / "m.gguf"
    for pos in range(data_start):
        for value in (0x00, 0xFF, 0x80):
            if fuzz_seed[pos] == value:
                continue
            mutated = bytearray(fuzz_seed)
            mutated[pos] = value
            p.write_bytes(bytes(mutated))
            _exercise(p)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_mutations_raise_only_edgellm_errors(tmp_path: Path, fuzz_seed: bytes,
                                                   data: st.DataObject) -> None:
    mutated = bytearray(fuzz_seed)
    n = len(mutated)
    for _ in range(data.draw(st.integers(1, 8), label="n_mutations")):
        # Favour the header, where the structure lives.
        pos = data.draw(st.one_of(st.integers(0, min(n, 700) - 1), st.integers(0, n - 1)))
        mutated[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans(), label="truncate"):
        del mutated[data.draw(st.integers(0, n)):]
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(bytes(mutated))
    _exercise(p)


# --------------------------------------------------------------------------------------
# Writer argument checking and atomicity


def _m() -> dict[str, Any]:
    return {"general.architecture": "llama"}


WRITER_ERRORS: dict[str, tuple[dict[str, Any], list[Any], type[Exception], str]] = {
    "uint32 out of range": ({"k": GGUFValue(GGUFValueType.UINT32, -1)}, [], InvalidArgumentError,
                            "does not fit UINT32"),
    "int8 array out of range": ({"k": GGUFValue(GGUFValueType.ARRAY, [1, 300],
                                                GGUFValueType.INT8)}, [],
                                InvalidArgumentError, "does not fit INT8"),
    "empty list": ({"k": []}, [], InvalidArgumentError, "empty list"),
    "mixed list": ({"k": ["a", 1]}, [], InvalidArgumentError, "only str"),
    "unsupported value": ({"k": object()}, [], InvalidArgumentError, "no GGUF type"),
    "lone surrogate": ({"k": "\udcff"}, [], InvalidArgumentError, "UTF-8"),
    "bool given for u32": ({"k": GGUFValue(GGUFValueType.UINT32, True)}, [],
                           InvalidArgumentError, "needs an int"),
    "2-D metadata array": ({"k": np.zeros((2, 2))}, [], InvalidArgumentError, "1-D"),
    "row not a block multiple": (_m(), [("w", np.zeros((2, 48), np.float32), GGMLType.Q8_0)],
                                 InvalidArgumentError, "row length 48"),
    "duplicate tensor": (_m(), [("w", np.zeros(32, np.float32), 0),
                                ("w", np.zeros(32, np.float32), 0)],
                         InvalidArgumentError, "duplicate tensor name 'w'"),
    "name too long": (_m(), [("w" * 64, np.zeros(32, np.float32), 0)], InvalidArgumentError,
                      "longer than 63"),
    "5 dims": (_m(), [("w", np.zeros((1, 1, 1, 1, 32), np.float32), 0)], InvalidArgumentError,
               "5 dims"),
    "raw size mismatch": (_m(), [("w", RawTensor(b"\0" * 33, (32,)), GGMLType.Q8_0)],
                          InvalidArgumentError, "33 bytes given"),
    "unknown type": (_m(), [("w", np.zeros(32, np.float32), 99)], UnsupportedError,
                     "unknown ggml type 99"),
    "array for a type we cannot encode": (_m(), [("w", np.zeros(256, np.float32),
                                                  GGMLType.Q4_K)], UnsupportedError, "Q4_K"),
    "not an array": (_m(), [("w", [1.0] * 32, 0)], InvalidArgumentError, "numpy array"),
    "string data": (_m(), [("w", np.array(["a"] * 32), 0)], InvalidArgumentError,
                    "cannot encode"),
    "non-finite quantised": (_m(), [("w", np.full(32, np.nan, np.float32), GGMLType.Q8_0)],
                             InvalidArgumentError, "not finite"),
}


@pytest.mark.parametrize("case", sorted(WRITER_ERRORS))
def test_writer_rejects_bad_arguments_and_leaves_nothing(tmp_path: Path, case: str) -> None:
    meta, tensors, exc, pattern = WRITER_ERRORS[case]
    out = tmp_path / "o.gguf"
    with pytest.raises(exc, match=pattern):
        write_gguf(out, meta, tensors)
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    write_gguf(out, _m(), [("w", np.ones(32, np.float32), 0)])
    assert out.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    before = out.read_bytes()

    def boom() -> np.ndarray:
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_gguf(out, _m(), [("w", LazyTensor((32,), boom), 0)])
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["o.gguf"]
    with pytest.raises(InvalidArgumentError, match="expected \\(32,\\)"):
        write_gguf(out, _m(), [("w", LazyTensor((32,), lambda: np.ones(31, np.float32)), 0)])
    assert out.read_bytes() == before and os.listdir(tmp_path) == ["o.gguf"]


def test_progress_is_reported_per_tensor(tmp_path: Path) -> None:
    seen: list[tuple[int, int, str]] = []
    write_gguf(tmp_path / "p.gguf", _m(), [("a", np.ones(32, np.float32), 0),
                                            ("b", np.ones(32, np.float32), 1)],
               progress=lambda i, n, name: seen.append((i, n, name)))
    assert seen == [(1, 2, "a"), (2, 2, "b")]


# --------------------------------------------------------------------------------------
# quant.py: the C quantiser against gguf.quants


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 4), blocks=st.integers(1, 5), scale=st.sampled_from([0.0, 1e-3, 1.0, 300.0]),
       seed=st.integers(0, 2**31 - 1), which=st.sampled_from(["q8_0", "q4_0", "f16", "f32"]))
def test_quantize_matches_gguf_quants_bytes(rows: int, blocks: int, scale: float, seed: int,
                                            which: str) -> None:
    rng = _rng(seed)
    # "+ 0" turns -0.0 into +0.0: on an all-zero block whose first value is -0.0, gguf.quants'
    # numpy Q4_0 takes the scale's sign from that -0.0 while ggml's C reference (and ours)
    # keeps +0.0 as the max, so the f16 scale bytes differ (0x0000 vs 0x8000); values agree.
    x = (rng.standard_normal((rows, 32 * blocks)) * scale).astype(np.float32) + np.float32(0)
    if seed % 3 == 0:
        x[0, :32] = scale  # a constant block (the all-equal rounding edge)
    t = quant.TYPES[which]
    qt = QT[which.upper()]
    ours = quant.quantize(x, t)
    theirs = gq_quantize(x, qt)
    assert ours.dtype == np.uint8 and ours.shape == (rows, quant.row_bytes(t, x.shape[1]))
    assert ours.tobytes() == theirs.tobytes()
    back = quant.dequantize(ours, t, x.shape)
    np.testing.assert_array_equal(back, ggufpkg.quants.dequantize(theirs, qt).astype(np.float32))


def test_quant_argument_errors() -> None:
    assert quant.row_bytes(quant.Q8_0, 64) == 68 and quant.row_bytes(quant.Q4_0, 64) == 36
    assert quant.row_bytes(quant.F16, 5) == 10
    with pytest.raises(InvalidArgumentError, match="multiple of the block size 32"):
        quant.row_bytes(quant.Q4_0, 40)
    with pytest.raises(UnsupportedError, match="Q4_K is not a type edgellm encodes"):
        quant.quantize(np.zeros(256, np.float32), int(GGMLType.Q4_K))
    with pytest.raises(InvalidArgumentError, match="needs 68"):
        quant.dequantize(b"\0" * 67, quant.Q8_0, (64,))
    with pytest.raises(InvalidArgumentError):
        quant.quantize(np.float32(1.0), quant.F32)
    assert quant.quantize(np.zeros((0, 32), np.float32), quant.Q8_0).shape == (0, 34)
