# SPDX-License-Identifier: MIT
"""Tokenizer and chat-template tests against independent implementations: Hugging Face
tokenizers, sentencepiece, llama2.c's encode/decode (reimplemented here) and jinja2."""

from __future__ import annotations

import json
import math
import os
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from edgellm.errors import EdgeLLMError, InvalidArgumentError, ModelFormatError, UnsupportedError
from edgellm.runtime.chat import apply_chat_template, detect_chat_format
from edgellm.runtime.tokenizer import StreamDecoder, Tokenizer, TokenType

DATA = Path(__file__).parent / "data"
STORIES = DATA / "stories260K"
BOTCHAN = DATA / "corpora" / "botchan.txt"  # third-party text: see data/corpora/README.md
MEDQUAD = DATA / "corpora" / "medquad_sample.txt"
# Hypothesis examples per property test; raise it for a long fuzzing run.
EXAMPLES = int(os.environ.get("EDGELLM_TEST_EXAMPLES", "0"))

EDGE_CASES = [
    "", " ", "  ", "a", "Hello world", " leading space", "trailing space ", "two  spaces   three",
    "tab\tand\nnewline\r\nCRLF", "\n\nblank lines\n\n", "it's don't we'll they've I'M YOU'RE he'd",
    "numbers 0 12 345 6789 3.14159 1,000,000 2024-06-01", "$100 + 5% = <b>bold</b> & {json: [1]}",
    "Ünïcödé àçcénts — “quotes” ‘single’ … ellipsis",
    "日本語の文章です。中文句子，标点！한국어 텍스트",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧 flag 🇯🇵", "Ελληνικά Русский עברית العربية हिन्दी",
    "\u00a0nbsp\u2009thin\u3000ideographic space", "zero\u200bwidth",
    "mixed    \t \n  whitespace  \n", "ＦＵＬＬ　ｗｉｄｔｈ １２３",
    "math ∑∫√∞ ≠ ≤ x²", "e\u0301 combining", "'s 'S 'll", "a...b!!!c???",
]


def _lines(path: Path, step: int) -> list[str]:
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines[::step]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Real text (every 8th Botchan line, every 4th MedQuAD line), numbers and edge cases."""
    return _lines(BOTCHAN, 8) + _lines(MEDQUAD, 4) + _numbers(3100)[3000:] + EDGE_CASES


# --- gpt2 kind: a byte-level BPE trained with Hugging Face tokenizers ---------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>", "ünïcode"]
# The Split patterns of the real tokenizer.json files (Hugging Face spelling, (?i:...)).
LLAMA3_HF = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_HF = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's patterns for a GGUF file whose pre-tokenizer is "default".
LLAMACPP_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+",
                    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                    r"\p{N}+", r"[0-9][0-9][0-9]"]


def _hf_pre(pre: str) -> Any:
    """The Hugging Face pre-tokenizer a model with this GGUF pre name ships."""
    bytelevel = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM's tokenizer.json: Digits(individual) then ByteLevel(regex)
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    patterns = {"llama-bpe": [LLAMA3_HF], "qwen2": [QWEN2_HF], "default": LLAMACPP_DEFAULT}[pre]
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns] + [bytelevel])


def _numbers(n: int) -> list[str]:
    """Deterministic lines full of numbers, so the vocabulary learns digit merges."""
    rng = random.Random(1234)
    return [f"In {rng.randint(1800, 2030)}, {rng.randint(0, 10**7):,} of {rng.randint(0, 999)} "
            f"({rng.randint(0, 100)}.{rng.randint(0, 99)}%) on {rng.randint(1990, 2030)}-"
            f"{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}: x{rng.randint(0, 99999)}!"
            for _ in range(n)]


@pytest.fixture(scope="module")
def bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE (vocab, merges) trained on coarse words (a space and everything up to
    the next space), so its merges cross the boundaries the pre-tokenizers differ on (digit
    runs, punctuation, letters): which merges apply depends on the pre-tokenizer, and a
    wrong pattern changes the ids."""
    trainee = HFTokenizer(models.BPE())
    trainee.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?[^ ]+| +"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    trainee.train_from_iterator(_lines(BOTCHAN, 1) + _lines(MEDQUAD, 1) + _numbers(3000), trainer)
    model = json.loads(trainee.to_str())["model"]
    return model["vocab"], [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


@pytest.fixture(scope="module", params=["gpt-2", "llama-bpe", "qwen2", "smollm", "default"])
def bpe_pair(request: pytest.FixtureRequest,
             bpe_vocab: Any) -> tuple[Tokenizer, HFTokenizer, dict[str, Any]]:
    """(edgellm tokenizer from GGUF-style metadata, the Hugging Face oracle, the metadata)."""
    pre = request.param
    vocab, merges = bpe_vocab
    oracle = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                                    ignore_merges=pre == "llama-bpe"))
    oracle.pre_tokenizer = _hf_pre(pre)
    oracle.decoder = decoders.ByteLevel()
    oracle.add_special_tokens(SPECIALS)
    oracle.add_tokens(USER_DEFINED)
    ids = oracle.get_vocab(with_added_tokens=True)
    tokens = sorted(ids, key=ids.__getitem__)
    assert [ids[t] for t in tokens] == list(range(len(tokens)))
    types = [3 if t in SPECIALS else 4 if t in USER_DEFINED else 1 for t in tokens]
    md = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),  # as the GGUF reader
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": ids["<|endoftext|>"],
        "tokenizer.ggml.eos_token_id": ids["<|im_end|>"],
        "tokenizer.ggml.add_bos_token": False,
    }
    return Tokenizer.from_metadata(md), oracle, md


