# SPDX-License-Identifier: MIT
"""The exception hierarchy: one root, each class also a builtin so callers may catch either."""

from __future__ import annotations


class EdgeLLMError(Exception):
    """Root of every error edgellm raises on purpose."""


class InvalidArgumentError(EdgeLLMError, ValueError):
    """An argument is out of range or of the wrong kind."""


class ModelFormatError(EdgeLLMError, ValueError):
    """A model file (GGUF, llama2.c, safetensors) is malformed, truncated or inconsistent."""


class PickleRefusedError(ModelFormatError):
    """A pickle checkpoint (.bin/.pt/.pth/.ckpt) was offered; edgellm never unpickles."""


class UnsupportedError(EdgeLLMError, NotImplementedError):
    """Valid input that this version does not handle (an architecture, a tensor type)."""


class IsaError(EdgeLLMError, RuntimeError):
    """A requested instruction set is not compiled in or not supported by this CPU."""


class ContextFullError(EdgeLLMError, RuntimeError):
    """The session's KV cache has no room for more tokens."""


class StateError(EdgeLLMError, RuntimeError):
    """A call made in the wrong state (a closed model, an unfinished object)."""


class NativeError(EdgeLLMError, RuntimeError):
    """The C core reported a failure without a more specific class."""


class NativeVersionError(EdgeLLMError, ImportError):
    """The compiled core does not match this Python package (often: two copies installed)."""
