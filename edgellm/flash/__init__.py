# SPDX-License-Identifier: MIT
"""Flashing: put a build and a device identity on a device over serial, SSH or an SD card.

- ``package``: the flash package (``make_package``, ``pack``, ``unpack``, ``install_package``);
- ``targets``: ``edgellm flash`` (select the build, identity, package, dispatch by target URI);
- ``ssh``: the ``ssh://`` target; ``serial_link``/``receive``: the ``serial://`` target and the
  device-side receiver; ``firstboot``: the ``dir:`` (SD card) target and first boot;
- ``progress``: bytes, rate and ETA of a transfer.

docs/flash.md walks through all of it.

.. versionadded:: 0.1
"""

from __future__ import annotations

from .package import install_package, make_package, pack, unpack

__all__ = ["install_package", "make_package", "pack", "unpack"]
