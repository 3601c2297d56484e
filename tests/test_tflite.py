# SPDX-License-Identifier: MIT
"""The TFLite/LiteRT backend: export with litert-torch, run with ai-edge-litert, against native.

Real parts throughout: stories260K and the demo cardiology leaf exported by litert-torch
(int8 by ai-edge-quantizer), run by the LiteRT interpreter, compared with the C runtime.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.tolerances import LOGITS_REL_F32, rel_err

import edgellm
from edgellm.cli import main
from edgellm.errors import TFLiteDelegateError, TFLiteRuntimeError, UnsupportedError
from edgellm.formats.bundle import read_manifest
from edgellm.formats.convert import convert
from edgellm.hub.build import build
from edgellm.tflite.export import export_tflite, quantize_tflite
from edgellm.tflite.runtime import TFLiteModel, check_runtime

DATA = Path(__file__).parent / "data" / "stories260K"
GOLDEN = (DATA / "golden_greedy.txt").read_text(encoding="utf-8").rstrip("\n")
LEAF = Path(edgellm.__file__).parent / "demo" / "bundles" / "en-medical-cardiology-rpi5-q8_0"
# The issue's bar: the int8 export picks native Q8_0's greedy token at >= 97% of positions.
# int8 per-channel weights round differently from Q8_0's 32-blocks and Q8_0 also quantises
# activations; the leaf (4096-token vocabulary) has near-ties a few times per hundred steps.
GREEDY_AGREE_INT8 = 0.97
N_POS = 256  # greedy positions per prompt
PROMPTS = {
    "stories": ["", "Once upon a time", "Tom had a red ball", "The little dog"],
    "leaf": ["The patient presented with chest pain and", "Atrial fibrillation is",
             "The heart", "Treatment of heart failure includes"],
}


def _f32_folder(src: Path, out: Path) -> Path:
    """out/ with model.gguf (F32) and model.tflite (its F32 export): what Model() opens."""
    out.mkdir()
    gguf = convert(src, out / "model.gguf", type="f32", log=None)
    export_tflite(gguf, out / "model.tflite", quantize=None)
    return out


@pytest.fixture(scope="module")
def f32(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tflite-f32")
    return {"stories": _f32_folder(DATA / "stories260K.bin", root / "stories"),
            "leaf": _f32_folder(LEAF / "model.gguf", root / "leaf")}


@pytest.fixture(scope="module")
def coral(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`edgellm build ... --board coral-dev-board` bundles: stories260K through the CLI, the leaf
    through build(); each holds model.gguf (the native Q8_0 build) and model.tflite (int8)."""
    out = tmp_path_factory.mktemp("coral")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # litert-torch's progress must not land there
        rc = main(["build", str(DATA / "stories260K.bin"), "--board", "coral-dev-board",
                   "--out", str(out / "s"), "--node", "stories", "--json"])
    assert rc == 0
    assert json.loads(stdout.getvalue())["backend"]["file"] == "model.tflite"
    leaf = build(LEAF / "model.gguf", "coral-dev-board", out=out / "l", log=None)
    return {"stories": out / "s" / "stories-coral-dev-board-q8_0", "leaf": leaf.bundle.folder}


@pytest.mark.parametrize("name", ["stories", "leaf"])
def test_f32_export_logits_match_native(f32: dict[str, Path], name: str) -> None:
    folder = f32[name]
    rng = np.random.default_rng(7)
    with edgellm.Model(folder / "model.gguf", n_threads=2) as native:
        vocab = native.config.vocab_size
        tokens = [1] + [int(t) for t in rng.integers(3, vocab, 149)]  # 3 prefill chunks, padded
        want = native.logits(tokens)
        with native.session() as s:
            s.eval(tokens[:20])
            steps = [s._last.copy()]
            for t in tokens[20:40]:
                s.eval([t])
                steps.append(s._last.copy())
    with edgellm.Model(folder, n_threads=2) as m:
        assert isinstance(m, TFLiteModel) and m.quantize == "none"
        got = m.logits(tokens)
        with m.session() as s:
            s.eval(tokens[:20])
            dec = [s._last.copy()]
            for t in tokens[20:40]:
                s._step(t)  # the decode signature
                dec.append(s._last.copy())
    assert got.shape == want.shape == (150, vocab)
    for pos in range(len(tokens)):
        assert rel_err(got[pos], want[pos]) < LOGITS_REL_F32, pos
    for i, (a, b) in enumerate(zip(dec, steps)):
        assert rel_err(a, b) < LOGITS_REL_F32, i


