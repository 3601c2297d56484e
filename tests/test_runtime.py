# SPDX-License-Identifier: MIT
"""The Python runtime end to end: stories260K's published output, reference parity, sessions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.tolerances import LOGITS_REL_F32, LOGITS_REL_Q8_0, rel_err

import edgellm
from edgellm import _native
from edgellm.formats.convert import convert
from edgellm.formats.gguf import read_gguf
from edgellm.formats.quant import dequantize
from edgellm.runtime import reference
from edgellm.runtime.config import ROPE_NEOX, ROPE_NORM, ModelConfig
from edgellm.runtime.sampler import Sampler

DATA = Path(__file__).parent / "data" / "stories260K"
GOLDEN = (DATA / "golden_greedy.txt").read_text().rstrip("\n")


@pytest.fixture(scope="module")
def stories(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """stories260K converted to each weight type edgellm writes."""
    out = tmp_path_factory.mktemp("stories")
    return {
        t: convert(DATA / "stories260K.bin", out / f"stories260K-{t}.gguf", type=t,
                   tokenizer=DATA / "tok512.bin")
        for t in ("f32", "f16", "q8_0", "q4_0")
    }


def _reference_weights(path: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    with read_gguf(path) as gf:
        cfg = ModelConfig.from_metadata(gf.metadata)
        w = {}
        for name, info in gf.tensors.items():
            shape = tuple(reversed(info.shape))
            w[name] = dequantize(gf.tensor_bytes(name), info.type, shape).astype(np.float64)
    return cfg, w


def test_rope_modes_match_the_c_enum() -> None:
    assert (ROPE_NORM, ROPE_NEOX) == (_native.lib.EDGELLM_ROPE_NORM, _native.lib.EDGELLM_ROPE_NEOX)


def test_stories260k_reproduces_the_published_greedy_output(stories: dict[str, Path]) -> None:
    with edgellm.Model(stories["f32"], n_threads=2) as m:
        text = m.generate("", max_tokens=256, temperature=0.0)
    assert text == GOLDEN


def test_stories260k_published_output_through_the_cli(stories: dict[str, Path]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "edgellm", "run", str(stories["f32"]), "--temp", "0", "-n", "256"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == GOLDEN + "\n"


@pytest.mark.parametrize("wtype", ["f32", "f16", "q8_0", "q4_0"])
def test_c_forward_matches_numpy_reference(stories: dict[str, Path], wtype: str) -> None:
    cfg, w = _reference_weights(stories[wtype])
    tokens = [1, 403, 407, 261, 378, 432, 363, 430, 261, 417, 324, 270, 503, 419, 290, 480, 266, 46]
    want = reference.forward(tokens, w, cfg)
    with edgellm.Model(stories[wtype], n_threads=2) as m:
        got = m.logits(tokens)
    # F32/F16 weights run with f32 activations; Q8_0/Q4_0 also quantise activations to Q8_0.
    tol = LOGITS_REL_F32 if wtype in ("f32", "f16") else LOGITS_REL_Q8_0
    assert rel_err(got, want) < tol


def test_prefill_equals_token_by_token(stories: dict[str, Path]) -> None:
    tokens = list(range(1, 40))
    with edgellm.Model(stories["q8_0"], n_threads=2) as m:
        batched = m.logits(tokens)
        with m.session() as s:
            single = np.stack([s.eval([t], logits="last") for t in tokens])
    assert rel_err(batched, single) < LOGITS_REL_F32


def test_session_reuses_its_cache_across_turns(stories: dict[str, Path]) -> None:
    with edgellm.Model(stories["q8_0"], n_threads=1) as m:
        first = m.generate("Once upon a time", max_tokens=20, temperature=0.0)
        with m.session() as s:
            a = s.generate("Once upon a time", max_tokens=20, temperature=0.0)
            cached = s.pos
            b = s.generate("Once upon a time", max_tokens=20, temperature=0.0)
            # The second call shares the whole prompt: only its last token is re-evaluated.
            assert s.last_stats is not None and s.last_stats.prompt_tokens == len(m.tokenize("Once upon a time"))
            s.truncate(3)
            assert s.pos == 3 and s.tokens == m.tokenize("Once upon a time")[:3]
            c = s.generate("Once upon a time", max_tokens=20, temperature=0.0)
    assert first == a == b == c
    assert cached > len(m.tokenize("Once upon a time"))


def test_seeded_sampling_is_deterministic(stories: dict[str, Path]) -> None:
    with edgellm.Model(stories["q4_0"], n_threads=2) as m:
        a = m.generate("The cat", max_tokens=40, temperature=1.0, top_k=20, top_p=0.9, seed=7)
        b = m.generate("The cat", max_tokens=40, temperature=1.0, top_k=20, top_p=0.9, seed=7)
        c = m.generate("The cat", max_tokens=40, temperature=1.0, top_k=20, top_p=0.9, seed=8)
    assert a == b
    assert a != c


def test_streaming_equals_whole_text_and_stop_strings_cut(stories: dict[str, Path]) -> None:
    with edgellm.Model(stories["f32"], n_threads=1) as m:
        whole = m.generate("", max_tokens=60, temperature=0.0)
        pieces = list(m.generate("", max_tokens=60, temperature=0.0, stream=True))
        cut = m.generate("", max_tokens=60, temperature=0.0, stop=["Lily"])
        streamed_cut = "".join(m.generate("", max_tokens=60, temperature=0.0, stop=["Lily"], stream=True))
    assert "".join(pieces) == whole and len(pieces) > 5
    assert cut == whole[: whole.index("Lily")] == streamed_cut


def test_context_full_is_a_typed_error_and_keeps_the_cache(stories: dict[str, Path]) -> None:
    with edgellm.Model(stories["f32"], n_threads=1, n_ctx=16) as m, m.session() as s:
        s.eval(list(range(1, 11)))
        with pytest.raises(edgellm.ContextFullError):
            s.eval(list(range(1, 11)))
        assert s.pos == 10
        s.eval([5] * 6)
        assert s.pos == 16


def test_bad_token_and_closed_handles_are_typed_errors(stories: dict[str, Path]) -> None:
    m = edgellm.Model(stories["f32"], n_threads=1)
    s = m.session()
    with pytest.raises(edgellm.InvalidArgumentError):
        s.eval([1, 512])
    assert s.pos == 0
    s.close()
    s.close()
    with pytest.raises(edgellm.StateError):
        s.eval([1])
    m.close()
    m.close()
    with pytest.raises(edgellm.StateError):
        m.session()


def test_sampler_refuses_bad_parameters_and_greedy_is_argmax() -> None:
    with pytest.raises(edgellm.InvalidArgumentError):
        Sampler(temperature=-1)
    with pytest.raises(edgellm.InvalidArgumentError):
        Sampler(top_p=0.0)
    logits = np.array([0.1, 3.0, 3.0, -1.0], dtype=np.float32)
    assert Sampler(temperature=0)(logits) == 1
    # top_k=1 makes any temperature greedy.
    assert all(Sampler(temperature=2.0, top_k=1, seed=s)(logits) == 1 for s in range(20))
