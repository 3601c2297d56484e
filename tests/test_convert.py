# SPDX-License-Identifier: MIT
"""Model imports (llama2.c, Hugging Face safetensors, GGUF requantising) checked against independent readers."""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import gguf as ggufpkg
import numpy as np
import pytest
from gguf.quants import quantize as gq_quantize

from edgellm.errors import (
    InvalidArgumentError,
    ModelFormatError,
    PickleRefusedError,
    UnsupportedError,
)
from edgellm.formats.convert import convert, detect_source
from edgellm.formats.gguf import GGMLType, RawTensor, read_gguf, write_gguf
from edgellm.formats.hf import SafetensorsFile, import_hf, tokenizer_metadata
from edgellm.formats.llama2c import read_llama2c, read_llama2c_tokenizer

VT = ggufpkg.GGUFValueType
QT = ggufpkg.GGMLQuantizationType

_IN_REPO = Path(__file__).parent / "data" / "stories260K"
STORIES = _IN_REPO if (_IN_REPO / "stories260K.bin").is_file() else \
    Path("/work/shared/data/models/stories260K")
STORIES_BIN = STORIES / "stories260K.bin"
STORIES_TOK = STORIES / "tok512.bin"


def _silent() -> io.StringIO:
    return io.StringIO()


# The metadata types llama.cpp's loader insists on (it checks each key's GGUF type).
def _llama_cpp_types(arch: str) -> dict[str, list[int]]:
    u32, f32, s, b = [VT.UINT32], [VT.FLOAT32], [VT.STRING], [VT.BOOL]
    t: dict[str, list[int]] = {
        "general.architecture": s, "general.name": s, "general.file_type": u32,
        "general.quantization_version": u32, "general.alignment": u32,
        "tokenizer.ggml.model": s, "tokenizer.ggml.pre": s,
        "tokenizer.ggml.tokens": [VT.ARRAY, VT.STRING],
        "tokenizer.ggml.scores": [VT.ARRAY, VT.FLOAT32],
        "tokenizer.ggml.token_type": [VT.ARRAY, VT.INT32],
        "tokenizer.ggml.merges": [VT.ARRAY, VT.STRING],
        "tokenizer.ggml.bos_token_id": u32, "tokenizer.ggml.eos_token_id": u32,
        "tokenizer.ggml.unknown_token_id": u32, "tokenizer.ggml.padding_token_id": u32,
        "tokenizer.ggml.add_bos_token": b, "tokenizer.ggml.add_eos_token": b,
        "tokenizer.chat_template": s, "edgellm.source": s, "edgellm.converter_version": s,
    }
    for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv", "rope.dimension_count",
              "vocab_size", "attention.key_length", "attention.value_length"):
        t[f"{arch}.{k}"] = u32
    for k in ("rope.freq_base", "attention.layer_norm_rms_epsilon", "rope.scaling.factor"):
        t[f"{arch}.{k}"] = f32
    t[f"{arch}.rope.scaling.type"] = s
    return t


def _assert_llama_cpp_types(path: Path, arch: str) -> dict[str, Any]:
    """Every key has llama.cpp's type (per gguf.GGUFReader); returns the values."""
    r = ggufpkg.GGUFReader(path)
    want = _llama_cpp_types(arch)
    values = {}
    for key, field in r.fields.items():
        if key.startswith("GGUF."):
            continue
        assert key in want, f"unexpected key {key}"
        assert [int(t) for t in field.types] == [int(t) for t in want[key]], key
        values[key] = field.contents()
    return values


# --------------------------------------------------------------------------------------
# llama2.c: the real stories260K


