# SPDX-License-Identifier: MIT
"""The C quantizers against the gguf package, block sizes, and every ISA's matmul against generic."""

from __future__ import annotations

import os
import pathlib
import re
import struct
import subprocess
import sys

import cffi
import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support.tolerances import (
    KERNEL_DOT_REL,
    KERNEL_QDOT_REL,
    QUANT_ERR_ABS,
    QUANT_Q4_0_ERR_D,
    QUANT_Q8_0_ERR_D,
)

from edgellm._native import ffi, lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
QTYPES = {"Q4_0": lib.EDGELLM_TYPE_Q4_0, "Q8_0": lib.EDGELLM_TYPE_Q8_0}
# ggml block layouts as Python structs: f16 scale, then the quants.
PY_BLOCKS = {"Q4_0": "<e16B", "Q8_0": "<e32b"}
ISA_NAMES = [ffi.string(lib.edgellm_isa_name(i)).decode() for i in range(lib.EDGELLM_ISA_COUNT)]
USABLE = [
    i for i in range(lib.EDGELLM_ISA_COUNT)
    if lib.edgellm_isa_built_mask() & lib.edgellm_isa_supported_mask() & (1 << i)
]


def check(status: int) -> None:
    assert status == lib.EDGELLM_STATUS_OK, ffi.string(lib.edgellm_last_error()).decode()


def c_quantize(x: np.ndarray, qtype: str) -> bytes:  # [n] f32 -> n / 32 blocks
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = bytearray(x.size // 32 * lib.edgellm_type_block_bytes(QTYPES[qtype]))
    check(lib.edgellm_quantize(QTYPES[qtype], ffi.from_buffer("float[]", x), ffi.from_buffer(out), x.size))
    return bytes(out)


def c_dequantize(blocks: bytes, n: int, qtype: str) -> np.ndarray:  # n / 32 blocks -> [n] f32
    out = np.empty(n, dtype=np.float32)
    check(lib.edgellm_dequantize(QTYPES[qtype], ffi.from_buffer(blocks), ffi.from_buffer("float[]", out), n))
    return out


def gguf_quantize(x: np.ndarray, qtype: str) -> bytes:  # [n] f32 -> n / 32 blocks
    with np.errstate(all="ignore"):  # subnormal blocks overflow 1 / d inside gguf, as in C
        return gguf.quants.quantize(x.reshape(1, -1).astype(np.float32), gguf.GGMLQuantizationType[qtype]).tobytes()


# --------------------------------------------------------------------------
# Quantizers vs the gguf package (byte for byte)


def _edge_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    half = (np.arange(32, dtype=np.float32) % 8 + 0.5) * np.where(np.arange(32) % 2, -1, 1)
    return {
        "zeros": np.zeros(64, np.float32),
        "negative_zeros": np.full(32, -0.0, np.float32),  # d = -0 / -8 = +0 in NumPy
        "all_equal": np.full(32, 3.25, np.float32),
        "all_equal_negative": np.full(32, -0.7, np.float32),
        "ties_q8": np.concatenate([half, [127.0]]).astype(np.float32)[1:],  # d = 1: exact .5s
        "ties_q4": np.array([8.0, -4.5, 4.5, -0.5, 0.5, 1.5, -1.5] + [0.5] * 25, np.float32),
        "huge": (rng.standard_normal(64) * 3e4).astype(np.float32),
        "small": (rng.standard_normal(64) * 1e-5).astype(np.float32),
        "subnormal_scale": (rng.standard_normal(64) * 1e-7).astype(np.float32),
        "denormal_values": (rng.standard_normal(64) * 1e-40).astype(np.float32),  # 1 / d = inf
        "max_first_vs_last": np.array([-2.0] + [0.1] * 30 + [2.0], np.float32),  # argmax tie
        "one_spike": np.eye(1, 32, 17, dtype=np.float32).ravel() * -9.0,
    }


@pytest.mark.parametrize("qtype", sorted(QTYPES))
@pytest.mark.parametrize("case", sorted(_edge_cases()))
def test_quantize_matches_gguf_on_edge_cases(qtype: str, case: str) -> None:
    x = _edge_cases()[case]
    assert c_quantize(x, qtype) == gguf_quantize(x, qtype)


@pytest.mark.parametrize("qtype", sorted(QTYPES))
def test_quantize_matches_gguf_on_random_data(qtype: str) -> None:
    rng = np.random.default_rng(11)
    scales = 10.0 ** rng.integers(-4, 4, size=(256, 1))  # per-block magnitudes
    x = (rng.standard_normal((256, 32)) * scales).astype(np.float32).ravel()
    got = c_quantize(x, qtype)
    assert got == gguf_quantize(x, qtype)
    want = gguf.quants.dequantize(np.frombuffer(got, np.uint8).reshape(256, -1), gguf.GGMLQuantizationType[qtype])
    np.testing.assert_array_equal(c_dequantize(got, x.size, qtype), want.ravel())


@settings(max_examples=60, deadline=None)
@given(
    qtype=st.sampled_from(sorted(QTYPES)),
    x=hnp.arrays(np.float32, st.integers(1, 6).map(lambda k: 32 * k),
                 elements=st.floats(-1e5, 1e5, allow_nan=False, width=32)),
)
def test_quantize_error_bound_and_gguf_identity(qtype: str, x: np.ndarray) -> None:
    q = c_quantize(x, qtype)
    assert q == gguf_quantize(x, qtype)
    err = np.abs(c_dequantize(q, x.size, qtype) - x).reshape(-1, 32)
    amax = np.abs(x).reshape(-1, 32).max(axis=1, keepdims=True).astype(np.float64)
    d = amax / 127 if qtype == "Q8_0" else amax / 8
    k = QUANT_Q8_0_ERR_D if qtype == "Q8_0" else QUANT_Q4_0_ERR_D
    assert np.all(err <= k * d + QUANT_ERR_ABS)


def test_quantize_rejects_bad_input() -> None:
    import edgellm
    from edgellm import _native

    x = np.ones(33, np.float32)
    out = bytearray(64)
    with pytest.raises(edgellm.InvalidArgumentError, match="multiple of the block size 32"):
        _native.check(lib.edgellm_quantize(lib.EDGELLM_TYPE_Q8_0, ffi.from_buffer("float[]", x), ffi.from_buffer(out), 33))
    x[3] = np.inf
    with pytest.raises(edgellm.InvalidArgumentError, match="not finite"):
        _native.check(lib.edgellm_quantize(lib.EDGELLM_TYPE_Q4_0, ffi.from_buffer("float[]", x), ffi.from_buffer(out), 32))
    with pytest.raises(edgellm.UnsupportedError):
        _native.check(lib.edgellm_quantize(7, ffi.from_buffer("float[]", x), ffi.from_buffer(out), 32))


# --------------------------------------------------------------------------
# Block layouts: the C structs (kernels.h), the Python structs and the gguf package agree


def test_block_sizes_match_python_structs_and_gguf() -> None:
    header = (ROOT / "csrc" / "kernels" / "kernels.h").read_text()
    header = header.replace("EL_QK / 2", "16").replace("EL_QK", "32")
    local = cffi.FFI()
    for name in ("el_block_q8_0", "el_block_q4_0"):
        body = re.search(r"typedef struct \{([^}]*)\} " + name + ";", header)
        assert body, f"{name} not found in kernels.h"
        local.cdef("typedef struct {" + re.sub(r"//[^\n]*", "", body.group(1)) + "} " + name + ";")
    for qtype, name in (("Q8_0", "el_block_q8_0"), ("Q4_0", "el_block_q4_0")):
        size = struct.calcsize(PY_BLOCKS[qtype])
        assert local.sizeof(name) == size
        assert lib.edgellm_type_block_bytes(QTYPES[qtype]) == size
        assert lib.edgellm_type_block_size(QTYPES[qtype]) == 32
        assert gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]] == (32, size)
    assert lib.edgellm_type_block_bytes(lib.EDGELLM_TYPE_F16) == struct.calcsize("<e")
    assert lib.edgellm_type_block_bytes(lib.EDGELLM_TYPE_F32) == struct.calcsize("<f")


