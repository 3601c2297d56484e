# SPDX-License-Identifier: MIT
"""Hugging Face LlamaForCausalLM / Qwen2ForCausalLM folders (safetensors only) read into GGUF terms."""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, ModelFormatError, PickleRefusedError, UnsupportedError
from .gguf import ImportedModel, LazyTensor

# --------------------------------------------------------------------------------------
# safetensors: an u64 header length, a JSON header, then raw little-endian tensor data.

MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit
_ST_DTYPES: dict[str, str] = {
    "BOOL": "?", "U8": "<u1", "I8": "<i1", "F8_E4M3": "<u1", "F8_E5M2": "<u1", "U16": "<u2",
    "I16": "<i2", "F16": "<f2", "BF16": "<u2", "U32": "<u4", "I32": "<i4", "F32": "<f4",
    "U64": "<u8", "I64": "<i8", "F64": "<f8",
}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_HELP = (
    "pickle checkpoints can run arbitrary code when loaded, so edgellm never opens them. "
    "Convert to safetensors on a machine you trust, e.g.: python -c \"from transformers import "
    "AutoModelForCausalLM as M; M.from_pretrained('IN').save_pretrained('OUT', "
    "safe_serialization=True)\" (copy the tokenizer files too), or download the model's "
    "*.safetensors files")


