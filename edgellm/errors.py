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


class UpdateRefusedError(UpdateError):
    """A signed target does not fit this device (board, device, node, release, base): refused."""

    def __init__(self, reason: str, detail: str, *, attack: bool) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.attack = reason, detail, attack


class DeviceConfigError(EdgeLLMError, ValueError):
    """A device.toml is missing, unreadable or has a bad field (names the file and the field)."""


class TufRepoError(EdgeLLMError, RuntimeError):
    """The hub's TUF repository is missing, already initialised or lacks a role's keys."""


class FlashError(EdgeLLMError, RuntimeError):
    """`edgellm flash` could not deliver or install a package; the device keeps what it had."""


class FlashPackageError(FlashError, ValueError):
    """A flash package or archive is malformed, unsafe, over its caps or fails verification."""


class FlashTargetError(FlashError, FileNotFoundError):
    """A flash target (URI, folder, serial port, remote path) is malformed or does not exist."""


class FlashConnectError(FlashError, ConnectionError):
    """A flash target host cannot be reached, or refused the login (names host and port)."""


class FlashHostKeyError(FlashConnectError):
    """The SSH host key differs from the one in known_hosts (or is missing there): refused."""


class FlashPortBusyError(FlashError, BlockingIOError):
    """A serial port is held by another process (names the port)."""


class FlashRemoteError(FlashError):
    """A command on the flash target failed (remote verify, receive, enabling the agent)."""


class FlashDiskFullError(FlashError, DiskFullError):
    """The flash target has too little free space; checked before anything is written."""


class FlashIdentityError(FlashError, PermissionError):
    """A flash package would replace a provisioned device's identity or trust root: refused."""


class SerialLinkError(FlashError, ConnectionError):
    """A serial flash link failed (port error, cable pulled, peer silent); a retry resumes."""


class ImageRejectedError(FlashPackageError):
    """A received image's sha256 differs from the one its sender announced: refused, removed."""


class ReleaseError(EdgeLLMError, ValueError):
    """A release cannot be published: unknown node, version or board, no build, a bad bundle."""


class RolloutError(EdgeLLMError, LookupError):
    """An unknown rollout id, or a rollout in a state that does not allow the action."""


class TFLiteDelegateError(EdgeLLMError, FileNotFoundError):
    """A TFLite delegate library the board profile (or caller) names is not installed here."""


class TFLiteRuntimeError(EdgeLLMError, RuntimeError):
    """No usable TFLite interpreter, or one known to fail or give wrong results for this model."""
