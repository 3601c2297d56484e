# SPDX-License-Identifier: MIT
"""Model selection over a real bundle tree: boards x needs x contexts x speed floors.

The bundles are real: bundle.json written by formats.bundle.write_manifest over a model.gguf
whose header (metadata, tokenizer, tensor infos) is that of a real model shape in the
bundle's recipe, with the file's true size. Only the tensor data is a hole (a sparse file of
zeros): the selection reads headers and sizes, never weights, so the estimates see exactly
what real builds would give them, while the 1.1B-parameter master costs no disk and no time.
The shapes are public checkpoints': master TinyLlama-1.1B (trained to 4096 here), en
SmolLM-360M, en/medical SmolLM-135M, en/medical/cardiology a 25M-parameter child.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.random_gguf import Shape, n_params, write_sparse_gguf

from edgellm import InvalidArgumentError, IsaError
from edgellm.boards import load_board
from edgellm.formats.bundle import (
    Lineage,
    ModelSummary,
    SourceInfo,
    bundle_dirname,
    list_bundles,
    write_manifest,
)
from edgellm.hub import estimate
from edgellm.hub.select import SelectionError, check_runs_on, node_path, select

REPO = Path(__file__).resolve().parents[1]
MASTER = Shape(dim=2048, hidden_dim=5632, n_layers=22, n_heads=32, n_kv_heads=4,
               vocab_size=32000, seq_len=4096)
EN = Shape(dim=960, hidden_dim=2560, n_layers=32, n_heads=15, n_kv_heads=5, vocab_size=49152,
           seq_len=2048, tied=True)
MEDICAL = Shape(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                seq_len=2048, tied=True)
CARDIOLOGY = Shape(dim=384, hidden_dim=1024, n_layers=12, n_heads=6, n_kv_heads=2,
                   vocab_size=16384, seq_len=2048, tied=True)

# (node, shape, board it was built for, recipe, version). rpi5 builds require neon, dotprod
# and fp16 (the rpi5 profile's features); rpi4 and rpi-zero-2w builds only neon.
BUILDS = [
    ("master", MASTER, "rpi5", "q8_0", 1),
    ("master", MASTER, "rpi4", "q4_0_mixed", 1),
    ("en", EN, "rpi4", "q8_0", 1),
    ("en", EN, "rpi-zero-2w", "q4_0_mixed", 1),
    ("en/medical", MEDICAL, "rpi5", "f16", 1),
    ("en/medical", MEDICAL, "rpi5", "q8_0", 1),
    ("en/medical", MEDICAL, "rpi5", "q8_0", 2),
    ("en/medical", MEDICAL, "rpi4", "q4_0", 1),
    ("en/medical/cardiology", CARDIOLOGY, "rpi5", "q8_0", 1),
    ("en/medical/cardiology", CARDIOLOGY, "rpi4", "q4_0", 1),
]


def _summary(s: Shape) -> ModelSummary:
    return ModelSummary(arch="llama", dim=s.dim, hidden_dim=s.hidden_dim, n_layers=s.n_layers,
                        n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, head_dim=s.hd,
                        vocab_size=s.vocab_size, seq_len=s.seq_len, n_params=n_params(s))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundles")
    for node, shape, board, recipe, version in BUILDS:
        folder = root / (bundle_dirname(node, board, recipe) + f"-v{version}")
        folder.mkdir()
        gguf = write_sparse_gguf(folder / "model.gguf", shape, recipe, tokenizer="bpe",
                                 extra={"edgellm.node": node, "edgellm.version": version})
        facts = estimate.model_facts(gguf)
        parent = None if node == "master" else node.rsplit("/", 1)[0] if "/" in node else "master"
        write_manifest(folder, board=board, isa_features=load_board(board).isa_features,
                       recipe=recipe, source=SourceInfo("gguf", "random", str(gguf), ()),
                       node=node, version=version, lineage=Lineage(parent, 1 if parent else None),
                       config=_summary(shape), weights_bytes=facts.weights_bytes)
    return root


@pytest.fixture(scope="module")
def bundles(tree: Path) -> list[Any]:
    return list_bundles(tree)


def _pick(sel: Any) -> tuple[str, str, int, str]:
    b = sel.require()
    return b.node, b.recipe, b.version, b.board


def _cand(sel: Any, node: str, recipe: str, board: str | None = None, version: int | None = None) -> Any:
    found = [c for c in sel.candidates if c.bundle.node == node and c.bundle.recipe == recipe
             and (board is None or c.bundle.board == board)
             and (version is None or c.bundle.version == version)]
    assert len(found) == 1, [(c.bundle.node, c.bundle.recipe) for c in sel.candidates]
    return found[0]


# --- the scenarios ------------------------------------------------------------------------------


def test_the_exact_node_fits_and_the_best_recipe_wins(bundles: list[Any]) -> None:
    board = load_board("rpi5")
    sel = select(board, "en/medical/cardiology", bundles)
    assert _pick(sel) == ("en/medical/cardiology", "q8_0", 1, "rpi5")
    assert sel.fallback is None
    chosen = sel.chosen
    assert chosen is not None and chosen.ok and not chosen.reasons
    assert chosen.memory.total <= board.ram_budget_bytes
    # Every build on the path was considered, deepest node first; nothing off the path.
    assert [c.bundle.node for c in sel.candidates][:2] == ["en/medical/cardiology"] * 2
    assert {c.bundle.node for c in sel.candidates} == {"en/medical/cardiology", "en/medical", "en", "master"}
    # The rpi4 build of the same node runs here too, but q8_0 outranks q4_0.
    assert _cand(sel, "en/medical/cardiology", "q4_0").ok
    assert "passes; the choice ranks higher" in sel.explain()


def test_within_a_node_f16_beats_q8_0_and_the_newest_version_wins(bundles: list[Any]) -> None:
    sel = select(load_board("rpi5"), "en/medical", bundles)
    assert _pick(sel) == ("en/medical", "f16", 1, "rpi5")
    order = [(c.bundle.recipe, c.bundle.version) for c in sel.candidates if c.bundle.node == "en/medical"]
    assert order == [("f16", 1), ("q8_0", 2), ("q8_0", 1), ("q4_0", 1)]
    # On an rpi4 the rpi5 builds need dotprod: the neon-only q4_0 build is what runs.
    sel = select(load_board("rpi4"), "en/medical", bundles)
    assert _pick(sel) == ("en/medical", "q4_0", 1, "rpi4")
    # rpi-zero-2w does not allow f16 at all.
    sel = select(load_board("rpi-zero-2w"), "en/medical", bundles)
    assert any("recipe f16 is not allowed on rpi-zero-2w" in r for r in _cand(sel, "en/medical", "f16").reasons)


def test_too_big_on_rpi_zero_2w_falls_back_to_a_smaller_recipe(bundles: list[Any]) -> None:
    board = load_board("rpi-zero-2w")
    sel = select(board, "en", bundles, context=512)
    assert _pick(sel) == ("en", "q4_0_mixed", 1, "rpi-zero-2w")
    q8 = _cand(sel, "en", "q8_0")
    assert q8.runs and not q8.ok and q8.memory.total > board.ram_budget_bytes
    # The only reason, with both numbers as the table shows them.
    assert q8.reasons == [f"needs {q8.memory.total / 1e6:.0f} MB, board budget 322 MB"]
    assert sel.fallback is None  # the same node: only the recipe changed
    assert sel.chosen is not None and sel.chosen.memory.total <= board.ram_budget_bytes


def test_nothing_fits_reports_the_smallest_shortfall(bundles: list[Any]) -> None:
    board = load_board("rpi-zero-2w")
    sel = select(board, "en", bundles, context=2048)
    assert sel.choice is None
    short = {(c.bundle.node, c.bundle.recipe): c.memory_short for c in sel.candidates if c.runs}
    assert all(v > 0 for v in short.values()) and len(short) == 3
    closest = min(short, key=lambda k: short[k])
    assert closest == ("en", "q4_0_mixed")
    mb = f"{short[closest] / 1e6:.0f} MB"
    assert sel.shortfall is not None
    assert sel.shortfall.startswith("closest: en q4_0_mixed v1") and f"needs {mb} more RAM" in sel.shortfall
    assert sel.shortfall in sel.explain()
    with pytest.raises(SelectionError, match="more RAM"):
        sel.require()


def test_a_need_with_no_build_uses_its_nearest_ancestor_and_says_so(bundles: list[Any]) -> None:
    sel = select(load_board("rpi5"), "en/medical/neurology", bundles)
    assert _pick(sel)[:2] == ("en/medical", "f16")
    assert sel.fallback == "no build for en/medical/neurology; using its nearest ancestor en/medical"
    assert sel.fallback in sel.explain()


def test_the_speed_floor_rejects_the_slower_build(bundles: list[Any]) -> None:
    board = load_board("rpi4")
    card = select(board, "en/medical/cardiology", bundles).chosen
    med = select(board, "en/medical/neurology", bundles).chosen
    assert card is not None and med is not None
    assert (card.bundle.node, med.bundle.node) == ("en/medical/cardiology", "en/medical")
    assert med.tokens_per_s < card.tokens_per_s  # a bigger model reads more bytes per token
    floor = round((med.tokens_per_s + card.tokens_per_s) / 2, 1)
    # The floor lets the small cardiology model through...
    sel = select(board, "en/medical/cardiology", bundles, min_tokens_per_s=floor)
    assert _pick(sel)[:2] == ("en/medical/cardiology", "q4_0")
    # ...but not en/medical, nor its (bigger, slower) ancestors: nothing is fast enough.
    sel = select(board, "en/medical/neurology", bundles, min_tokens_per_s=floor)
    assert sel.choice is None
    m = _cand(sel, "en/medical", "q4_0")
    assert m.reasons == [f"est. {m.tokens_per_s:.1f} tok/s < {floor:g} required"]
    assert sel.shortfall == (f"closest: en/medical q4_0 v1 (rpi4) fits in RAM but reaches est. "
                             f"{m.tokens_per_s:.1f} tok/s, {floor - m.tokens_per_s:.1f} short of {floor:g}")


def test_a_context_beyond_the_seq_len_of_the_deep_nodes_falls_back_to_master(bundles: list[Any]) -> None:
    board = load_board("rpi5-8gb")
    sel = select(board, "en/medical/cardiology", bundles, context=4096)
    assert _pick(sel)[:2] == ("master", "q8_0")
    c = _cand(sel, "en/medical/cardiology", "q8_0")
    assert "context 4096 > the model's seq_len 2048" in c.reasons
    assert sel.fallback == ("no build of en/medical/cardiology fits rpi5-8gb; using its nearest "
                            "ancestor master")
    chosen = sel.chosen
    assert chosen is not None
    assert chosen.memory.kv_cache == estimate.kv_cache_bytes(_summary(MASTER), 4096, "f16")
    # Beyond every model's seq_len: refused with the longest one named.
    sel = select(board, "en", bundles, context=8192)
    assert sel.choice is None and sel.shortfall is not None
    assert "holds context 8192" in sel.shortfall and "seq_len 4096" in sel.shortfall


def test_a_build_that_needs_dotprod_is_refused_on_rpi4(bundles: list[Any]) -> None:
    rpi4, rpi5 = load_board("rpi4"), load_board("rpi5")
    sel = select(rpi4, "en/medical/cardiology", bundles)
    c = _cand(sel, "en/medical/cardiology", "q8_0", board="rpi5")
    assert not c.ok and not c.runs
    assert "built for rpi5: requires dotprod, fp16, rpi4 lacks them" in c.reasons
    assert "requires dotprod" in sel.explain()
    with pytest.raises(IsaError, match="requires dotprod"):
        check_runs_on(c.bundle, rpi4)
    # The rpi4 build needs only neon: it runs on an rpi5 as well.
    generic = _cand(sel, "en/medical/cardiology", "q4_0", board="rpi4").bundle
    check_runs_on(generic, rpi5)
    # A CPU reporting fewer features than its board profile: refused before any transfer.
    with pytest.raises(IsaError, match="this CPU lacks"):
        check_runs_on(c.bundle, rpi5, host_features=["neon"])
    sel = select(rpi5, "en/medical/cardiology", bundles, host_features=["neon"])
    assert _pick(sel)[3] == "rpi4"


def test_a_tflite_board_gets_no_native_build(bundles: list[Any]) -> None:
    sel = select(load_board("coral-dev-board"), "en/medical", bundles)
    assert sel.choice is None
    assert all(not c.runs for c in sel.candidates)
    assert all(any("tflite backend" in r for r in c.reasons) for c in sel.candidates)
    assert sel.shortfall is not None and "runs on coral-dev-board" in sel.shortfall


def test_a_measured_speed_on_the_board_overrides_the_estimate(bundles: list[Any]) -> None:
    board = load_board("rpi4")
    target = next(b for b in bundles if b.node == "en/medical/cardiology" and b.board == "rpi4")
    sha = target.file("model.gguf").sha256
    slow = dataclasses.replace(board, measured={**board.measured, f"decode_tok_s.{sha}": 0.5})
    sel = select(slow, "en/medical/cardiology", bundles, min_tokens_per_s=1.0)
    c = _cand(sel, "en/medical/cardiology", "q4_0")
    assert (c.tokens_per_s, c.speed_basis) == (0.5, "measured")
    assert c.reasons == ["est. 0.5 tok/s < 1 required"]
    assert _pick(sel) == ("en/medical", "q4_0", 1, "rpi4")
    assert sel.fallback == "no build of en/medical/cardiology fits rpi4; using its nearest ancestor en/medical"


def test_no_bundles_on_the_path(tmp_path: Path, bundles: list[Any]) -> None:
    sel = select(load_board("rpi5"), "de/legal", [b for b in bundles if b.node != "master"])
    assert sel.choice is None and sel.candidates == []
    assert sel.shortfall == "no bundles for de/legal or its ancestors (de/legal, de, master)"


def test_node_paths_and_bad_needs() -> None:
    assert node_path("en/medical/cardiology") == ["en/medical/cardiology", "en/medical", "en", "master"]
    assert node_path("master") == ["master"]
    assert node_path("master/en") == ["en", "master"]
    for bad in ("", "/", "en//x"):
        with pytest.raises(InvalidArgumentError):
            node_path(bad)
    with pytest.raises(InvalidArgumentError, match="context"):
        select(load_board("rpi5"), "en", [], context=0)
    with pytest.raises(InvalidArgumentError, match="min_tokens_per_s"):
        select(load_board("rpi5"), "en", [], min_tokens_per_s=0)


def test_explain_tables_every_rejected_build_with_numbers(bundles: list[Any]) -> None:
    sel = select(load_board("rpi4"), "en/medical/cardiology", bundles, min_tokens_per_s=0.01)
    text = sel.explain()
    assert text.startswith("need en/medical/cardiology on rpi4 (RAM budget 3.2 GB), context 2048")
    assert "choice: en/medical/cardiology q4_0 v1 (rpi4)" in text
    for c in sel.candidates:
        if c.bundle is not sel.choice:
            assert f"{c.bundle.node} {c.bundle.recipe} v{c.bundle.version}" in text
            for r in c.reasons:
                assert r in text
    d = sel.to_dict()
    assert d["choice"]["recipe"] == "q4_0" and len(d["candidates"]) == len(sel.candidates)
    json.dumps(d)


# --- the CLI -------------------------------------------------------------------------------------


def edgellm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgellm", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, cwd=REPO)


def test_cli_select_prints_the_choice_and_json(tree: Path) -> None:
    r = edgellm("select", "--board", "rpi5", "--need", "en/medical/cardiology", "--bundles", str(tree))
    assert r.returncode == 0, r.stderr
    assert "choice: en/medical/cardiology q8_0 v1 (rpi5)" in r.stdout
    r = edgellm("select", "--board", "rpi-zero-2w", "--need", "en", "--context", "512", "--json",
                env={"EDGELLM_BUNDLES": str(tree)})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["choice"]["node"], d["choice"]["recipe"]) == ("en", "q4_0_mixed")
    assert d["choice"]["memory"]["total"] <= d["ram_budget_bytes"]


def test_cli_select_exits_non_zero_when_nothing_fits(tree: Path) -> None:
    r = edgellm("select", "--board", "rpi-zero-2w", "--need", "en", "--bundles", str(tree))
    assert r.returncode == 1
    assert "nothing fits: closest: en q4_0_mixed v1" in r.stderr and "more RAM" in r.stderr
    r = edgellm("select", "--board", "rpi6", "--need", "en", "--bundles", str(tree))
    assert r.returncode == 1 and "rpi5" in r.stderr  # an unknown board lists the valid names