def _read_v0_independently(path: Path) -> dict[str, np.ndarray]:
    """Parse a llama2.c v0 file here, without edgellm, in its documented order."""
    raw = path.read_bytes()
    dim, hidden, L, nh, nkv, vocab, seq = struct.unpack_from("<7i", raw, 0)
    kv = dim // nh * nkv
    floats = np.frombuffer(raw, dtype="<f4", offset=28)
    out: dict[str, np.ndarray] = {}
    pos = 0
    for name, shape in (("emb", (abs(vocab), dim)), ("rms_att", (L, dim)), ("wq", (L, dim, dim)),
                        ("wk", (L, kv, dim)), ("wv", (L, kv, dim)), ("wo", (L, dim, dim)),
                        ("rms_ffn", (L, dim)), ("w1", (L, hidden, dim)), ("w2", (L, dim, hidden)),
                        ("w3", (L, hidden, dim)), ("rms_final", (dim,)),
                        ("fr", (seq, dim // nh // 2)), ("fi", (seq, dim // nh // 2))):
        n = int(np.prod(shape))
        out[name] = floats[pos:pos + n].reshape(shape)
        pos += n
    if vocab < 0:
        out["wcls"] = floats[pos:pos + abs(vocab) * dim].reshape(abs(vocab), dim)
        pos += abs(vocab) * dim
    assert pos == floats.size
    return out


@pytest.fixture(scope="module")
def stories(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("stories")
    logs = {t: io.StringIO() for t in ("f32", "q8_0", "q4_0")}
    paths = {t: convert(STORIES_BIN, out / f"s-{t}.gguf", t, log=logs[t]) for t in logs}
    return {"paths": paths, "logs": logs, "ref": _read_v0_independently(STORIES_BIN)}


def test_stories260k_config_and_tensors(stories: dict[str, Any]) -> None:
    path = stories["paths"]["f32"]
    values = _assert_llama_cpp_types(path, "llama")
    assert values["general.architecture"] == "llama" and values["general.name"] == "stories260K"
    assert values["general.file_type"] == 0 and "general.quantization_version" not in values
    assert values["edgellm.source"] == "llama2c:stories260K.bin"
    expected = {"context_length": 512, "embedding_length": 64, "block_count": 5,
                "feed_forward_length": 172, "attention.head_count": 8,
                "attention.head_count_kv": 4, "rope.dimension_count": 8, "vocab_size": 512}
    for k, v in expected.items():
        assert values[f"llama.{k}"] == v, k
    assert values["llama.rope.freq_base"] == 10000.0
    assert values["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5, rel=1e-7)
    ref = stories["ref"]
    with read_gguf(path) as f:
        assert len(f.tensors) == 2 + 9 * 5 and "output.weight" not in f.tensors  # tied
        assert all(t.type == GGMLType.F32 for t in f.tensors.values())
        assert f.tensors["token_embd.weight"].shape == (64, 512)
        assert f.tensors["blk.0.attn_k.weight"].shape == (64, 32)
        assert f.tensors["blk.4.ffn_down.weight"].shape == (172, 64)
        assert f.tensors["blk.4.ffn_gate.weight"].shape == (64, 172)
        np.testing.assert_array_equal(f.tensor_array("token_embd.weight"), ref["emb"])
        np.testing.assert_array_equal(f.tensor_array("output_norm.weight"), ref["rms_final"])
        for layer in range(5):
            b = f"blk.{layer}."
            for gname, rname in (("attn_norm", "rms_att"), ("attn_q", "wq"), ("attn_k", "wk"),
                                 ("attn_v", "wv"), ("attn_output", "wo"), ("ffn_norm", "rms_ffn"),
                                 ("ffn_gate", "w1"), ("ffn_down", "w2"), ("ffn_up", "w3")):
                np.testing.assert_array_equal(f.tensor_array(b + gname + ".weight"),
                                              ref[rname][layer])


def test_stories260k_tokenizer_metadata(stories: dict[str, Any]) -> None:
    values = _assert_llama_cpp_types(stories["paths"]["f32"], "llama")
    tokens, types = values["tokenizer.ggml.tokens"], list(values["tokenizer.ggml.token_type"])
    assert values["tokenizer.ggml.model"] == "llama" and len(tokens) == 512
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
    assert tokens[3:259] == [f"<0x{i:02X}>" for i in range(256)] and set(types[3:259]) == {6}
    assert set(types[259:]) == {1}
    # Pieces come back in sentencepiece form: the export's spaces were "▁".
    raw = STORIES_TOK.read_bytes()
    pos, pieces, scores = 4, [], []
    for _ in range(512):
        score, n = struct.unpack_from("<fi", raw, pos)
        pieces.append(raw[pos + 8:pos + 8 + n].decode())
        scores.append(score)
        pos += 8 + n
    assert tokens[259] == pieces[259].replace(" ", "▁") == "▁t"
    assert tokens[3:] == [p.replace(" ", "▁") for p in pieces[3:]]
    np.testing.assert_array_equal(np.asarray(values["tokenizer.ggml.scores"], np.float32),
                                  np.asarray(scores, np.float32))
    assert (values["tokenizer.ggml.bos_token_id"], values["tokenizer.ggml.eos_token_id"],
            values["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert values["tokenizer.ggml.add_bos_token"] is True
    assert values["tokenizer.ggml.add_eos_token"] is False


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_stories260k_quantised_bytes_match_gguf_quants(stories: dict[str, Any], qtype: str) -> None:
    path, ref = stories["paths"][qtype], stories["ref"]
    qt = QT[qtype.upper()]
    values = _assert_llama_cpp_types(path, "llama")
    assert values["general.file_type"] == {"q8_0": 7, "q4_0": 2}[qtype]
    assert values["general.quantization_version"] == 2
    with read_gguf(path) as f:
        assert f.tensors["blk.0.attn_norm.weight"].type == GGMLType.F32
        assert bytes(f.tensor_bytes("token_embd.weight")) == gq_quantize(ref["emb"], qt).tobytes()
        assert bytes(f.tensor_bytes("blk.2.attn_k.weight")) == gq_quantize(ref["wk"][2], qt).tobytes()
        assert bytes(f.tensor_bytes("blk.3.ffn_up.weight")) == gq_quantize(ref["w3"][3], qt).tobytes()
        # ffn_down rows hold hidden_dim = 172 values, not a multiple of 32: F16 instead.
        down = f.tensors["blk.1.ffn_down.weight"]
        assert down.type == GGMLType.F16
        np.testing.assert_array_equal(f.tensor_array(down.name), ref["w2"][1].astype(np.float16))
    log = stories["logs"][qtype].getvalue()
    assert log.count("row length 172 is not a multiple of 32, stored as F16") == 5
    assert "blk.4.ffn_down.weight" in log


def test_wrong_size_llama2c_files_are_refused(tmp_path: Path) -> None:
    full = STORIES_BIN.read_bytes()
    cases = {"short.bin": full[:-4], "long.bin": full + b"\0" * 4,
             "header.bin": full[:28]}
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ModelFormatError, match=f"implies 1056540 bytes, the file has {len(data)}"):
            read_llama2c(p)
    bad = bytearray(full)
    bad[0:4] = struct.pack("<i", -64)  # dim
    (tmp_path / "neg.bin").write_bytes(bytes(bad))
    with pytest.raises(ModelFormatError, match="dim = -64 is out of range"):
        read_llama2c(tmp_path / "neg.bin")
    bad[0:4] = struct.pack("<i", 63)  # not a multiple of n_heads
    (tmp_path / "odd.bin").write_bytes(bytes(bad))
    with pytest.raises(ModelFormatError, match="inconsistent"):
        read_llama2c(tmp_path / "odd.bin")
    (tmp_path / "tiny.bin").write_bytes(b"\1\2\3")
    with pytest.raises(ModelFormatError, match="too short"):
        read_llama2c(tmp_path / "tiny.bin")


def test_llama2c_tokenizer_problems(tmp_path: Path) -> None:
    model = tmp_path / "m.bin"
    shutil.copy(STORIES_BIN, model)
    with pytest.raises(InvalidArgumentError, match="no llama2.c tokenizer"):
        convert(model, tmp_path / "o.gguf", "f32", log=_silent())
    tok = STORIES_TOK.read_bytes()
    (tmp_path / "tok512.bin").write_bytes(tok[:-3])
    with pytest.raises(ModelFormatError, match="truncated|length"):
        convert(model, tmp_path / "o.gguf", "f32", log=_silent())
    with pytest.raises(ModelFormatError, match="bytes left after 511 tokens"):
        read_llama2c_tokenizer(STORIES_TOK, 511)
    with pytest.raises(ModelFormatError, match="cannot hold 4096 tokens"):
        read_llama2c_tokenizer(STORIES_TOK, 4096)
    assert len(read_llama2c_tokenizer(STORIES_TOK).pieces) == 512
    # An explicit tokenizer= wins over the folder search.
    out = convert(model, tmp_path / "o.gguf", "f32", tokenizer=STORIES_TOK, log=_silent())
    with read_gguf(out) as f:
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 512
    assert not (tmp_path / "o.gguf.tmp").exists()


def test_llama2c_untied_v0_and_ak42_v1(tmp_path: Path) -> None:
    ref = _read_v0_independently(STORIES_BIN)
    raw = STORIES_BIN.read_bytes()
    dim, hidden, L, nh, nkv, vocab, seq = struct.unpack_from("<7i", raw, 0)
    wcls = np.random.default_rng(3).standard_normal((vocab, dim)).astype(np.float32)
    # v0 untied: negative vocab_size, output matrix appended.
    v0 = tmp_path / "untied" / "m.bin"
    v0.parent.mkdir()
    v0.write_bytes(struct.pack("<7i", dim, hidden, L, nh, nkv, -vocab, seq) + raw[28:]
                   + wcls.tobytes())
    shutil.copy(STORIES_TOK, v0.parent / "tok512.bin")
    out0 = convert(v0, tmp_path / "v0.gguf", "f32", log=_silent())
    # v1 ("ak42"): 256-byte header, norms first, no RoPE tables; same weights.
    head = struct.pack("<Ii7iB", 0x616B3432, 1, dim, hidden, L, nh, nkv, vocab, seq, 0)
    body = [ref["rms_att"], ref["rms_ffn"], ref["rms_final"], ref["emb"], ref["wq"], ref["wk"],
            ref["wv"], ref["wo"], ref["w1"], ref["w2"], ref["w3"], wcls]
    v1 = tmp_path / "v1" / "m.bin"
    v1.parent.mkdir()
    v1.write_bytes(head + bytes(256 - len(head)) + b"".join(a.tobytes() for a in body))
    out1 = convert(v1, tmp_path / "v1.gguf", "f32", tokenizer=STORIES_TOK, log=_silent())
    with read_gguf(out0) as a, read_gguf(out1) as b:
        assert list(a.tensors) == list(b.tensors) and "output.weight" in a.tensors
        np.testing.assert_array_equal(a.tensor_array("output.weight"), wcls)
        for name in a.tensors:
            assert bytes(a.tensor_bytes(name)) == bytes(b.tensor_bytes(name)), name
    assert read_llama2c(v1).config.version == 1
    v2 = tmp_path / "v2.bin"
    v2.write_bytes(struct.pack("<Ii", 0x616B3432, 2) + bytes(300))
    with pytest.raises(UnsupportedError, match="version 2"):
        read_llama2c(v2)


# --------------------------------------------------------------------------------------
# GGUF -> GGUF requantising


def test_requantising_a_gguf_matches_direct_conversion(stories: dict[str, Any],
                                                       tmp_path: Path) -> None:
    f32 = stories["paths"]["f32"]
    again = convert(f32, tmp_path / "re-q8.gguf", "q8_0", log=_silent())
    direct = stories["paths"]["q8_0"]
    with read_gguf(again) as a, read_gguf(direct) as b:
        assert list(a.tensors) == list(b.tensors)
        for name, info in a.tensors.items():
            assert info.type == b.tensors[name].type
            assert bytes(a.tensor_bytes(name)) == bytes(b.tensor_bytes(name)), name
        for key, value in b.fields.items():
            if key != "edgellm.source":
                assert a.fields[key].type == value.type, key
                assert np.array_equal(np.asarray(a.metadata[key], dtype=object),
                                      np.asarray(b.metadata[key], dtype=object)), key
        assert a.metadata["edgellm.source"] == "gguf:s-f32.gguf"
    # Same type: bytes are copied, not re-encoded; Q8_0 -> F16 decodes the blocks.
    same = convert(direct, tmp_path / "same.gguf", "q8_0", log=_silent())
    assert read_gguf(same).tensor_bytes("blk.0.attn_q.weight") == \
        read_gguf(direct).tensor_bytes("blk.0.attn_q.weight")
    f16 = convert(direct, tmp_path / "f16.gguf", "f16", log=_silent())
    r = ggufpkg.GGUFReader(direct)
    q = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    with read_gguf(f16) as f:
        assert f.metadata["general.file_type"] == 1
        assert "general.quantization_version" not in f.metadata
        np.testing.assert_array_equal(f.tensor_array("blk.0.attn_q.weight"),
                                      ggufpkg.quants.dequantize(q.data, QT.Q8_0).astype(np.float16))
    with pytest.raises(InvalidArgumentError, match="in place"):
        convert(f16, f16, "q8_0", log=_silent())


def test_requantising_refuses_types_it_cannot_decode(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "k.gguf", {"general.architecture": "llama"},
                     [("w", RawTensor(bytes(144 * 2), (256, 2)), GGMLType.Q4_K)])
    with pytest.raises(UnsupportedError, match="'w' is Q4_K"):
        convert(src, tmp_path / "o.gguf", "q8_0", log=_silent())


# --------------------------------------------------------------------------------------
# Hugging Face folders (tiny random transformers models)


def _hf_originals(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF folder as float32, read by the safetensors package itself."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[k] = v.float().numpy()
    return out


def _permute_reference(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows -> GGUF adjacent pairs, by explicit indices (not the reshape trick)."""
    hd = w.shape[0] // n_heads
    order = []
    for h in range(n_heads):
        for i in range(hd // 2):
            order += [h * hd + i, h * hd + hd // 2 + i]
    return w[order]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from support.tiny_models import make_tiny_llama, make_tiny_qwen2

    d = tmp_path_factory.mktemp("hf")
    return {
        # GQA (4 heads, 2 kv heads), untied, llama-3-style BPE, linear RoPE, padded vocab.
        "llama": make_tiny_llama(d / "llama", seed=1, rope_linear_factor=2.0, vocab_pad=5),
        # Tied, Llama-2-style sentencepiece tokenizer, bf16 weights in 3 shards.
        "llama_tied": make_tiny_llama(d / "llama_tied", seed=2, tied=True, dtype="bfloat16",
                                      tokenizer="spm", max_shard_size="60KB", n_kv_heads=1),
        # Tied with q/k/v biases, Qwen2-style BPE, ChatML, fp16 weights.
        "qwen2": make_tiny_qwen2(d / "qwen2", seed=3, dtype="float16"),
    }


def test_hf_llama_untied_gqa_f32_equals_permuted_originals(hf_models: dict[str, Path],
                                                           tmp_path: Path) -> None:
    src = hf_models["llama"]
    out = convert(src, tmp_path / "l.gguf", "f32", log=_silent())
    values = _assert_llama_cpp_types(out, "llama")
    cfg = json.loads((src / "config.json").read_text())
    assert values["llama.block_count"] == 2 and values["llama.attention.head_count"] == 4
    assert values["llama.attention.head_count_kv"] == 2 and values["llama.rope.dimension_count"] == 16
    assert values["llama.vocab_size"] == cfg["vocab_size"] == 384 + 5
    assert values["llama.rope.scaling.type"] == "linear"
    assert values["llama.rope.scaling.factor"] == 2.0
    assert values["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5, rel=1e-7)
    assert "llama.attention.key_length" not in values  # head_dim * n_heads == dim
    orig = _hf_originals(src)
    with read_gguf(out) as f:
        assert len(f.tensors) == 3 + 9 * 2
        np.testing.assert_array_equal(f.tensor_array("token_embd.weight"),
                                      orig["model.embed_tokens.weight"])
        np.testing.assert_array_equal(f.tensor_array("output.weight"), orig["lm_head.weight"])
        np.testing.assert_array_equal(f.tensor_array("output_norm.weight"), orig["model.norm.weight"])
        for i in range(2):
            hf, b = f"model.layers.{i}.", f"blk.{i}."
            np.testing.assert_array_equal(f.tensor_array(b + "attn_q.weight"),
                                          _permute_reference(orig[hf + "self_attn.q_proj.weight"], 4))
            np.testing.assert_array_equal(f.tensor_array(b + "attn_k.weight"),
                                          _permute_reference(orig[hf + "self_attn.k_proj.weight"], 2))
            for g, h in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                         ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                         ("ffn_down", "mlp.down_proj"), ("attn_norm", "input_layernorm"),
                         ("ffn_norm", "post_attention_layernorm")):
                np.testing.assert_array_equal(f.tensor_array(f"{b}{g}.weight"),
                                              orig[f"{hf}{h}.weight"])


def _rope_half(v: np.ndarray, pos: int, theta: float) -> np.ndarray:  # [d] -> [d]
    """HF's rotate-half RoPE: pairs (i, i + d/2)."""
    d = v.size
    ang = pos * theta ** (-np.arange(0, d, 2) / d)
    c, s = np.cos(ang), np.sin(ang)
    a, b = v[: d // 2], v[d // 2:]
    return np.concatenate([a * c - b * s, a * s + b * c])


def _rope_pairs(v: np.ndarray, pos: int, theta: float) -> np.ndarray:  # [d] -> [d]
    """GGUF llama's RoPE: adjacent pairs (2i, 2i + 1)."""
    d = v.size
    ang = pos * theta ** (-np.arange(0, d, 2) / d)
    c, s = np.cos(ang), np.sin(ang)
    out = np.empty_like(v)
    out[0::2] = v[0::2] * c - v[1::2] * s
    out[1::2] = v[0::2] * s + v[1::2] * c
    return out


def test_hf_llama_permutation_preserves_attention_scores(hf_models: dict[str, Path],
                                                         tmp_path: Path) -> None:
    src = hf_models["llama"]
    out = convert(src, tmp_path / "l.gguf", "f32", log=_silent())
    orig = _hf_originals(src)
    x = np.random.default_rng(0).standard_normal(64)
    hd, theta = 16, 10000.0
    with read_gguf(out) as f:
        wq = f.tensor_array("blk.1.attn_q.weight").astype(np.float64)
        wk = f.tensor_array("blk.1.attn_k.weight").astype(np.float64)
    hq = orig["model.layers.1.self_attn.q_proj.weight"].astype(np.float64)
    hk = orig["model.layers.1.self_attn.k_proj.weight"].astype(np.float64)
    for head in range(4):
        kv = head // 2  # GQA: 2 query heads per kv head
        q_hf, k_hf = hq[head * hd:(head + 1) * hd] @ x, hk[kv * hd:(kv + 1) * hd] @ x
        q_gg, k_gg = wq[head * hd:(head + 1) * hd] @ x, wk[kv * hd:(kv + 1) * hd] @ x
        for pq, pk in ((0, 0), (7, 3), (200, 31)):
            hf_score = _rope_half(q_hf, pq, theta) @ _rope_half(k_hf, pk, theta)
            gg_score = _rope_pairs(q_gg, pq, theta) @ _rope_pairs(k_gg, pk, theta)
            assert gg_score == pytest.approx(hf_score, rel=1e-9, abs=1e-12)
        # Without the permutation the scores would differ (the test can fail).
        wrong = _rope_pairs(q_hf, 7, theta) @ _rope_pairs(k_hf, 3, theta)
        assert wrong != pytest.approx(_rope_half(q_hf, 7, theta) @ _rope_half(k_hf, 3, theta),
                                      rel=1e-6)


def test_hf_llama_bpe_tokenizer_metadata(hf_models: dict[str, Path], tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    src = hf_models["llama"]
    values = _assert_llama_cpp_types(convert(src, tmp_path / "l.gguf", "f16", log=_silent()),
                                     "llama")
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    n = tok.get_vocab_size()
    tokens, types = values["tokenizer.ggml.tokens"], list(values["tokenizer.ggml.token_type"])
    assert values["tokenizer.ggml.model"] == "gpt2" and values["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(tokens) == n + 5
    assert tokens[:n] == [tok.id_to_token(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 5)] and set(types[n:]) == {5}
    specials = {a.content for a in tok.get_added_tokens_decoder().values()}
    assert {tokens[i] for i, t in enumerate(types) if t == 3} == specials
    assert set(types[:256]) == {1}
    merges = json.loads((src / "tokenizer.json").read_text())["model"]["merges"]
    assert values["tokenizer.ggml.merges"] == [" ".join(m) for m in merges] and merges
    assert values["tokenizer.ggml.bos_token_id"] == tok.token_to_id("<|begin_of_text|>")
    assert values["tokenizer.ggml.eos_token_id"] == tok.token_to_id("<|end_of_text|>")
    assert values["tokenizer.ggml.add_bos_token"] is True  # from the TemplateProcessing
    assert values["tokenizer.ggml.add_eos_token"] is False
    assert values["tokenizer.chat_template"] == (src / "chat_template.jinja").read_text()
    assert "tokenizer.ggml.scores" not in values


def test_hf_llama_tied_bf16_sharded_with_sentencepiece(hf_models: dict[str, Path],
                                                       tmp_path: Path) -> None:
    import sentencepiece as spm

    src = hf_models["llama_tied"]
    assert (src / "model.safetensors.index.json").is_file()
    assert len(list(src.glob("model-*.safetensors"))) > 1
    out = convert(src, tmp_path / "t.gguf", "f32", log=_silent())
    values = _assert_llama_cpp_types(out, "llama")
    orig = _hf_originals(src)
    assert SafetensorsFile(next(src.glob("model-*.safetensors"))).tensors.popitem()[1].dtype == "BF16"
    with read_gguf(out) as f:
        assert "output.weight" not in f.tensors and len(f.tensors) == 2 + 9 * 2
        np.testing.assert_array_equal(f.tensor_array("token_embd.weight"),
                                      orig["model.embed_tokens.weight"])
        np.testing.assert_array_equal(f.tensor_array("blk.0.attn_k.weight"),
                                      _permute_reference(orig["model.layers.0.self_attn.k_proj.weight"], 1))
        np.testing.assert_array_equal(f.tensor_array("blk.1.ffn_norm.weight"),
                                      orig["model.layers.1.post_attention_layernorm.weight"])
    assert values["llama.attention.head_count_kv"] == 1
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    n = sp.get_piece_size()
    assert values["tokenizer.ggml.model"] == "llama"
    assert values["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    np.testing.assert_array_equal(np.asarray(values["tokenizer.ggml.scores"], np.float32),
                                  np.asarray([sp.get_score(i) for i in range(n)], np.float32))
    types = list(values["tokenizer.ggml.token_type"])
    assert types[:3] == [2, 3, 3] and set(types[3:259]) == {6} and set(types[259:]) == {1}
    assert (values["tokenizer.ggml.bos_token_id"], values["tokenizer.ggml.eos_token_id"],
            values["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert values["tokenizer.ggml.add_bos_token"] is True


def test_hf_qwen2_tied_with_biases(hf_models: dict[str, Path], tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    src = hf_models["qwen2"]
    out = convert(src, tmp_path / "q.gguf", "f32", log=_silent())
    values = _assert_llama_cpp_types(out, "qwen2")
    assert values["general.architecture"] == "qwen2"
    assert values["qwen2.rope.freq_base"] == 1e6
    assert values["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-7)
    orig = _hf_originals(src)
    with read_gguf(out) as f:
        assert "output.weight" not in f.tensors and len(f.tensors) == 2 + 12 * 2
        for i in range(2):
            hf, b = f"model.layers.{i}.self_attn.", f"blk.{i}."
            for g, h in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")):
                # qwen2 keeps rotate-half (NEOX) RoPE: no permutation of weights or biases.
                np.testing.assert_array_equal(f.tensor_array(f"{b}{g}.weight"),
                                              orig[f"{hf}{h}.weight"])
                np.testing.assert_array_equal(f.tensor_array(f"{b}{g}.bias"),
                                              orig[f"{hf}{h}.bias"])
                assert f.tensors[f"{b}{g}.bias"].type == GGMLType.F32
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    assert values["tokenizer.ggml.pre"] == "qwen2"
    assert values["tokenizer.ggml.eos_token_id"] == tok.token_to_id("<|im_end|>")
    assert values["tokenizer.ggml.padding_token_id"] == tok.token_to_id("<|endoftext|>")
    assert values["tokenizer.ggml.bos_token_id"] == tok.token_to_id("<|endoftext|>")  # config
    assert values["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in values["tokenizer.chat_template"]


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0"])
def test_hf_encoded_types_match_gguf_quants(hf_models: dict[str, Path], tmp_path: Path,
                                            qtype: str) -> None:
    src = hf_models["llama"]
    out = convert(src, tmp_path / f"l-{qtype}.gguf", qtype, log=_silent())
    orig = _hf_originals(src)
    qt = QT[qtype.upper()]
    with read_gguf(out) as f:
        q = _permute_reference(orig["model.layers.0.self_attn.q_proj.weight"], 4)
        assert f.tensors["blk.0.attn_q.weight"].type == qt
        assert bytes(f.tensor_bytes("blk.0.attn_q.weight")) == gq_quantize(q, qt).tobytes()
        assert bytes(f.tensor_bytes("output.weight")) == \
            gq_quantize(orig["lm_head.weight"], qt).tobytes()
        assert f.tensors["blk.0.attn_norm.weight"].type == GGMLType.F32
        assert f.metadata["general.file_type"] == {"f16": 1, "q8_0": 7, "q4_0": 2}[qtype]


def test_hf_bad_folders(hf_models: dict[str, Path], tmp_path: Path) -> None:
    src = hf_models["qwen2"]

    def copy(name: str) -> Path:
        return Path(shutil.copytree(src, tmp_path / name))

    d = copy("arch")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedError, match="GPT2LMHeadModel"):
        import_hf(d)
    (d / "config.json").write_text(json.dumps(
        {**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}))
    with pytest.raises(UnsupportedError, match="yarn"):
        import_hf(d)
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ModelFormatError, match="missing tensors.*blk.2"):
        import_hf(d)
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    with pytest.raises(ModelFormatError, match="has shape"):
        import_hf(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        import_hf(d)

    d = copy("trunc")
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-10])
    with pytest.raises(ModelFormatError, match="past the end"):
        import_hf(d)
    st.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ModelFormatError, match="header length"):
        import_hf(d)
    st.write_bytes(struct.pack("<Q", 4) + b"{no}")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        import_hf(d)

    d = copy("tok")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError, match="no tokenizer"):
        import_hf(d)

    cfg = json.loads((src / "config.json").read_text())
    with pytest.raises(ModelFormatError, match="outside the model's vocab_size 100"):
        tokenizer_metadata(src, "qwen2", cfg, 100)  # a tokenizer bigger than the embedding
    tj = json.loads((src / "tokenizer.json").read_text())
    d = copy("unigram")
    (d / "tokenizer.json").write_text(json.dumps({**tj, "model": {"type": "Unigram"}}))
    with pytest.raises(UnsupportedError, match="'Unigram' is not supported"):
        import_hf(d)


def test_pickle_is_refused(tmp_path: Path) -> None:
    import torch

    only = tmp_path / "pickle_only"
    only.mkdir()
    (only / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    torch.save({"w": torch.zeros(2)}, only / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="arbitrary code.*safetensors"):
        convert(only, tmp_path / "o.gguf", "f16", log=_silent())
    bare = tmp_path / "bare"
    bare.mkdir()
    torch.save({"w": torch.zeros(2)}, bare / "model.pt")
    with pytest.raises(PickleRefusedError, match="model.pt"):
        convert(bare, tmp_path / "o.gguf", log=_silent())
    # A torch file handed over directly, in the zip and the legacy (raw pickle) layouts.
    with pytest.raises(PickleRefusedError):
        convert(only / "pytorch_model.bin", tmp_path / "o.gguf", log=_silent())
    legacy = tmp_path / "legacy.bin"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(PickleRefusedError):
        detect_source(legacy)
    assert not (tmp_path / "o.gguf").exists()


def test_a_llama2c_file_that_starts_like_a_pickle_is_still_llama2c(tmp_path: Path) -> None:
    # dim 640 is b"\x80\x02\x00\x00": the bytes of pickle protocol 2. The size check decides.
    dim, hidden, layers, heads, kv_heads, vocab, seq = 640, 32, 1, 10, 1, 4, 2
    kv = dim // heads * kv_heads
    n = (vocab * dim + layers * dim + layers * dim * dim + 2 * layers * kv * dim
         + layers * dim * dim + layers * dim + 3 * layers * hidden * dim + dim
         + 2 * seq * (dim // heads // 2))
    p = tmp_path / "m.bin"
    p.write_bytes(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, seq)
                  + bytes(4 * n))
    assert p.read_bytes()[:2] == b"\x80\x02"
    assert detect_source(p) == "llama2c"
    p.write_bytes(p.read_bytes()[:-4])
    with pytest.raises(PickleRefusedError):
        detect_source(p)


def test_convert_arguments_and_progress(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="unknown type 'q5_0'"):
        convert(STORIES_BIN, tmp_path / "o.gguf", "q5_0")
    with pytest.raises(InvalidArgumentError, match="no such file"):
        convert(tmp_path / "missing.bin", tmp_path / "o.gguf")
    log = io.StringIO()
    out = convert(STORIES_BIN, tmp_path / "o.gguf", "f16", tokenizer=STORIES_TOK, log=log,
                  progress=True, name="tiny stories")
    assert "\rconvert: 47/47 tensors" in log.getvalue()
    with read_gguf(out) as f:
        assert f.metadata["general.name"] == "tiny stories"
        assert f.metadata["general.file_type"] == 1
        assert f.tensors["blk.0.ffn_down.weight"].type == GGMLType.F16
        assert f.tensors["blk.0.ffn_norm.weight"].type == GGMLType.F32
