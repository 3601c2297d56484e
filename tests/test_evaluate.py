# SPDX-License-Identifier: MIT
"""Perplexity (edgellm-ppl-v1) against independent computations, its windowing, and its errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.tiny_models import make_tiny_llama, make_tiny_qwen2
from support.tolerances import PPL_REL

import edgellm
from edgellm.formats.convert import convert
from edgellm.formats.gguf import read_gguf
from edgellm.formats.quant import dequantize
from edgellm.hub.evaluate import (
    PROTOCOL,
    gutenberg_body,
    perplexity,
    resolve_window,
    token_nll,
    window_plan,
)
from edgellm.runtime import reference
from edgellm.runtime.config import ModelConfig

DATA = Path(__file__).parent / "data"
STORIES = DATA / "stories260K" / "stories260K.bin"
BOTCHAN = DATA / "corpora" / "botchan.txt"
MEDQUAD = DATA / "corpora" / "medquad_sample.txt"


@pytest.fixture(scope="module")
def stories_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(STORIES, tmp_path_factory.mktemp("ppl") / "s-f32.gguf", type="f32", log=None)


@pytest.fixture(scope="module")
def held_out() -> str:
    return gutenberg_body(BOTCHAN.read_text(encoding="utf-8"))


def _independent_windows(n: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Window (start, end) pairs: starts at multiples of stride until one reaches the end."""
    out, start = [], 0
    while True:
        out.append((start, min(start + window, n)))
        if start + window >= n:
            return out
        start += stride


def _owner(i: int, windows: list[tuple[int, int]], bos: bool) -> int | None:
    """The window scoring token i: the first with the most left context before i."""
    best, best_ctx = None, -1
    for k, (s, e) in enumerate(windows):
        if s <= i < e and (bos or i > s) and i - s > best_ctx:
            best, best_ctx = k, i - s
    return best


# --- windowing --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 400), window=st.integers(1, 64), data=st.data(), bos=st.booleans())
def test_every_token_is_scored_once_in_its_best_window(n: int, window: int,
                                                       data: st.DataObject, bos: bool) -> None:
    stride = data.draw(st.integers(1, window))
    plan = window_plan(n, window, stride, bos)
    assert [(w.start, w.end) for w in plan] == _independent_windows(n, window, stride)
    scored: list[int] = []
    for k, w in enumerate(plan):
        assert w.start <= w.score_start <= w.end and w.end - w.start <= window
        for i in range(w.score_start, w.end):
            assert _owner(i, [(p.start, p.end) for p in plan], bos) == k, (i, k)
        scored.extend(range(w.score_start, w.end))
    assert len(scored) == len(set(scored)), "a token was scored twice"
    unscorable = {i for i in range(n) if _owner(i, [(p.start, p.end) for p in plan], bos) is None}
    assert sorted(scored) == sorted(set(range(n)) - unscorable)
    if bos:
        assert not unscorable
    else:  # only token 0 has no prediction, unless windows are disjoint
        assert unscorable == ({0} if stride < window else {w.start for w in plan})


def test_first_window_scores_all_and_later_ones_their_last_stride() -> None:
    plan = window_plan(1000, 256, 64, True)
    assert (plan[0].start, plan[0].score_start, plan[0].end) == (0, 0, 256)
    for w in plan[1:-1]:
        assert w.end - w.score_start == 64 and w.end - w.start == 256
    assert plan[-1].end == 1000 and plan[-2].end < 1000


def test_stride_equal_to_window_gives_disjoint_windows() -> None:
    plan = window_plan(1000, 128, 128, True)
    assert len(plan) == 8
    for a, b in zip(plan, plan[1:]):
        assert b.start == a.end == b.score_start
    assert all(w.score_start == w.start for w in plan)


def test_window_defaults_follow_the_context() -> None:
    assert resolve_window(512, True, None, None) == (511, 255)
    assert resolve_window(512, False, None, None) == (512, 256)
    assert resolve_window(4096, True, None, None) == (512, 256)
    assert resolve_window(256, True, 100, 100) == (100, 100)


def test_log_softmax_is_stable_and_exact() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 50)).astype(np.float32) * 3
    targets = rng.integers(0, 50, size=7)
    want = [-math.log(math.exp(float(row[t])) / sum(math.exp(float(x)) for x in row))
            for row, t in zip(logits, targets)]
    np.testing.assert_allclose(token_nll(logits, targets), want, rtol=1e-12)
    huge = logits.astype(np.float64) + 1e4  # exp(1e4) overflows; a shift-invariant NLL does not
    got = token_nll(huge, targets)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-9)