def test_bpe_encode_matches_hf(bpe_pair: Any, texts: list[str]) -> None:
    tok, oracle, _ = bpe_pair
    assert tok.kind == "gpt2"
    for text in texts:
        want = oracle.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == want, text


def test_bpe_decode_round_trips(bpe_pair: Any, texts: list[str]) -> None:
    tok, oracle, _ = bpe_pair
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(ids) == oracle.decode(ids, skip_special_tokens=True)


def test_bpe_special_tokens(bpe_pair: Any) -> None:
    tok, oracle, md = bpe_pair
    text = "<|im_start|>user\nHello <think>ünïcode<|im_end|>\n<|im_start|>assistant\n"
    parsed = tok.encode(text, parse_special=True)
    assert parsed == oracle.encode(text, add_special_tokens=False).ids
    start = md["tokenizer.ggml.tokens"].index("<|im_start|>")
    assert parsed.count(start) == 2
    # Without parse_special the control texts are plain text; user-defined ones still match
    # (llama.cpp, and Hugging Face's encode_special_tokens).
    oracle.encode_special_tokens = True
    try:
        plain = tok.encode(text)
        assert plain == oracle.encode(text, add_special_tokens=False).ids
    finally:
        oracle.encode_special_tokens = False
    assert not {i for i in plain if tok.token_type(i) == TokenType.CONTROL}
    assert tok.decode(plain) == text
    assert tok.decode(parsed) == "user\nHello <think>ünïcode\nassistant\n"
    assert tok.decode(parsed, skip_special=False) == text


def test_bpe_specials_and_defaults(bpe_pair: Any) -> None:
    tok, _, md = bpe_pair
    ids = md["tokenizer.ggml.tokens"]
    assert tok.bos_id == ids.index("<|endoftext|>") and tok.eos_id == ids.index("<|im_end|>")
    # EOS first, then llama.cpp's well-known end-of-generation texts.
    assert tok.eos_ids[0] == tok.eos_id and set(tok.eos_ids) == {tok.eos_id, tok.bos_id}
    both = tok.encode("hi", add_bos=True, add_eos=True)
    assert both == [tok.bos_id, *tok.encode("hi"), tok.eos_id]
    assert not tok.add_bos and tok.pre == md["tokenizer.ggml.pre"]
    del md["tokenizer.ggml.add_bos_token"]  # the llama.cpp default per pre-tokenizer
    try:
        assert Tokenizer.from_metadata(md).add_bos == (md["tokenizer.ggml.pre"] == "llama-bpe")
    finally:
        md["tokenizer.ggml.add_bos_token"] = False


