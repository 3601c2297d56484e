# SPDX-License-Identifier: MIT
"""Static checks of the package: ruff (errors, imports, modern syntax) and mypy --strict."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing() -> None:
    assert shutil.which("ruff"), "ruff is not installed (run .ci/setup, or pip install ruff)"
    r = subprocess.run(["ruff", "check", "edgellm", "tests", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_passes_on_the_package() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy", "edgellm"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
