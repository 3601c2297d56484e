# SPDX-License-Identifier: MIT
"""Distillation and pretraining (edgellm.hub.distill) with real torch training on the CPU.

A tiny teacher (dim 64, 4 layers, a BPE tokenizer trained on Botchan) is pretrained once per
session; students (2 layers, dim 32) are distilled from it. Checks: KL to the teacher and
held-out perplexity fall; resume gives the very weights of an uninterrupted run; bad input
raises typed errors and writes nothing; a full disk (a real 1 MB tmpfs) during a checkpoint
keeps the previous one; the output converts to GGUF and edgellm's logits match torch's.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support.tiny_models import make_tiny_llama, make_tiny_qwen2, save_bpe_tokenizer
from support.tolerances import LOGITS_REL_TRANSFORMERS, rel_err

from edgellm.cli import main
from edgellm.errors import (
    CheckpointMismatchError,
    CorpusError,
    DiskFullError,
    InvalidArgumentError,
    TokenizerMismatchError,
    UnsupportedError,
)
from edgellm.hub.distill import (
    StudentShape,
    TrainSettings,
    distill,
    init_student,
    pretrain,
    read_documents,
    student_config,
)
from edgellm.hub.trainer import write_safetensors

ROOT = Path(__file__).resolve().parents[1]
BOTCHAN = ROOT / "tests" / "data" / "corpora" / "botchan.txt"
TEACHER = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
SMALL = StudentShape(n_layers=2, dim=32)
# Short CPU runs: 8 windows of 64 tokens a step.
FAST = dict(batch_size=8, seq_len=64, lr=3e-3, warmup=5, eval_tokens=4096)
FINAL_NAMES = ("config.json", "model.safetensors", "train.json", "tokenizer.json")


def _docs() -> tuple[list[str], list[str]]:
    """Botchan's paragraphs (one a line) after the Gutenberg header: train, then held out."""
    lines = [x.strip() for x in BOTCHAN.read_text(encoding="utf-8").splitlines()]
    docs = [x for x in lines[40:] if x and not x.startswith("***")]
    return docs[:-80], docs[-80:]


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: tiny matmuls gain nothing from two, and under load (CI runs other
    suites beside this one on 2 cores) OpenMP's spinning threads slow training several-fold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    with _one_torch_thread():
        yield


@pytest.fixture(scope="session")
def corpus() -> tuple[list[str], list[str]]:
    return _docs()


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    save_bpe_tokenizer(d, "llama3", 384)
    return d


@pytest.fixture(scope="session")
def teacher(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path,
            corpus: tuple[list[str], list[str]]) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("runs") / "teacher"
    with _one_torch_thread():  # session fixtures start before the module's autouse one
        r = pretrain(tok_dir, TEACHER, *corpus, out,
                     TrainSettings(steps=60, eval_every=30, checkpoint_every=60, **FAST),
                     progress=False)
    return out, r


@pytest.fixture(scope="session")
def student(tmp_path_factory: pytest.TempPathFactory, teacher: tuple[Path, Any],
            corpus: tuple[list[str], list[str]]) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("runs") / "student"
    with _one_torch_thread():
        r = distill(teacher[0], *corpus, out, SMALL,
                    TrainSettings(steps=40, eval_every=10, checkpoint_every=20, **FAST),
                    progress=False)
    return out, r


# --------------------------------------------------------------------------------------
# Training works


