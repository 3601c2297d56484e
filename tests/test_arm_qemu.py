# SPDX-License-Identifier: MIT
"""The C tests cross-compiled for aarch64 and run under qemu: NEON on a Cortex-A53, + SDOT on an A76."""

from __future__ import annotations

import pathlib
import tempfile

import pytest
from support import run_qemu_tests as rq


@pytest.fixture(scope="module")
def arm_results() -> dict[tuple[str, str], rq.RunResult]:
    """Every C test binary, cross-built once, run on each emulated CPU (two at a time).

    A missing cross compiler or qemu fails here with the apt command; it never skips.
    """
    with tempfile.TemporaryDirectory(prefix="edgellm-arm-") as tmp:
        build_dir = pathlib.Path(tmp) / "build-aarch64"
        rq.build(build_dir)
        return {(r.binary, r.cpu): r for r in rq.run_all(build_dir)}


def test_missing_tools_name_the_apt_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rq.shutil, "which", lambda tool: None)
    with pytest.raises(rq.QemuSetupError, match="apt-get install gcc-aarch64-linux-gnu"):
        rq.check_tools(need_compiler=True)


def test_kernel_report_check_catches_a_wrong_isa_set() -> None:
    # the A53 must not claim SDOT; a report that tests neon_dotprod there is a failure
    bad = "isa supported: generic neon neon_dotprod\nisa tested: neon neon_dotprod\n"
    assert len(rq.check_kernel_report(bad, "cortex-a53")) == 2
    good = "isa supported: generic neon\nisa tested: neon\n"
    assert rq.check_kernel_report(good, "cortex-a53") == []


@pytest.mark.slow
@pytest.mark.parametrize("cpu", sorted(rq.CPUS))
def test_kernels_under_qemu(arm_results: dict[tuple[str, str], rq.RunResult], cpu: str) -> None:
    r = arm_results[("test_kernels", cpu)]
    assert r.ok, f"{r.problems}\n{r.output}"
    assert rq._isa_line(r.output, "isa tested") == rq.CPUS[cpu]["tested"]
    assert "0 failed" in r.output
    if cpu == "cortex-a53":
        assert "asimddp" not in (rq._isa_line(r.output, "cpu features") or [])


@pytest.mark.slow
@pytest.mark.parametrize("cpu", sorted(rq.CPUS))
def test_every_c_test_under_qemu(arm_results: dict[tuple[str, str], rq.RunResult], cpu: str) -> None:
    others = [r for (binary, c), r in arm_results.items() if c == cpu and binary != "test_kernels"]
    assert others, "expected the forward's C test (test_core) as well"
    for r in others:
        assert r.ok, f"{r.binary} on {cpu}:\n{r.output[-4000:]}"
