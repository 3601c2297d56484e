# SPDX-License-Identifier: MIT
"""Memory and speed estimates against the C core's own sizes and this machine's peak RSS."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.random_gguf import Shape, n_params, write_random_gguf, write_sparse_gguf

import edgellm
from edgellm.formats.convert import convert
from edgellm.hub import estimate
from edgellm.hub.bench import measure_peak_rss

DATA = Path(__file__).parent / "data" / "stories260K"
REPO = Path(__file__).resolve().parents[1]

# The bound: the estimate is within 10% of the measured peak RSS.
MEMORY_REL_TOL = 0.10

# Realistic shapes of a few tens of MB (GQA, untied and tied embeddings, Q8_0 and Q4_0).
DIM512 = Shape(dim=512, hidden_dim=1408, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=8000,
               seq_len=2048)
DIM768 = Shape(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=16384,
               seq_len=2048, tied=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("estimate")
    return {
        "stories260K-q8_0": convert(DATA / "stories260K.bin", out / "stories-q8_0.gguf", type="q8_0",
                                    tokenizer=DATA / "tok512.bin"),
        "stories260K-f32": convert(DATA / "stories260K.bin", out / "stories-f32.gguf", type="f32",
                                   tokenizer=DATA / "tok512.bin"),
        "dim512-q8_0": write_random_gguf(out / "dim512-q8_0.gguf", DIM512, "q8_0", seed=1),
        "dim768-q4_0-bpe": write_random_gguf(out / "dim768-q4_0.gguf", DIM768, "q4_0", seed=2,
                                             tokenizer="bpe"),
    }


@dataclasses.dataclass(frozen=True)
class Board:
    """The fields of edgellm.boards.BoardProfile that the estimates read."""

    name: str
    cores: int
    mem_bandwidth_gbs: float
    sustained_factor: float = 1.0
    measured: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def sustained_bandwidth_bytes_per_s(self) -> float:
        return self.mem_bandwidth_gbs * self.sustained_factor * 1e9


# --- the C core's sizes --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["stories260K-q8_0", "stories260K-f32", "dim512-q8_0", "dim768-q4_0-bpe"])
def test_kv_cache_bytes_match_the_c_core(models: dict[str, Path], name: str) -> None:
    with edgellm.Model(models[name], n_threads=1) as m:
        for n_ctx in (1, 100, m.config.seq_len):
            assert estimate.kv_cache_bytes(m.config, n_ctx, m.kv_type) == m.kv_cache_bytes(n_ctx)


# A child that reports the virtual size a session adds: its KV cache and scratch arena are two
# mmap'd allocations (the session struct and a 1-thread pool are a few hundred heap bytes).
_VSZ_CHILD = r"""
import json, sys
from edgellm.runtime.model import Model
def vsz():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
m = Model(sys.argv[1], n_threads=1)
before = vsz()
s = m.session(n_ctx=int(sys.argv[2]), n_threads=1)
print(json.dumps({"added": vsz() - before, "kv": m.kv_cache_bytes(int(sys.argv[2])), "kv_type": m.kv_type}))
"""


@pytest.mark.parametrize(("name", "n_ctx"), [("dim512-q8_0", 2048), ("dim768-q4_0-bpe", 300)])
def test_scratch_formula_matches_the_session_allocation(models: dict[str, Path], name: str,
                                                        n_ctx: int) -> None:
    r = subprocess.run([sys.executable, "-c", _VSZ_CHILD, str(models[name]), str(n_ctx)],
                       capture_output=True, text=True, cwd=REPO, check=True)
    got = json.loads(r.stdout)
    facts = estimate.model_facts(models[name])
    scratch = estimate.scratch_bytes(facts.config, n_ctx, 1)
    # Each mmap'd chunk is rounded up to whole pages with a 16-byte header, and the aligned
    # arena may take one more page: at most 3 pages between the formula and the kernel's count.
    assert abs(got["added"] - (got["kv"] + scratch)) <= 3 * 4096, (got, scratch)
    assert scratch > 1_000_000  # the check would not see a missing (chunk, hidden_dim) buffer


# --- memory against peak RSS -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("name", "n_ctx"), [
    ("stories260K-q8_0", 300), ("stories260K-q8_0", 512),
    ("dim512-q8_0", 512), ("dim512-q8_0", 2048),
    ("dim768-q4_0-bpe", 512), ("dim768-q4_0-bpe", 2048),
])
def test_memory_estimate_is_within_10_percent_of_peak_rss(models: dict[str, Path], name: str,
                                                          n_ctx: int) -> None:
    facts = estimate.model_facts(models[name])
    r = measure_peak_rss(models[name], n_ctx, n_threads=1, gen_tokens=256)
    assert r["generated_tokens"] == 256, r  # the measurement covers what it claims
    mem = estimate.memory_bytes(facts.config, facts.weights_bytes, n_ctx, r["kv_type"], n_threads=1,
                                n_tokens=r["positions"], n_merges=facts.n_merges)
    err = (mem.total - r["VmHWM"]) / r["VmHWM"]
    assert abs(err) <= MEMORY_REL_TOL, (name, n_ctx, mem.as_dict(), r)
    # The file's pages are all resident: a forward reads every weight.
    assert r["RssFile"] >= facts.weights_bytes


@pytest.mark.slow
def test_full_context_estimate_bounds_a_filled_session(models: dict[str, Path]) -> None:
    """What select() uses (n_tokens = None: a full KV cache) matches a session run to the end."""
    path = models["dim512-q8_0"]
    facts = estimate.model_facts(path)
    n_ctx = 384
    r = measure_peak_rss(path, n_ctx, n_threads=1, gen_tokens=n_ctx)
    assert r["positions"] == n_ctx, r
    mem = estimate.memory_bytes(facts.config, facts.weights_bytes, n_ctx, r["kv_type"], n_threads=1)
    assert abs(mem.total - r["VmHWM"]) / r["VmHWM"] <= MEMORY_REL_TOL, (mem.as_dict(), r)
    assert mem.kv_cache == estimate.kv_cache_bytes(facts.config, n_ctx, r["kv_type"])


@given(n_layers=st.integers(1, 4), n_kv=st.sampled_from([1, 2, 4]), hd=st.sampled_from([8, 64, 128]),
       n_ctx=st.integers(1, 3000), frac=st.floats(0, 1), kv_type=st.sampled_from(["f16", "f32"]))
@settings(max_examples=60, deadline=None)
def test_resident_kv_grows_with_positions_up_to_the_allocation(
        n_layers: int, n_kv: int, hd: int, n_ctx: int, frac: float, kv_type: str) -> None:
    cfg = estimate.Dims(dim=n_kv * hd * 2, hidden_dim=64, n_layers=n_layers, n_heads=2 * n_kv,
                        n_kv_heads=n_kv, head_dim=hd, vocab_size=300, seq_len=4096)
    n = int(frac * n_ctx)
    full = estimate.kv_cache_bytes(cfg, n_ctx, kv_type)
    got = estimate.kv_resident_bytes(cfg, n_ctx, kv_type, n)
    more = estimate.kv_resident_bytes(cfg, n_ctx, kv_type, min(n + 1, n_ctx))
    assert got <= more
    assert got <= full + 2 * estimate.PAGE_SIZE  # whole pages around a 16-byte-offset block
    if n == n_ctx:
        assert got >= full
    if n == 0:
        assert got == 0


def test_memory_estimate_rejects_bad_input(models: dict[str, Path]) -> None:
    facts = estimate.model_facts(models["dim512-q8_0"])
    with pytest.raises(edgellm.InvalidArgumentError, match="seq_len"):
        estimate.memory_bytes(facts.config, facts.weights_bytes, 4096, "f16")
    with pytest.raises(edgellm.InvalidArgumentError, match="kv_type"):
        estimate.memory_bytes(facts.config, facts.weights_bytes, 512, "q8_0")
    with pytest.raises(ValueError, match="n_tokens"):
        estimate.memory_bytes(facts.config, facts.weights_bytes, 512, "f16", n_tokens=513)
    with pytest.raises(edgellm.InvalidArgumentError, match="hidden_dim"):
        estimate.memory_bytes({"dim": 64}, 1000, 16, "f16")


# --- file facts ------------------------------------------------------------------------------


def _reference_decode_bytes(path: Path) -> int:
    """Weight bytes per decode step by llama.cpp's own GGUF reader (gguf package)."""
    import gguf

    r = gguf.GGUFReader(path)
    infos = {t.name: t for t in r.tensors}
    total = sum(int(t.n_bytes) for t in r.tensors)
    embd = infos["token_embd.weight"]
    row = int(embd.n_bytes) // int(embd.shape[1])
    return total - int(embd.n_bytes) + row + (int(embd.n_bytes) if "output.weight" not in infos else 0)