# --- llama kind: a SentencePiece BPE trained with sentencepiece ---------------------------


def _sp_metadata(sp: Any) -> dict[str, Any]:
    """GGUF-style metadata of a sentencepiece model, as a converter writes it."""
    n = sp.get_piece_size()

    def kind(i: int) -> int:
        return (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                else 5 if sp.is_unused(i) else 1)

    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": np.array([sp.get_score(i) for i in range(n)], np.float32),
        "tokenizer.ggml.token_type": np.array([kind(i) for i in range(n)], np.int32),
        "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }


@pytest.fixture(scope="module")
def sp_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Any]:
    prefix = tmp_path_factory.mktemp("sp") / "botchan"
    # Llama's settings: BPE, byte fallback, no normalisation, no whitespace folding.
    spm.SentencePieceTrainer.train(
        input=str(BOTCHAN), model_prefix=str(prefix), model_type="bpe", vocab_size=1000,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, num_threads=1, minloglevel=2,
        control_symbols=["<|im_start|>", "<|im_end|>"], unk_id=0, bos_id=1, eos_id=2)
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    return Tokenizer.from_metadata(_sp_metadata(sp)), sp


def test_spm_encode_matches_sentencepiece(sp_pair: Any, texts: list[str]) -> None:
    tok, sp = sp_pair
    assert tok.add_bos and tok.add_space_prefix and tok.kind == "llama"
    byte_tokens = 0
    for text in texts:
        ids = tok.encode(text)
        assert ids == sp.encode(text, add_bos=True), text
        byte_tokens += sum(sp.is_byte(i) for i in ids)
    assert byte_tokens > 20  # the byte fallback was exercised


def test_spm_decode_round_trips(sp_pair: Any, texts: list[str]) -> None:
    tok, sp = sp_pair
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(ids[1:]) == sp.decode(ids[1:]) == text  # without BOS too


def test_spm_special_tokens(sp_pair: Any) -> None:
    tok, sp = sp_pair
    start, end = sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>")
    text = "<|im_start|>user\nHello there<|im_end|>"
    # sentencepiece never matches control pieces in text: that is parse_special=False.
    assert tok.encode(text) == sp.encode(text, add_bos=True)
    # llama.cpp: the special ids, and a space prefix for the text after a special token.
    assert tok.encode(text, parse_special=True) == \
        [sp.bos_id(), start, *sp.encode("user\nHello there"), end]
    assert tok.decode(tok.encode(text, parse_special=True)) == "user\nHello there"


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if b < 0x80:
            return value, pos


def _to_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _mark_unused(model: bytes, pieces: set[str]) -> bytes:
    """A sentencepiece ModelProto with some pieces' type set to UNUSED: each piece is a
    length-delimited field 1 whose own field 1 is the text; appending field 3 (type) = 5
    overrides the type, as the last value of a protobuf field wins."""
    out, pos = bytearray(), 0
    while pos < len(model):
        tag, body_at = _varint(model, pos)
        assert tag & 7 == 2  # every top-level ModelProto field is length-delimited
        n, body_at = _varint(model, body_at)
        body, end = model[body_at:body_at + n], body_at + n
        if tag >> 3 == 1:
            text_len, text_at = _varint(body, 1)
            if body[text_at:text_at + text_len].decode("utf-8") in pieces:
                body += b"\x18\x05"
        out += _to_varint(tag) + _to_varint(len(body)) + body
        pos = end
    return bytes(out)


