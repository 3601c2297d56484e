# SPDX-License-Identifier: MIT
"""The demo tree the project ships (edgellm/demo/): its files, its registry, and the claims
docs/tree.md makes of it, checked against the shipped files themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.greedy import edgellm_greedy, llama_cpp_greedy

import edgellm
from edgellm.formats.bundle import list_bundles, sha256_file
from edgellm.hub.evaluate import perplexity
from edgellm.hub.registry import Registry
from edgellm.hub.select import select
from edgellm.hub.tree import load_tree

DEMO = Path(edgellm.__file__).parent / "demo"
BUNDLES = DEMO / "bundles"
REGISTRY = DEMO / "hub" / "registry.sqlite"
LEAF, MASTER = "en/medical/cardiology", "master"


def _scores(reg: Registry, node: str) -> dict[tuple[str, str], float]:
    """(recipe, held-out set) -> perplexity of the node's current version."""
    v = reg.current(node)
    assert v is not None, node
    return {(b.recipe, name): sc.ppl for b in reg.builds(v.id) for name, sc in b.scores.items()}


def test_shipped_bundles_verify_and_fit_the_budget() -> None:
    bundles = list_bundles(BUNDLES)
    assert {b.node for b in bundles} == {"master", "en", "en/medical", LEAF}
    for b in bundles:
        b.verify()  # every file's size and sha256 against its manifest
        assert sha256_file(b.model_path) == b.files[0].sha256
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total < 60 * 2**20, f"the demo ships {total / 2**20:.1f} MiB, over 60"


def test_specialisation_pays() -> None:
    """The leaf is within 1.25x the master's cardiology perplexity at <= 1/8 of its
    parameters (edgellm-ppl-v1 on the f16 builds, as registered by `tree build`)."""
    with Registry.open(REGISTRY) as reg:
        leaf, master = reg.current(LEAF), reg.current(MASTER)
        assert leaf is not None and master is not None
        assert leaf.params * 8 <= master.params
        ls, ms = _scores(reg, LEAF), _scores(reg, MASTER)
    assert ls[("f16", "cardiology")] <= 1.25 * ms[("f16", "cardiology")]
    # The no-teacher baselines (same shape, data and steps) trained beside it on the GPU.
    summary = json.loads((DEMO / "hub" / "train_summary.json").read_text(encoding="utf-8"))
    ppl = summary["heldout_ppl"]
    leaf_ppl = ppl["en-medical-cardiology"]["cardiology"]
    for base in ("en-medical-cardiology.no-teacher", "en-medical-cardiology.scratch"):
        assert leaf_ppl <= 0.9 * ppl[base]["cardiology"], base


def test_quantisation_costs_what_the_table_says() -> None:
    """Q8_0 costs at most 1% perplexity over f16 on every node and held-out set, and the
    mixed 4-bit recipe beats plain Q4_0 on every node's own held-out set."""
    own = {"master": "general", "en": "general", "en/medical": "medical", LEAF: "cardiology"}
    with Registry.open(REGISTRY) as reg:
        for node, held in own.items():
            s = _scores(reg, node)
            for name in ("general", "medical", "cardiology"):
                assert s[("q8_0", name)] <= 1.01 * s[("f16", name)], (node, name)
            assert s[("q4_0_mixed", held)] < s[("q4_0", held)], node


def test_shipped_leaf_scores_what_the_registry_says() -> None:
    tree = load_tree(DEMO / "tree.toml")
    held = tree.data().heldout_text("cardiology")
    leaf = next(b for b in list_bundles(BUNDLES) if b.node == LEAF and b.recipe == "q8_0")
    r = perplexity(leaf.model_path, held, window=tree.eval_window, stride=tree.eval.get("stride"),
                   max_tokens=tree.eval["max_tokens"])
    with Registry.open(REGISTRY) as reg:
        want = _scores(reg, LEAF)[("q8_0", "cardiology")]
    assert r.ppl == pytest.approx(want, rel=1e-4)


