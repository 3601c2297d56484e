# SPDX-License-Identifier: MIT
"""The only importer of the compiled cffi module: loads it, checks it, maps status codes.

Hazard note: everything here hands raw pointers to C. Buffers passed with
``ffi.from_buffer`` must stay alive (and, for outputs, writable and C-contiguous) for the
whole call; handles are freed by ``ffi.gc`` or explicitly, never both. C keeps no pointer
to a caller buffer after a call returns, except model tensor data, which the caller keeps
mapped until the model is freed (``edgellm.runtime.model.Model`` holds the mapping).
"""

from __future__ import annotations

import os
from typing import Any

from . import errors
from ._version import __version__

__all__ = ["build_info", "check", "ffi", "isa_names", "lib"]

try:
    from ._edgellm_cffi import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the install
    raise errors.NativeVersionError(
        "edgellm's compiled core (edgellm/_edgellm_cffi*.so) is missing or does not load: "
        f"{exc}. Install with `pip install .` or build in place with `make build`."
    ) from exc

# The ABI version this Python code was written against (edgellm.h EDGELLM_ABI_VERSION).
_EXPECTED_ABI = 1

if lib.edgellm_abi_version() != _EXPECTED_ABI or lib.EDGELLM_ABI_VERSION != _EXPECTED_ABI:
    raise errors.NativeVersionError(
        f"compiled core has ABI {lib.edgellm_abi_version()}, this package expects {_EXPECTED_ABI}; "
        "two copies of edgellm may be installed (check `pip list` and PYTHONPATH)"
    )

_STATUS_CLASS: dict[int, type[errors.EdgeLLMError]] = {
    lib.EDGELLM_STATUS_ERR_INVALID_ARG: errors.InvalidArgumentError,
    lib.EDGELLM_STATUS_ERR_FORMAT: errors.ModelFormatError,
    lib.EDGELLM_STATUS_ERR_UNSUPPORTED: errors.UnsupportedError,
    lib.EDGELLM_STATUS_ERR_NOMEM: errors.NativeError,
    lib.EDGELLM_STATUS_ERR_ISA: errors.IsaError,
    lib.EDGELLM_STATUS_ERR_CONTEXT_FULL: errors.ContextFullError,
    lib.EDGELLM_STATUS_ERR_STATE: errors.StateError,
}


def check(status: int) -> None:
    """Raise the exception class for a non-zero status, with C's detail message."""
    if status == lib.EDGELLM_STATUS_OK:
        return
    name = ffi.string(lib.edgellm_status_str(status)).decode()
    detail = ffi.string(lib.edgellm_last_error()).decode(errors="replace")
    cls = _STATUS_CLASS.get(status, errors.NativeError)
    raise cls(f"{name}: {detail}" if detail else name)


def _select_isa() -> None:
    """Choose the kernel table once: EDGELLM_ISA if set (an error if it can't be honoured)."""
    want = os.environ.get("EDGELLM_ISA", "")
    check(lib.edgellm_isa_select(want.encode()))


ffi.init_once(_select_isa, "edgellm_isa_select")


def isa_names() -> list[str]:
    """Names of every ISA this build knows, in enum order."""
    return [ffi.string(lib.edgellm_isa_name(i)).decode() for i in range(lib.EDGELLM_ISA_COUNT)]


def build_info() -> dict[str, Any]:
    """What the compiled core reports about itself, plus run-time CPU facts."""
    raw = ffi.string(lib.edgellm_build_info()).decode()
    info: dict[str, Any] = dict(kv.split("=", 1) for kv in raw.split(";") if "=" in kv)
    names = isa_names()
    built = lib.edgellm_isa_built_mask()
    supported = lib.edgellm_isa_supported_mask()
    info["built_with"] = [n for i, n in enumerate(names) if built & (1 << i)]
    info["has"] = [n for i, n in enumerate(names) if supported & (1 << i)]
    info["cpu_features"] = ffi.string(lib.edgellm_cpu_features()).decode().split()
    info["active"] = names[lib.edgellm_isa_active()]
    info["python_version"] = __version__
    return info
