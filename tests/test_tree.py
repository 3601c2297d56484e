# SPDX-License-Identifier: MIT
"""The model tree: tree file validation, corpora and the held-out invariant, the demo tree and
its tokenizer, and a tiny three-node tree built end to end on CPU (real training, GGUF builds,
perplexity, registry)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgellm.cli import main
from edgellm.errors import CorpusError, TokenizerMismatchError
from edgellm.formats.bundle import read_manifest
from edgellm.hub.corpus import (
    CorpusSpec,
    base_id,
    corpus_hash,
    is_heldout,
    load_records,
    split_records,
    text_key,
    train_tokenizer,
)
from edgellm.hub.registry import Registry
from edgellm.hub.tree import TreeFileError, count_params, load_tree, node_configs

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "edgellm" / "demo"
CORPORA = DEMO / "corpora"
QA = "Question: {question}\nAnswer: {answer}"


# --- corpora ----------------------------------------------------------------------------


def test_text_splits_and_ids(tmp_path: Path) -> None:
    p = tmp_path / "book.txt"
    p.write_text("one\ntwo\n\n\nthree\n \nfour", encoding="utf-8")
    recs = load_records(CorpusSpec("b", p))
    assert [(r.id, r.text) for r in recs] == [("book:0", "one\ntwo"), ("book:1", "three"),
                                             ("book:2", "four")]
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(" \n = A = \n \n a text \n = = Sec = = \n more \n = B = \n b \n",
                    encoding="utf-8")
    recs = load_records(CorpusSpec("w", wiki, split="wikitext"))
    assert len(recs) == 2 and "= = Sec = =" in recs[0].text and recs[1].text.startswith(" = B =") and recs[0].text.startswith(" = A =")
    lines = load_records(CorpusSpec("l", p, split="lines", lines=2))
    assert [r.text for r in lines] == ["one\ntwo", "three", "four"]


def test_jsonl_ids_repeats_and_split(tmp_path: Path) -> None:
    p = tmp_path / "qa.jsonl.gz"
    rows = [{"c": "x", "q": "1", "question": "a?", "answer": "A"},
            {"c": "y", "q": "1", "question": "b?", "answer": "B"},
            {"c": "x", "q": "1", "question": "a?", "answer": "A"},      # exact repeat: dropped
            {"c": "x", "q": "1", "question": "c?", "answer": "C"}]     # same id, other text
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = CorpusSpec("qa", p, format="jsonl", id_fields=("c", "q"), text=QA)
    recs = load_records(spec)
    assert [r.id for r in recs] == ["x/1", "y/1", "x/1#2"]
    assert base_id("x/1#2") == "x/1" and recs[0].text == "Question: a?\nAnswer: A"
    # A repeated id follows its base id to the same side of the split.
    for salt in map(str, range(40)):
        assert is_heldout("x/1#2", salt, 0.5) == is_heldout("x/1", salt, 0.5)
    # The split is a pure function of (id, salt, fraction), nested in the fraction.
    ids = [f"id{i}" for i in range(2000)]
    small = {i for i in ids if is_heldout(i, "s", 0.1)}
    big = {i for i in ids if is_heldout(i, "s", 0.3)}
    assert small < big and 120 < len(small) < 280 and 480 < len(big) < 720
    assert {i for i in ids if is_heldout(i, "other", 0.1)} != small
    train, held = split_records(recs, CorpusSpec("qa", p, fraction=0.0, heldout_ids=("y/1",)))
    assert [r.id for r in held] == ["y/1"] and len(train) == 2
    assert corpus_hash(train) != corpus_hash(recs) and corpus_hash(train) == corpus_hash(train)


def test_match_keeps_a_topic_slice(tmp_path: Path) -> None:
    p = tmp_path / "qa.jsonl"
    rows = [{"id": "1", "focus": "Heart Attack", "text": "a"}, {"id": "2", "focus": "Asthma", "text": "b"},
            {"id": "3", "focus": "Aortic Valve Disease", "text": "c"}, {"id": "4", "text": "d"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    spec = CorpusSpec("qa", p, format="jsonl", match=(("focus", r"\b(heart|aort\w*)\b"),))
    assert [r.id for r in load_records(spec)] == ["1", "3"]  # any case; a missing field fails
    _write_tree(tmp_path, f"""\
        tokenizer = "tok"
        [corpora.qa]
        path = "{p.name}"
        match = {{ focus = "(unclosed" }}
        """)
    with pytest.raises(TreeFileError, match=r"corpus 'qa'.match.focus: bad regular expression"):
        load_tree(tmp_path / "tree.toml")


def test_bad_corpora(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="is empty"):
        load_records(CorpusSpec("e", empty))
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(CorpusError, match=r"not UTF-8 \(byte offset 3, line 1"):
        load_records(CorpusSpec("l", latin))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": \n', encoding="utf-8")
    with pytest.raises(CorpusError, match="line 2 is not JSON"):
        load_records(CorpusSpec("b", bad, format="jsonl"))
    noid = tmp_path / "noid.jsonl"
    noid.write_text('{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="no id field 'id'"):
        load_records(CorpusSpec("n", noid, format="jsonl"))
    with pytest.raises(CorpusError, match="does not exist"):
        load_records(CorpusSpec("m", tmp_path / "missing.txt"))


# --- the demo tree ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    tree = load_tree(DEMO / "tree.toml")
    return tree, tree.data()


def test_demo_heldout_invariant(demo) -> None:
    tree, data = demo
    assert [n.path for n in tree.order()] == ["master", "en", "en/medical",
                                             "en/medical/cardiology"]
    assert tree.heldout_sets == ("general", "medical", "cardiology")
    assert data.check_invariant() == []
    card = data.heldout["cardiology"]
    assert len(card) >= 30
    card_ids = {r.id for r in card}
    card_texts = {text_key(r.text) for r in card}
    # Every cardiology held-out pair is also in the medical and full MedQuAD files ...
    med_ids = {r.id for r in data.records["medquad_medical"]}
    full_ids = {r.id for r in data.records["medquad_full"]}
    assert card_ids <= med_ids and card_ids <= full_ids
    # ... and no node trains on it, by id or by text; nor on any held-out record of any set.
    every_held = {r.id for recs in data.heldout.values() for r in recs}
    for node, recs in data.train.items():
        ids = {r.id for r in recs}
        assert not ids & every_held, node
        assert not {text_key(r.text) for r in recs} & card_texts, node
    # The split is the fixed hash: recomputing it gives the same ids.
    spec = tree.corpora["medquad_cardiology"]
    again = {r.id for r in data.records["medquad_cardiology"]
             if is_heldout(r.id, spec.salt, spec.fraction)}
    assert again == card_ids
    # The master trains on the medical text too, minus the held-out pairs.
    assert len(data.train["master"]) > len(data.records["medquad_full"]) - len(every_held) - 100
    assert data.excluded["en/medical"] > 0  # cardiology pairs held out from the medical file


def test_demo_shapes(demo) -> None:
    tree, _ = demo
    params = {k: count_params(c) for k, c in node_configs(tree).items()}
    order = [n.path for n in tree.order()]
    for a, b in zip(order, order[1:]):
        assert params[b] < params[a], (a, b)
    assert params["en/medical/cardiology"] * 8 <= params["master"]
    assert params == {"master": 15_735_168, "en": 5_868_800, "en/medical": 3_443_136,
                      "en/medical/cardiology": 1_730_176}


def test_demo_tokenizer_matches_runtime(demo) -> None:
    """edgellm's runtime tokenizer, rebuilt from the GGUF metadata the converter writes,
    encodes every held-out set to exactly the ids the `tokenizers` library gives."""
    from tokenizers import Tokenizer

    from edgellm.formats.hf import tokenizer_metadata
    from edgellm.runtime.tokenizer import Tokenizer as Runtime

    tree, data = demo
    ref = Tokenizer.from_file(str(tree.tokenizer / "tokenizer.json"))
    assert ref.get_vocab_size() == 4096
    meta = tokenizer_metadata(tree.tokenizer, "llama", {}, 4096)
    rt = Runtime.from_metadata(meta)
    assert (rt.bos_id, rt.eos_id, rt.add_bos) == (0, 1, True)
    for name in tree.heldout_sets:
        text = data.heldout_text(name)
        want = ref.encode(text, add_special_tokens=False).ids
        assert rt.encode(text, add_bos=False) == want, name
        assert rt.encode(text[:200])[:1] == [0]
        assert rt.decode(want) == text


def test_demo_tokenizer_is_reproducible(demo, tmp_path: Path) -> None:
    """make_tokenizer.py retrains the shipped tokenizer.json byte for byte."""
    tree, _ = demo
    r = subprocess.run([sys.executable, "-m", "edgellm.demo.make_tokenizer", "--out",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tokenizer.json").read_bytes() == \
        (tree.tokenizer / "tokenizer.json").read_bytes()


def test_demo_corpora_attributed() -> None:
    readme = (CORPORA / "README.md").read_text(encoding="utf-8")
    shipped = sorted(p.relative_to(CORPORA).as_posix() for p in CORPORA.rglob("*")
                     if p.is_file() and p.name != "README.md")
    for rel in shipped:
        assert f"`{rel}`" in readme, rel
    for licence in ("CC BY-SA 3.0", "CC BY 4.0", "public domain", "MIT"):
        assert licence in readme
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()
                and "__pycache__" not in p.parts)
    assert total < 60 * 2**20


# --- tree file validation ---------------------------------------------------------------


def _write_tree(folder: Path, body: str) -> Path:
    p = folder / "tree.toml"
    p.write_text(textwrap.dedent(body), encoding="utf-8")
    return p


_HEAD = """\
tokenizer = "tok"
[corpora.gen]
path = "gen.txt"
heldout = "general"
fraction = 0.2
"""


@pytest.mark.parametrize("nodes, match", [
    ("[nodes.a]\ncorpora=['gen']\nparent='b'\n[nodes.b]\ncorpora=['gen']\nparent='a'\n",
     r"node 'a': parent links form a cycle \(a -> b -> a\)"),
    ("[nodes.m]\ncorpora=['gen']\nmodel={dim=32,n_layers=2,n_heads=2,hidden_dim=64}\n"
     "[nodes.c]\ncorpora=['gen']\nparent='mastr'\n", r"parent 'mastr' is not a node"),
    ("[nodes.m]\ncorpora=['gen']\nmodel={dim=32,n_layers=2,n_heads=2,hidden_dim=64}\n"
     "[nodes.n]\ncorpora=['gen']\nmodel={dim=32,n_layers=2,n_heads=2,hidden_dim=64}\n",
     r"one root .* this has 2: m, n"),
    ("[nodes.m]\ncorpora=['gen']\nmodel={dim=32,n_layers=2,n_heads=2,hidden_dim=64}\nstep=3\n",
     r"node 'm': unknown key 'step'"),
    ("[nodes.m]\ncorpora=['gen']\nmodel={dim=32,n_layers=2,n_heads=2,hidden_dim=64}\n"
     "train={stpes=3}\n", r"node 'm': train: unknown key 'stpes'; did you mean 'steps'"),
    ("[nodes.m]\ncorpora=['gen']\nmodel={dim=32,n_layers=2,n_heads=2,hidden_dim=64}\n"
     "train={steps=0}\n", r"node 'm': train.steps: must be > 0"),
    ("[nodes.m]\ncorpora=['med']\nmodel={dim=32,n_layers=2,n_heads=2,hidden_dim=64}\n",
     r"node 'm': corpora: no corpus 'med'"),
    ("[nodes.m]\ncorpora=['gen']\nmodel={dim=32,n_layers=2,n_heads=2,hidden_dim=64}\n"
     "[nodes.'m/c']\ncorpora=['gen']\nparent='m'\nstudent={dim=64}\n",
     r"node 'm/c': student.dim = 64 is wider than its parent 'm' \(dim = 32\)"),
    ("[nodes.m]\ncorpora=['gen']\nmodel={dim=32,n_layers=2,n_heads=2,hidden_dim=64}\n"
     "[nodes.'m/c']\ncorpora=['gen']\nparent='m'\nstudent={hidden_dim=128}\n",
     r"student.hidden_dim = 128 is wider than its parent 'm'"),
    ("[nodes.m]\ncorpora=['gen']\nmodel={dim=32,n_layers=2,n_heads=2,hidden_dim=64}\n"
     "[nodes.'m/c']\ncorpora=['gen']\nparent='m'\nstudent={dim=24}\n",
     r"node 'm/c': student: dim 24 is not a multiple of the parent's head_dim 16"),
    ("[nodes.m]\ncorpora=['gen']\nmodel={dim=30,n_layers=2,n_heads=4,hidden_dim=64}\n",
     r"dim 30 is not a multiple of n_heads 4"),
])
def test_tree_file_errors(tmp_path: Path, nodes: str, match: str) -> None:
    (tmp_path / "gen.txt").write_text("a\n\nb\n", encoding="utf-8")
    p = _write_tree(tmp_path, _HEAD + nodes)
    with pytest.raises(TreeFileError, match=match) as e:
        load_tree(p)
    assert str(p) in str(e.value)


def test_tree_file_missing_corpus(tmp_path: Path) -> None:
    p = _write_tree(tmp_path, _HEAD + "[nodes.m]\ncorpora=['gen']\n"
                    "model={dim=32,n_layers=2,n_heads=2,hidden_dim=64}\n")
    with pytest.raises(TreeFileError, match=r"corpus 'gen'.path: .*gen.txt does not exist; fix"):
        load_tree(p)


# --- a tiny tree, end to end on CPU -----------------------------------------------------


def _tiny_corpora(folder: Path) -> None:
    """Small real corpora cut from the demo's: speeches, medical and cardiology Q/A pairs
    (the cardiology pairs are in the medical file too, as in MedQuAD)."""
    speeches = (CORPORA / "general" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    (folder / "general.txt").write_text("\n\n".join(speeches.split("\n\n")[:120]),
                                        encoding="utf-8")
    with gzip.open(CORPORA / "cardiology" / "medquad_cardiology.jsonl.gz", "rt",
                   encoding="utf-8") as f:
        card = [json.loads(line) for line in f][:40]
    with gzip.open(CORPORA / "medical" / "medquad_medical.jsonl.gz", "rt", encoding="utf-8") as f:
        med = [json.loads(line) for line in f][:60]
    for r in card + med:
        r["answer"] = r["answer"][:300]
    (folder / "card.jsonl").write_text("".join(json.dumps(r) + "\n" for r in card),
                                       encoding="utf-8")
    (folder / "med.jsonl").write_text("".join(json.dumps(r) + "\n" for r in med + card),
                                      encoding="utf-8")


TINY = """\
name = "tiny"
tokenizer = "tok"
salt = "tiny-v1"
boards = ["x86-host"]
quant_types = ["f16", "q4_0"]
[eval]
max_tokens = 256
[train]
batch_size = 4
seq_len = 32
lr = 3e-3
warmup = 2
eval_every = 10
checkpoint_every = 10
eval_tokens = 256
device = "cpu"
[corpora.general]
path = "general.txt"
heldout = "general"
fraction = 0.1
[corpora.medical]
path = "med.jsonl"
id = ["collection", "qid"]
text = "Question: {question}\\nAnswer: {answer}"
heldout = "medical"
fraction = 0.15
[corpora.cardiology]
path = "card.jsonl"
id = ["collection", "qid"]
text = "Question: {question}\\nAnswer: {answer}"
heldout = "cardiology"
fraction = 0.25
[nodes.master]
corpora = ["general", "medical"]
model = { dim = 64, n_layers = 2, n_heads = 2, hidden_dim = 128, seq_len = 64 }
train = { steps = STEPS }
[nodes.med]
parent = "master"
corpora = ["medical"]
student = { dim = 32, n_layers = 2, hidden_dim = 64 }
train = { steps = 8 }
[nodes."med/cardio"]
parent = "med"
corpora = ["cardiology"]
student = { n_layers = 1 }
train = { steps = 6 }
"""


def _tiny_tree(folder: Path, steps: int = 12) -> Path:
    return _write_tree(folder, TINY.replace("STEPS", str(steps)))


def _snapshot(reg_path: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(reg_path)
    try:
        return [tuple(r) for t in ("nodes", "versions", "builds", "build_files", "build_scores")
                for r in conn.execute(f"SELECT * FROM {t} ORDER BY 1")]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny")
    _tiny_corpora(root)
    tree_path = _tiny_tree(root)
    tree = load_tree(tree_path)
    data = tree.data()
    texts = [r.text for n in tree.order() for r in data.train[n.path]]
    train_tokenizer(texts, root / "tok", vocab_size=320)
    out = root / "hub"
    rc = main(["tree", "build", str(tree_path), "--out", str(out), "-t", "2"])
    assert rc == 0
    return root, tree_path, out, out / "registry.sqlite"


@pytest.mark.slow
def test_tiny_tree_registry(tiny, capsys: pytest.CaptureFixture[str]) -> None:
    root, tree_path, out, reg_path = tiny
    with Registry.open(reg_path) as reg:
        assert reg.nodes() == [("master", None), ("med", "master"), ("med/cardio", "med")]
        assert reg.ancestors("med/cardio") == ["med", "master"]
        assert reg.descendants("master") == ["med", "med/cardio"]
        tree = load_tree(tree_path)
        data = tree.data()
        params = {}
        for node in ("master", "med", "med/cardio"):
            v = reg.current(node)
            assert v is not None and v.version == 1
            assert v.corpus_hash == data.corpus_hash(node)
            assert v.config_hash == tree.config_hash(node)
            assert v.n_train_records == len(data.train[node])
            assert (v.checkpoint / "model.safetensors").is_file()
            assert v.checkpoint.is_relative_to(out)
            params[node] = v.params
            builds = reg.builds(v.id)
            assert [(b.board, b.recipe) for b in builds] == [("x86-host", "f16"),
                                                             ("x86-host", "q4_0")]
            for b in builds:
                assert list(b.scores) == ["general", "medical", "cardiology"]
                # Windows fit the training sequence (seq_len 32, so 31 tokens + BOS).
                assert read_manifest(b.folder).scores["general"].window == tree.eval_window == 31
                assert (b.scores["general"].window, b.scores["general"].stride) == (31, 15)
                assert all(1 < s.ppl < 400 for s in b.scores.values())
                for name, sha, size in b.files:
                    blob = (b.folder / name).read_bytes()
                    assert len(blob) == size and hashlib.sha256(blob).hexdigest() == sha
        assert params["master"] > params["med"] > params["med/cardio"]
        med = reg.current("med")
        assert med is not None and med.parent_version == 1
        # Stored paths are relative to the registry's folder.
        row = reg.conn.execute("SELECT checkpoint FROM versions WHERE node = 'med'").fetchone()
        assert row[0].startswith("models/med/v1-")
    # The GGUF's tokenizer (edgellm runtime) encodes held-out text as `tokenizers` does.
    from tokenizers import Tokenizer

    from edgellm.runtime.model import Model

    with Registry.open(reg_path) as reg:
        gguf = reg.builds(reg.current("med/cardio").id)[0].folder / "model.gguf"  # type: ignore[union-attr]
    ref = Tokenizer.from_file(str(root / "tok" / "tokenizer.json"))
    with Model(gguf) as m:
        for name in ("general", "medical", "cardiology"):
            text = (out / "heldout" / f"{name}.txt").read_text(encoding="utf-8")
            assert m.tokenize(text, add_bos=False) == ref.encode(text,
                                                                 add_special_tokens=False).ids
    # The invariant on the tiny tree.
    assert data.check_invariant() == []
    assert not {r.id for r in data.train["med"]} & {r.id for r in data.heldout["cardiology"]}

    # `tree show`: a table with params, MiB per quant type and the three perplexities.
    capsys.readouterr()
    assert main(["tree", "show", "--registry", str(reg_path), "--plot",
                 str(root / "ppl.png")]) == 0
    table = capsys.readouterr().out
    head = table.splitlines()[0].split()
    assert head[:3] == ["node", "ver", "params"]
    for col in ("f16", "q4_0", "general", "medical", "cardiology"):
        assert col in head
    assert f"{params['med/cardio']:,}" in table and "  med/cardio" in table
    assert (root / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["tree", "show", "--registry", str(reg_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["node"] for r in doc["table"]] == ["master", "med", "med/cardio"]
    assert set(doc["table"][2]["ppl"]) == {"general", "medical", "cardiology"}

    # A second build finds nothing to do.
    assert main(["tree", "build", str(tree_path), "--out", str(out)]) == 0
    assert "everything is current" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_tree_errors_leave_registry(tiny, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root, tree_path, out, reg_path = tiny
    before = _snapshot(reg_path)
    # A corpus that is not UTF-8: refused before anything is trained.
    bad_root = tmp_path / "bad"
    bad_root.mkdir()
    for f in ("general.txt", "med.jsonl", "card.jsonl"):
        (bad_root / f).write_bytes((root / f).read_bytes())
    (bad_root / "tok").symlink_to(root / "tok")
    (bad_root / "card.jsonl").write_bytes(b'{"collection": "x", "qid": "\xff"}\n')
    bad_tree = _write_tree(bad_root, (tree_path.read_text(encoding="utf-8")))
    assert main(["tree", "build", str(bad_tree), "--out", str(out),
                 "--registry", str(reg_path)]) == 1
    assert "not UTF-8" in capsys.readouterr().err
    (bad_root / "card.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(CorpusError, match="is empty"):
        from edgellm.hub.treebuild import build_tree

        build_tree(load_tree(bad_tree), out=out, registry=reg_path, log=None)
    assert _snapshot(reg_path) == before

    # A tokenizer that differs from the one the parent was trained with.
    other = tmp_path / "other"
    other.mkdir()
    (other / "tok").mkdir()
    for f in ("general.txt", "med.jsonl", "card.jsonl"):
        (other / f).write_bytes((root / f).read_bytes())
    tree = load_tree(_write_tree(other, tree_path.read_text(encoding="utf-8")))
    data = tree.data()
    train_tokenizer([r.text for r in data.train["master"]][:30], other / "tok", vocab_size=300)
    from edgellm.hub.treebuild import build_tree

    with pytest.raises(TokenizerMismatchError, match=r"med/cardio: tokenizer mismatch: its "
                                                     r"parent med@1"):
        build_tree(tree, out=out, registry=reg_path, only="med/cardio", log=None)
    assert _snapshot(reg_path) == before

    # A full disk (a file size limit: writes fail with EFBIG) while the master retrains.
    changed = _tiny_tree(tmp_path, steps=13)
    for f in ("general.txt", "med.jsonl", "card.jsonl"):
        (tmp_path / f).write_bytes((root / f).read_bytes())
    (tmp_path / "tok").symlink_to(root / "tok")
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (150000, 150000)); "
            "from edgellm.cli import main; "
            f"sys.exit(main(['tree', 'build', {str(changed)!r}, '--out', {str(out)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 1, r.stderr
    assert "disk" in r.stderr.lower() and "registry is unchanged" in r.stderr
    assert _snapshot(reg_path) == before


@pytest.mark.slow
def test_tiny_tree_parent_rebuild(tiny, capsys: pytest.CaptureFixture[str]) -> None:
    root, tree_path, out, reg_path = tiny
    # Retrain the middle node (its config changes): its child becomes stale, the root does not.
    text = tree_path.read_text(encoding="utf-8").replace("train = { steps = 8 }",
                                                        "train = { steps = 9 }")
    (root / "changed").mkdir()
    changed = _write_tree(root / "changed", text)
    for f in ("general.txt", "med.jsonl", "card.jsonl"):
        (root / "changed" / f).symlink_to(root / f)
    (root / "changed" / "tok").symlink_to(root / "tok")
    capsys.readouterr()
    assert main(["tree", "stale", str(changed), "--registry", str(reg_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["master v1: current", "med v1: stale: config changed",
                     "med/cardio v1: stale: ancestor med is stale"]
    assert main(["tree", "build", str(changed), "--out", str(out), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "plan: master: current (v1)" in err
    assert "plan: med: train -- config changed" in err
    assert "plan: med/cardio: train -- ancestor med is stale" in err
    with Registry.open(reg_path) as reg:
        assert reg.current("med").version == 1  # type: ignore[union-attr]  # dry run: no change
    assert main(["tree", "build", str(changed), "--out", str(out)]) == 0
    with Registry.open(reg_path) as reg:
        assert [v.version for v in reg.versions("master")] == [1]
        assert [v.version for v in reg.versions("med")] == [1, 2]
        cardio = reg.current("med/cardio")
        assert cardio is not None and (cardio.version, cardio.parent_version) == (2, 2)
        stale = {(n, v) for n, v, _ in reg.stale_builds()}
        assert stale == {("med", 1), ("med/cardio", 1)}
        assert all(not s.reasons for s in reg.stale())


@pytest.mark.slow
def test_tiny_tree_imports_checkpoints(tiny, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`--checkpoints DIR` registers folders trained elsewhere (train_nodes.py on a GPU
    machine) without training: the same weights give the same scores."""
    import shutil

    _, tree_path, _, reg_path = tiny
    runs = tmp_path / "runs"
    with Registry.open(reg_path) as reg:
        want = {}
        for node in ("master", "med", "med/cardio"):
            v = reg.versions(node)[0]  # v1, trained by the fixture
            dst = runs / node.replace("/", "-")
            dst.mkdir(parents=True)
            for f in v.checkpoint.iterdir():
                if f.is_file():
                    shutil.copy2(f, dst / f.name)
            want[node] = {b.recipe: b.scores["cardiology"].ppl for b in reg.builds(v.id)}
    out = tmp_path / "hub"
    capsys.readouterr()
    assert main(["tree", "build", str(tree_path), "--out", str(out), "--checkpoints",
                 str(runs)]) == 0
    err = capsys.readouterr().err
    assert err.count(": importing ") == 3 and "pretraining" not in err and "distilling" not in err
    with Registry.open(out / "registry.sqlite") as reg:
        for node, scores in want.items():
            v = reg.current(node)
            assert v is not None and v.train["imported_from"].endswith(node.replace("/", "-"))
            assert v.config["checkpoint_sha256"]
            got = {b.recipe: b.scores["cardiology"].ppl for b in reg.builds(v.id)}
            assert got == pytest.approx(scores, rel=1e-9)
    # The wrong folder for a node (the master's weights as med): refused, nothing registered.
    (runs / "med" / "model.safetensors").write_bytes(
        (runs / "master" / "model.safetensors").read_bytes())
    shutil.copy2(runs / "master" / "config.json", runs / "med" / "config.json")
    before = _snapshot(out / "registry.sqlite")
    assert main(["tree", "build", str(tree_path), "--out", str(out), "--checkpoints",
                 str(runs)]) == 1
    assert "med: the imported checkpoint" in capsys.readouterr().err
    assert _snapshot(out / "registry.sqlite") == before