@pytest.mark.parametrize("name", ["stories260K-q8_0", "dim512-q8_0", "dim768-q4_0-bpe"])
def test_model_facts_agree_with_an_independent_reader(models: dict[str, Path], name: str) -> None:
    import gguf

    facts = estimate.model_facts(models[name])
    r = gguf.GGUFReader(models[name])
    assert facts.weights_bytes == sum(int(t.n_bytes) for t in r.tensors)
    assert facts.decode_weight_bytes == _reference_decode_bytes(models[name])
    merges = r.fields.get("tokenizer.ggml.merges")
    assert facts.n_merges == (len(merges.data) if merges is not None else 0)


@pytest.mark.parametrize("recipe", ["f16", "q8_0", "q4_0_mixed", "q4_0"])
@pytest.mark.parametrize("tied", [False, True])
def test_manifest_only_facts_are_close_to_the_file_facts(tmp_path: Path, recipe: str, tied: bool) -> None:
    """Without model.gguf (a remote listing) the manifest's numbers give nearly the same facts."""
    shape = dataclasses.replace(DIM512, tied=tied, vocab_size=32000)
    path = write_sparse_gguf(tmp_path / "m.gguf", shape, recipe)
    exact = estimate.model_facts(path)

    @dataclasses.dataclass
    class Manifest:  # the fields of formats.bundle.Bundle that facts_from_bundle reads
        folder: Path
        config: object
        weights_bytes: int
        recipe: str
        files: tuple[object, ...] = ()

    summary = dataclasses.make_dataclass("S", ["n_params"])(n_params(shape))
    cfg = {**dataclasses.asdict(exact.config)}
    cfg_obj = type("Cfg", (), {**cfg, "n_params": summary.n_params})()
    facts = estimate.facts_from_bundle(Manifest(tmp_path / "absent", cfg_obj, exact.weights_bytes, recipe))
    assert facts.weights_bytes == exact.weights_bytes
    assert abs(facts.decode_weight_bytes - exact.decode_weight_bytes) <= 0.01 * exact.decode_weight_bytes


