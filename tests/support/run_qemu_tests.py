# SPDX-License-Identifier: MIT
"""Cross-compile the C tests for aarch64 and run each under qemu as a Cortex-A53 and a Cortex-A76.

Usage:
    python tests/support/run_qemu_tests.py BUILD_DIR            # run an existing build
    python tests/support/run_qemu_tests.py --build BUILD_DIR    # configure and build it first

The A53 has NEON but no SDOT, the A76 has both; test_kernels' report must show exactly the
ISAs each CPU can run being tested (and forcing neon_dotprod on the A53 failing, which
test_kernels checks itself). Exit status 0 only when every binary passes on both CPUs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOOLCHAIN = ROOT / "cmake" / "aarch64-linux-gnu.cmake"
SYSROOT = "/usr/aarch64-linux-gnu"
QEMU = "qemu-aarch64-static"
CROSS_CC = "aarch64-linux-gnu-gcc"
APT_HINT = (
    "install it with: sudo apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross "
    "qemu-user-static"
)

# ISAs each emulated CPU must report as supported, and test_kernels must then test.
CPUS: dict[str, dict[str, list[str]]] = {
    "cortex-a53": {"supported": ["generic", "neon"], "tested": ["neon"]},
    "cortex-a76": {"supported": ["generic", "neon", "neon_dotprod"], "tested": ["neon", "neon_dotprod"]},
}
# Under emulation the tests run ~20x slower than native; this bounds a hung binary.
RUN_TIMEOUT_S = 600


class QemuSetupError(RuntimeError):
    """A cross compiler, qemu or the aarch64 sysroot is missing."""


@dataclasses.dataclass
class RunResult:
    """One test binary's run on one emulated CPU."""

    binary: str
    cpu: str
    returncode: int
    output: str
    problems: list[str]

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.problems


def check_tools(need_compiler: bool) -> None:
    """Raise QemuSetupError naming the apt packages when a tool is missing."""
    missing = [t for t in ([CROSS_CC] if need_compiler else []) + [QEMU] if shutil.which(t) is None]
    if not pathlib.Path(SYSROOT, "lib").is_dir():
        missing.append(f"{SYSROOT} (the arm64 C library)")
    if missing:
        raise QemuSetupError(f"missing {', '.join(missing)}; {APT_HINT}")


def build(build_dir: pathlib.Path, jobs: int = 2) -> None:
    """Configure and build the C tests for aarch64 into build_dir."""
    check_tools(need_compiler=True)
    subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
         f"-DCMAKE_TOOLCHAIN_FILE={TOOLCHAIN}", "-DEDGELLM_PYTHON=OFF", "-DEDGELLM_TESTS=ON",
         "-DEDGELLM_WERROR=ON"],
        check=True, capture_output=True, text=True,
    )
    subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs)], check=True,
                   capture_output=True, text=True)


def test_binaries(build_dir: pathlib.Path) -> list[pathlib.Path]:
    """Every C test executable CMake built (csrc/tests/test_*.c -> BUILD_DIR/test_*)."""
    sources = sorted((ROOT / "csrc" / "tests").glob("test_*.c"))
    return [build_dir / s.stem for s in sources]


def _isa_line(output: str, key: str) -> list[str] | None:
    for line in output.splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].split()
    return None


def check_kernel_report(output: str, cpu: str) -> list[str]:
    """Problems with test_kernels' ISA report for this CPU (empty when as expected)."""
    want = CPUS[cpu]
    problems = []
    supported = _isa_line(output, "isa supported")
    tested = _isa_line(output, "isa tested")
    if supported != want["supported"]:
        problems.append(f"{cpu}: supported ISAs {supported}, expected {want['supported']}")
    if tested != want["tested"]:
        problems.append(f"{cpu}: tested ISAs {tested}, expected {want['tested']}")
    return problems


def run_binary(binary: pathlib.Path, cpu: str) -> RunResult:
    """Run one test binary under qemu as cpu."""
    proc = subprocess.run(
        [QEMU, "-L", SYSROOT, "-cpu", cpu, str(binary)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    output = proc.stdout + proc.stderr
    problems = check_kernel_report(output, cpu) if binary.name == "test_kernels" else []
    return RunResult(binary.name, cpu, proc.returncode, output, problems)


def run_all(build_dir: pathlib.Path, jobs: int = 2) -> list[RunResult]:
    """Run every test binary on every CPU in CPUS, jobs emulators at a time."""
    check_tools(need_compiler=False)
    binaries = test_binaries(build_dir)
    absent = [b.name for b in binaries if not b.is_file()]
    if absent:
        raise FileNotFoundError(f"{build_dir} lacks {absent}; build with --build first")
    runs = [(b, cpu) for cpu in CPUS for b in binaries]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda run: run_binary(*run), runs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build_dir", type=pathlib.Path)
    parser.add_argument("--build", action="store_true", help="configure and build first")
    args = parser.parse_args(argv)
    try:
        if args.build:
            build(args.build_dir)
        results = run_all(args.build_dir)
    except (QemuSetupError, FileNotFoundError, subprocess.CalledProcessError) as exc:
        print(f"run_qemu_tests: {exc}", file=sys.stderr)
        return 2
    for r in results:
        status = "ok" if r.ok else f"FAILED (exit {r.returncode})"
        print(f"{r.cpu:11s} {r.binary:14s} {status}")
        for line in r.output.splitlines():
            if line.startswith(("isa ", "cpu features")) or not r.ok:
                print(f"    {line}")
        for p in r.problems:
            print(f"    problem: {p}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