def test_f32_export_reproduces_the_published_greedy_output(f32: dict[str, Path]) -> None:
    with edgellm.Model(f32["stories"] / "model.tflite", n_threads=2) as m:
        assert m.generate("", max_tokens=256, temperature=0.0) == GOLDEN


def test_generate_behaves_as_the_native_runtime(f32: dict[str, Path]) -> None:
    """Same tokenizer, sampler, streaming and stop strings: same text from the same seed."""
    kw = dict(max_tokens=60, temperature=0.9, top_k=40, top_p=0.95, seed=11)
    with edgellm.Model(f32["stories"] / "model.gguf", n_threads=2) as native, \
            edgellm.Model(f32["stories"], n_threads=2) as m:
        assert m.tokenize("Once upon a time") == native.tokenize("Once upon a time")
        want = native.generate("Once upon a time", **kw)
        assert m.generate("Once upon a time", **kw) == want
        pieces = list(m.generate("Once upon a time", stream=True, **kw))
        assert len(pieces) > 5 and "".join(pieces) == want
        cut = m.generate("Once upon a time", stop="Lily", **dict(kw, temperature=0.0))
        assert cut == native.generate("Once upon a time", stop="Lily", **dict(kw, temperature=0.0))
        assert "Lily" not in cut
        with m.session() as s:  # the cache persists between calls; a shared prefix is reused
            first = s.generate("Once upon a time", max_tokens=8, temperature=0.0)
            assert s.pos == len(m.tokenize("Once upon a time")) + 8
            assert s.generate("Once upon a time", max_tokens=8, temperature=0.0) == first
        with pytest.raises(edgellm.ContextFullError), m.session(n_ctx=16) as s:
            s.eval(list(range(3, 20)))
        with pytest.raises(UnsupportedError, match="adapters"):
            m.attach_adapter(f32["stories"] / "model.gguf")


def test_the_runner_fallback_matches_the_in_place_cache(f32: dict[str, Path]) -> None:
    """Where the interpreter gives no view of a signature's buffers (tflite-runtime), the public
    signature runner carries the cache in on every call: same logits, same text."""
    tokens = [1, *range(3, 90)]
    with edgellm.Model(f32["stories"], n_threads=2) as m:
        assert all(sig.fast is not None for sig in m._sigs.values())  # ai-edge-litert: in place
        want, text = m.logits(tokens), m.generate("Tom", max_tokens=40, temperature=0.0)
        for sig in m._sigs.values():
            sig.fast = None
        assert np.array_equal(m.logits(tokens), want)
        assert m.generate("Tom", max_tokens=40, temperature=0.0) == text


@pytest.mark.parametrize("name", ["stories", "leaf"])
def test_coral_build_int8_agrees_with_native_q8_0(coral: dict[str, Path], name: str) -> None:
    b = read_manifest(coral[name]).verify()
    assert b.board == "coral-dev-board" and b.recipe == "q8_0"
    assert {f.name for f in b.files} == {"model.gguf", "model.tflite"}
    be = b.backend
    assert (be["name"], be["file"], be["quantize"]) == ("tflite", "model.tflite", "int8")
    cfg = b.config
    cache = [[cfg.n_layers, be["n_ctx"], cfg.n_kv_heads * cfg.head_dim], "float32"]
    assert be["signatures"]["decode"]["inputs"]["k_cache"] == cache
    assert be["signatures"]["prefill"]["outputs"]["logits"] == [[1, be["prefill_len"], cfg.vocab_size], "float32"]
    agree = total = 0
    with edgellm.Model(b.model_path, n_threads=2) as native, \
            edgellm.Model(b.folder, n_threads=2, delegate=None) as m:
        assert isinstance(m, TFLiteModel) and m.quantize == "int8"
        for text in PROMPTS[name]:
            ids = native.tokenize(text)
            with native.session() as s:  # native Q8_0's own greedy path, 256 steps
                s.eval(ids)
                seq = list(ids)
                for _ in range(N_POS):
                    seq.append(int(np.argmax(s._last)))
                    s.eval(seq[-1:])
            want = native.logits(seq)[len(ids) - 1 : -1].argmax(-1)
            got = m.logits(seq)[len(ids) - 1 : -1].argmax(-1)  # teacher-forced on that path
            agree += int((want == got).sum())
            total += N_POS
    assert agree / total >= GREEDY_AGREE_INT8, f"{agree}/{total}"