def test_pretrain_learns_and_records_its_facts(teacher: tuple[Path, Any], tok_dir: Path) -> None:
    out, r = teacher
    ppl = [h["heldout_ppl"] for h in r.history]
    assert [h["step"] for h in r.history] == [0, 30, 60]
    assert ppl[-1] < 0.5 * ppl[0], ppl  # from ~vocab-size perplexity to well below
    assert math.isnan(r.history[-1]["kl"]) and r.teacher_params is None
    facts = json.loads((out / "train.json").read_text())
    assert facts["kind"] == "pretrain" and facts["steps"] == 60 and facts["seed"] == 0
    assert facts["history"][-1]["kl"] is None  # strict JSON: NaN is written as null
    assert facts["params"] == r.params == sum(t.numel() for t in load_file(
        str(out / "model.safetensors")).values())
    assert (out / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert r.tokens_per_s > 0 and r.device == "cpu"


def test_distill_lowers_kl_to_the_teacher_and_heldout_perplexity(
        student: tuple[Path, Any], teacher: tuple[Path, Any]) -> None:
    out, r = student
    h0, h1 = r.history[0], r.history[-1]
    assert [h["step"] for h in r.history] == [0, 10, 20, 30, 40]
    assert h1["heldout_kl"] < 0.5 * h0["heldout_kl"], (h0, h1)  # KL(teacher || student) at T=1
    assert h1["heldout_ppl"] < 0.8 * h0["heldout_ppl"], (h0, h1)
    assert r.history[-1]["kl"] < r.history[1]["kl"]  # the training KL at T falls too
    assert r.params < r.teacher_params / 3
    facts = json.loads((out / "train.json").read_text())
    import hashlib

    assert facts["parent"] == str(teacher[0].resolve())
    assert facts["parent_config_sha256"] == hashlib.sha256(
        (teacher[0] / "config.json").read_bytes()).hexdigest()
    assert facts["teacher_params"] == r.teacher_params == teacher[1].params
    assert facts["shape"]["dim"] == 32 and facts["layers"] == [0, 3]
    assert facts["settings"]["temperature"] == 2.0 and facts["tokens_per_s"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"]) == (32, 2, 2, 1, 64)
    assert not list(out.glob(".*tmp*"))


def test_no_teacher_baseline_trains_on_the_data_alone(
        tmp_path: Path, teacher: tuple[Path, Any], corpus: tuple[list[str], list[str]]) -> None:
    r = distill(teacher[0], *corpus, tmp_path / "base", SMALL,
                TrainSettings(steps=20, eval_every=20, checkpoint_every=20, **FAST),
                teacher=False, progress=False)
    assert r.teacher_params is None
    assert all(math.isnan(h["kl"]) and math.isnan(h["heldout_kl"]) for h in r.history)
    assert r.history[-1]["ce"] == r.history[-1]["loss"]
    assert r.history[-1]["heldout_ppl"] < r.history[0]["heldout_ppl"]
    assert json.loads((tmp_path / "base" / "train.json").read_text())["teacher"] is False


def test_bf16_autocast_path_trains(tmp_path: Path, teacher: tuple[Path, Any],
                                   corpus: tuple[list[str], list[str]]) -> None:
    """The CUDA recipe (bf16 autocast, bf16 teacher weights, fp32 master weights) on the CPU."""
    out = tmp_path / "bf16"
    r = distill(teacher[0], *corpus, out, SMALL,
                TrainSettings(steps=6, eval_every=6, checkpoint_every=3, precision="bf16", **FAST),
                progress=False)
    assert r.history[-1]["heldout_kl"] < r.history[0]["heldout_kl"]
    assert json.loads((out / "train.json").read_text())["precision"] == "bf16"
    saved = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in saved.values())


# --------------------------------------------------------------------------------------
# Shapes and initialisation


def test_student_config_derives_and_validates_shapes() -> None:
    parent = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 8,
              "intermediate_size": 688, "num_attention_heads": 8, "num_key_value_heads": 4,
              "vocab_size": 512, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}
    c = student_config(parent, StudentShape(n_layers=4, dim=128))
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"],
            c["num_key_value_heads"], c["head_dim"]) == (4, 128, 4, 2, 32)
    assert c["intermediate_size"] == 352  # 688 / 2 = 344, to a multiple of 32
    assert c["rope_parameters"] == parent["rope_parameters"] and c["vocab_size"] == 512
    c = student_config(parent, StudentShape(shrink=0.5))
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_key_value_heads"]) == (4, 128, 2)
    assert student_config(parent, StudentShape())["intermediate_size"] == 688
    wide = [StudentShape(dim=512), StudentShape(n_layers=9), StudentShape(hidden_dim=1024),
            StudentShape(n_heads=16, dim=512), StudentShape(n_kv_heads=8),
            StudentShape(layers=(0, 8)), StudentShape(dim=100), StudentShape(shrink=0.5, dim=64),
            StudentShape(shrink=1.5), StudentShape(layers=(3, 1)),
            StudentShape(n_layers=2, layers=(0, 1, 2)), StudentShape(n_heads=3, n_kv_heads=2)]
    for shape in wide:
        with pytest.raises(InvalidArgumentError):
            student_config(parent, shape)
    with pytest.raises(InvalidArgumentError, match=r"dim 512 > parent's 256"):
        student_config(parent, StudentShape(dim=512))
    with pytest.raises(UnsupportedError):
        student_config({**parent, "model_type": "gpt2"}, StudentShape())


