# SPDX-License-Identifier: MIT
"""The model registry on a real SQLite file: lineage, staleness, atomic writes (no training)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgellm.hub import db
from edgellm.hub.registry import (
    MIGRATIONS,
    Expected,
    NewBuild,
    NewVersion,
    Registry,
    RegistryError,
    ScoreInfo,
)

CHAIN = ["master", "en", "en/medical", "en/medical/cardiology"]
WANTED = [("rpi5", "f16"), ("rpi5", "q4_0")]


def _version(tmp: Path, node: str, parent: str | None, pv: int | None, *, corpus: str = "c",
             config: str = "k", tok: str = "t", tag: str = "") -> NewVersion:
    ckpt = tmp / "models" / f"{node.replace('/', '-')}{tag}"
    ckpt.mkdir(parents=True, exist_ok=True)
    return NewVersion(node=node, parent=parent, parent_version=pv, corpus_hash=corpus,
                      config_hash=config, tokenizer_hash=tok, config={"dim": 8},
                      checkpoint=ckpt, params=1000, n_train_records=10, train={"steps": 5})


def _build(tmp: Path, node: str, recipe: str, ppl: float = 10.0) -> NewBuild:
    folder = tmp / "builds" / f"{node.replace('/', '-')}-{recipe}"
    folder.mkdir(parents=True, exist_ok=True)
    return NewBuild("rpi5", recipe, folder, 1234, [("model.gguf", "ab" * 32, 2000)],
                    [ScoreInfo("general", ppl, 2.3, 100, "edgellm-ppl-v1", "cd" * 32)])


def _chain(tmp: Path, reg: Registry) -> None:
    parent = None
    for node in CHAIN:
        reg.register(_version(tmp, node, parent, 1 if parent else None),
                     [_build(tmp, node, r) for _, r in WANTED])
        parent = node


def _counts(reg: Registry) -> dict[str, int]:
    return {t: reg.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("nodes", "versions", "builds", "build_files", "build_scores")}


@pytest.fixture
def reg(tmp_path: Path):
    with Registry.open(tmp_path / "registry.sqlite") as r:
        yield r


def test_lineage_queries(tmp_path: Path, reg: Registry) -> None:
    _chain(tmp_path, reg)
    assert reg.ancestors("en/medical/cardiology") == ["en/medical", "en", "master"]
    assert reg.ancestors("master") == []
    assert reg.descendants("master") == ["en", "en/medical", "en/medical/cardiology"]
    assert reg.descendants("en/medical") == ["en/medical/cardiology"]
    assert reg.descendants("en/medical/cardiology") == []
    assert reg.children("en") == ["en/medical"]
    assert reg.nodes() == [("master", None), ("en", "master"), ("en/medical", "en"),
                           ("en/medical/cardiology", "en/medical")]
    with pytest.raises(RegistryError, match="not in the registry"):
        reg.ancestors("fr")
    v = reg.current("en/medical")
    assert v is not None and (v.version, v.parent, v.parent_version) == (1, "en", 1)
    assert [b.recipe for b in reg.builds(v.id)] == ["f16", "q4_0"]
    assert reg.builds(v.id)[0].scores["general"].ppl == 10.0
    assert reg.builds(v.id)[0].size == 2000


def test_branching_descendants(tmp_path: Path, reg: Registry) -> None:
    _chain(tmp_path, reg)
    reg.register(_version(tmp_path, "fr", "master", 1))
    reg.register(_version(tmp_path, "en/legal", "en", 1))
    assert reg.descendants("master") == ["en", "en/legal", "en/medical",
                                         "en/medical/cardiology", "fr"]
    assert reg.descendants("en") == ["en/legal", "en/medical", "en/medical/cardiology"]
    assert reg.ancestors("en/legal") == ["en", "master"]


def test_parent_rebuild_makes_descendants_stale(tmp_path: Path, reg: Registry) -> None:
    _chain(tmp_path, reg)
    assert all(not s.reasons for s in reg.stale(builds=WANTED))
    assert reg.stale_builds() == []
    # en gets a new version: its children were distilled from en@1.
    v2 = reg.register(_version(tmp_path, "en", "master", 1, tag="v2"),
                      [_build(tmp_path, "en", "f16")])
    assert v2.version == 2
    st = {s.node: s.reasons for s in reg.stale()}
    assert st["master"] == () and st["en"] == ()
    assert st["en/medical"] == ("parent rebuilt: trained from en@1, current is en@2",)
    assert st["en/medical/cardiology"] == ("ancestor en/medical is stale",)
    stale_builds = {(n, v, b.recipe) for n, v, b in reg.stale_builds()}
    assert stale_builds == {("en", 1, "f16"), ("en", 1, "q4_0"),
                            ("en/medical", 1, "f16"), ("en/medical", 1, "q4_0"),
                            ("en/medical/cardiology", 1, "f16"),
                            ("en/medical/cardiology", 1, "q4_0")}
    # en@2 lacks its q4_0 build: only a build is missing, nothing needs retraining.
    en = {s.node: s.reasons for s in reg.stale(builds=WANTED)}["en"]
    assert en == ("missing build rpi5/q4_0",)
    # Retrain en/medical from en@2: it is current, its child is now stale by parent rebuild.
    reg.register(_version(tmp_path, "en/medical", "en", 2, tag="v2"))
    st = {s.node: s.reasons for s in reg.stale()}
    assert st["en/medical"] == ()
    assert st["en/medical/cardiology"] == (
        "parent rebuilt: trained from en/medical@1, current is en/medical@2",)


def test_expected_hashes(tmp_path: Path, reg: Registry) -> None:
    _chain(tmp_path, reg)
    same = {n: Expected("c", "k", "t") for n in CHAIN}
    assert all(not s.reasons for s in reg.stale(same))
    changed = dict(same, en=Expected("c2", "k2", "t2"))
    changed["fr"] = Expected("c", "k")
    st = {s.node: s for s in reg.stale(changed)}
    assert st["en"].reasons == ("corpus changed", "config changed", "tokenizer changed")
    assert st["en/medical"].reasons == ("ancestor en is stale",)
    assert st["fr"].version is None and st["fr"].reasons == ("missing: no version yet",)
    assert st["master"].reasons == ()


def test_missing_checkpoint_is_stale(tmp_path: Path, reg: Registry) -> None:
    _chain(tmp_path, reg)
    cur = reg.current("en/medical/cardiology")
    assert cur is not None
    cur.checkpoint.rmdir()
    st = {s.node: s.reasons for s in reg.stale()}
    assert st["en/medical/cardiology"] == (f"checkpoint {cur.checkpoint} is gone",)


def test_failed_register_writes_nothing(tmp_path: Path, reg: Registry) -> None:
    _chain(tmp_path, reg)
    before = _counts(reg)
    with pytest.raises(RegistryError, match="en@7 is not registered"):
        reg.register(_version(tmp_path, "en/medical", "en", 7))
    with pytest.raises(RegistryError, match="parent fr is not registered"):
        reg.register(_version(tmp_path, "fr/legal", "fr", 1))
    with pytest.raises(RegistryError, match="cannot move"):
        reg.register(_version(tmp_path, "en/medical", "master", 1))
    # The same board/recipe twice: the version row is rolled back with the builds.
    with pytest.raises(RegistryError, match="nothing written"):
        reg.register(_version(tmp_path, "en", "master", 1, tag="x"),
                     [_build(tmp_path, "en", "f16"), _build(tmp_path, "en", "f16")])
    assert _counts(reg) == before
    assert reg.current("en").version == 1  # type: ignore[union-attr]
    assert not reg.conn.in_transaction
    # A failed add_builds leaves the old builds.
    with pytest.raises(RegistryError):
        reg.add_builds("en", 1, [_build(tmp_path, "en", "q8_0"), _build(tmp_path, "en", "q8_0")])
    assert _counts(reg) == before


def test_add_builds_replaces_same_recipe(tmp_path: Path, reg: Registry) -> None:
    _chain(tmp_path, reg)
    reg.add_builds("en", 1, [_build(tmp_path, "en", "f16", ppl=7.5),
                             _build(tmp_path, "en", "q8_0")])
    v = reg.current("en")
    assert v is not None
    got = {b.recipe: b.scores["general"].ppl for b in reg.builds(v.id)}
    assert got == {"f16": 7.5, "q4_0": 10.0, "q8_0": 10.0}
    with pytest.raises(RegistryError, match="en@9"):
        reg.add_builds("en", 9, [])


def test_paths_relative_to_registry(tmp_path: Path, reg: Registry) -> None:
    inside = _version(tmp_path, "master", None, None)
    reg.register(inside)
    row = reg.conn.execute("SELECT checkpoint FROM versions").fetchone()
    assert row[0] == "models/master"
    assert reg.current("master").checkpoint == inside.checkpoint  # type: ignore[union-attr]
    other = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    outside = _version(other, "en", "master", 1)
    reg.register(outside)
    row = reg.conn.execute("SELECT checkpoint FROM versions WHERE node = 'en'").fetchone()
    assert Path(row[0]).is_absolute() and Path(row[0]) == outside.checkpoint


def test_schema_migrations(tmp_path: Path) -> None:
    path = tmp_path / "hub.sqlite"
    with Registry.open(path) as reg:
        assert db.schema_version(reg.conn, "registry") == len(MIGRATIONS)
        _chain(tmp_path, reg)
    with Registry.open(path) as reg:  # reopening keeps the rows, applies nothing twice
        assert len(reg.nodes()) == 4
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_versions SET version = 99 WHERE component = 'registry'")
    conn.commit()
    conn.close()
    with pytest.raises(db.DatabaseError, match="newer than this edgellm"):
        Registry.open(path)


def test_to_dict(tmp_path: Path, reg: Registry) -> None:
    _chain(tmp_path, reg)
    d = reg.to_dict()
    assert [n["path"] for n in d["nodes"]] == CHAIN
    card = d["nodes"][3]
    assert card["current"] == 1 and card["versions"][0]["parent_version"] == 1
    assert card["versions"][0]["builds"][0]["scores"]["general"]["ppl"] == 10.0