def test_spm_unused_pieces_are_split(sp_pair: Any, texts: list[str]) -> None:
    tok, sp = sp_pair
    # Mark frequent merged pieces unused: sentencepiece forms them, then splits them back.
    words = {p for p in (sp.id_to_piece(i) for i in range(300, 1000, 7)) if len(p) > 1}
    proto = _mark_unused(sp.serialized_model_proto(), words)
    patched = spm.SentencePieceProcessor(model_proto=proto)
    assert sum(patched.is_unused(i) for i in range(patched.get_piece_size())) == len(words) > 50
    md = {"tokenizer.ggml.model": "llama",
          "tokenizer.ggml.tokens": [tok.token_text(i) for i in range(tok.vocab_size)],
          "tokenizer.ggml.scores": [patched.get_score(i) for i in range(tok.vocab_size)],
          "tokenizer.ggml.token_type": [5 if patched.is_unused(i) else int(tok.token_type(i))
                                        for i in range(tok.vocab_size)]}
    unused_tok = Tokenizer.from_metadata(md)
    changed = 0
    for text in texts:
        ids = unused_tok.encode(text)
        assert ids == patched.encode(text, add_bos=True), text
        changed += ids != tok.encode(text)
    assert changed > len(texts) // 2


# --- the real stories260K tokenizer against llama2.c's algorithm --------------------------


def _read_tok512(path: Path) -> tuple[list[bytes], list[float]]:
    """llama2.c tokenizer.bin: int32 max_token_length, then (f32 score, i32 len, bytes)."""
    data = path.read_bytes()
    pos, vocab, scores = 4, [], []
    while pos < len(data):
        score, n = struct.unpack_from("<fi", data, pos)
        vocab.append(data[pos + 8:pos + 8 + n])
        scores.append(score)
        pos += 8 + n
    return vocab, scores


def _tok512_metadata(vocab: list[bytes], scores: list[float]) -> dict[str, Any]:
    """GGUF-style metadata as a converter writes it: "▁" for space, llama.cpp token types."""
    tokens, types = [], []
    for i, raw in enumerate(vocab):
        text = raw.decode("utf-8")
        if i in (1, 2):
            text = text.strip()  # stored as "\n<s>\n", "\n</s>\n"
        elif i >= 259:
            text = text.replace(" ", "\u2581")
        tokens.append(text)
        types.append(2 if i == 0 else 3 if i < 3 else 6 if i < 259 else 1)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": list(scores), "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}


def _llama2c_encode(vocab: list[bytes], scores: list[float], text: str) -> list[int]:
    """llama2.c run.c encode(): BOS, a " " dummy prefix, code points (bytes + 3 when not in
    the vocabulary), then merge the best-scoring adjacent pair (leftmost) until none."""
    index = {v: i for i, v in enumerate(vocab)}
    ids = [1]
    if text:
        ids.append(index[b" "])
    for ch in text:
        raw = ch.encode("utf-8")
        ids.extend([index[raw]] if raw in index else [b + 3 for b in raw])
    while True:
        best, at = -1e10, -1
        for k in range(len(ids) - 1):
            j = index.get(vocab[ids[k]] + vocab[ids[k + 1]], -1)
            if j != -1 and scores[j] > best:
                best, at, merged = scores[j], k, j
        if at == -1:
            return ids
        ids[at:at + 2] = [merged]


def _llama2c_decode(vocab: list[bytes], ids: list[int]) -> str:
    """llama2.c run.c decode() over a generated stream: strip the space after BOS, "<0xXX>"
    pieces are raw bytes; BOS itself is never printed."""
    out = b""
    for prev, cur in zip(ids, ids[1:]):
        piece = vocab[cur]
        if prev == 1 and piece.startswith(b" "):
            piece = piece[1:]
        if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
            piece = bytes([int(piece[3:5], 16)])
        out += piece
    return out.decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def stories() -> tuple[Tokenizer, list[bytes], list[float]]:
    vocab, scores = _read_tok512(STORIES / "tok512.bin")
    assert len(vocab) == 512
    return Tokenizer.from_metadata(_tok512_metadata(vocab, scores)), vocab, scores


def test_stories260k_matches_llama2c(stories: Any) -> None:
    tok, vocab, scores = stories
    golden = (STORIES / "golden_greedy.txt").read_text(encoding="utf-8").splitlines()
    sentences = golden + [
        "Once upon a time, there was a little girl named Lily.", "", "  two spaces",
        "Tom's dog ran away; he was sad!", "café ☕ 日本 naïve", "tab\tnew\nline", "x",
    ]
    for text in sentences:
        ids = tok.encode(text)
        assert ids == _llama2c_encode(vocab, scores, text), text
        assert tok.decode(ids) == _llama2c_decode(vocab, ids)
        if not text.startswith(" "):
            assert tok.decode(ids) == text