def _logits(model: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out: np.ndarray = model(torch.tensor([ids])).logits[0].numpy()
    return out


@pytest.mark.parametrize("builder", [make_tiny_llama, make_tiny_qwen2])
def test_full_shape_student_is_the_parent_and_narrow_ones_are_slices(
        tmp_path: Path, builder: Any) -> None:
    from transformers import AutoModelForCausalLM

    parent = AutoModelForCausalLM.from_pretrained(builder(tmp_path / "p", n_layers=3),
                                                  dtype=torch.float32).eval()
    ids = list(range(5, 40))
    same = init_student(parent, StudentShape()).eval()
    assert np.array_equal(_logits(same, ids), _logits(parent, ids))
    s = init_student(parent, StudentShape(layers=(0, 2), dim=32)).eval()
    p, q = parent.state_dict(), s.state_dict()
    assert torch.equal(q["model.embed_tokens.weight"], p["model.embed_tokens.weight"][:, :32])
    # parent: 4 query heads on 2 KV heads (head_dim 16); student: 2 on 1, the first group's.
    assert torch.equal(q["model.layers.1.self_attn.q_proj.weight"],
                       p["model.layers.2.self_attn.q_proj.weight"][:32, :32])
    assert torch.equal(q["model.layers.1.self_attn.k_proj.weight"],
                       p["model.layers.2.self_attn.k_proj.weight"][:16, :32])
    assert torch.equal(q["model.layers.0.self_attn.o_proj.weight"],
                       p["model.layers.0.self_attn.o_proj.weight"][:32, :32])
    assert q["model.layers.0.mlp.down_proj.weight"].shape == (32, 64)
    if "model.layers.0.self_attn.q_proj.bias" in p:
        assert torch.equal(q["model.layers.0.self_attn.q_proj.bias"],
                           p["model.layers.0.self_attn.q_proj.bias"][:32])


# --------------------------------------------------------------------------------------
# Checkpoints and resume


class _Interrupt(Exception):
    pass


def _stop_at(step: int) -> Any:
    def on_step(s: int) -> None:
        if s == step:
            raise _Interrupt

    return on_step


def test_resumed_training_reaches_the_same_weights(
        tmp_path: Path, teacher: tuple[Path, Any], corpus: tuple[list[str], list[str]]) -> None:
    settings = TrainSettings(steps=12, eval_every=3, checkpoint_every=4, **FAST)
    straight = distill(teacher[0], *corpus, tmp_path / "a", SMALL, settings, progress=False)
    out = tmp_path / "b"
    with pytest.raises(_Interrupt):  # stops at step 7: the checkpoint holds step 4
        distill(teacher[0], *corpus, out, SMALL, settings, progress=False, on_step=_stop_at(7))
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and not (out / "model.safetensors").exists()
    with pytest.raises(CheckpointMismatchError, match=r"settings\.lr: checkpoint 0\.003, now 0\.002"):
        distill(teacher[0], *corpus, out, SMALL, TrainSettings(**{**settings.__dict__, "lr": 2e-3}),
                progress=False)
    with pytest.raises(CheckpointMismatchError, match="hidden_size"):
        distill(teacher[0], *corpus, out, StudentShape(n_layers=2, dim=16), settings, progress=False)
    resumed = distill(teacher[0], *corpus, out, SMALL, settings, progress=False)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resume changed the weights"
    # json.dumps compares NaN (no teacher KL before step 1) equal to NaN.
    assert json.dumps(resumed.history) == json.dumps(straight.history) and resumed.steps == 12
    again = distill(teacher[0], *corpus, out, SMALL, settings, progress=False)  # already done
    assert json.dumps(again.history) == json.dumps(straight.history)


def test_safetensors_writer_round_trips(tmp_path: Path) -> None:
    t = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "c": torch.tensor(4.0),
         "d": torch.arange(6, dtype=torch.int64).reshape(2, 3), "e": torch.zeros(0)}
    write_safetensors(tmp_path / "x.safetensors", t, {"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in t.items())


# --------------------------------------------------------------------------------------
# Bad input: a typed error, and nothing at OUT_DIR


def _assert_nothing_written(out: Path) -> None:
    assert not any((out / n).exists() for n in FINAL_NAMES), sorted(p.name for p in out.iterdir())


def test_bad_input_raises_typed_errors_and_writes_nothing(
        tmp_path: Path, teacher: tuple[Path, Any], corpus: tuple[list[str], list[str]]) -> None:
    train, held = corpus
    other_tok = tmp_path / "other-tok"
    save_bpe_tokenizer(other_tok, "llama3", 320)
    s = TrainSettings(steps=2, **FAST)
    cases: list[tuple[type[Exception], str, dict[str, Any]]] = [
        (InvalidArgumentError, "dim 128 > parent's 64", dict(shape=StudentShape(dim=128))),
        (InvalidArgumentError, "n_layers 5 > parent's 4", dict(shape=StudentShape(n_layers=5))),
        (InvalidArgumentError, "hidden_dim 256", dict(shape=StudentShape(hidden_dim=256))),
        (InvalidArgumentError, "n_heads 8 > parent's 4", dict(shape=StudentShape(n_heads=8, dim=128))),
        (TokenizerMismatchError, "has 384 tokens.*has 320", dict(tokenizer_dir=other_tok)),
        (CorpusError, "no training text", dict(train_texts=[])),
        (CorpusError, "no training text", dict(train_texts=["", "  \n "])),
        (CorpusError, "no held-out text", dict(heldout_texts=[])),
        (CorpusError, "seq_len 64 needs at least 65", dict(train_texts=["a few words"])),
        (InvalidArgumentError, "alpha", dict(settings=TrainSettings(alpha=1.5))),
        (InvalidArgumentError, "max_position_embeddings 256",
         dict(settings=TrainSettings(**{**FAST, "seq_len": 512}))),
    ]
    for i, (exc, msg, kw) in enumerate(cases):
        out = tmp_path / f"out{i}"
        args: dict[str, Any] = dict(train_texts=train, heldout_texts=held, shape=SMALL, settings=s)
        args.update(kw)
        with pytest.raises(exc, match=msg):
            distill(teacher[0], out_dir=out, progress=False, **args)
        assert not out.exists(), (exc, msg)
    with pytest.raises(CorpusError, match="no held-out text"):
        pretrain(other_tok, TEACHER, train, [" "], tmp_path / "p", s, progress=False)
    assert not (tmp_path / "p").exists()


def test_text_files_non_utf8_and_empty_are_typed_errors(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n\nsecond".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt.*not UTF-8"):
        read_documents(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"empty\.txt"):
        read_documents(empty)
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("one\ndoc\n\n\ntwo\n", encoding="utf-8")
    assert read_documents(blocks) == ["one\ndoc", "two"]
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "Q1?", "answer": "A1."}\n\n{"question": "Q2?", "answer": "A2."}\n',
                  encoding="utf-8")
    assert read_documents(qa) == ["Question: Q1?\nAnswer: A1.", "Question: Q2?\nAnswer: A2."]
    tx = tmp_path / "t.jsonl"
    tx.write_text('{"text": "hello"}\n{"text": "world"}\n', encoding="utf-8")
    assert read_documents(tx) == ["hello", "world"]
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"odd\.jsonl.*\"text\""):
        read_documents(odd)