# --- against independent computations ---------------------------------------------------


def _reference_ppl(path: Path, ids: list[int], bos: int, window: int, stride: int) -> tuple[float, int]:
    """Perplexity by the NumPy float64 reference forward and brute-force window ownership."""
    with read_gguf(path) as gf:
        cfg = ModelConfig.from_metadata(gf.metadata)
        w = {n: dequantize(gf.tensor_bytes(n), t.type, t.shape[::-1]).astype(np.float64)
             for n, t in gf.tensors.items()}
    windows = _independent_windows(len(ids), window, stride)
    logp: dict[int, np.ndarray] = {}
    nll = []
    for i in range(len(ids)):
        k = _owner(i, windows, True)
        assert k is not None
        s, e = windows[k]
        if k not in logp:
            x = reference.forward([bos] + ids[s:e], w, cfg)  # [1 + e - s, vocab]
            mx = x.max(-1, keepdims=True)
            logp[k] = x - mx - np.log(np.exp(x - mx).sum(-1, keepdims=True))
        nll.append(-logp[k][i - s, ids[i]])  # row i - s follows BOS + ids[s:i]
    return math.exp(float(np.mean(nll))), len(nll)


@pytest.mark.parametrize(("window", "stride"), [(96, 40), (64, 64), (511, 255)])
def test_matches_numpy_reference_on_stories260k(stories_f32: Path, held_out: str,
                                                window: int, stride: int) -> None:
    with edgellm.Model(stories_f32, n_threads=2) as m:
        r = perplexity(m, held_out, window=window, stride=stride, max_tokens=300)
        ids = m.tokenize(held_out, add_bos=False)[:300]
        bos = m.tokenizer.bos_id
    assert bos is not None and r.bos
    want, n = _reference_ppl(stories_f32, ids, bos, window, stride)
    assert r.n_scored == n == 300 and r.n_tokens == 300
    assert r.n_windows == len(_independent_windows(300, window, stride))
    assert abs(r.ppl / want - 1) < PPL_REL, (r.ppl, want)
    assert r.protocol == PROTOCOL and (r.window, r.stride) == (window, stride)
    assert 1 < r.ppl < 512  # better than uniform over the vocabulary: a real model on English


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_matches_transformers_on_tiny_hf_models(tmp_path: Path, arch: str) -> None:
    # llama: Llama-3 style tokenizer that adds BOS; qwen2: no BOS, so every window's first
    # token is predicted from nothing and left out, and the default windows are n_ctx long.
    builder = make_tiny_llama if arch == "llama" else make_tiny_qwen2
    hf = builder(tmp_path / "hf", seed=5, seq_len=128)
    path = convert(hf, tmp_path / "m.gguf", type="f32", log=None)
    text = MEDQUAD.read_text(encoding="utf-8")[:3000]
    with edgellm.Model(path, n_threads=2) as m:
        r = perplexity(m, text, max_tokens=400)
        bos = m.tokenizer.bos_id if r.bos else None
        n = len(m.tokenize(text, add_bos=False)[:400])
    assert r.bos == (arch == "llama")
    assert (r.window, r.stride) == ((127, 63) if arch == "llama" else (128, 64))
    want, n_want = _transformers_ppl(hf, text, r.window, r.stride, bos, 400)
    assert r.n_tokens == n == 400 and r.n_windows == 6  # 400 tokens, windows ~127/63
    assert r.n_scored == n_want == (n if r.bos else n - 1)
    assert abs(r.ppl / want - 1) < PPL_REL, (r.ppl, want)