@pytest.mark.parametrize("variant", ["shuffled", "ties"])
def test_stories260k_score_order(stories: Any, variant: str) -> None:
    """The merge order follows the scores (not the ids), leftmost first on equal scores."""
    _, vocab, scores = stories
    rng = random.Random(7)
    scores = list(scores)
    if variant == "shuffled":
        tail = scores[259:]
        rng.shuffle(tail)
        scores[259:] = tail
    else:
        scores = [float(math.floor(x / 60.0)) for x in scores]  # five score levels
    tok = Tokenizer.from_metadata(_tok512_metadata(vocab, scores))
    changed = 0
    for text in (STORIES / "golden_greedy.txt").read_text(encoding="utf-8").splitlines():
        ids = tok.encode(text)
        assert ids == _llama2c_encode(vocab, scores, text)
        assert tok.decode(ids) == text
        changed += ids != stories[0].encode(text)
    assert changed > 0


def test_stories260k_stream_from_bos(stories: Any) -> None:
    tok, vocab, _ = stories
    text = "Once upon a time, Lily saw a big red ball. 日本!"
    ids = tok.encode(text)
    dec = StreamDecoder(tok, prev_id=tok.bos_id)  # generation that started from BOS alone
    streamed = "".join(dec.feed(i) for i in ids[1:]) + dec.flush()
    assert streamed == _llama2c_decode(vocab, ids) == text
    # After another prompt token the first word keeps its space.
    dec = tok.stream_decoder(prev_id=ids[1])
    assert "".join(dec.feed(i) for i in ids[2:]) + dec.flush() == text[len("Once"):]


# --- streaming ----------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], **kw: Any) -> list[str]:
    dec = StreamDecoder(tok, **kw)
    return [dec.feed(i) for i in ids] + [dec.flush()]


def test_stream_holds_split_characters(sp_pair: Any, bpe_pair: Any) -> None:
    text = "日本語 😀 café 한국어"
    for tok in (sp_pair[0], bpe_pair[0]):
        ids = tok.encode(text)
        chunks = _stream(tok, ids)
        assert "".join(chunks) == tok.decode(ids) == text
        assert all("\ufffd" not in c for c in chunks)
        # Some tokens complete no character: they were held, not emitted broken.
        assert sum(c == "" for c in chunks[:-1]) >= 5
        assert chunks[-1] == ""
        # Each non-empty chunk is exactly the characters its token completed.
        done = 0
        for i, chunk in enumerate(chunks[:-1]):
            assert text.startswith(chunk, done)
            done += len(chunk)
            whole = tok.decode(ids[: i + 1])
            assert whole.rstrip("\ufffd") == text[:done]


def test_stream_flush_replaces_unfinished_character(sp_pair: Any) -> None:
    tok, sp = sp_pair
    ids = tok.encode("日")[2:]  # "▁" then three byte tokens; keep the byte tokens
    assert all(sp.is_byte(i) for i in ids) and len(ids) == 3
    dec = StreamDecoder(tok, prev_id=tok.bos_id)
    assert dec.feed(ids[0]) == dec.feed(ids[1]) == ""
    assert dec.flush() == "\ufffd"
    assert dec.feed(ids[2]) == "\ufffd"  # a lone continuation byte after the reset


