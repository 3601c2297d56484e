# SPDX-License-Identifier: MIT
"""The C-only tests (csrc/tests), built normally and under AddressSanitizer + UBSan."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _require(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is not installed (run .ci/setup, or: apt-get install cmake ninja-build)"
    return path


def _build_and_ctest(build: Path, *cmake_args: str) -> str:
    _require("cmake")
    _require("ninja")
    subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja", "-DEDGELLM_PYTHON=OFF",
         "-DEDGELLM_TESTS=ON", "-DEDGELLM_WERROR=ON", *cmake_args],
        check=True, capture_output=True, text=True,
    )
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True, text=True)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    r = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.slow
def test_c_tests_pass(tmp_path: Path) -> None:
    out = _build_and_ctest(tmp_path / "build")
    assert "100% tests passed" in out


@pytest.mark.slow
def test_c_tests_pass_under_asan_and_ubsan(tmp_path: Path) -> None:
    out = _build_and_ctest(tmp_path / "build-asan", "-DEDGELLM_SANITIZE=ON", "-DCMAKE_BUILD_TYPE=Debug")
    assert "100% tests passed" in out
