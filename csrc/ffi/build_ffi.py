# SPDX-License-Identifier: MIT
"""Generate the cffi (API mode) module source from edgellm.cdef; CMake compiles it.

Usage: python build_ffi.py OUT.c
"""

import pathlib
import sys

import cffi

HERE = pathlib.Path(__file__).resolve().parent


def make_builder() -> cffi.FFI:
    """Return an FFI builder whose cdef the C compiler checks against edgellm.h."""
    ffibuilder = cffi.FFI()
    ffibuilder.cdef((HERE / "edgellm.cdef").read_text())
    ffibuilder.set_source("edgellm._edgellm_cffi", '#include "edgellm.h"\n')
    return ffibuilder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build_ffi.py OUT.c")
    make_builder().emit_c_code(sys.argv[1])