@settings(max_examples=EXAMPLES or 60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stream_equals_decode(sp_pair: Any, bpe_pair: Any, data: st.DataObject) -> None:
    for tok in (sp_pair[0], bpe_pair[0]):
        ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
        skip = data.draw(st.booleans())
        assert "".join(_stream(tok, ids, skip_special=skip)) == tok.decode(ids, skip_special=skip)
        # A stream that follows BOS is the sequence's text after BOS.
        head = "" if skip else tok.token_text(tok.bos_id)
        after_bos = "".join(_stream(tok, ids, prev_id=tok.bos_id, skip_special=skip))
        assert head + after_bos == tok.decode([tok.bos_id, *ids], skip_special=skip)


# --- bad metadata -------------------------------------------------------------------------


@pytest.fixture()
def good_md(stories: Any) -> dict[str, Any]:
    _, vocab, scores = stories
    return _tok512_metadata(vocab, scores)


def _gpt2_md(md: dict[str, Any]) -> dict[str, Any]:
    md = {**md, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": ["a b", "ab c"]}
    md["tokenizer.ggml.token_type"] = [1 if t == 6 else t for t in md["tokenizer.ggml.token_type"]]
    return md


BAD = [
    ("no tokens", lambda md: md.pop("tokenizer.ggml.tokens"), ModelFormatError),
    ("empty tokens", lambda md: md.update({"tokenizer.ggml.tokens": []}), ModelFormatError),
    ("tokens a str", lambda md: md.update({"tokenizer.ggml.tokens": "abc"}), ModelFormatError),
    ("token not str", lambda md: md["tokenizer.ggml.tokens"].__setitem__(7, 7), ModelFormatError),
    ("short scores", lambda md: md["tokenizer.ggml.scores"].pop(), ModelFormatError),
    ("nan score", lambda md: md["tokenizer.ggml.scores"].__setitem__(300, math.nan),
     ModelFormatError),
    ("long types", lambda md: md["tokenizer.ggml.token_type"].append(1), ModelFormatError),
    ("type 9", lambda md: md["tokenizer.ggml.token_type"].__setitem__(300, 9), ModelFormatError),
    ("byte type, no byte", lambda md: md["tokenizer.ggml.token_type"].__setitem__(300, 6),
     ModelFormatError),
    ("no model", lambda md: md.pop("tokenizer.ggml.model"), ModelFormatError),
    ("model not str", lambda md: md.update({"tokenizer.ggml.model": 1}), ModelFormatError),
    ("unknown model", lambda md: md.update({"tokenizer.ggml.model": "bert"}), UnsupportedError),
    ("bos out of range", lambda md: md.update({"tokenizer.ggml.bos_token_id": 512}),
     ModelFormatError),
    ("negative eos", lambda md: md.update({"tokenizer.ggml.eos_token_id": -1}), ModelFormatError),
    ("bool unk", lambda md: md.update({"tokenizer.ggml.unknown_token_id": True}), ModelFormatError),
    ("str pad", lambda md: md.update({"tokenizer.ggml.padding_token_id": "3"}), ModelFormatError),
    ("eot out of range", lambda md: md.update({"tokenizer.ggml.eot_token_id": 10**6}),
     ModelFormatError),
    ("add_bos not bool", lambda md: md.update({"tokenizer.ggml.add_bos_token": "yes"}),
     ModelFormatError),
    ("template not str", lambda md: md.update({"tokenizer.chat_template": 3}), ModelFormatError),
]


@pytest.mark.parametrize("name,mutate,error", BAD, ids=[b[0] for b in BAD])
def test_bad_metadata(good_md: dict[str, Any], name: str, mutate: Any, error: type) -> None:
    Tokenizer.from_metadata(good_md)  # the base is valid
    mutate(good_md)
    with pytest.raises(error) as exc:
        Tokenizer.from_metadata(good_md)
    assert isinstance(exc.value, EdgeLLMError)


BAD_GPT2 = [
    ("unknown pre", lambda md: md.update({"tokenizer.ggml.pre": "klingon"}), UnsupportedError),
    ("pre not str", lambda md: md.update({"tokenizer.ggml.pre": 2}), ModelFormatError),
    ("no merges", lambda md: md.pop("tokenizer.ggml.merges"), ModelFormatError),
    ("merge without space", lambda md: md["tokenizer.ggml.merges"].append("abc"), ModelFormatError),
    ("merge with empty half", lambda md: md["tokenizer.ggml.merges"].append("ab "),
     ModelFormatError),
    ("add_bos without bos", lambda md: (md.pop("tokenizer.ggml.bos_token_id"),
                                        md.update({"tokenizer.ggml.add_bos_token": True})),
     ModelFormatError),
]


@pytest.mark.parametrize("name,mutate,error", BAD_GPT2, ids=[b[0] for b in BAD_GPT2])
def test_bad_gpt2_metadata(good_md: dict[str, Any], name: str, mutate: Any, error: type) -> None:
    md = _gpt2_md(good_md)
    Tokenizer.from_metadata(md)
    mutate(md)
    with pytest.raises(error):
        Tokenizer.from_metadata(md)


def test_error_classes_are_builtins_too(good_md: dict[str, Any], stories: Any) -> None:
    good_md["tokenizer.ggml.model"] = "t5"
    with pytest.raises(NotImplementedError):
        Tokenizer.from_metadata(good_md)
    tok = stories[0]
    with pytest.raises(InvalidArgumentError):
        tok.encode(b"bytes")
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])
    with pytest.raises(InvalidArgumentError):
        StreamDecoder(tok).feed(-1)


