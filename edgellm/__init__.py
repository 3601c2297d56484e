# SPDX-License-Identifier: MIT
"""edgellm: run, specialise and update small language models on edge boards."""

from ._version import __version__
from .errors import (
    ContextFullError,
    EdgeLLMError,
    InvalidArgumentError,
    IsaError,
    ModelFormatError,
    NativeVersionError,
    PickleRefusedError,
    StateError,
    UnsupportedError,
)

__all__ = [
    "ContextFullError",
    "EdgeLLMError",
    "InvalidArgumentError",
    "IsaError",
    "Model",
    "ModelFormatError",
    "NativeVersionError",
    "PickleRefusedError",
    "Session",
    "StateError",
    "UnsupportedError",
    "__version__",
]


def __getattr__(name: str) -> object:
    # Model and Session load the compiled core; importing edgellm alone (for the CLI's
    # --help, or the hub's pure-Python parts) must not.
    if name in ("Model", "Session"):
        from .runtime import model

        return getattr(model, name)
    raise AttributeError(f"module 'edgellm' has no attribute {name!r}")
