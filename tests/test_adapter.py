# SPDX-License-Identifier: MIT
"""LoRA adapters: attached logits == merged weights, detach is exact, llama.cpp agrees, bad files refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.random_gguf import Shape, metadata, tensor_shapes, write_random_gguf
from support.tolerances import LOGITS_REL_F32, LOGITS_REL_Q8_0, rel_err

from edgellm.cli import main as cli_main
from edgellm.errors import (
    InvalidArgumentError,
    ModelFormatError,
    StateError,
    UnsupportedError,
)
from edgellm.formats import quant
from edgellm.formats.adapter import lora_scale, read_adapter, write_adapter
from edgellm.formats.gguf import GGUFValue, GGUFValueType, read_gguf, write_gguf
from edgellm.runtime.model import Model

# Tiny models: GQA and MQA, tied and untied outputs (q_dim and kv_dim not always multiples of 32).
SHAPES = {
    "gqa-untied": Shape(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2,
                        vocab_size=300, seq_len=128, tied=False),
    "mqa-tied": Shape(dim=96, hidden_dim=224, n_layers=2, n_heads=6, n_kv_heads=1,
                      vocab_size=320, seq_len=128, tied=True),
}
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
PROMPT = [1, 17, 290, 33, 5, 81, 260, 44, 9, 120, 71, 3]  # prefilled in one batched eval
N_DECODE = 6  # then single-token steps
ALPHA, RANK, SCALE = 16.0, 8, 0.75


def _write_f32_model(path: Path, s: Shape, seed: int) -> Path:
    """A random F32 llama (weights ~ N(0, 0.05), norms ~ 1 +- 0.1): logits of a few units."""
    rng = np.random.default_rng(seed)
    items: list[tuple[str, Any, int]] = []
    for name, shape in tensor_shapes(s):
        if len(shape) == 1:
            w = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            w = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        items.append((name, w, 0))
    return write_gguf(path, metadata(s, "f32"), items)


def _random_lora(s: Shape, seed: int, rank: int = RANK, output: bool = False,
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A, B for every projection of every layer (and output.weight when asked).

    Sized so scale * alpha / rank * B @ A is about as large as the base weights: the adapter
    moves the logits far beyond the comparison tolerances.
    """
    rng = np.random.default_rng(seed)
    shapes = dict(tensor_shapes(s))
    names = [f"blk.{i}.{p}.weight" for i in range(s.n_layers) for p in PROJECTIONS]
    if output:
        names.append("output.weight")
    out = {}
    for name in names:
        n_out, n_in = shapes[name]
        a = (0.08 * rng.standard_normal((rank, n_in))).astype(np.float32)
        b = (0.08 * rng.standard_normal((n_out, rank))).astype(np.float32)
        out[name] = (a, b)
    return out


def _write_merged(base: Path, out: Path, lora: dict[str, tuple[np.ndarray, np.ndarray]],
                  factor: float) -> Path:
    """base with W + factor * B @ A (float64, then F32) in every adapted tensor, all F32."""
    with read_gguf(base) as gf:
        meta = {k: v for k, v in gf.fields.items() if k != "general.file_type"}
        items: list[tuple[str, Any, int]] = []
        for name, info in gf.tensors.items():
            raw = gf.tensor_array(name)
            shape = info.shape[::-1]
            w = np.array(raw, dtype=np.float64) if info.type in (0, 1) else \
                quant.dequantize(raw, info.type, shape).astype(np.float64)
            if name in lora:
                a, b = lora[name]
                w = w + factor * (b.astype(np.float64) @ a.astype(np.float64))
            items.append((name, w.astype(np.float32), 0))
    return write_gguf(out, meta, items)


def _run(m: Model, tokens: list[int] = PROMPT, n_decode: int = N_DECODE) -> np.ndarray:
    """Logits of a batched prefill of tokens, then of n_decode greedy single-token steps."""
    rows = []
    with m.session(n_ctx=128) as s:
        rows.extend(s.eval(tokens, logits="all"))
        for _ in range(n_decode):
            rows.append(s.eval([int(np.argmax(rows[-1]))], logits="last"))
    return np.asarray(rows)