def test_a_missing_delegate_is_named(coral: dict[str, Path]) -> None:
    with pytest.raises(TFLiteDelegateError, match=r"coral-dev-board .*libedgetpu\.so\.1.*not installed.*delegate=None"):
        edgellm.Model(coral["stories"])
    with pytest.raises(TFLiteDelegateError, match="libnot-a-delegate.so.1"):
        edgellm.Model(coral["stories"], delegate="libnot-a-delegate.so.1")
    with pytest.raises(FileNotFoundError):  # the builtin it also is
        edgellm.Model(coral["stories"], delegate="/nonexistent/libdelegate.so")
    # The CLI passes no delegate: the error names the switch, which then runs it on the CPU.
    cmd = [sys.executable, "-m", "edgellm", "run", str(coral["stories"]), "--temp", "0", "-n", "20"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "EDGELLM_TFLITE_DELEGATE=none" in r.stderr, r.stderr
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, EDGELLM_TFLITE_DELEGATE="none"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time")


def _noop_delegate(folder: Path) -> Path:
    """tests/data/tflite/noop_delegate.c built as folder/libedgetpu.so.1 (+ the dev symlink)."""
    folder.mkdir()
    lib = folder / "libedgetpu.so.1"
    r = subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-Wl,-soname,libedgetpu.so.1", "-o",
                        str(lib), str(Path(__file__).parent / "data" / "tflite" / "noop_delegate.c")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (folder / "libedgetpu.so").symlink_to(lib.name)
    return lib


def test_a_present_delegate_is_loaded(tmp_path: Path, coral: dict[str, Path]) -> None:
    """A delegate plugin that claims no ops (so outputs stay the CPU's): the interpreter must
    call its Prepare, whether named by path or found for the board's tflite_delegate."""
    import ctypes

    lib = _noop_delegate(tmp_path / "lib")
    with edgellm.Model(coral["stories"], n_threads=2, delegate=None) as m:
        want = m.generate("", max_tokens=20, temperature=0.0)
    with edgellm.Model(coral["stories"], n_threads=2, delegate=str(lib)) as m:
        assert m.delegate == str(lib)
        assert m.generate("", max_tokens=20, temperature=0.0) == want
    assert ctypes.CDLL(str(lib)).noop_delegate_prepare_calls() >= 1
    # The board's library name, found by the dynamic loader (a fresh process: LD_LIBRARY_PATH
    # is read at start-up; LIBRARY_PATH lets ctypes.util.find_library's gcc probe see it).
    code = ("import ctypes, edgellm\n"
            f"m = edgellm.Model({str(coral['stories'])!r}, n_threads=2)\n"
            "print(m.delegate)\n"
            "print(m.generate('', max_tokens=20, temperature=0.0))\n"
            "print(ctypes.CDLL(m.delegate).noop_delegate_prepare_calls())\n")
    env = dict(os.environ, LD_LIBRARY_PATH=str(lib.parent), LIBRARY_PATH=str(lib.parent))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stderr
    name, text, calls = r.stdout.rstrip("\n").split("\n")
    assert name.endswith("libedgetpu.so.1") and text == want and int(calls) >= 1


def test_refused_runtime_combinations(f32: dict[str, Path]) -> None:
    # tflite-runtime 2.14 (its last release): built against numpy 1; wrong on dynamic-range int8.
    with pytest.raises(TFLiteRuntimeError, match="numpy"):
        check_runtime("tflite_runtime", "2.14.0", "2.1.0", dynamic_int8=False)
    with pytest.raises(TFLiteRuntimeError, match="wrong results"):
        check_runtime("tflite_runtime", "2.14.0", "1.26.4", dynamic_int8=True)
    check_runtime("tflite_runtime", "2.14.0", "1.26.4", dynamic_int8=False)  # f32, weight-only int8
    check_runtime("ai_edge_litert", "2.3.0", np.__version__, dynamic_int8=True)
    # This machine has tflite-runtime 2.14 installed beside numpy 2: refused before it crashes.
    assert int(np.__version__.split(".")[0]) >= 2
    with pytest.raises(TFLiteRuntimeError, match=r"tflite-runtime 2\.14.*numpy"):
        edgellm.Model(f32["stories"], runtime="tflite_runtime")
    with pytest.raises(edgellm.InvalidArgumentError, match="runtime"):
        edgellm.Model(f32["stories"], runtime="tensorflow")


def test_a_dynamic_range_export_is_refused_on_tflite_runtime(tmp_path: Path, f32: dict[str, Path]) -> None:
    """A dynamic-range export (int8 arithmetic) runs on ai-edge-litert and is refused on
    tflite-runtime; a bare file's quantisation is read from its tensors."""
    folder = tmp_path / "dyn"
    folder.mkdir()
    (folder / "model.gguf").write_bytes((f32["stories"] / "model.gguf").read_bytes())
    flat = (f32["stories"] / "model.tflite").read_bytes()
    (folder / "model.tflite").write_bytes(quantize_tflite(flat, "int8-dynamic"))
    with edgellm.Model(folder, n_threads=2) as m:
        assert m.runtime == "ai_edge_litert" and m.quantize == "int8-dynamic"
        assert m.generate("", max_tokens=24, temperature=0.0).startswith("Once upon a time")
    with pytest.raises(TFLiteRuntimeError, match="tflite-runtime"):
        edgellm.Model(folder, runtime="tflite_runtime")
    alone = tmp_path / "alone"  # no model.gguf beside it: no tokenizer, no config
    alone.mkdir()
    (alone / "model.tflite").write_bytes(flat)
    with pytest.raises(edgellm.ModelFormatError, match="model.gguf"):
        edgellm.Model(alone / "model.tflite")


# Runs inside the numpy<2 venv that .ci/setup makes for tflite-runtime 2.14 (its last release).
_RAW_PREFILL = """
import sys, numpy as np
import tflite_runtime.interpreter as tr
run = tr.Interpreter(model_path=sys.argv[1], num_threads=2).get_signature_runner("prefill")
ins = run.get_input_details()
n, cache = ins["tokens"]["shape"][1], np.zeros(ins["k_cache"]["shape"], np.float32)
tokens = (np.arange(n, dtype=np.int32) * 7 + 1)[None] % 500
out = run(tokens=tokens, input_pos=np.arange(n, dtype=np.int32), k_cache=cache, v_cache=cache)
np.save(sys.argv[2], out["logits"][0])
"""


def _litert_prefill(path: Path) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    run = Interpreter(model_path=str(path), num_threads=2).get_signature_runner("prefill")
    ins = run.get_input_details()
    n, cache = ins["tokens"]["shape"][1], np.zeros(ins["k_cache"]["shape"], np.float32)
    tokens = (np.arange(n, dtype=np.int32) * 7 + 1)[None] % 500
    out: np.ndarray = run(tokens=tokens, input_pos=np.arange(n, dtype=np.int32), k_cache=cache,
                          v_cache=cache)["logits"][0]
    return out


def test_tflite_runtime_2_14_is_wrong_exactly_where_edgellm_refuses_it(
        tmp_path: Path, f32: dict[str, Path], coral: dict[str, Path]) -> None:
    """tflite-runtime 2.14 with numpy<2 (a venv): right on f32 and weight-only int8 exports,
    wrong on dynamic-range int8 -- the one combination check_runtime refuses."""
    python = Path(os.environ.get("EDGELLM_TFLRT_VENV", "/opt/edgellm/tflite-runtime-2.14")) / "bin" / "python"
    assert python.is_file(), f"{python} missing: run .ci/setup (it makes the tflite-runtime venv)"
    dyn = tmp_path / "dyn.tflite"
    dyn.write_bytes(quantize_tflite((f32["stories"] / "model.tflite").read_bytes(), "int8-dynamic"))
    cases = {"none": f32["stories"] / "model.tflite", "int8": coral["stories"] / "model.tflite",
             "int8-dynamic": dyn}
    for mode, path in cases.items():
        r = subprocess.run([str(python), "-c", _RAW_PREFILL, str(path), str(tmp_path / f"{mode}.npy")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        theirs, ours = np.load(tmp_path / f"{mode}.npy"), _litert_prefill(path)
        right = rel_err(theirs, ours) < LOGITS_REL_F32
        agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
        if mode == "int8-dynamic":
            assert not right and agree < 0.5, (mode, agree)
            with pytest.raises(TFLiteRuntimeError, match="wrong results"):
                check_runtime("tflite_runtime", "2.14.0", "1.26.4", dynamic_int8=True)
        else:
            assert right and agree == 1.0, mode
            check_runtime("tflite_runtime", "2.14.0", "1.26.4", dynamic_int8=False)


def test_native_models_never_import_the_tflite_stack(f32: dict[str, Path]) -> None:
    code = ("import sys, edgellm\n"
            f"m = edgellm.Model({str(f32['stories'] / 'model.gguf')!r})\n"
            "m.generate('Once', max_tokens=4)\n"
            "bad = [k for k in sys.modules if k.split('.')[0] in "
            "('ai_edge_litert', 'tflite_runtime', 'litert_torch', 'torch') or k.startswith('edgellm.tflite')]\n"
            "print(json.dumps(bad))\n")
    r = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