def test_llama_cpp_runs_the_shipped_leaf_alike() -> None:
    leaf = next(b for b in list_bundles(BUNDLES) if b.node == LEAF and b.recipe == "q8_0")
    with edgellm.Model(leaf.model_path, n_threads=1) as m:
        prompt = m.tokenize("Question: What causes high blood pressure?\nAnswer:")
    assert edgellm_greedy(leaf.model_path, prompt, 32) == llama_cpp_greedy(leaf.model_path, prompt, 32)


def test_select_picks_the_leaf_for_a_bedside_pi() -> None:
    from edgellm.boards import load_board

    sel = select(load_board("rpi5"), LEAF, list_bundles(BUNDLES), context=512)
    assert sel.require().node == LEAF and sel.fallback is None


def test_walkthrough_runs_end_to_end(tmp_path: Path) -> None:
    """`make demo`'s script: tree, choice, answer; then a hub, a device flashed onto a folder
    standing in for its SD card, real Mosquitto + hub service + agent, usage upstream, a
    signed update committed and a forged one refused as an attack."""
    import sqlite3
    import subprocess
    import sys

    from edgellm.demo.fleet_step import DEVICE_ID
    from edgellm.demo.walkthrough import QUESTIONS
    from edgellm.fleet.slots import SlotStore

    r = subprocess.run([sys.executable, "-m", "edgellm.demo.walkthrough", "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout
    assert "choice: en/medical/cardiology q8_0 v1 (rpi5)" in out
    # provisioned by `edgellm flash --to dir:` and its first boot, with the 4-bit build
    assert f"device {DEVICE_ID}: en/medical/cardiology@1 (q4_0_mixed) -> dir:" in out
    assert "first boot: en/medical/cardiology v1 installed" in out
    stored = next(line for line in out.splitlines()
                  if line.startswith("the hub stored this report:"))
    report = json.loads(stored.split(":", 1)[1])
    assert report["requests"] == len(QUESTIONS) and report["node"] == LEAF
    assert report["gen_tokens"] > 0 and report["seq"] == 0
    for q in QUESTIONS:  # nothing of the questions reached the hub
        assert q.split("\n")[0][len("Question: "):] not in stored
    # the signed improvement: committed, reported; the forged one: refused as an attack
    assert f"device {DEVICE_ID}: committed in" in out
    assert "now serving en/medical/cardiology v2" in out
    assert f"device {DEVICE_ID}: refused, reason hash_mismatch, attack True" in out
    assert "still serving en/medical/cardiology v2" in out
    assert "verified; 0 files staged): the same answer as before" in out
    assert "devices flagged as attacked: " + DEVICE_ID in out
    assert "1 (0 online, 1 offline" in out  # the death certificate arrived
    conn = sqlite3.connect(tmp_path / "hub" / "registry.db")
    try:
        rows = conn.execute("SELECT version, outcome, reason, attack FROM fleet_updates WHERE "
                            "device = ? ORDER BY release", (DEVICE_ID,)).fetchall()
        states = conn.execute("SELECT state FROM fleet_rollouts ORDER BY id").fetchall()
        dev = conn.execute("SELECT version, attack FROM fleet_devices WHERE device = ?",
                           (DEVICE_ID,)).fetchone()
    finally:
        conn.close()
    assert rows == [(2, "committed", "ok", 0), (3, "refused", "hash_mismatch", 1)]
    assert states == [("done",), ("halted",)]
    assert dev == (2, 1)
    # on the device: version 2 (the shipped 8-bit build) is the current model, and verifies
    models = SlotStore(tmp_path / "sdcard" / "rootfs" / "var" / "lib" / "edgellm" / "models")
    active = models.read_pointer("current")
    assert active is not None and active.version == 2
    q8 = next(b for b in list_bundles(BUNDLES) if b.node == LEAF and b.recipe == "q8_0")
    assert active.model_sha256 == q8.files[0].sha256
    models.verify(active)