def test_defaults_without_optional_keys(good_md: dict[str, Any]) -> None:
    # llama.cpp's defaults: BOS 1, EOS 2, UNK 0; types inferred (bytes, specials).
    for key in ("scores", "token_type", "bos_token_id", "eos_token_id", "unknown_token_id"):
        del good_md[f"tokenizer.ggml.{key}"]
    tok = Tokenizer.from_metadata(good_md)
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
    assert tok.token_type(1) == TokenType.CONTROL and tok.token_type(0) == TokenType.UNKNOWN
    assert tok.token_type(3 + 0x41) == TokenType.BYTE
    assert tok.decode(tok.encode("Once upon")) == "Once upon"


# --- chat templates -----------------------------------------------------------------------

# Real templates, as their tokenizer_config.json files hold them (JSON-decoded).
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
         "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SMOLLM = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}"
          "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
          "{% for message in loop_messages %}{% if (message['role'] == 'user') != "
          "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
          "user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and "
          "system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
          "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = "
          "message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + "
          "'[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + "
          "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
          "{{ '<|system|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == "
          "'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n"
          "{% endif %}\n{% endfor %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
          "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = "
          "bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt "
          "%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
TEMPLATES = {"qwen2": (QWEN2, "chatml"), "smollm": (SMOLLM, "chatml"), "llama2": (LLAMA2, "llama2"),
             "zephyr": (ZEPHYR, "zephyr"), "llama3": (LLAMA3, "llama3")}