@pytest.fixture(scope="module", params=[(k, t) for k in sorted(SHAPES) for t in ("f32", "q8_0")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    key, wtype = request.param
    s = SHAPES[key]
    root = tmp_path_factory.mktemp(f"{key}-{wtype}")
    if wtype == "f32":
        base = _write_f32_model(root / "base.gguf", s, seed=7)
    else:
        base = write_random_gguf(root / "base.gguf", s, "q8_0", seed=7)
    lora = _random_lora(s, seed=11, output=not s.tied)
    with read_gguf(base) as gf:
        adapter = write_adapter(root / "lora.gguf", gf.metadata, lora, ALPHA)
    merged = _write_merged(base, root / "merged.gguf", lora, lora_scale(ALPHA, RANK, SCALE))
    return {"shape": s, "wtype": wtype, "base": base, "adapter": adapter, "merged": merged,
            "lora": lora, "root": root}


# --- numerics ------------------------------------------------------------------------


def test_attached_adapter_matches_merged_weights(case: dict[str, Any]) -> None:
    with Model(case["merged"], n_threads=2) as mm:
        want = _run(mm)
    with Model(case["base"], n_threads=2) as m:
        base = _run(m)
        info = m.attach_adapter(case["adapter"], scale=SCALE)
        got = _run(m)
    assert (info.rank, info.alpha, info.scale) == (RANK, ALPHA, SCALE)
    assert info.n_tensors == len(case["lora"])
    # Q8_0 bases quantise activations for the base matmul only (the merged reference is F32).
    tol = LOGITS_REL_F32 if case["wtype"] == "f32" else LOGITS_REL_Q8_0
    assert rel_err(got, want) < tol
    # The adapter moves the logits far more than the tolerance: the comparison can fail.
    assert rel_err(base, want) > 20 * tol


def test_detach_restores_the_base_exactly_and_scale_zero_is_the_base(case: dict[str, Any]) -> None:
    with Model(case["base"], n_threads=2) as fresh:
        want = _run(fresh)
    with Model(case["base"], n_threads=2) as m:
        m.attach_adapter(case["adapter"], scale=SCALE)
        assert m.adapter is not None
        assert not np.array_equal(_run(m), want)
        m.detach_adapter()
        assert m.adapter is None
        assert np.array_equal(_run(m), want)
        m.attach_adapter(case["adapter"], scale=0.0)  # adds exactly 0 * B A x
        assert np.array_equal(_run(m), want)


def test_thread_count_does_not_change_adapted_logits(case: dict[str, Any]) -> None:
    outs = []
    for n in (1, 3):
        with Model(case["base"], n_threads=n) as m:
            m.attach_adapter(case["adapter"], scale=SCALE)
            outs.append(_run(m, PROMPT * 6, 2))  # 72 tokens: two prefill chunks
    assert np.array_equal(outs[0], outs[1])


def test_f16_and_q8_0_adapter_files_agree_with_f32(case: dict[str, Any]) -> None:
    root = case["root"]
    lora32 = _random_lora(case["shape"], seed=12, rank=32)  # Q8_0 needs rank % 32 == 0
    with read_gguf(case["base"]) as gf:
        f16 = write_adapter(root / "lora-f16.gguf", gf.metadata, case["lora"], ALPHA, type="f16")
        r32 = write_adapter(root / "lora-r32.gguf", gf.metadata, lora32, ALPHA)
        q8 = write_adapter(root / "lora-r32-q8_0.gguf", gf.metadata, lora32, ALPHA, type="q8_0")
    with Model(case["base"], n_threads=2) as m:
        m.attach_adapter(case["adapter"], scale=SCALE)
        want = _run(m)
        m.attach_adapter(f16, scale=SCALE)  # replaces the F32 one
        got = _run(m)
        m.attach_adapter(r32, scale=SCALE)
        want32 = _run(m)
        m.attach_adapter(q8, scale=SCALE)
        got32 = _run(m)
    assert rel_err(got, want) < 1e-2  # A and B rounded to 11 significant bits
    assert rel_err(got32, want32) < 5e-2  # A and B rounded to 8 bits per 32-block
    assert rel_err(got32, want) > 0.1  # (another adapter: the comparisons can fail)
    assert f16.stat().st_size < case["adapter"].stat().st_size * 0.6
    assert q8.stat().st_size < r32.stat().st_size * 0.3


def test_an_adapter_written_by_the_gguf_package_loads(case: dict[str, Any]) -> None:
    """A file from llama.cpp's own writer (the gguf package, as convert_lora_to_gguf.py uses)."""
    import gguf

    path = case["root"] / "theirs.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, ALPHA)
    for name, (a, b) in case["lora"].items():
        w.add_tensor(name + ".lora_a", a)
        w.add_tensor(name + ".lora_b", b.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with read_gguf(case["base"]) as gf:
        ours = write_adapter(case["root"] / "ours.gguf", gf.metadata,
                             {n: (a, b.astype(np.float16).astype(np.float32)) for n, (a, b) in case["lora"].items()},
                             ALPHA)
    with Model(case["base"], n_threads=2) as m:
        m.attach_adapter(path, scale=SCALE)
        got = _run(m)
        m.attach_adapter(ours, scale=SCALE)
        assert np.array_equal(got, _run(m))  # F16 B is widened exactly: the same adapter


# --- llama.cpp -----------------------------------------------------------------------


def _llama_cpp_logits(model: Path, tokens: list[int], lora: Path | None, scale: float,
                      kv_f32: bool) -> np.ndarray:
    """llama.cpp's logits of every position, its adapter loaded through llama-cpp-python."""
    import llama_cpp

    kw: dict[str, Any] = {"lora_path": str(lora), "lora_scale": scale} if lora else {}
    if kv_f32:  # GGML_TYPE_F32 caches, as edgellm uses for float models (llama.cpp's default is F16)
        kw |= {"type_k": 0, "type_v": 0}
    llm = llama_cpp.Llama(str(model), n_ctx=64, n_threads=2, verbose=False, logits_all=True, **kw)
    try:
        llm.reset()
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def test_llama_cpp_loads_the_same_adapter_and_agrees(case: dict[str, Any]) -> None:
    tokens = PROMPT + [250, 12, 99, 7]
    f32 = case["wtype"] == "f32"
    theirs = _llama_cpp_logits(case["base"], tokens, case["adapter"], SCALE, f32)
    theirs_base = _llama_cpp_logits(case["base"], tokens, None, 1.0, f32)
    with Model(case["base"], n_threads=2) as m:
        m.attach_adapter(case["adapter"], scale=SCALE)
        ours = m.logits(tokens)
    # Q8_0: the two runtimes' base forwards already differ by ~7e-3 on these random models.
    tol = LOGITS_REL_F32 if f32 else LOGITS_REL_Q8_0
    assert rel_err(ours, theirs) < tol
    assert rel_err(theirs_base, theirs) > 20 * tol  # llama.cpp did apply it
    assert [int(np.argmax(r)) for r in ours] == [int(np.argmax(r)) for r in theirs]


# --- refusals ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("refusals")
    s = SHAPES["gqa-untied"]
    base = _write_f32_model(root / "base.gguf", s, seed=3)
    lora = _random_lora(s, seed=4)
    with read_gguf(base) as gf:
        meta = dict(gf.metadata)
    good = write_adapter(root / "good.gguf", meta, lora, ALPHA)
    return {"root": root, "shape": s, "base": base, "meta": meta, "lora": lora, "good": good}


def _raw_adapter(path: Path, tensors: list[tuple[str, Any, int]], **meta: Any) -> Path:
    """An adapter written by hand (write_adapter refuses what these tests need)."""
    keys: dict[str, Any] = {"general.architecture": "llama", "general.type": "adapter",
                            "adapter.type": "lora",
                            "adapter.lora.alpha": GGUFValue(GGUFValueType.FLOAT32, ALPHA)}
    keys.update({k.replace("__", "."): v for k, v in meta.items()})
    return write_gguf(path, {k: v for k, v in keys.items() if v is not None}, tensors)


def _bad_files(small: dict[str, Any]) -> Iterator[tuple[str, Path, type[Exception]]]:
    root, meta, lora = small["root"], small["meta"], small["lora"]
    a, b = lora["blk.0.attn_q.weight"]
    yield ("other architecture",
           write_adapter(root / "qwen.gguf", {**meta, "general.architecture": "qwen2"}, lora, ALPHA),
           ModelFormatError)
    a_wide = np.zeros((RANK, a.shape[1] + 32), np.float32)
    yield "n_in mismatch", write_adapter(root / "nin.gguf", meta, {"blk.0.attn_q.weight": (a_wide, b)},
                                         ALPHA), ModelFormatError
    b_tall = np.zeros((b.shape[0] * 2, RANK), np.float32)
    yield "n_out mismatch", write_adapter(root / "nout.gguf", meta, {"blk.0.attn_q.weight": (a, b_tall)},
                                          ALPHA), ModelFormatError
    yield "rank mismatch", _raw_adapter(root / "rank.gguf", [
        ("blk.0.attn_q.weight.lora_a", a, 0), ("blk.0.attn_q.weight.lora_b", b[:, :4].copy(), 0)]), \
        ModelFormatError
    yield "missing lora_b", _raw_adapter(root / "half.gguf", [("blk.0.attn_q.weight.lora_a", a, 0)]), \
        ModelFormatError
    yield "unknown name", _raw_adapter(root / "name.gguf", [
        ("blk.0.attn_q.weight.lora_a", a, 0), ("blk.0.attn_q.weight.lora_b", b, 0),
        ("blk.0.attn_q.weight.scale", np.ones(4, np.float32), 0)]), ModelFormatError
    yield "unknown base tensor", _raw_adapter(root / "base-name.gguf", [
        ("blk.0.attn_qq.weight.lora_a", a, 0), ("blk.0.attn_qq.weight.lora_b", b, 0)]), ModelFormatError
    yield "a norm", _raw_adapter(root / "norm.gguf", [
        ("blk.0.attn_norm.weight.lora_a", a, 0), ("blk.0.attn_norm.weight.lora_b", b, 0)]), \
        ModelFormatError
    yield "layer beyond the model", write_adapter(root / "layer.gguf", meta, {"blk.7.attn_q.weight": (a, b)},
                                                  ALPHA), ModelFormatError
    yield "not an adapter", small["base"], ModelFormatError
    yield "a control vector", _raw_adapter(root / "cvec.gguf", [
        ("blk.0.attn_q.weight.lora_a", a, 0), ("blk.0.attn_q.weight.lora_b", b, 0)],
        adapter__type="control_vector"), UnsupportedError
    yield "negative alpha", _raw_adapter(root / "alpha.gguf", [
        ("blk.0.attn_q.weight.lora_a", a, 0), ("blk.0.attn_q.weight.lora_b", b, 0)],
        adapter__lora__alpha=GGUFValue(GGUFValueType.FLOAT32, -1.0)), ModelFormatError
    nan_a = a.copy()
    nan_a[3, 5] = np.nan
    yield "NaN in lora_a", _raw_adapter(root / "nan.gguf", [
        ("blk.0.attn_q.weight.lora_a", nan_a, 0), ("blk.0.attn_q.weight.lora_b", b, 0)]), ModelFormatError
    inf_b = b.astype(np.float16)
    inf_b[1, 2] = np.inf
    yield "Inf in an F16 lora_b", _raw_adapter(root / "inf.gguf", [
        ("blk.1.ffn_down.weight.lora_a", lora["blk.1.ffn_down.weight"][0], 0),
        ("blk.1.ffn_down.weight.lora_b", np.vstack([inf_b, inf_b])[: lora["blk.1.ffn_down.weight"][1].shape[0]],
         1)]), ModelFormatError
    yield "token_embd", _raw_adapter(root / "embd.gguf", [
        ("token_embd.weight.lora_a", np.zeros((300, RANK), np.float32), 0),
        ("token_embd.weight.lora_b", np.zeros((RANK, 64), np.float32), 0)]), UnsupportedError


# What each refusal's message must say (the reason, not just any error of the right class).
WHY = {
    "other architecture": "architecture 'qwen2'", "n_in mismatch": "does not fit the base",
    "n_out mismatch": "does not fit the base", "rank mismatch": "differs from lora_b",
    "missing lora_b": "has lora_a but no lora_b", "unknown name": "not a LoRA tensor",
    "unknown base tensor": "not a tensor of a llama", "a norm": "not a projection",
    "layer beyond the model": "layer 7 is outside", "not an adapter": "not an adapter",
    "a control vector": "control_vector", "negative alpha": "alpha",
    "NaN in lora_a": "row 3, column 5) is not finite", "Inf in an F16 lora_b": "row 1, column 2",
    "token_embd": "token_embd",
}


def test_bad_adapters_are_refused_and_the_attached_one_stays(small: dict[str, Any]) -> None:
    with Model(small["base"], n_threads=2) as m:
        m.attach_adapter(small["good"], scale=SCALE)
        before = _run(m, n_decode=1)
        info = m.adapter
        seen = set()
        for what, path, err in _bad_files(small):
            with pytest.raises(err, match=WHY[what].replace("(", r"\(").replace(")", r"\)")):
                m.attach_adapter(path, scale=1.0)
            assert m.adapter == info, what
            seen.add(what)
        assert seen == set(WHY)
        assert np.array_equal(_run(m, n_decode=1), before)
        with pytest.raises(InvalidArgumentError):
            m.attach_adapter(small["good"], scale=float("nan"))
        with pytest.raises(InvalidArgumentError):
            m.attach_adapter(small["root"] / "missing.gguf")


def test_output_adapter_on_a_tied_model_is_refused(tmp_path: Path) -> None:
    s = SHAPES["mqa-tied"]
    base = _write_f32_model(tmp_path / "tied.gguf", s, seed=5)
    with read_gguf(base) as gf:
        meta = dict(gf.metadata)
    a = np.zeros((RANK, s.dim), np.float32)
    b = np.zeros((s.vocab_size, RANK), np.float32)
    lora = {"output.weight": (a, b)}
    path = write_adapter(tmp_path / "out.gguf", meta, lora, ALPHA)
    with Model(base, n_threads=1) as m, pytest.raises(ModelFormatError, match="tied"):
        m.attach_adapter(path)


def test_write_adapter_refuses_bad_input(small: dict[str, Any]) -> None:
    meta, lora, root = small["meta"], small["lora"], small["root"]
    a, b = lora["blk.0.attn_q.weight"]
    bad_a = a.copy()
    bad_a[0, 0] = np.inf
    for tensors, kw in (({}, {}), ({"blk.0.attn_q.weight": (bad_a, b)}, {}),
                        ({"blk.0.attn_q.weight": (a, b.T.copy())}, {}),
                        ({"blk.0.attn_norm.weight": (a, b)}, {}),
                        ({"blk.0.attn_q.weight": (a, b)}, {"type": "q4_0"})):
        with pytest.raises(InvalidArgumentError):
            write_adapter(root / "w.gguf", meta, tensors, ALPHA, **kw)
    with pytest.raises(InvalidArgumentError):
        write_adapter(root / "w.gguf", meta, lora, -2.0)
    with read_adapter(small["good"]) as lf:
        assert lf.arch == "llama" and lf.alpha == ALPHA and lf.rank == RANK
        assert {p.base for p in lf.pairs} == set(lora)


# --- state ---------------------------------------------------------------------------


def test_attach_and_detach_while_generating_are_refused(small: dict[str, Any]) -> None:
    with Model(small["base"], n_threads=2) as m:
        stream = m.generate(PROMPT, max_tokens=8, temperature=0, stream=True)
        next(stream)
        with pytest.raises(StateError):
            m.attach_adapter(small["good"])
        assert m.adapter is None
        rest = list(stream)  # the answer finishes on the base weights
        assert rest is not None
        m.attach_adapter(small["good"])
        stream = m.generate(PROMPT, max_tokens=8, temperature=0, stream=True)
        next(stream)
        with pytest.raises(StateError):
            m.detach_adapter()
        stream.close()
        m.detach_adapter()
        assert m.adapter is None


def test_a_session_cache_never_mixes_adapters(small: dict[str, Any]) -> None:
    with Model(small["base"], n_threads=2) as m:
        with m.session(n_ctx=64) as s:
            s.eval(PROMPT)
            m.attach_adapter(small["good"], scale=SCALE)
            with pytest.raises(StateError):
                s.eval([5])  # the cache holds base-model positions
            # generate() starts the cache over under the adapter: same text as a fresh session.
            got = s.generate(PROMPT, max_tokens=6, temperature=0)
        with m.session(n_ctx=64) as fresh:
            want = fresh.generate(PROMPT, max_tokens=6, temperature=0)
        assert got == want


def test_cli_run_with_lora(small: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", str(small["base"]), "hello", "-n", "12", "--temp", "0", "-t", "1"]
    assert cli_main(args) == 0
    plain = capsys.readouterr().out
    assert cli_main([*args, "--lora", str(small["good"]), "--lora-scale", str(SCALE)]) == 0
    adapted = capsys.readouterr().out
    with Model(small["base"], n_threads=1) as m:
        m.attach_adapter(small["good"], scale=SCALE)
        want = m.generate("hello", max_tokens=12, temperature=0)
    assert adapted.rstrip("\n") == want
    assert adapted != plain
    assert cli_main([*args, "--lora", str(small["base"])]) == 1  # not an adapter: one-line error
    assert "not an adapter" in capsys.readouterr().err