# --------------------------------------------------------------------------------------
# A full disk during a checkpoint


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir())


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(
        tmp_path: Path, student: tuple[Path, Any], teacher: tuple[Path, Any],
        corpus: tuple[list[str], list[str]]) -> None:
    # A tmpfs that holds one checkpoint of this student but not two at once.
    ckpt_bytes = _dir_bytes(student[0] / "checkpoint")
    size = (int(ckpt_bytes * 1.6) // 4096 + 1) * 4096
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"this test needs root to mount a tmpfs: {r.stderr}"
    try:
        out = mnt / "student"
        settings = TrainSettings(steps=8, eval_every=4, checkpoint_every=4, **FAST)
        with pytest.raises(DiskFullError, match=r"disk full .*small/student") as ei:
            distill(teacher[0], *corpus, out, SMALL, settings, progress=False)
        assert "step 4" in str(ei.value)
        assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]  # no temp dir, no output
        _assert_nothing_written(out)
        for f in ("model", "optimizer", "rng"):
            assert load_file(str(out / "checkpoint" / f"{f}.safetensors"))
        # With room again, the kept checkpoint resumes to the end.
        big = tmp_path / "big"
        shutil.copytree(out, big)
        r2 = distill(teacher[0], *corpus, big, SMALL, settings, progress=False)
        assert r2.steps == 8 and (big / "train.json").is_file()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# --------------------------------------------------------------------------------------