# --- speed -------------------------------------------------------------------------------------


def test_decode_estimate_is_the_roofline_of_its_inputs(models: dict[str, Path]) -> None:
    facts = estimate.model_facts(models["dim512-q8_0"])
    cfg = facts.config
    slow_mem = Board("slow", cores=4, mem_bandwidth_gbs=4.0, sustained_factor=0.5)
    e = estimate.decode_estimate(cfg, facts.decode_bytes, slow_mem, 1024)
    bw = 2e9
    kv = 2 * cfg.n_layers * 512 * cfg.kv_dim * 2  # f16 KV at the mean position 512
    want = 1 / (facts.decode_weight_bytes / bw + kv / bw + estimate.TOKEN_OVERHEAD_S)
    assert e.tokens_per_s == pytest.approx(want, rel=1e-9)
    assert e.basis == "bandwidth" and e.bound == "memory"

    # One-core kernel rates: measured at 1 thread they set the rate ("kernels"); at 4 threads
    # they are extrapolated to 4x and, being below the bandwidth, make it compute-bound.
    rates = {f"kernel_gbs.{t}": 0.1 for t in (*facts.decode_bytes, "f16")}
    fast_mem = dataclasses.replace(slow_mem, mem_bandwidth_gbs=100.0, sustained_factor=1.0, measured=rates)
    one = estimate.decode_estimate(cfg, facts.decode_bytes, fast_mem, 1024, n_threads=1)
    four = estimate.decode_estimate(cfg, facts.decode_bytes, fast_mem, 1024, n_threads=4)
    assert (one.basis, one.bound, four.bound) == ("roofline", "kernels", "compute")
    assert one.seconds_weights == pytest.approx(facts.decode_weight_bytes / 0.1e9)
    assert four.seconds_weights == pytest.approx(one.seconds_weights / 4)
    # Extrapolated rates above the bandwidth are capped by it...
    many = dataclasses.replace(fast_mem, measured=dict.fromkeys(rates, 60.0))
    capped = estimate.decode_estimate(cfg, facts.decode_bytes, many, 1024, n_threads=4)
    assert capped.bound == "memory"
    assert capped.seconds_weights == pytest.approx(facts.decode_weight_bytes / 100e9)
    # ...while a rate measured at that thread count streamed from DRAM and is used as is.
    at4 = dataclasses.replace(fast_mem, measured={f"{k}@4": 150.0 for k in rates})
    got = estimate.decode_estimate(cfg, facts.decode_bytes, at4, 1024, n_threads=4)
    assert got.bound == "kernels"
    assert got.seconds_weights == pytest.approx(facts.decode_weight_bytes / 150e9)

    # A longer context reads more KV per token.
    assert (estimate.decode_tokens_per_s(cfg, facts.decode_bytes, slow_mem, 2048)
            < estimate.decode_tokens_per_s(cfg, facts.decode_bytes, slow_mem, 256))


