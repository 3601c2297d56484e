# SPDX-License-Identifier: MIT
"""ggml tensor types: every type's block layout, and F32/F16/Q8_0/Q4_0 rows encoded by the C quantiser."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, UnsupportedError


class GGMLType(enum.IntEnum):
    """ggml tensor type ids, as stored in GGUF tensor infos (ggml.h enum ggml_type)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


# (elements per block, bytes per block) for every ggml type, so shapes of types edgellm does
# not run are still validated. Values are the ggml block layouts (ggml-common.h).
GGML_BLOCK: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 40), GGMLType.Q2_K: (256, 84),
    GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144), GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210), GGMLType.Q8_K: (256, 292), GGMLType.IQ2_XXS: (256, 66),
    GGMLType.IQ2_XS: (256, 74), GGMLType.IQ3_XXS: (256, 98), GGMLType.IQ1_S: (256, 50),
    GGMLType.IQ4_NL: (32, 18), GGMLType.IQ3_S: (256, 110), GGMLType.IQ2_S: (256, 82),
    GGMLType.IQ4_XS: (256, 136), GGMLType.I8: (1, 1), GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4), GGMLType.I64: (1, 8), GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (256, 56), GGMLType.BF16: (1, 2), GGMLType.TQ1_0: (256, 54),
    GGMLType.TQ2_0: (256, 66), GGMLType.MXFP4: (32, 17), GGMLType.NVFP4: (64, 36),
    GGMLType.Q1_0: (128, 18),
}
# Ids ggml once used and removed; named in errors so users know why their file fails.
GGML_REMOVED: dict[int, str] = {4: "Q4_2", 5: "Q4_3", 31: "Q4_0_4_4", 32: "Q4_0_4_8",
                                33: "Q4_0_8_8", 36: "IQ4_NL_4_4", 37: "IQ4_NL_4_8",
                                38: "IQ4_NL_8_8"}
# The types edgellm's C core runs (edgellm.h edgellm_type).
RUNNABLE_TYPES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.Q4_0, GGMLType.Q8_0})
def ggml_type_name(type_id: int) -> str:
    """Name of a ggml type id ("Q8_0"), or a description of an unknown or removed one."""
    if type_id in GGML_BLOCK:
        return GGMLType(type_id).name
    if type_id in GGML_REMOVED:
        return f"{GGML_REMOVED[type_id]} (removed from ggml)"
    return f"unknown ggml type {type_id}"


def ggml_nbytes(type_id: int, shape: Sequence[int]) -> int:
    """Bytes a tensor of this ggml type and GGUF-order shape (ne0 first) takes.

    Raises:
        UnsupportedError: an unknown type id.
        InvalidArgumentError: ne0 is not a multiple of the type's block size, or a dim < 1.
    """
    if type_id not in GGML_BLOCK:
        raise UnsupportedError(f"{ggml_type_name(type_id)} is not a tensor type edgellm knows")
    block, block_bytes = GGML_BLOCK[GGMLType(type_id)]
    if not shape or any(int(d) < 1 for d in shape):
        raise InvalidArgumentError(f"tensor shape {tuple(shape)} must have dims >= 1")
    if shape[0] % block:
        raise InvalidArgumentError(
            f"row length {shape[0]} is not a multiple of {GGMLType(type_id).name}'s block "
            f"size {block}")
    n = 1
    for d in shape:
        n *= int(d)
    return n // block * block_bytes


# The types edgellm encodes and runs. Their ids are ggml's, which edgellm.h's edgellm_type
# mirrors (test_gguf checks C agrees); TYPES maps the CLI's --type names to them.
F32 = GGMLType.F32
F16 = GGMLType.F16
Q8_0 = GGMLType.Q8_0
Q4_0 = GGMLType.Q4_0
TYPES: dict[str, GGMLType] = {"f32": F32, "f16": F16, "q8_0": Q8_0, "q4_0": Q4_0}


def _core() -> Any:
    """The compiled core, imported on first use: the type table above needs no build."""
    from .. import _native

    return _native


def _block(type_id: int) -> tuple[int, int]:
    """(elements, bytes) of one block of type_id, asked of C."""
    lib = _core().lib
    block = int(lib.edgellm_type_block_size(int(type_id)))
    nbytes = int(lib.edgellm_type_block_bytes(int(type_id)))
    if block <= 0 or nbytes <= 0:
        raise UnsupportedError(f"{ggml_type_name(int(type_id))} is not a type edgellm encodes "
                               "(F32, F16, Q8_0, Q4_0)")
    return block, nbytes