@dataclass(frozen=True)
class SafetensorInfo:
    """One tensor of a safetensors file."""

    name: str
    dtype: str  # safetensors dtype name: "F32", "BF16", ...
    shape: tuple[int, ...]  # numpy order
    offset: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """A safetensors file mapped read-only, header validated against the file size."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        self.path = p
        size = p.stat().st_size
        if size < 8:
            raise ModelFormatError(f"{p}: {size} bytes is too short for safetensors")
        with open(p, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > MAX_SAFETENSORS_HEADER or hlen > size - 8:
                raise ModelFormatError(
                    f"{p}: safetensors header length {hlen} does not fit the {size}-byte file")
            raw = f.read(hlen)
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse(raw, size)
        except BaseException:
            self._mm.close()
            raise

    def _parse(self, raw: bytes, size: int) -> None:
        p = self.path
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ModelFormatError(f"{p}: safetensors header is not valid JSON: {exc}") from None
        if not isinstance(header, dict):
            raise ModelFormatError(f"{p}: safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not isinstance(meta, dict):
            raise ModelFormatError(f"{p}: safetensors __metadata__ is not an object")
        self.metadata: dict[str, Any] = dict(meta or {})
        base = 8 + len(raw)
        self.tensors: dict[str, SafetensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = self._check_entry(name, entry, base, size)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise ModelFormatError(f"{p}: tensors {a!r} and {b!r} overlap")

    def _check_entry(self, name: str, e: Any, base: int, size: int) -> SafetensorInfo:
        p = self.path
        if not isinstance(e, dict):
            raise ModelFormatError(f"{p}: entry {name!r} is not an object")
        dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise UnsupportedError(f"{p}: tensor {name!r} has dtype {dtype!r}, unknown to edgellm")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ModelFormatError(f"{p}: tensor {name!r} has a bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise ModelFormatError(f"{p}: tensor {name!r} has bad data_offsets {offs!r}")
        n = 1
        for d in shape:
            n *= d
        nbytes = n * np.dtype(_ST_DTYPES[dtype]).itemsize
        if offs[1] - offs[0] != nbytes:
            raise ModelFormatError(f"{p}: tensor {name!r} {dtype}{shape} needs {nbytes} bytes, "
                                   f"data_offsets span {offs[1] - offs[0]}")
        if base + offs[1] > size:
            raise ModelFormatError(f"{p}: tensor {name!r} runs past the end of the file "
                                   "(truncated?)")
        return SafetensorInfo(name, dtype, tuple(shape), base + offs[0], nbytes)

    def raw(self, name: str) -> np.ndarray:
        """A zero-copy read-only view in the stored dtype (BF16 as uint16, F8 as uint8)."""
        t = self.tensors[name]
        arr = np.frombuffer(self._mm, dtype=_ST_DTYPES[t.dtype], count=t.nbytes
                            // np.dtype(_ST_DTYPES[t.dtype]).itemsize, offset=t.offset)
        return arr.reshape(t.shape)

    def float32(self, name: str) -> np.ndarray:  # [*shape] -> [*shape] f32
        """A float tensor widened to float32 (F32 stays a view; others are converted)."""
        t = self.tensors[name]
        if t.dtype not in _FLOAT_DTYPES:
            raise UnsupportedError(f"{self.path}: tensor {name!r} has dtype {t.dtype}; "
                                   f"weights must be one of {', '.join(_FLOAT_DTYPES)}")
        raw = self.raw(name)
        if t.dtype == "BF16":
            # bf16 is the top half of an f32: shift the bits into place.
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if t.dtype == "F32":
            return raw
        return raw.astype(np.float32)


# --------------------------------------------------------------------------------------
# The checkpoint folder


def refuse_pickle(folder: Path) -> None:
    """Raise PickleRefusedError when a folder offers weights only as pickle files."""
    pickles = sorted(q.name for q in folder.iterdir()
                     if q.is_file() and q.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PickleRefusedError(f"{folder} holds only pickle weights ({', '.join(pickles)}): "
                                 f"{PICKLE_HELP}")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON: {exc}") from None


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights (the index's shards, or every file)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        doc = _load_json(index)
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise ModelFormatError(f"{index}: no weight_map")
        names: list[str] = []
        for shard in wm.values():
            # A shard must be a plain file name in this folder (no path traversal).
            if (not isinstance(shard, str) or Path(shard).name != shard
                    or not shard.endswith(".safetensors")):
                raise ModelFormatError(f"{index}: bad shard name {shard!r}")
            if shard not in names:
                names.append(shard)
        missing = [s for s in names if not (folder / s).is_file()]
        if missing:
            raise ModelFormatError(f"{index}: shard(s) missing: {', '.join(missing)}")
        return [folder / s for s in names]
    files = sorted(q for q in folder.glob("*.safetensors") if q.is_file())
    if not files:
        refuse_pickle(folder)
        raise ModelFormatError(f"{folder}: no *.safetensors weights")
    return files


def _hf_to_gguf_name(name: str, n_layers: int) -> str | None:
    """GGUF name of an HF LlamaForCausalLM / Qwen2ForCausalLM tensor; None to skip it."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    if name.endswith("rotary_emb.inv_freq"):
        return None  # a buffer some old checkpoints saved; recomputed from rope_theta
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return None
    layer = int(parts[2])
    if layer >= n_layers:
        raise ModelFormatError(f"tensor {name!r} is for layer {layer}, the config has "
                               f"{n_layers}")
    rest = ".".join(parts[3:])
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    if rest not in per_layer:
        return None
    return f"blk.{layer}.{per_layer[rest]}"


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:  # [n_heads*head_dim, ...] -> same
    """Reorder q/k rows from HF's rotate-half RoPE to GGUF llama's adjacent-pair RoPE.

    Within each head, rows [0..h/2) and [h/2..h) interleave: new row 2i = old i,
    new row 2i+1 = old i + h/2. Works for weights [rows, dim] and biases [rows].
    """
    rest = w.shape[1:]
    head_dim = w.shape[0] // n_heads
    return (w.reshape(n_heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(w.shape))


@dataclass(frozen=True)
class _Arch:
    name: str  # GGUF architecture
    permute_qk: bool  # HF rotate-half -> GGUF adjacent pairs (llama only)


_ARCHS = {"LlamaForCausalLM": _Arch("llama", True), "Qwen2ForCausalLM": _Arch("qwen2", False)}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _cfg_int(cfg: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    v = cfg.get(key, default)
    if v is None and default is not None:
        v = default
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ModelFormatError(f"{path}: {key} = {v!r} must be a positive integer")
    return v


def _cfg_float(cfg: dict[str, Any], key: str, path: Path, default: float) -> float:
    v = cfg.get(key, default)
    if v is None:
        v = default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
        raise ModelFormatError(f"{path}: {key} = {v!r} must be a positive number")
    return float(v)


def _arch_metadata(cfg: dict[str, Any], path: Path) -> tuple[_Arch, dict[str, Any]]:
    """The <arch>.* keys from config.json (Transformers 4 and 5 layouts)."""
    archs = cfg.get("architectures") or [_MODEL_TYPES.get(str(cfg.get("model_type")), "")]
    cls = archs[0] if isinstance(archs, list) and archs else None
    if cls not in _ARCHS:
        raise UnsupportedError(f"{path}: architecture {cls or cfg.get('model_type')!r} is not "
                               f"supported (edgellm converts {', '.join(_ARCHS)})")
    arch = _ARCHS[cls]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedError(f"{path}: hidden_act {act!r} is not supported (only silu)")
    if cfg.get("use_sliding_window"):
        raise UnsupportedError(f"{path}: sliding-window attention is not supported")
    if cfg.get("mlp_bias") or (arch.name == "llama" and cfg.get("attention_bias")):
        raise UnsupportedError(f"{path}: llama models with attention or MLP biases are not "
                               "supported")
    dim = _cfg_int(cfg, "hidden_size", path)
    n_heads = _cfg_int(cfg, "num_attention_heads", path)
    n_kv_heads = _cfg_int(cfg, "num_key_value_heads", path, n_heads)
    if dim % n_heads and cfg.get("head_dim") is None:
        raise ModelFormatError(f"{path}: hidden_size {dim} is not a multiple of "
                               f"num_attention_heads {n_heads}")
    head_dim = _cfg_int(cfg, "head_dim", path, dim // n_heads or 1)
    if n_heads % n_kv_heads or head_dim % 2:
        raise ModelFormatError(f"{path}: num_attention_heads {n_heads} must be a multiple of "
                               f"num_key_value_heads {n_kv_heads}, head_dim {head_dim} even")
    # Transformers 5 nests theta and scaling in rope_parameters; 4 has rope_theta/rope_scaling.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ModelFormatError(f"{path}: rope_parameters/rope_scaling is not an object")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0:
        raise ModelFormatError(f"{path}: rope_theta {theta!r} must be a positive number")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    a = arch.name
    meta: dict[str, Any] = {
        f"{a}.context_length": _cfg_int(cfg, "max_position_embeddings", path),
        f"{a}.embedding_length": dim,
        f"{a}.block_count": _cfg_int(cfg, "num_hidden_layers", path),
        f"{a}.feed_forward_length": _cfg_int(cfg, "intermediate_size", path),
        f"{a}.attention.head_count": n_heads,
        f"{a}.attention.head_count_kv": n_kv_heads,
        f"{a}.rope.freq_base": float(theta),
        f"{a}.attention.layer_norm_rms_epsilon": _cfg_float(cfg, "rms_norm_eps", path, 1e-6),
        f"{a}.rope.dimension_count": head_dim,
        f"{a}.vocab_size": _cfg_int(cfg, "vocab_size", path),
    }
    if head_dim * n_heads != dim:
        meta[f"{a}.attention.key_length"] = head_dim
        meta[f"{a}.attention.value_length"] = head_dim
    if rope_type == "linear":
        factor = rope.get("factor")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
            raise ModelFormatError(f"{path}: linear rope scaling needs a positive factor")
        meta[f"{a}.rope.scaling.type"] = "linear"
        meta[f"{a}.rope.scaling.factor"] = float(factor)
    elif rope_type not in ("default", None):
        raise UnsupportedError(f"{path}: rope scaling {rope_type!r} is not supported "
                               "(only linear)")
    return arch, meta


# --------------------------------------------------------------------------------------
# Tokenizers

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1, 2, 3, 4, 5, 6)

# Split regexes of known byte-level BPE pre-tokenizers -> llama.cpp tokenizer.ggml.pre names.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_BY_REGEX = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def _token_text(v: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, an AddedToken dict or null."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return str(v["content"])
    return None


def _chat_template(folder: Path, tcfg: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tpl = tcfg.get("chat_template")
    if tpl is None and (folder / "chat_template.json").is_file():
        doc = _load_json(folder / "chat_template.json")
        tpl = doc.get("chat_template") if isinstance(doc, dict) else None
    if isinstance(tpl, list):  # named templates: keep the default one
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) else None


def _special_ids(tcfg: dict[str, Any], cfg: dict[str, Any],
                 ids: dict[str, int]) -> dict[str, int]:
    """bos/eos/unk/pad ids: tokenizer_config.json's tokens, else config.json's *_token_id."""
    out: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        text = _token_text(tcfg.get(f"{kind}_token"))
        if text is not None and text in ids:
            out[kind] = ids[text]
            continue
        v = cfg.get(f"{kind}_token_id")
        if isinstance(v, list) and v:
            v = v[0]
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out[kind] = v
    return out


def _template_special_id(item: Any, specials: dict[str, Any]) -> int | None:
    """The id of a TemplateProcessing item when it is a special token, else None."""
    if isinstance(item, dict) and isinstance(item.get("SpecialToken"), dict):
        entry = specials.get(item["SpecialToken"].get("id"))
        if isinstance(entry, dict) and entry.get("ids"):
            return int(entry["ids"][0])
    return None


def _template_adds(tj: dict[str, Any]) -> tuple[int | None, int | None]:
    """Ids a TemplateProcessing post-processor puts before / after a single sequence."""
    pp = tj.get("post_processor")
    procs = pp.get("processors", []) if isinstance(pp, dict) and pp.get("type") == "Sequence" \
        else [pp]
    for proc in procs:
        if not isinstance(proc, dict) or proc.get("type") != "TemplateProcessing":
            continue
        single, specials = proc.get("single") or [], proc.get("special_tokens") or {}
        if single and isinstance(specials, dict):
            return (_template_special_id(single[0], specials),
                    _template_special_id(single[-1], specials))
    return None, None


def _finish_vocab(tokens: list[str | None], types: np.ndarray, vocab_size: int,
                  path: Path) -> list[str]:
    """Pad a tokenizer's vocabulary to the embedding's vocab_size with unused [PADi] tokens."""
    if len(tokens) > vocab_size:
        raise ModelFormatError(f"{path}: the tokenizer has {len(tokens)} tokens, the model "
                               f"embeds only {vocab_size}")
    out: list[str] = []
    for i in range(vocab_size):
        t = tokens[i] if i < len(tokens) else None
        if t is None:
            t = f"[PAD{i}]"
            types[i] = TOKEN_UNUSED
        out.append(t)
    return out


def _bpe_metadata(folder: Path, arch: str, cfg: dict[str, Any], tcfg: dict[str, Any],
                  vocab_size: int) -> dict[str, Any]:
    """llama.cpp "gpt2" (byte-level BPE) tokenizer keys from tokenizer.json."""
    path = folder / "tokenizer.json"
    tj = _load_json(path)
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise UnsupportedError(f"{path}: tokenizer model {kind!r} is not supported (BPE only)")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise ModelFormatError(f"{path}: model.vocab is not an object")
    ids: dict[str, int] = {}
    n = 0
    for tok, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size:
            raise ModelFormatError(f"{path}: token {tok!r} has id {i!r} outside the model's "
                                   f"vocab_size {vocab_size}")
        ids[tok] = i
        n = max(n, i + 1)
    added = tj.get("added_tokens") or []
    for a in added:
        if (not isinstance(a, dict) or not isinstance(a.get("content"), str)
                or not isinstance(a.get("id"), int) or not 0 <= a["id"] < vocab_size):
            raise ModelFormatError(f"{path}: bad added token {a!r} (vocab_size {vocab_size})")
        ids[a["content"]] = a["id"]
        n = max(n, a["id"] + 1)
    tokens: list[str | None] = [None] * n
    types = np.full(vocab_size, TOKEN_NORMAL, dtype=np.int32)
    for tok, i in vocab.items():
        tokens[i] = tok
    for a in added:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = TOKEN_CONTROL if a.get("special") else TOKEN_USER_DEFINED
    merges = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            merges.append(f"{m[0]} {m[1]}")
        else:
            raise ModelFormatError(f"{path}: bad merge {m!r}")
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_name(tj, arch),
        "tokenizer.ggml.tokens": _finish_vocab(tokens, types, vocab_size, path),
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    bos_added, eos_added = _template_adds(tj)
    special = _special_ids(tcfg, cfg, ids)
    add_bos = tcfg.get("add_bos_token")
    add_eos = tcfg.get("add_eos_token")
    if not isinstance(add_bos, bool):
        add_bos = bos_added is not None
        if bos_added is not None and "bos" not in special:
            special["bos"] = bos_added
    if not isinstance(add_eos, bool):
        add_eos = eos_added is not None and eos_added != bos_added
    meta.update(_special_keys(special, vocab_size, path))
    meta["tokenizer.ggml.add_bos_token"] = add_bos
    meta["tokenizer.ggml.add_eos_token"] = add_eos
    return meta


def _pre_name(tj: dict[str, Any], arch: str) -> str:
    """llama.cpp's tokenizer.ggml.pre for a byte-level BPE tokenizer.json."""
    pre = tj.get("pre_tokenizer")
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == \
        "Sequence" else [pre]
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "Split":
            pattern = step.get("pattern") or {}
            regex = pattern.get("Regex") if isinstance(pattern, dict) else None
            if regex in _PRE_BY_REGEX:
                return _PRE_BY_REGEX[str(regex)]
    if len(steps) == 1 and isinstance(steps[0], dict) and steps[0].get("type") == "ByteLevel" \
            and steps[0].get("use_regex", True):
        return "gpt-2"
    return "qwen2" if arch == "qwen2" else "default"


def _special_keys(special: dict[str, int], vocab_size: int, path: Path) -> dict[str, Any]:
    names = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
             "pad": "padding_token_id"}
    out: dict[str, Any] = {}
    for kind, i in special.items():
        if not 0 <= i < vocab_size:
            raise ModelFormatError(f"{path}: {kind} token id {i} is outside vocab_size "
                                   f"{vocab_size}")
        out[f"tokenizer.ggml.{names[kind]}"] = i
    return out


def _spm_metadata(folder: Path, cfg: dict[str, Any], tcfg: dict[str, Any],
                  vocab_size: int) -> dict[str, Any]:
    """llama.cpp "llama" (sentencepiece) tokenizer keys from tokenizer.model."""
    path = folder / "tokenizer.model"
    try:
        import sentencepiece
    except ImportError:
        raise UnsupportedError(f"{path}: reading a sentencepiece tokenizer needs the "
                               "sentencepiece package (pip install sentencepiece)") from None
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (RuntimeError, OSError) as exc:
        raise ModelFormatError(f"{path}: not a sentencepiece model: {exc}") from None
    n = sp.GetPieceSize()
    tokens: list[str | None] = []
    scores = np.full(vocab_size, -1000.0, dtype=np.float32)  # padding scores as llama.cpp
    types = np.full(vocab_size, TOKEN_NORMAL, dtype=np.int32)
    if n > vocab_size:
        raise ModelFormatError(f"{path}: the tokenizer has {n} pieces, the model embeds only "
                               f"{vocab_size}")
    for i in range(n):
        tokens.append(sp.IdToPiece(i))
        scores[i] = sp.GetScore(i)
        if sp.IsUnknown(i):
            types[i] = TOKEN_UNKNOWN
        elif sp.IsControl(i):
            types[i] = TOKEN_CONTROL
        elif sp.IsUnused(i):
            types[i] = TOKEN_UNUSED
        elif sp.IsByte(i):
            types[i] = TOKEN_BYTE
    ids = {t: i for i, t in enumerate(tokens) if t is not None}
    # Tokens added on top of the sentencepiece model (ids >= n).
    extra: list[tuple[str, int, bool]] = []
    tj_path = folder / "tokenizer.json"
    if tj_path.is_file():
        tj = _load_json(tj_path)
        for a in (tj.get("added_tokens") or []) if isinstance(tj, dict) else []:
            if isinstance(a, dict) and isinstance(a.get("content"), str) \
                    and isinstance(a.get("id"), int):
                extra.append((a["content"], a["id"], bool(a.get("special"))))
    elif (folder / "added_tokens.json").is_file():
        doc = _load_json(folder / "added_tokens.json")
        if isinstance(doc, dict):
            extra += [(k, v, False) for k, v in doc.items() if isinstance(v, int)]
    for text, i, is_special in extra:
        if i < n:
            continue  # already a sentencepiece piece
        if i >= vocab_size:
            raise ModelFormatError(f"{folder}: added token {text!r} id {i} is outside "
                                   f"vocab_size {vocab_size}")
        tokens.extend([None] * (i + 1 - len(tokens)))
        tokens[i] = text
        ids[text] = i
        scores[i] = 0.0
        types[i] = TOKEN_CONTROL if is_special else TOKEN_USER_DEFINED
    special = {k: v for k, v in (("bos", sp.bos_id()), ("eos", sp.eos_id()),
                                 ("unk", sp.unk_id()), ("pad", sp.pad_id())) if v >= 0}
    special.update(_special_ids(tcfg, {}, ids))
    add_bos = tcfg.get("add_bos_token", True)
    add_eos = tcfg.get("add_eos_token", False)
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": _finish_vocab(tokens, types, vocab_size, path),
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
    }
    meta.update(_special_keys(special, vocab_size, path))
    meta["tokenizer.ggml.add_bos_token"] = bool(add_bos)
    meta["tokenizer.ggml.add_eos_token"] = bool(add_eos)
    return meta


