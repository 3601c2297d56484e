# SPDX-License-Identifier: MIT
"""Quant recipes, per-board builds and bundle manifests, on the real stories260K model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from support.tiny_models import make_tiny_llama

import edgellm
from edgellm.boards import BoardProfile, load_board
from edgellm.cli import main
from edgellm.formats.bundle import (
    BundleError,
    BundleIntegrityError,
    BundleSchemaError,
    list_bundles,
    parse_parent,
    read_manifest,
)
from edgellm.formats.convert import convert
from edgellm.formats.gguf import read_gguf
from edgellm.formats.quant import GGMLType
from edgellm.hub.build import AUTO_MAX_CTX, BuildResult, build, footprint, inspect_source
from edgellm.hub.evaluate import gutenberg_body, perplexity
from edgellm.hub.quantize import RECIPES, get_recipe, markdown_table, quality_table

DATA = Path(__file__).parent / "data"
STORIES = DATA / "stories260K" / "stories260K.bin"
BOTCHAN = DATA / "corpora" / "botchan.txt"
QUALITY_TOKENS = 2000  # docs/quantization.md: the first 2000 tokens of Botchan's body
PROMPT = [1, 403, 407, 261, 378]  # BOS "Once upon a time" in tok512


# --- board profiles (boards/*.toml) --------------------------------------------------------

RPI5 = load_board("rpi5")  # native; f16, q8_0, q4_0_mixed, q4_0; 3 GiB budget


def _board(name: str, quant_types: tuple[str, ...], budget: int) -> BoardProfile:
    """rpi5 with other allowed recipes and a RAM budget of exactly `budget` bytes."""
    return dataclasses.replace(RPI5, path=Path(), name=name, ram_mb=64,
                               ram_share=(budget + 0.5) / (64 << 20), quant_types=quant_types,
                               default_type=quant_types[0])


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("text") / "botchan.txt"
    p.write_text(gutenberg_body(BOTCHAN.read_text(encoding="utf-8"))[:20000], encoding="utf-8")
    return p


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# --- recipes and quality -------------------------------------------------------------------


def test_quality_claims_on_stories260k() -> None:
    # The claims: Q8_0 within 1% of F32; q4_0_mixed strictly better than plain Q4_0.
    text = gutenberg_body(BOTCHAN.read_text(encoding="utf-8"))
    rows = {r["recipe"]: r for r in quality_table(STORIES, text, max_tokens=QUALITY_TOKENS,
                                                  log=None)}
    ppl = {k: float(str(r["ppl"])) for k, r in rows.items()}
    assert all(r["n_scored"] == QUALITY_TOKENS for r in rows.values())
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.01, ppl
    assert ppl["q4_0_mixed"] < ppl["q4_0"], ppl
    assert ppl["f32"] < ppl["q4_0"]  # 4-bit blocks cost something measurable on this model
    size = {k: int(str(r["weights_bytes"])) for k, r in rows.items()}
    assert size["f32"] > size["q8_0"] > size["q4_0_mixed"] > size["q4_0"]
    table = markdown_table(list(rows.values()))
    assert "| q4_0_mixed |" in table and "+0.00%" in table  # f32 against itself


def test_mixed_recipe_tensor_types(tmp_path: Path) -> None:
    r = get_recipe("q4_0_mixed")
    assert r("token_embd.weight", (512, 64)) == GGMLType.Q8_0
    assert r("output.weight", (512, 64)) == GGMLType.Q8_0
    assert r("output.weight", (512, 48)) == GGMLType.F16  # rows not a multiple of 32
    assert r("blk.3.attn_v.weight", (32, 64)) == GGMLType.Q4_0
    assert r("blk.3.ffn_down.weight", (64, 172)) == GGMLType.F16
    assert r("blk.3.ffn_norm.weight", (64,)) == GGMLType.F32
    path = convert(STORIES, tmp_path / "m.gguf", type=r.base_type, recipe=r, log=None)
    with read_gguf(path) as gf:
        got = {t.name: t.type_name for t in gf.tensors.values()}
        assert gf.metadata["general.file_type"] == 2  # llama.cpp's MOSTLY_Q4_0
        assert gf.metadata["general.quantization_version"] == 2
    assert got["token_embd.weight"] == "Q8_0" and "output.weight" not in got  # tied output
    for name, t in got.items():
        if name.endswith("_norm.weight"):
            assert t == "F32", name
        elif name.endswith("ffn_down.weight"):
            assert t == "F16", name  # 172-long rows
        elif name.startswith("blk."):
            assert t == "Q4_0", name
    with pytest.raises(edgellm.InvalidArgumentError, match="q4_0_mixed"):
        get_recipe("q3_k")


def test_recipe_sizes_and_kv_cache_match_real_files(tmp_path: Path) -> None:
    # footprint() is what --type auto decides with: check it against converted files.
    src = inspect_source(STORIES)
    assert src.config.n_layers == 5 and src.kind == "llama2c"
    for name, recipe in RECIPES.items():
        path = convert(STORIES, tmp_path / f"{name}.gguf", type=recipe.base_type, recipe=recipe,
                       log=None)
        est = footprint(recipe, src)
        with read_gguf(path) as gf:
            assert est.weights == sum(t.nbytes for t in gf.tensors.values()), name
        with edgellm.Model(path, n_threads=1) as m:
            assert est.kv_cache == m.kv_cache_bytes(min(src.config.seq_len, AUTO_MAX_CTX)), name
        assert est.scratch > 0 and est.runtime_overhead > 0  # what select counts too


def test_llama_cpp_loads_mixed_build_and_agrees(tmp_path: Path) -> None:
    import llama_cpp

    r = get_recipe("q4_0_mixed")
    path = convert(STORIES, tmp_path / "mixed.gguf", type=r.base_type, recipe=r, log=None)
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False, logits_all=True)
    llm.eval(PROMPT)
    theirs = []
    for _ in range(32):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs.append(nxt)
        llm.eval([nxt])
    llm.close()
    with edgellm.Model(path, n_threads=2) as m, m.session() as s:
        logits = s.eval(PROMPT)
        ours = []
        for _ in range(32):
            ours.append(int(np.argmax(logits)))
            logits = s.eval([ours[-1]])
    assert ours == theirs
    assert len(set(ours)) > 5  # a story, not one token repeated


# --- builds ------------------------------------------------------------------------------


def _build(out: Path, text: Path, **kw: object) -> BuildResult:
    args: dict[str, object] = dict(type="q4_0_mixed", node="en/stories", version=3,
                                   parent="en@2", eval_texts=[text], max_eval_tokens=500,
                                   n_threads=2, log=None)
    args.update(kw)
    return build(STORIES, RPI5, out=out, **args)


def test_build_is_byte_reproducible_with_scores_inside(tmp_path: Path, held_out: Path) -> None:
    a = _build(tmp_path / "a", held_out)
    time.sleep(1.1)  # a timestamp anywhere (even in seconds) would now differ
    b = _build(tmp_path / "b", held_out)
    fa, fb = a.bundle.folder, b.bundle.folder
    assert fa.name == fb.name == "en-stories-rpi5-q4_0_mixed"
    assert sorted(p.name for p in fa.iterdir()) == ["bundle.json", "model.gguf"]
    assert _sha(fa / "model.gguf") == _sha(fb / "model.gguf")
    assert (fa / "bundle.json").read_bytes() == (fb / "bundle.json").read_bytes()

    m = read_manifest(fa).verify()
    assert (m.node, m.version, m.board, m.recipe) == ("en/stories", 3, "rpi5", "q4_0_mixed")
    assert (m.lineage.parent, m.lineage.parent_version) == ("en", 2)
    assert m.isa_features == RPI5.isa_features == ("neon", "dotprod", "fp16")
    assert m.runtime_version == edgellm.__version__
    assert m.files[0].sha256 == _sha(fa / "model.gguf") and m.model_size == (fa / "model.gguf").stat().st_size
    assert m.source.kind == "llama2c" and [f.name for f in m.source.files] == ["stories260K.bin", "tok512.bin"]
    assert m.source.files[0].sha256 == _sha(STORIES)
    assert (m.config.dim, m.config.n_layers, m.config.n_heads, m.config.n_kv_heads,
            m.config.head_dim, m.config.vocab_size, m.config.seq_len) == (64, 5, 8, 4, 8, 512, 512)
    with read_gguf(fa / "model.gguf") as gf:
        meta = gf.metadata
        assert m.weights_bytes == sum(t.nbytes for t in gf.tensors.values())
        assert m.config.n_params == sum(t.n_elements for t in gf.tensors.values()) == 260032
    assert meta["edgellm.node"] == "en/stories" and meta["edgellm.version"] == 3
    assert meta["edgellm.parent"] == "en" and meta["edgellm.parent_version"] == 2
    assert meta["edgellm.board"] == "rpi5" and meta["edgellm.recipe"] == "q4_0_mixed"
    assert meta["edgellm.isa_features"] == ["neon", "dotprod", "fp16"]
    score = m.scores["botchan"]
    assert meta["edgellm.eval.botchan.ppl"] == score.ppl == a.results["botchan"].ppl
    assert meta["edgellm.eval.botchan.protocol"] == score.protocol == "edgellm-ppl-v1"
    assert (score.n_scored, score.window, score.stride) == (500, 511, 255)
    assert score.text_sha256 == _sha(held_out)
    # The scores describe the final file itself: evaluating it again gives the same number.
    with edgellm.Model(fa / "model.gguf", n_threads=2) as final:  # as the build ran it
        again = perplexity(final, held_out.read_text(encoding="utf-8"), max_tokens=500)
    assert again.ppl == score.ppl


def test_manifest_validation_and_tampering(tmp_path: Path, held_out: Path) -> None:
    good = _build(tmp_path / "out", held_out, eval_texts=[]).bundle.folder
    assert read_manifest(good).scores == {}

    def variant(name: str) -> Path:
        d = tmp_path / "out" / name
        shutil.copytree(good, d)
        return d

    flipped = variant("flipped")
    raw = bytearray((flipped / "model.gguf").read_bytes())
    raw[-100] ^= 0x01  # one bit of one weight
    (flipped / "model.gguf").write_bytes(bytes(raw))
    with pytest.raises(BundleIntegrityError, match="sha256"):
        read_manifest(flipped).verify()
    cut = variant("cut")
    (cut / "model.gguf").write_bytes((good / "model.gguf").read_bytes()[:-32])
    with pytest.raises(BundleIntegrityError, match="size"):
        read_manifest(cut).verify()
    gone = variant("gone")
    (gone / "model.gguf").unlink()
    with pytest.raises(BundleIntegrityError, match="missing"):
        read_manifest(gone).verify()

    def edit(name: str, change: Callable[[dict[str, Any]], object]) -> Path:
        d = variant(name)
        data = json.loads((d / "bundle.json").read_text())
        change(data)
        (d / "bundle.json").write_text(json.dumps(data))
        return d

    with pytest.raises(BundleError, match="missing field 'board'"):
        read_manifest(edit("noboard", lambda d: d.pop("board")))
    with pytest.raises(BundleError, match="config.dim"):
        read_manifest(edit("nodim", lambda d: d["config"].pop("dim")))
    with pytest.raises(BundleSchemaError, match="schema 2"):
        read_manifest(edit("schema2", lambda d: d.update(schema=2)))
    with pytest.raises(BundleError, match="'version' has the wrong type"):
        read_manifest(edit("strver", lambda d: d.update(version="1")))
    with pytest.raises(BundleError, match="model.gguf"):
        read_manifest(edit("nofiles", lambda d: d.update(files=[])))
    notjson = variant("notjson")
    (notjson / "bundle.json").write_text("{oops")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(notjson)
    with pytest.raises(BundleError, match="no bundle.json"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError):  # BundleError is also the builtin
        read_manifest(notjson)

    with pytest.raises(BundleError):
        list_bundles(tmp_path / "out")  # the broken ones are in there
    found = list_bundles(tmp_path / "out", skip_invalid=True)
    assert sorted(b.folder.name for b in found) == sorted(
        ["en-stories-rpi5-q4_0_mixed", "flipped", "cut", "gone"])  # readable manifests
    assert parse_parent("en/medical@4") == ("en/medical", 4) and parse_parent("en") == ("en", None)
    for bad in ("en@0", "en@x", "/en", "en//a", ""):
        with pytest.raises(edgellm.InvalidArgumentError):
            parse_parent(bad)


def test_board_rules_refuse_clearly(tmp_path: Path, held_out: Path) -> None:
    zero = load_board("rpi-zero-2w")  # allows q8_0, q4_0_mixed, q4_0
    with pytest.raises(edgellm.InvalidArgumentError, match="allowed: q8_0, q4_0_mixed, q4_0"):
        build(STORIES, zero, type="f16", out=tmp_path, log=None)
    with pytest.raises(edgellm.InvalidArgumentError, match="allowed: q8_0"):  # tflite: tests/test_tflite.py
        build(STORIES, "coral-dev-board", type="f16", out=tmp_path, log=None)
    with pytest.raises(edgellm.InvalidArgumentError, match="version"):
        build(STORIES, zero, type="q4_0", version=0, out=tmp_path, log=None)
    with pytest.raises(edgellm.InvalidArgumentError, match="node path"):
        build(STORIES, zero, type="q4_0", node="en//x", out=tmp_path, log=None)
    with pytest.raises(edgellm.InvalidArgumentError, match="unknown quant recipe"):
        build(STORIES, zero, type="q5_k", out=tmp_path, log=None)
    assert list(tmp_path.iterdir()) == []
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(edgellm.InvalidArgumentError, match="empty"):  # fails after converting
        build(STORIES, RPI5, type="q8_0", eval_texts=[empty],
              out=tmp_path / "out", log=None)
    with pytest.raises(edgellm.InvalidArgumentError, match="both named 'botchan'"):
        build(STORIES, zero, type="q4_0", eval_texts=[held_out, held_out], out=tmp_path / "out",
              log=None)
    assert list((tmp_path / "out").iterdir()) == []  # no bundle folder is left half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "out"]


def test_auto_picks_the_best_recipe_that_fits(tmp_path: Path) -> None:
    src = inspect_source(STORIES)
    need = {n: footprint(RECIPES[n], src).total for n in ("f16", "q8_0", "q4_0_mixed", "q4_0")}

    def board(total: int, allowed: tuple[str, ...] = ("f16", "q8_0", "q4_0", "q4_0_mixed")) -> BoardProfile:
        b = _board("auto-test", allowed, total)
        assert b.ram_budget_bytes == total
        return b

    cases = [(board(60 << 20), "f16"), (board(need["f16"]), "f16"),
             (board(need["f16"] - 1), "q8_0"), (board(need["q8_0"] - 1), "q4_0_mixed"),
             (board(need["q4_0_mixed"] - 1), "q4_0"),
             (board(60 << 20, ("q4_0", "q4_0_mixed", "f32")), "q4_0_mixed")]
    for prof, want in cases:
        r = build(STORIES, prof, out=tmp_path / want, log=None)
        assert r.recipe == want == r.bundle.recipe, (prof.ram_budget_bytes, r.reason)
        assert f"auto chose {want}" in r.reason
        with read_gguf(r.bundle.model_path) as gf:
            assert gf.metadata["edgellm.recipe"] == want
    with pytest.raises(edgellm.InvalidArgumentError, match="no allowed recipe fits"):
        build(STORIES, board(need["q4_0"] - 1), out=tmp_path / "none", log=None)


def test_build_from_gguf_keeps_node_and_drops_stale_scores(tmp_path: Path, held_out: Path) -> None:
    first = _build(tmp_path / "a", held_out).bundle
    with read_gguf(first.model_path) as gf:
        assert "edgellm.eval.botchan.ppl" in gf.metadata
    second = build(first.model_path, "rpi5", type="q8_0", out=tmp_path / "b", log=None).bundle
    assert second.node == "en/stories" and second.version == 1 and second.lineage.parent is None
    assert second.source.kind == "gguf" and second.source.files[0].sha256 == first.files[0].sha256
    with read_gguf(second.model_path) as gf:
        stale = [k for k in gf.metadata if k.startswith(("edgellm.eval.", "edgellm.parent"))]
        assert stale == [] and gf.metadata["edgellm.recipe"] == "q8_0"
    plain = build(STORIES, RPI5, type="q8_0", out=tmp_path / "c", log=None)
    assert plain.bundle.node == "master" and plain.bundle.folder.name == "master-rpi5-q8_0"


def test_build_from_hf_checkpoint(tmp_path: Path) -> None:
    hf = make_tiny_llama(tmp_path / "hf", seed=7)
    b = build(hf, RPI5, type="f16", node="en", out=tmp_path / "out",
              log=None).bundle.verify()
    names = {f.name: f for f in b.source.files}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    assert names["model.safetensors"].sha256 == _sha(hf / "model.safetensors")
    assert (b.config.dim, b.config.n_layers, b.config.n_kv_heads, b.config.head_dim) == (64, 2, 2, 16)
    with read_gguf(b.model_path) as gf:
        assert {t.type_name for t in gf.tensors.values()} == {"F16", "F32"}


def test_cli_build_and_errors(tmp_path: Path, held_out: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["build", str(STORIES), "--board", "rpi5", "--out", str(tmp_path),
               "--node", "en/x", "--version", "2", "--parent", "en@1", "--eval-text",
               str(held_out), "--eval-max-tokens", "300", "-t", "2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "auto chose f16 for rpi5" in err and "eval botchan: ppl" in err
    b = list_bundles(tmp_path)[0].verify()
    assert (b.node, b.version, b.lineage.parent_version, b.recipe) == ("en/x", 2, 1, "f16")
    assert str(b.folder) in out and f"{b.scores['botchan'].ppl:.4f}" in out
    for args, words in ((["--board", "coral-dev-board", "--type", "q4_0"], "allowed: q8_0"),
                        (["--board", "rpi-zero-2w", "--type", "f16"], "allowed: q8_0"),
                        (["--board", "rpi55"], "rpi5")):
        rc = main(["build", str(STORIES), "--out", str(tmp_path / "err"), *args])
        err = capsys.readouterr().err
        assert rc == 1 and err.startswith("edgellm build: error:") and words in err, err
        assert len(err.strip().splitlines()) == 1