def _transformers_ppl(folder: Path, text: str, window: int, stride: int, bos: int | None,
                      max_tokens: int) -> tuple[float, int]:
    """Perplexity by transformers' forward (f32, log-softmax in float64), same windows and rule."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]
    ids = ids[:max_tokens]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = _independent_windows(len(ids), window, stride)
    nll = []
    cache: dict[int, np.ndarray] = {}
    lead = [] if bos is None else [bos]
    for i in range(len(ids)):
        k = _owner(i, windows, bos is not None)
        if k is None:
            continue  # no BOS: a window's first token has nothing before it
        s, e = windows[k]
        if k not in cache:
            with torch.no_grad():
                x = model(torch.tensor([lead + ids[s:e]])).logits[0].double()
            cache[k] = torch.log_softmax(x, dim=-1).numpy()
        row = i - s if bos is not None else i - s - 1
        nll.append(-cache[k][row, ids[i]])
    return math.exp(float(np.mean(nll))), len(nll)


# --- behaviour -----------------------------------------------------------------------------


def test_short_text_is_one_window(stories_f32: Path) -> None:
    text = "Once upon a time there was a little girl named Lily."
    with edgellm.Model(stories_f32, n_threads=1) as m:
        n = len(m.tokenize(text, add_bos=False))
        r = perplexity(m, text)
        # One window from BOS: the same as the model's own logits over BOS + text.
        ids = m.tokenize(text, add_bos=True)
        logits = m.logits(ids)
    assert r.n_windows == 1 and r.n_scored == r.n_tokens == n
    want = math.exp(float(token_nll(logits[:-1], np.array(ids[1:])).mean()))
    assert abs(r.ppl / want - 1) < 1e-12
    assert r.ppl < 30  # in-domain (TinyStories-like) text: far better than uniform (512)


def test_bad_arguments_are_typed_errors(stories_f32: Path) -> None:
    with edgellm.Model(stories_f32, n_threads=1) as m:
        with pytest.raises(edgellm.InvalidArgumentError, match="stride"):
            perplexity(m, "Once upon a time", window=64, stride=65)
        with pytest.raises(edgellm.InvalidArgumentError, match="empty"):
            perplexity(m, "")
        with pytest.raises(edgellm.InvalidArgumentError, match="n_ctx=512"):
            perplexity(m, "Once upon a time", window=512)  # + BOS = 513 positions
        with pytest.raises(edgellm.InvalidArgumentError, match="window"):
            perplexity(m, "Once upon a time", window=0)
        with pytest.raises(edgellm.InvalidArgumentError, match="max_tokens"):
            perplexity(m, "Once upon a time", max_tokens=0)
        with pytest.raises(ValueError):  # also the builtin
            perplexity(m, "Once", stride=0)


def test_path_argument_opens_and_closes_the_model(stories_f32: Path) -> None:
    text = "The dog ran to the park. He was happy."
    with edgellm.Model(stories_f32, n_threads=1) as m:
        want = perplexity(m, text)
    got = perplexity(stories_f32, text)  # all CPUs: threads may only reorder f32 sums
    assert got.ppl == pytest.approx(want.ppl, rel=1e-6) and got.n_scored == want.n_scored


def test_gutenberg_header_is_dropped() -> None:
    raw = BOTCHAN.read_text(encoding="utf-8")
    body = gutenberg_body(raw)
    assert "Posting Date" in raw and "FULL LICENSE" in raw
    assert "Posting Date" not in body and "FULL LICENSE" not in body
    assert body.lstrip().startswith("Produced by") and body in raw
    assert 200_000 < len(body) < len(raw) - 10_000  # the book stays, header and licence go
    assert gutenberg_body("plain text") == "plain text"


def test_cli_eval_prints_the_same_numbers(stories_f32: Path, tmp_path: Path) -> None:
    text = tmp_path / "held.txt"
    text.write_text(gutenberg_body(BOTCHAN.read_text(encoding="utf-8"))[:4000], encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "edgellm", "eval", str(stories_f32), "--text",
                        str(text), "--window", "200", "--stride", "100", "--max-tokens", "600",
                        "--json", "-t", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = perplexity(stories_f32, text.read_text(encoding="utf-8"), window=200, stride=100,
                      max_tokens=600)
    assert got["ppl"] == pytest.approx(want.ppl, rel=1e-6)  # -t 1 there, all CPUs here
    assert (got["n_scored"], got["n_windows"], got["protocol"]) == (600, 5, PROTOCOL)
    assert "windows" in r.stderr  # the progress line
    human = subprocess.run([sys.executable, "-m", "edgellm", "eval", str(stories_f32), "--text",
                            str(text), "--max-tokens", "300"], capture_output=True, text=True,
                           timeout=120)
    assert human.returncode == 0, human.stderr
    for label in ("perplexity:", "tokens scored:", "time:", "protocol:"):
        assert label in human.stdout
    bad = subprocess.run([sys.executable, "-m", "edgellm", "eval", str(stories_f32), "--text",
                          str(text), "--window", "100", "--stride", "200"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("edgellm eval: error:")
    assert len(bad.stderr.strip().splitlines()) == 1