def tokenizer_metadata(folder: Path, arch: str, cfg: dict[str, Any],
                       vocab_size: int) -> dict[str, Any]:
    """tokenizer.ggml.* (and tokenizer.chat_template) keys for an HF model folder.

    A sentencepiece tokenizer.model gives the "llama" kind; otherwise tokenizer.json must be
    a byte-level BPE ("gpt2" kind). Vocabularies are padded to vocab_size with [PADi].
    """
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = _load_json(tcfg_path) if tcfg_path.is_file() else {}
    if not isinstance(tcfg, dict):
        raise ModelFormatError(f"{tcfg_path}: not a JSON object")
    meta: dict[str, Any] | None = None
    if (folder / "tokenizer.model").is_file():
        try:
            meta = _spm_metadata(folder, cfg, tcfg, vocab_size)
        except ModelFormatError:
            # Some BPE models ship a non-sentencepiece tokenizer.model (tiktoken ranks).
            if not (folder / "tokenizer.json").is_file():
                raise
    if meta is None:
        if not (folder / "tokenizer.json").is_file():
            raise ModelFormatError(f"{folder}: no tokenizer.json or tokenizer.model")
        meta = _bpe_metadata(folder, arch, cfg, tcfg, vocab_size)
    tpl = _chat_template(folder, tcfg)
    if tpl is not None:
        meta["tokenizer.chat_template"] = tpl
    return meta


