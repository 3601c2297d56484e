# SPDX-License-Identifier: MIT
"""The `edgellm` command as users meet it: info, convert, run, chat, help and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).parent / "data" / "stories260K"


def edgellm(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgellm", *args], capture_output=True, text=True, timeout=300,
        input=stdin, env=None if env is None else {**os.environ, **env},
    )


def test_info_reports_build_cpu_and_kernel_table() -> None:
    r = edgellm("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)["core"]
    assert "generic" in info["built_with"] and "generic" in info["has"]
    assert info["active"] in info["has"] and info["active"] in info["built_with"]
    human = edgellm("info")
    assert "kernel table:" in human.stdout and info["active"] in human.stdout


def test_forcing_an_isa_this_cpu_lacks_fails_loudly() -> None:
    foreign = "neon" if os.uname().machine in ("x86_64", "AMD64") else "avx2"
    r = edgellm("info", env={"EDGELLM_ISA": foreign})
    assert r.returncode != 0
    assert foreign in (r.stderr + r.stdout)
    r = edgellm("info", "--json", env={"EDGELLM_ISA": "generic"})
    assert r.returncode == 0 and json.loads(r.stdout)["core"]["active"] == "generic"


def test_convert_then_run_then_chat(tmp_path: Path) -> None:
    out = tmp_path / "s.gguf"
    r = edgellm("convert", str(DATA / "stories260K.bin"), "--out", str(out), "--type", "q8_0")
    assert r.returncode == 0, r.stderr
    r = edgellm("info", str(out), "--json")
    model = json.loads(r.stdout)["model"]
    assert model["config"]["n_layers"] == 5 and model["tensor_types"]["Q8_0"] > 0
    r = edgellm("run", str(out), "Once upon a time", "-n", "16", "--temp", "0", "-v")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "tok/s" in r.stderr
    # No chat template: the plain layout is used; two turns share one session.
    r = edgellm("chat", str(out), "-n", "8", "--temp", "0", stdin="Hello\nTell me a story\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) >= 2


def test_errors_are_one_line_and_nonzero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    r = edgellm("run", str(bad), "hi")
    assert r.returncode == 1
    assert r.stderr.startswith("edgellm run: error:") and len(r.stderr.strip().splitlines()) == 1
    r = edgellm("run", str(tmp_path / "missing.gguf"), "hi")
    assert r.returncode == 1 and "missing.gguf" in r.stderr
    pickle_dir = tmp_path / "hf"
    pickle_dir.mkdir()
    (pickle_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (pickle_dir / "pytorch_model.bin").write_bytes(b"\x80\x04")
    r = edgellm("convert", str(pickle_dir), "--out", str(tmp_path / "x.gguf"))
    assert r.returncode == 1 and "pickle" in r.stderr.lower()


def test_help_teaches_with_examples() -> None:
    r = edgellm("--help")
    assert r.returncode == 0 and "examples:" in r.stdout
    for cmd in ("run", "chat", "convert", "info"):
        r = edgellm(cmd, "--help")
        assert r.returncode == 0 and "example" in r.stdout, cmd