# --------------------------------------------------------------------------
# Every ISA that runs here against generic


def _exact_q8_blocks(rng: np.random.Generator, n_rows: int, nb: int) -> bytes:
    """Q8_0 blocks with scales in {1/2, 1} and |q| <= 8: every dot is exact in f32."""
    blocks = np.zeros(n_rows * nb, dtype=[("d", "<f2"), ("qs", "i1", 32)])
    blocks["d"] = rng.choice([0.5, 1.0], size=blocks.size)
    blocks["qs"] = rng.integers(-8, 9, size=(blocks.size, 32))
    return blocks.tobytes()


def _exact_q4_blocks(rng: np.random.Generator, n_rows: int, nb: int) -> bytes:
    blocks = np.zeros(n_rows * nb, dtype=[("d", "<f2"), ("qs", "u1", 16)])
    blocks["d"] = rng.choice([0.5, 1.0], size=blocks.size)
    blocks["qs"] = rng.integers(0, 256, size=(blocks.size, 16))
    return blocks.tobytes()


def _matmul_q8(isa: int, wtype: int, w: bytes, rows: int, cols: int, xq: bytes, n_tok: int) -> np.ndarray:
    y = np.empty((n_tok, rows), np.float32)
    check(lib.edgellm_matmul_q8(isa, wtype, ffi.from_buffer(w), rows, cols, ffi.from_buffer(xq), n_tok, ffi.from_buffer("float[]", y)))
    return y


def _matmul(isa: int, wtype: int, w: bytes, rows: int, cols: int, x: np.ndarray) -> np.ndarray:
    y = np.empty((x.shape[0], rows), np.float32)
    check(lib.edgellm_matmul(isa, wtype, ffi.from_buffer(w), rows, cols, ffi.from_buffer("float[]", x), x.shape[0], ffi.from_buffer("float[]", y)))
    return y