def row_bytes(type_id: int, n: int) -> int:
    """Bytes of one row of n elements of type_id.

    Raises:
        UnsupportedError: a type the C core does not encode.
        InvalidArgumentError: n is not a positive multiple of the type's block size.
    """
    block, nbytes = _block(type_id)
    if n <= 0 or n % block:
        raise InvalidArgumentError(
            f"row length {n} is not a positive multiple of the block size {block}")
    return n // block * nbytes


def quantize(x: Any, type_id: int) -> np.ndarray:  # [..., n] f32 -> [..., row_bytes] uint8
    """Encode the last axis of x as rows of type_id blocks (byte-identical to ggml).

    Args:
        x: float array [..., n]; n must be a multiple of the block size (32 for Q8_0/Q4_0).
        type_id: F32, F16, Q8_0 or Q4_0 (ggml ids).

    Returns:
        uint8 array [..., row_bytes(type_id, n)].

    Raises:
        InvalidArgumentError: a bad row length, or a value that is not finite.
        UnsupportedError: a type the C core does not encode.
    """
    if np.ndim(x) == 0:
        raise InvalidArgumentError("quantize needs an array with at least one axis")
    arr = np.ascontiguousarray(x, dtype=np.float32)
    n = arr.shape[-1]
    rb = row_bytes(type_id, n)
    out = np.empty(arr.shape[:-1] + (rb,), dtype=np.uint8)
    if arr.size:
        c = _core()
        c.check(c.lib.edgellm_quantize(int(type_id), c.ffi.from_buffer("float[]", arr),
                                       c.ffi.from_buffer(out, require_writable=True), arr.size))
    return out


def dequantize(raw: Any, type_id: int, shape: Sequence[int]) -> np.ndarray:  # -> [*shape] f32
    """Decode type_id blocks back to float32.

    Args:
        raw: bytes-like holding rows of blocks (a memoryview of a GGUF tensor, a uint8 array).
        type_id: F32, F16, Q8_0 or Q4_0.
        shape: the decoded shape in numpy order [..., n]; n is the row length.

    Returns:
        float32 array of the given shape (a new array).
    """
    shape = tuple(int(d) for d in shape)
    if not shape or any(d < 0 for d in shape):
        raise InvalidArgumentError(f"bad shape {shape}")
    rb = row_bytes(type_id, shape[-1])
    n_rows = 1
    for d in shape[:-1]:
        n_rows *= d
    src = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=np.uint8)
    src = np.ascontiguousarray(src).reshape(-1).view(np.uint8)
    if src.nbytes != n_rows * rb:
        raise InvalidArgumentError(f"{src.nbytes} bytes given; shape {shape} needs "
                                   f"{n_rows * rb} for {ggml_type_name(int(type_id))}")
    out = np.empty(shape, dtype=np.float32)
    if out.size:
        c = _core()
        c.check(c.lib.edgellm_dequantize(int(type_id), c.ffi.from_buffer(src),
                                         c.ffi.from_buffer("float[]", out, require_writable=True),
                                         out.size))
    return out


ENCODE_CHUNK_ELEMENTS = 1 << 22  # encode ~16 MiB of f32 at a time to bound peak memory


def encode_rows(x: np.ndarray, type_id: int) -> Iterator[np.ndarray]:  # [..., n] -> [rows, rb]*
    """Encode a float array [..., n] as type_id in row chunks (bounded memory for big tensors).

    F32 and F16 are converted by NumPy (IEEE round-to-nearest-even, as ggml does), so writing
    float files needs no compiled core; Q8_0/Q4_0 go through quantize().

    Yields:
        C-contiguous arrays whose bytes, concatenated, are the encoded tensor.
    """
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.floating)
                                   or np.issubdtype(x.dtype, np.integer)):
        raise InvalidArgumentError(f"cannot encode numpy {x.dtype} data")
    if x.ndim == 0:
        raise InvalidArgumentError("encode_rows needs an array with at least one axis")
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    step = max(1, ENCODE_CHUNK_ELEMENTS // max(n, 1))
    for r0 in range(0, rows.shape[0], step):
        chunk = rows[r0 : r0 + step]
        if type_id == GGMLType.F32:
            yield np.ascontiguousarray(chunk, dtype="<f4")
        elif type_id == GGMLType.F16:
            yield np.ascontiguousarray(chunk.astype("<f4").astype("<f2"))
        else:
            yield quantize(chunk, type_id)
