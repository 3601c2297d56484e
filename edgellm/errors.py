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


class CorpusError(EdgeLLMError, ValueError):
    """Training or held-out text is empty, unreadable, not UTF-8 or malformed (names the file)."""


class TokenizerMismatchError(EdgeLLMError, ValueError):
    """Two tokenizers (or a tokenizer and a model's embedding) that must agree do not."""


class CheckpointMismatchError(EdgeLLMError, ValueError):
    """A checkpoint to resume from was made with other settings, shape, parent or data."""


class DiskFullError(EdgeLLMError, OSError):
    """A write ran out of disk space (ENOSPC); the previous complete file stays valid."""


class BrokerConnectError(EdgeLLMError, ConnectionError):
    """The MQTT broker could not be reached or refused the connection (names host and port)."""


class MissingToolError(EdgeLLMError, FileNotFoundError):
    """An external program edgellm runs (mosquitto, ...) is not installed; says how to install it."""


class HubHomeError(EdgeLLMError, ValueError):
    """A hub home folder is missing, incomplete or would be overwritten; names the path."""


class UnknownDeviceError(EdgeLLMError, KeyError):
    """A device id the hub never issued a certificate to (or one already revoked)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BrokerError(EdgeLLMError, RuntimeError):
    """The MQTT broker did not start, stopped, or could not be signalled (names its log)."""


class PkiError(EdgeLLMError, ValueError):
    """A key, certificate or CRL file is missing, unreadable or not what it should be."""


class PatchError(EdgeLLMError, ValueError):
    """A delta or adapter patch is malformed, over its bounds, or its result fails verification."""


class PatchBaseError(PatchError):
    """A delta patch was offered for a base model other than the one this device holds."""


class UpdateError(EdgeLLMError, RuntimeError):
    """An update could not be staged, installed or committed; the previous model stays active."""


class DeviceConfigError(EdgeLLMError, ValueError):
    """A device.toml is missing, unreadable or has a bad field (names the file and the field)."""


class TufRepoError(EdgeLLMError, RuntimeError):
    """The hub's TUF repository is missing, already initialised or lacks a role's keys."""