def test_measured_speed_and_ratio_take_precedence(models: dict[str, Path]) -> None:
    facts = estimate.model_facts(models["dim512-q8_0"], sha256="ab" * 32)
    board = Board("b", cores=4, mem_bandwidth_gbs=10.0)
    base = estimate.decode_tokens_per_s(facts.config, facts.decode_bytes, board, 1024)
    measured = dataclasses.replace(board, measured={"decode_tok_s." + "ab" * 32: 7.5})
    e = estimate.decode_estimate(facts.config, facts.decode_bytes, measured, 1024, sha256=facts.sha256)
    assert (e.tokens_per_s, e.basis) == (7.5, "measured")
    ratio = dataclasses.replace(board, measured={"decode_ratio": 0.5})
    e = estimate.decode_estimate(facts.config, facts.decode_bytes, ratio, 1024, sha256=facts.sha256)
    assert e.tokens_per_s == pytest.approx(base * 0.5) and e.basis == "bandwidth x ratio"


def test_speed_estimate_rejects_bad_input(models: dict[str, Path]) -> None:
    facts = estimate.model_facts(models["dim512-q8_0"])
    board = Board("b", cores=4, mem_bandwidth_gbs=10.0)
    with pytest.raises(edgellm.InvalidArgumentError, match="n_threads"):
        estimate.decode_estimate(facts.config, facts.decode_bytes, board, 512, n_threads=0)
    with pytest.raises(edgellm.InvalidArgumentError, match="bandwidth"):
        estimate.decode_estimate(facts.config, facts.decode_bytes, Board("z", 4, 0.0), 512)
    with pytest.raises(edgellm.InvalidArgumentError, match="seq_len"):
        estimate.decode_estimate(facts.config, facts.decode_bytes, board, 4096)


# --- the on-board bench ----------------------------------------------------------------------


def test_cli_bench_prints_context_first_and_json_lines(models: dict[str, Path]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "edgellm", "bench", str(models["stories260K-q8_0"]), "--board", "x86-host",
         "--threads", "1", "2", "--prompt-tokens", "8", "--gen-tokens", "8", "--reps", "2"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr
    err = r.stderr
    # The board, the kernel table, threads and build come before any number.
    first_number = err.index("threads 1:")
    for label in ("board:", "kernels:", "threads:", "build:", "model:"):
        assert 0 <= err.index(label) < first_number, label
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["threads"] for x in lines] == [1, 2]
    import hashlib

    sha = hashlib.sha256(models["stories260K-q8_0"].read_bytes()).hexdigest()
    for x in lines:
        assert x["board"] == "x86-host" and x["model_sha256"] == sha
        assert x["isa"] and x["edgellm"] and ("git" in x)
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes"):
            assert x[key] > 0, key
        assert len(x["decode_all"]) == 2 and all(v > 0 for v in x["decode_all"])
        assert x["estimate"]["memory"]["total"] > 0 and x["estimate"]["decode_tokens_per_s"] > 0
        assert x["measured_key"] == f"decode_tok_s.{sha}"
    assert f'"decode_tok_s.{sha}"' in err  # the line to paste into boards/x86-host.toml


def test_cli_bench_json_only_and_bad_input(models: dict[str, Path]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "edgellm", "bench", str(models["stories260K-q8_0"]), "--json",
         "--threads", "1", "--prompt-tokens", "4", "--gen-tokens", "4", "--reps", "1"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["threads"] == 1
    r = subprocess.run(
        [sys.executable, "-m", "edgellm", "bench", str(models["stories260K-q8_0"]),
         "--prompt-tokens", "400", "--gen-tokens", "400"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 1 and "seq_len 512" in r.stderr


def test_kernel_rates_give_positive_measured_keys(tmp_path: Path) -> None:
    from edgellm.hub.bench import kernel_rates

    got = kernel_rates(["q4_0"], n_threads=2, mib=16, tokens=4, reps=1, workdir=tmp_path)
    assert set(got) == {"token_overhead_us@2", "kernel_gbs.q4_0@2", "kernel_row_ns.q4_0@2"}
    # These are timings solved from differences of timings: on a loaded 2-core CI machine any of
    # them can come out <= 0, so only their presence and finiteness are checked here; their
    # accuracy is measured by bench/estimate_accuracy.py (docs/selection.md), not in a unit test.
    assert all(math.isfinite(v) for v in got.values())
    assert list(tmp_path.iterdir()) == []  # the synthetic models are gone