# --------------------------------------------------------------------------------------
# The import


def import_hf(folder: str | os.PathLike[str]) -> ImportedModel:
    """Read an HF LlamaForCausalLM / Qwen2ForCausalLM folder (config.json + safetensors).

    Llama q/k weights are permuted from HF's rotate-half RoPE to the adjacent pairs GGUF
    "llama" uses; qwen2 keeps rotate-half (llama.cpp runs it in NEOX mode) and its q/k/v
    biases. Tensors load lazily (one at a time) when written.

    Raises:
        PickleRefusedError: the folder has only pickle weights.
        UnsupportedError: another architecture, activation, rope scaling or tokenizer kind.
        ModelFormatError: missing or inconsistent config, weights or tokenizer files.
    """
    d = Path(folder)
    if not d.is_dir():
        raise InvalidArgumentError(f"{d} is not a folder")
    weight_files = _weight_files(d)  # first: a pickle-only folder is refused before all else
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ModelFormatError(f"{d}: no config.json (not a Hugging Face model folder?)")
    cfg = _load_json(cfg_path)
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{cfg_path}: not a JSON object")
    arch, meta = _arch_metadata(cfg, cfg_path)
    a = arch.name
    n_layers = meta[f"{a}.block_count"]
    n_heads = meta[f"{a}.attention.head_count"]
    n_kv_heads = meta[f"{a}.attention.head_count_kv"]
    head_dim = meta[f"{a}.rope.dimension_count"]
    dim = meta[f"{a}.embedding_length"]
    hidden = meta[f"{a}.feed_forward_length"]
    vocab_size = meta[f"{a}.vocab_size"]
    tied = bool(cfg.get("tie_word_embeddings", False))

    files = [SafetensorsFile(f) for f in weight_files]
    where: dict[str, tuple[SafetensorsFile, str]] = {}
    for sf in files:
        for name in sf.tensors:
            gname = _hf_to_gguf_name(name, n_layers)
            if gname is None:
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                raise UnsupportedError(f"{sf.path}: tensor {name!r} has no GGUF counterpart "
                                       f"in {a} (unsupported model variant?)")
            if gname in where:
                raise ModelFormatError(f"{d}: tensor {name!r} appears in two files")
            where[gname] = (sf, name)
    if tied:
        where.pop("output.weight", None)  # tied: llama.cpp reuses token_embd

    # Expected GGUF names and numpy shapes.
    q_rows, kv_rows = n_heads * head_dim, n_kv_heads * head_dim
    expected: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab_size, dim),
                                            "output_norm.weight": (dim,)}
    if not tied:
        expected["output.weight"] = (vocab_size, dim)
    for i in range(n_layers):
        b = f"blk.{i}."
        expected.update({
            b + "attn_norm.weight": (dim,), b + "attn_q.weight": (q_rows, dim),
            b + "attn_k.weight": (kv_rows, dim), b + "attn_v.weight": (kv_rows, dim),
            b + "attn_output.weight": (dim, q_rows), b + "ffn_norm.weight": (dim,),
            b + "ffn_gate.weight": (hidden, dim), b + "ffn_up.weight": (hidden, dim),
            b + "ffn_down.weight": (dim, hidden)})
        if a == "qwen2":
            expected.update({b + "attn_q.bias": (q_rows,), b + "attn_k.bias": (kv_rows,),
                             b + "attn_v.bias": (kv_rows,)})
    missing = [n for n in expected if n not in where]
    if missing:
        raise ModelFormatError(f"{d}: missing tensors (GGUF names): {', '.join(missing[:8])}"
                               f"{' ...' if len(missing) > 8 else ''}")
    extra = [n for n in where if n not in expected]
    if extra:
        raise UnsupportedError(f"{d}: unexpected tensors for {a}: {', '.join(extra[:8])}")
    tensors: list[tuple[str, LazyTensor]] = []
    for gname, shape in expected.items():
        sf, hname = where[gname]
        got = sf.tensors[hname].shape
        if got != shape:
            raise ModelFormatError(f"{sf.path}: {hname!r} has shape {got}, the config implies "
                                   f"{shape}")
        if sf.tensors[hname].dtype not in _FLOAT_DTYPES:
            raise UnsupportedError(f"{sf.path}: {hname!r} has dtype {sf.tensors[hname].dtype}")
        heads = 0
        if arch.permute_qk and gname.endswith(("attn_q.weight", "attn_q.bias")):
            heads = n_heads
        elif arch.permute_qk and gname.endswith(("attn_k.weight", "attn_k.bias")):
            heads = n_kv_heads
        tensors.append((gname, LazyTensor(shape, _loader(sf, hname, heads))))

    meta.update(tokenizer_metadata(d, a, cfg, vocab_size))
    return ImportedModel(a, d.resolve().name, meta, tensors, f"hf:{d.resolve().name}")


def _loader(sf: SafetensorsFile, name: str, permute_heads: int) -> Any:
    def load() -> np.ndarray:
        w = sf.float32(name)
        return permute_qk(w, permute_heads) if permute_heads else w

    return load