@pytest.mark.parametrize("isa", [i for i in USABLE if i != lib.EDGELLM_ISA_GENERIC], ids=lambda i: ISA_NAMES[i])
@pytest.mark.parametrize("qtype", sorted(QTYPES))
@pytest.mark.parametrize("rows,cols,n_tok", [(1, 32, 1), (7, 288, 3), (33, 1056, 5), (5, 4096, 9)])
def test_isa_integer_dots_bit_exact(isa: int, qtype: str, rows: int, cols: int, n_tok: int) -> None:
    rng = np.random.default_rng(rows * cols + n_tok)
    nb = cols // 32
    w = _exact_q4_blocks(rng, rows, nb) if qtype == "Q4_0" else _exact_q8_blocks(rng, rows, nb)
    xq = _exact_q8_blocks(rng, n_tok, nb)
    want = _matmul_q8(lib.EDGELLM_ISA_GENERIC, QTYPES[qtype], w, rows, cols, xq, n_tok)
    got = _matmul_q8(isa, QTYPES[qtype], w, rows, cols, xq, n_tok)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("isa", [i for i in USABLE if i != lib.EDGELLM_ISA_GENERIC], ids=lambda i: ISA_NAMES[i])
@pytest.mark.parametrize("wtype", ["F32", "F16", "Q4_0", "Q8_0"])
@pytest.mark.parametrize("rows,cols,n_tok", [(3, 96, 1), (17, 800, 4), (9, 2048, 6)])
def test_isa_real_data_within_tolerance(isa: int, wtype: str, rows: int, cols: int, n_tok: int) -> None:
    rng = np.random.default_rng(rows + cols + n_tok)
    wf = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((n_tok, cols)).astype(np.float32)
    if wtype == "F32":
        w, wd, tol = wf.tobytes(), wf, KERNEL_DOT_REL
    elif wtype == "F16":
        w, wd, tol = wf.astype(np.float16).tobytes(), wf.astype(np.float16).astype(np.float32), KERNEL_DOT_REL
    else:
        w = c_quantize(wf.ravel(), wtype)
        wd, tol = c_dequantize(w, wf.size, wtype).reshape(rows, cols), KERNEL_QDOT_REL
    etype = getattr(lib, f"EDGELLM_TYPE_{wtype}")
    want = _matmul(lib.EDGELLM_ISA_GENERIC, etype, w, rows, cols, x)
    got = _matmul(isa, etype, w, rows, cols, x)
    xd = x if wtype in ("F32", "F16") else np.stack([c_dequantize(c_quantize(t, "Q8_0"), cols, "Q8_0") for t in x])
    scale = np.abs(xd.astype(np.float64)) @ np.abs(wd.astype(np.float64)).T  # [n_tok, rows]
    assert np.all(np.abs(got.astype(np.float64) - want) <= tol * scale)
    # and both match the float64 product of the (de)quantised operands
    assert np.all(np.abs(want - xd.astype(np.float64) @ wd.astype(np.float64).T) <= tol * scale)


def test_usable_isas_include_the_best_for_this_machine() -> None:
    assert lib.EDGELLM_ISA_GENERIC in USABLE
    features = ffi.string(lib.edgellm_cpu_features()).decode().split()
    if "avx512vnni" in features and "os_zmm" in features:
        assert lib.EDGELLM_ISA_AVX512 in USABLE
    if "avx2" in features and "fma" in features:
        assert lib.EDGELLM_ISA_AVX2 in USABLE


# --------------------------------------------------------------------------
# EDGELLM_ISA: forcing a table


def _import_with_isa(value: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import edgellm\n"
        "try:\n"
        "    from edgellm._native import lib, ffi\n"
        "except edgellm.IsaError as e:\n"
        "    print('IsaError:', e); raise SystemExit(3)\n"
        "print('active', ffi.string(lib.edgellm_isa_name(lib.edgellm_isa_active())).decode())\n"
    )
    env = dict(os.environ, EDGELLM_ISA=value, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)


def test_forcing_an_unavailable_isa_raises_isa_error() -> None:
    foreign = "avx2" if lib.EDGELLM_ISA_NEON in USABLE else "neon"  # the other architecture's ISA
    r = _import_with_isa(foreign)
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"ISA '{foreign}' is not compiled into this library" in r.stdout


def test_forcing_an_unknown_isa_raises_isa_error() -> None:
    r = _import_with_isa("sse9")
    assert r.returncode == 3 and "unknown ISA name 'sse9'" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("name", [ISA_NAMES[i] for i in USABLE])
def test_forcing_a_usable_isa_selects_it(name: str) -> None:
    r = _import_with_isa(name)
    assert r.returncode == 0 and r.stdout.strip() == f"active {name}", r.stdout + r.stderr