SYSTEM = {"role": "system", "content": "You are a careful cardiology assistant."}
CONVERSATIONS = [
    [{"role": "user", "content": "What is atrial fibrillation?"}],
    [SYSTEM, {"role": "user", "content": " Hi!\n"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, how can I help?"},
     {"role": "user", "content": "Explain angina in one line. 日本語"}],
    [SYSTEM, {"role": "user", "content": "a"}, {"role": "assistant", "content": " b "},
     {"role": "user", "content": ""}],
    [],
]


def _render(template: str, messages: Any, gen: bool, engine: str) -> Any:
    """The rendered text, or the error class when the template refuses the messages."""
    try:
        return apply_chat_template(template, messages, gen, bos_token="<s>", eos_token="</s>",
                                   engine=engine)
    except EdgeLLMError as exc:
        return type(exc)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_builtin_chat_formats_equal_jinja(name: str) -> None:
    template, fmt = TEMPLATES[name]
    assert detect_chat_format(template) == fmt
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want, got = (_render(template, messages, gen, e) for e in ("jinja", "builtin"))
            assert got == want, (messages, gen)
    if name == "qwen2":  # the template's default system prompt is reproduced
        assert apply_chat_template(QWEN2, CONVERSATIONS[0], engine="builtin").startswith(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")


def test_llama2_roles_must_alternate() -> None:
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    for engine in ("jinja", "builtin"):
        with pytest.raises(InvalidArgumentError, match="alternate"):
            apply_chat_template(LLAMA2, bad, engine=engine)


def test_plain_layout_without_template() -> None:
    messages = [SYSTEM, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    want = ("System: You are a careful cardiology assistant.\nUser: Hi\nAssistant: Hello!\n"
            "User: Bye\nAssistant:")
    for engine in ("auto", "jinja", "builtin"):
        assert apply_chat_template(None, messages, engine=engine) == want
    assert apply_chat_template(None, messages, False) == want[: -len("Assistant:")]
    assert detect_chat_format(None) == "plain"


def test_chat_template_errors() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    mistral = ("{{ bos_token }}{% for message in messages %}{{ '[INST] ' + message['content'] + "
               "' [/INST]' }}{% endfor %}")
    assert detect_chat_format(mistral) is None
    assert apply_chat_template(mistral, msgs, bos_token="<s>") == "<s>[INST] hi [/INST]"
    with pytest.raises(UnsupportedError):
        apply_chat_template(mistral, msgs, engine="builtin")
    with pytest.raises(ModelFormatError):
        apply_chat_template("{% for m in messages %}", msgs)
    with pytest.raises(ModelFormatError):  # the sandbox refuses unsafe calls
        apply_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", msgs)
    with pytest.raises(InvalidArgumentError):
        apply_chat_template(QWEN2, [{"content": "no role"}])
    with pytest.raises(InvalidArgumentError):
        apply_chat_template(QWEN2, msgs, engine="mako")
    with pytest.raises(InvalidArgumentError):  # the template's own failure (None + str)
        apply_chat_template(QWEN2, [{"role": "user", "content": None}])


def test_tokenizer_chat_prompt(bpe_pair: Any) -> None:
    tok, oracle, md = bpe_pair
    md = {**md, "tokenizer.chat_template": QWEN2}
    tok = Tokenizer.from_metadata(md)
    assert tok.chat_template == QWEN2
    prompt = tok.apply_chat_template(CONVERSATIONS[2])
    assert prompt == apply_chat_template(QWEN2, CONVERSATIONS[2], engine="builtin")
    ids = tok.encode(prompt, parse_special=True)
    assert ids == oracle.encode(prompt, add_special_tokens=False).ids
    assert ids.count(md["tokenizer.ggml.tokens"].index("<|im_start|>")) == 5
    assert tok.eos_id in tok.eos_ids


@settings(max_examples=EXAMPLES or 150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=30),
    # the characters where the pre-tokenizers differ: spaces, digits, contractions, marks
    st.text(" \t\n\r\u00a0\u3000\u2009aZé1234'sStLld.,!?(-日😀\u0301", max_size=30)))
def test_random_text_matches_oracles(sp_pair: Any, bpe_pair: Any, text: str) -> None:
    tok, sp = sp_pair
    ids = tok.encode(text)
    assert ids == sp.encode(text, add_bos=True)
    assert tok.decode(ids) == sp.decode(ids)
    if "\u2581" not in text:  # SentencePiece reads a "▁" in the text as a space
        assert tok.decode(ids) == text
    tok, oracle, _ = bpe_pair
    oracle.encode_special_tokens = True  # control texts are plain text without parse_special
    try:
        assert tok.encode(text) == oracle.encode(text, add_special_tokens=False).ids
    finally:
        oracle.encode_special_tokens = False
    assert tok.decode(tok.encode(text)) == text


def test_encode_chat_adds_one_bos(sp_pair: Any) -> None:
    tok, sp = sp_pair
    messages = [{"role": "user", "content": "Where is the school?"}]
    llama2 = Tokenizer.from_metadata({**_sp_metadata(sp), "tokenizer.chat_template": LLAMA2})
    # The template writes "<s>" itself: parsed to BOS, not doubled by add_bos.
    want = [sp.bos_id(), *sp.encode("[INST] Where is the school? [/INST]")]
    assert llama2.encode_chat(messages) == want
    plain = tok.encode_chat(messages)  # no template: the plain layout, BOS from add_bos
    assert plain == sp.encode("User: Where is the school?\nAssistant:", add_bos=True)