# The output runs in edgellm


def test_output_converts_to_gguf_and_runs_in_edgellm(tmp_path: Path, student: tuple[Path, Any],
                                                     corpus: tuple[list[str], list[str]]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgellm.formats.convert import convert
    from edgellm.runtime.model import Model

    out = student[0]
    gguf = convert(out, tmp_path / "s.gguf", "f32", log=None)
    text = corpus[1][0][:200]
    ids = AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want = _logits(hf, ids)
    with Model(gguf, n_threads=1) as m:
        assert m.tokenize(text) == ids
        got = m.logits(ids)
        assert m.config.n_layers == 2 and m.config.dim == 32
    assert rel_err(got, want) < LOGITS_REL_TRANSFORMERS


# --------------------------------------------------------------------------------------
# The command


def test_cli_help_teaches() -> None:
    r = subprocess.run([sys.executable, "-m", "edgellm", "distill", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for want in ("--no-teacher", "--shrink", "examples:", "edgellm distill ./master", "resumes"):
        assert want in r.stdout


def test_cli_distills_from_text_files(tmp_path: Path, teacher: tuple[Path, Any],
                                      corpus: tuple[list[str], list[str]],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    train_txt = tmp_path / "train.txt"
    train_txt.write_text("\n\n".join(corpus[0][:400]), encoding="utf-8")
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus[1][:20]),
                    encoding="utf-8")
    out = tmp_path / "cli"
    args = ["distill", str(teacher[0]), "--train", str(train_txt), "--heldout", str(held),
            "--out", str(out), "--layers", "2", "--dim", "32", "--steps", "3", "--batch-size", "4",
            "--seq-len", "32", "--warmup", "1", "--seed", "3", "--device", "cpu", "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] == 3 and res["device"] == "cpu" and res["history"][0]["kl"] is None
    facts = json.loads((out / "train.json").read_text())
    assert facts["seed"] == 3 and facts["train_documents"] == 400
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    assert main(["distill", str(teacher[0]), "--train", str(bad), "--heldout", str(held),
                 "--out", str(tmp_path / "never")]) == 1
    assert "bad.txt" in capsys.readouterr().err and not (tmp_path / "never").exists()
