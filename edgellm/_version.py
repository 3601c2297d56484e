# SPDX-License-Identifier: MIT
"""The package version: the single source read by pyproject.toml, CMake and the C core."""

__version__ = "0.1.0"
