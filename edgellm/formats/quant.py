# SPDX-License-Identifier: MIT
"""NumPy front-end to the C quantiser: rows of floats to and from ggml F32/F16/Q8_0/Q4_0 blocks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._native import check, ffi, lib
from ..errors import InvalidArgumentError, UnsupportedError

# The ggml type ids the C core encodes and decodes (edgellm.h edgellm_type).
F32: int = lib.EDGELLM_TYPE_F32
F16: int = lib.EDGELLM_TYPE_F16
Q8_0: int = lib.EDGELLM_TYPE_Q8_0
Q4_0: int = lib.EDGELLM_TYPE_Q4_0
TYPES: dict[str, int] = {"f32": F32, "f16": F16, "q8_0": Q8_0, "q4_0": Q4_0}


def _block(type_id: int) -> tuple[int, int]:
    """(elements, bytes) of one block of type_id, asked of C."""
    block = int(lib.edgellm_type_block_size(int(type_id)))
    nbytes = int(lib.edgellm_type_block_bytes(int(type_id)))
    if block <= 0 or nbytes <= 0:
        raise UnsupportedError(f"ggml type {type_id} is not one edgellm encodes "
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
    """
    if np.ndim(x) == 0:
        raise InvalidArgumentError("quantize needs an array with at least one axis")
    arr = np.ascontiguousarray(x, dtype=np.float32)
    n = arr.shape[-1]
    rb = row_bytes(type_id, n)
    out = np.empty(arr.shape[:-1] + (rb,), dtype=np.uint8)
    total = arr.size
    if total:
        check(lib.edgellm_quantize(int(type_id), ffi.from_buffer("float[]", arr),
                                   ffi.from_buffer(out, require_writable=True), total))
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
    n = shape[-1]
    rb = row_bytes(type_id, n)
    n_rows = 1
    for d in shape[:-1]:
        n_rows *= d
    src = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw
    src = np.ascontiguousarray(src).reshape(-1).view(np.uint8)
    if src.nbytes != n_rows * rb:
        raise InvalidArgumentError(
            f"{src.nbytes} bytes given; shape {shape} needs {n_rows * rb} for type {type_id}")
    out = np.empty(shape, dtype=np.float32)
    if out.size:
        check(lib.edgellm_dequantize(int(type_id), ffi.from_buffer(src),
                                     ffi.from_buffer("float[]", out, require_writable=True),
                                     out.size))
    return out
