# SPDX-License-Identifier: MIT
"""Tell systemd about the agent's state (sd_notify protocol) without linking libsystemd.

Public API: ``notify(state) -> bool``. A unit with ``Type=notify`` (and ``WatchdogSec=``)
starts the service with ``$NOTIFY_SOCKET`` set to a unix datagram socket: a path, or a
name in the abstract namespace written with a leading ``@``. ``notify`` sends one datagram
such as ``"READY=1"``, ``"WATCHDOG=1"``, ``"STATUS=connected"`` or ``"STOPPING=1"``
(several lines may go in one state, separated by newlines).

Outside systemd (``$NOTIFY_SOCKET`` unset or empty) it does nothing and returns False, so
the agent calls it unconditionally. A send that fails (socket gone, unsupported address
such as ``vsock:``) also returns False rather than raising: a lost watchdog ping is
systemd's to notice (it restarts the service), never a reason for the agent to die.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify"]


def _address(value: str) -> str | None:
    """The AF_UNIX address for a $NOTIFY_SOCKET value; None when it is not a unix socket."""
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace: leading NUL, no file
    if value.startswith("/"):
        return value
    return None


def notify(state: str) -> bool:
    """Send state (e.g. ``"READY=1"``) to systemd's notify socket.

    Args:
        state: newline-separated ``KEY=VALUE`` assignments, ASCII/UTF-8.

    Returns:
        True when the datagram was sent; False when ``$NOTIFY_SOCKET`` is unset or empty,
        is not a unix socket address, or the send failed.
    """
    value = os.environ.get("NOTIFY_SOCKET", "")
    if not value or not state:
        return False
    addr = _address(value)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), addr)
    except OSError:
        return False
    return True
