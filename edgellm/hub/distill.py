# SPDX-License-Identifier: MIT
"""Distil a parent model into a smaller student, or pretrain a Llama from scratch, on the hub.

A student is a smaller Llama-family model that shares its parent's tokenizer. It starts from
the parent's weights -- chosen layers, and where it is narrower the first hidden channels, whole
attention heads (per KV group) and the strongest FFN neurons -- and trains on its corpus to
match the parent's next-token distribution (KL at a temperature) plus the data's own loss.

Usage::

    from edgellm.hub.distill import StudentShape, TrainSettings, distill, pretrain
    r = pretrain("tok/", {"hidden_size": 256, "num_hidden_layers": 4, ...}, train, held,
                 "master/", TrainSettings(steps=2000))
    r = distill("master/", med_train, med_held, "en-medical/", StudentShape(n_layers=2, dim=128),
                TrainSettings(steps=1000))          # teacher=False: the CE-only baseline
    r.history[-1]["heldout_ppl"], r.tokens_per_s      # OUT_DIR also has train.json

Each OUT_DIR is a Hugging Face folder (config.json, model.safetensors, tokenizer files, and
train.json with the run's facts) that `edgellm convert OUT_DIR --out m.gguf` turns into GGUF.
Training checkpoints go to OUT_DIR/checkpoint/ and a rerun resumes from them (same weights as
an uninterrupted run). The engine (loop, checkpoints, atomic writes) is `edgellm.hub.trainer`.

Public API: StudentShape, TrainSettings, TrainResult, student_config, init_student, pretrain,
distill, read_documents.

.. versionadded:: 0.1
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import (
    CorpusError,
    InvalidArgumentError,
    ModelFormatError,
    TokenizerMismatchError,
    UnsupportedError,
)
from .trainer import TrainResult, TrainSettings

__all__ = ["StudentShape", "TrainResult", "TrainSettings", "distill", "init_student", "pretrain",
           "read_documents", "student_config"]

_ARCHS = ("llama", "qwen2")  # model_type values whose tensors init_student knows how to slice
_FFN_MULTIPLE = 32  # a narrowed student's default FFN width is a multiple of this


@dataclass(frozen=True)
class StudentShape:
    """The student's size relative to its parent; every field may only shrink the parent's.

    Give the fields you want (None keeps the parent's, or follows from dim), or `shrink` alone
    to scale layers, KV heads (and with them query heads and dim) and the FFN by one factor.
    The student always keeps the parent's head_dim, RoPE settings and vocabulary.

    .. versionadded:: 0.1
    """

    n_layers: int | None = None  # None: the parent's (or len(layers))
    dim: int | None = None  # hidden size (None: parent's); must be <= parent's
    hidden_dim: int | None = None  # FFN width (None: parent's x dim/parent_dim, multiple of 32)
    n_heads: int | None = None  # None: keep the parent's head_dim => dim // head_dim
    n_kv_heads: int | None = None  # None: keep the parent's query:kv ratio
    shrink: float | None = None  # alternative to the above: scale layers and widths (0 < s <= 1)
    layers: tuple[int, ...] | None = None  # parent layers that initialise the student's


@dataclass(frozen=True)
class _Plan:
    """A validated student shape and which parent parts it keeps."""

    layers: tuple[int, ...]
    dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int


# --------------------------------------------------------------------------------------
# Shapes


def _config_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, Mapping):
        return dict(cfg)
    to_dict = getattr(cfg, "to_dict", None)
    if callable(to_dict):
        d = to_dict()
        if isinstance(d, dict):
            return d
    raise InvalidArgumentError(f"parent_config must be a dict or a transformers config, not "
                               f"{type(cfg).__name__}")


def _pos_int(cfg: Mapping[str, Any], key: str, default: int | None = None) -> int:
    v = cfg.get(key, default)
    if v is None:
        v = default
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ModelFormatError(f"parent config: {key} = {v!r} must be a positive integer")
    return v


def _plan(parent: Mapping[str, Any], shape: StudentShape) -> _Plan:
    if parent.get("model_type") not in _ARCHS:
        raise UnsupportedError(f"parent model_type {parent.get('model_type')!r}: distillation "
                               f"supports {', '.join(_ARCHS)}")
    n_layers_p = _pos_int(parent, "num_hidden_layers")
    dim_p = _pos_int(parent, "hidden_size")
    hidden_p = _pos_int(parent, "intermediate_size")
    heads_p = _pos_int(parent, "num_attention_heads")
    kv_p = _pos_int(parent, "num_key_value_heads", heads_p)
    head_dim = _pos_int(parent, "head_dim", dim_p // heads_p or 1)
    group_p = heads_p // kv_p
    coupled = heads_p * head_dim == dim_p  # dim = n_heads * head_dim (not so in Gemma-like models)

    for name in ("n_layers", "dim", "hidden_dim", "n_heads", "n_kv_heads"):
        v = getattr(shape, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InvalidArgumentError(f"StudentShape.{name} must be a positive integer, got {v!r}")
    if shape.shrink is not None:
        s = shape.shrink
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 < s <= 1:
            raise InvalidArgumentError(f"StudentShape.shrink must be in (0, 1], got {s!r}")
        given = [n for n in ("n_layers", "dim", "hidden_dim", "n_heads", "n_kv_heads")
                 if getattr(shape, n) is not None]
        if given:
            raise InvalidArgumentError(f"StudentShape.shrink replaces {', '.join(given)}: give "
                                       "either shrink or explicit sizes")
        n_layers = max(1, round(n_layers_p * s)) if shape.layers is None else len(shape.layers)
        n_kv = max(1, round(kv_p * s))
        n_heads = n_kv * group_p
        dim = n_heads * head_dim if coupled else max(1, round(dim_p * s))
    else:
        dim = shape.dim or dim_p
        n_layers = shape.n_layers or (len(shape.layers) if shape.layers else n_layers_p)
        if shape.n_heads is not None:
            n_heads = shape.n_heads
        elif coupled:
            if dim % head_dim:
                raise InvalidArgumentError(f"dim {dim} is not a multiple of the parent's head_dim "
                                           f"{head_dim} (whole heads are kept); pick dim = k * "
                                           f"{head_dim}")
            n_heads = dim // head_dim
        else:
            n_heads = max(1, heads_p * dim // dim_p)
        n_kv = shape.n_kv_heads or max(1, n_heads // group_p)

    wider = [f"{what} {mine} > parent's {theirs}" for what, mine, theirs in (
        ("n_layers", n_layers, n_layers_p), ("dim", dim, dim_p), ("n_heads", n_heads, heads_p),
        ("n_kv_heads", n_kv, kv_p)) if mine > theirs]
    if wider:
        raise InvalidArgumentError(f"the student may not be wider or deeper than its parent: "
                                   f"{', '.join(wider)}")
    if dim == dim_p:
        default_hidden = hidden_p
    else:
        m = min(_FFN_MULTIPLE, hidden_p)
        default_hidden = min(hidden_p, max(m, round(hidden_p * dim / dim_p / m) * m))
    hidden = shape.hidden_dim or default_hidden
    if hidden > hidden_p:
        raise InvalidArgumentError(f"the student may not be wider than its parent: hidden_dim "
                                   f"{hidden} > parent's {hidden_p}")
    if coupled and n_heads * head_dim != dim:
        raise InvalidArgumentError(f"n_heads {n_heads} x head_dim {head_dim} (kept from the "
                                   f"parent) must equal dim {dim}")
    if n_heads % n_kv:
        raise InvalidArgumentError(f"n_heads {n_heads} must be a multiple of n_kv_heads {n_kv}")

    if shape.layers is not None:
        layers = tuple(shape.layers)
        if (not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
                or not all(0 <= i < n_layers_p for i in layers)):
            raise InvalidArgumentError(f"StudentShape.layers {layers} must be parent layer "
                                       f"indices in 0..{n_layers_p - 1}")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise InvalidArgumentError(f"StudentShape.layers {layers} must be strictly increasing")
        if len(layers) != n_layers:
            raise InvalidArgumentError(f"StudentShape.layers names {len(layers)} layers, "
                                       f"n_layers is {n_layers}")
    elif n_layers == 1:
        layers = (0,)
    else:  # evenly spaced, first and last included
        layers = tuple(round(i * (n_layers_p - 1) / (n_layers - 1)) for i in range(n_layers))
    return _Plan(layers, dim, hidden, n_heads, n_kv, head_dim)


def student_config(parent_config: Any, shape: StudentShape) -> dict[str, Any]:
    """The student's config kwargs (transformers LlamaConfig / Qwen2Config), validated.

    Args:
        parent_config: the parent's config.json as a dict, or its transformers config.
        shape: the student's size.

    Returns:
        The parent's config with the student's sizes (RoPE, norms, vocabulary unchanged).

    Raises:
        InvalidArgumentError: the student is wider or deeper than the parent in any size, or
            the sizes do not fit together (whole heads, GQA groups, layer indices).
        UnsupportedError: the parent is not a llama or qwen2 model.
    """
    d = _config_dict(parent_config)
    p = _plan(d, shape)
    out = {k: v for k, v in d.items()
           if k not in ("_name_or_path", "transformers_version", "_commit_hash", "torch_dtype")}
    out.update(num_hidden_layers=len(p.layers), hidden_size=p.dim, intermediate_size=p.hidden_dim,
               num_attention_heads=p.n_heads, num_key_value_heads=p.n_kv_heads,
               head_dim=p.head_dim, dtype="float32")
    lt = d.get("layer_types")
    if isinstance(lt, list) and len(lt) == d["num_hidden_layers"]:
        out["layer_types"] = [lt[i] for i in p.layers]
    return out


def _make_config(kwargs: Mapping[str, Any]) -> Any:
    from transformers import AutoConfig

    kw = dict(kwargs)
    model_type = kw.pop("model_type", "llama")
    try:
        return AutoConfig.for_model(model_type, **kw)
    except (TypeError, ValueError, KeyError) as exc:
        raise InvalidArgumentError(f"bad model config: {exc}") from None


def _head_rows(heads: Sequence[int], head_dim: int) -> Any:  # -> [len(heads) * head_dim]
    import torch

    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def init_student(parent: Any, shape: StudentShape) -> Any:
    """A student model (fp32, CPU) initialised from a loaded parent by slicing its weights.

    Keeps the chosen layers; the first `dim` hidden channels (embeddings, norms, every
    projection); the first n_kv_heads KV heads with, per KV group, its first query heads (whole
    heads, so RoPE pairs stay intact); and per layer the FFN neurons with the largest
    |gate| * |up| * |down| norms, in their original order. A student of the parent's full
    shape reproduces the parent exactly.

    Raises:
        InvalidArgumentError, UnsupportedError: as student_config; UnsupportedError also for a
            parent tensor with no slicing rule.
    """
    import torch
    from transformers import AutoModelForCausalLM

    pcfg = _config_dict(parent.config)
    plan = _plan(pcfg, shape)
    cfg = _make_config(student_config(pcfg, shape))
    student = AutoModelForCausalLM.from_config(cfg).float()  # type: ignore[no-untyped-call]
    heads_p = pcfg["num_attention_heads"]
    group_p = heads_p // pcfg.get("num_key_value_heads", heads_p)
    group = plan.n_heads // plan.n_kv_heads
    if group <= group_p:  # each KV head keeps its own query heads
        q_heads = [j * group_p + r for j in range(plan.n_kv_heads) for r in range(group)]
    else:
        q_heads = list(range(plan.n_heads))
    q_rows = _head_rows(q_heads, plan.head_dim)
    kv_rows = _head_rows(range(plan.n_kv_heads), plan.head_dim)
    dims = torch.arange(plan.dim)
    where = {src: dst for dst, src in enumerate(plan.layers)}
    sd = parent.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        t = t.detach().float()
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = t[:, dims]
            continue
        if name == "model.norm.weight":
            out[name] = t[dims]
            continue
        parts = name.split(".")
        if parts[:2] != ["model", "layers"] or len(parts) < 4:
            raise UnsupportedError(f"parent tensor {name!r} has no slicing rule")
        src = int(parts[2])
        if src not in where:
            continue
        rest = ".".join(parts[3:])
        new = f"model.layers.{where[src]}.{rest}"
        if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[new] = t[dims]
        elif rest == "self_attn.q_proj.weight":
            out[new] = t[q_rows][:, dims]
        elif rest == "self_attn.q_proj.bias":
            out[new] = t[q_rows]
        elif rest in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            out[new] = t[kv_rows][:, dims]
        elif rest in ("self_attn.k_proj.bias", "self_attn.v_proj.bias"):
            out[new] = t[kv_rows]
        elif rest == "self_attn.o_proj.weight":
            out[new] = t[dims][:, q_rows]
        elif rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
            keep = _ffn_keep(sd, f"model.layers.{src}.mlp.", plan.hidden_dim)
            out[new] = t[:, dims][keep] if rest != "mlp.down_proj.weight" else t[dims][:, keep]
        else:
            raise UnsupportedError(f"parent tensor {name!r} has no slicing rule")
    missing, unexpected = student.load_state_dict(out, strict=False)
    allowed = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise UnsupportedError(f"student init: missing {sorted(set(missing) - allowed)}, "
                               f"unexpected {sorted(unexpected)}")
    return student


def _ffn_keep(sd: Mapping[str, Any], prefix: str, k: int) -> Any:  # -> [k] sorted indices
    import torch

    gate, up, down = (sd[prefix + n].detach().float() for n in ("gate_proj.weight", "up_proj.weight",
                                                                 "down_proj.weight"))
    if k == gate.shape[0]:
        return torch.arange(k)
    score = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)
    return torch.sort(torch.topk(score, k).indices).values


# --------------------------------------------------------------------------------------
# Loading parents, tokenizers and texts


def _read_config(folder: Path) -> tuple[dict[str, Any], str]:
    """(config.json as a dict, sha256 of its bytes)."""
    from ..formats.hf import _weight_files

    if not folder.is_dir():
        raise InvalidArgumentError(f"parent {folder} is not a folder")
    _weight_files(folder)  # refuses pickle-only folders and missing weights
    path = folder / "config.json"
    try:
        raw = path.read_bytes()
        cfg = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{folder}: no config.json (not a Hugging Face model folder?)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{path}: not a JSON object")
    return cfg, hashlib.sha256(raw).hexdigest()


def _load_parent(folder: Path) -> Any:
    """The parent as a transformers model (fp32, CPU), weights from safetensors only."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..formats.hf import _weight_files

    config = AutoConfig.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_config(config).float()  # type: ignore[no-untyped-call]
    sd: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        sd.update({k: v.float() for k, v in load_file(str(f)).items()})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = [u for u in unexpected if not u.endswith("rotary_emb.inv_freq")]
    if set(missing) - allowed or unexpected:
        raise ModelFormatError(f"{folder}: weights do not match config.json: missing "
                               f"{sorted(set(missing) - allowed)[:6]}, unexpected {unexpected[:6]}")
    return model.eval()


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    if not _has_tokenizer(folder):
        raise ModelFormatError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model)")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{folder}: cannot load the tokenizer: {exc}") from None


def _vocab_sha(tok: Any) -> str:
    items = sorted(tok.get_vocab().items())
    return hashlib.sha256(json.dumps(items).encode("utf-8")).hexdigest()


def _same_vocab(a: Any, a_dir: Path, b: Any, b_dir: Path) -> None:
    va, vb = a.get_vocab(), b.get_vocab()
    if va == vb:
        return
    diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])[:3]
    raise TokenizerMismatchError(f"tokenizers differ: {a_dir} has {len(va)} tokens, {b_dir} has "
                                 f"{len(vb)}; e.g. {diff}. A student must share its parent's "
                                 "tokenizer")


def _check_vocab_fits(tok: Any, vocab_size: int, where: Path) -> None:
    if len(tok) > vocab_size:
        raise TokenizerMismatchError(f"{where}: the tokenizer has {len(tok)} tokens, the model's "
                                     f"embedding only {vocab_size}")


def _check_out(out: Path, *sources: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"output {out} exists and is not a folder")
    for src in sources:
        if out.resolve() == src.resolve():
            raise InvalidArgumentError(f"output {out} is the input folder {src}; pick another")


def read_documents(path: str | os.PathLike[str]) -> list[str]:
    """Documents of a text file: blank-line-separated blocks of UTF-8 text, or JSON lines
    (.jsonl, .jsonl.gz) with a "text" field or "question" and "answer" fields.

    Raises:
        CorpusError: the file is missing, not UTF-8, malformed, or has no text (names the file).
    """
    from . import corpus

    p = Path(path)
    fmt = corpus.detect_format(p)
    template = "{text}"
    if fmt == "jsonl":
        template = _jsonl_template(p)
    spec = corpus.CorpusSpec(name=p.name, path=p, format=fmt, id_fields=(), text=template)
    return [r.text for r in corpus.load_records(spec)]  # raises errors.CorpusError


def _jsonl_template(p: Path) -> str:
    """"{text}" or the question/answer template, from the file's first JSON object."""
    try:
        opener = gzip.open if p.name.lower().endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8", errors="replace") as f:
            first = next((line for line in f if line.strip()), "")
        obj = json.loads(first) if first else {}
    except (OSError, EOFError, json.JSONDecodeError):
        return "{text}"  # load_records reports the problem
    if isinstance(obj, dict) and "text" not in obj and "question" in obj and "answer" in obj:
        return "Question: {question}\nAnswer: {answer}"
    if isinstance(obj, dict) and "text" not in obj:
        raise CorpusError(f"{p}: JSON lines need a \"text\" field or \"question\" and \"answer\" "
                          f"fields; the first line has {', '.join(sorted(obj)) or 'none'}")
    return "{text}"


# --------------------------------------------------------------------------------------
# The two entry points


def _streams(tok: Any, train_texts: Sequence[str], heldout_texts: Sequence[str],
             settings: TrainSettings) -> tuple[Any, Any]:
    from .trainer import encode_documents

    train_ids = encode_documents(tok, train_texts, "training")
    held_ids = encode_documents(tok, heldout_texts, "held-out")
    if len(train_ids) < settings.seq_len + 1:
        raise CorpusError(f"the training text has {len(train_ids)} tokens; seq_len "
                          f"{settings.seq_len} needs at least {settings.seq_len + 1} (add text "
                          "or lower seq_len)")
    if len(held_ids) < 2:
        raise CorpusError("the held-out text has fewer than 2 tokens")
    return train_ids, held_ids


def _config_identity(cfg: Any) -> dict[str, Any]:
    d = _config_dict(cfg)
    d = {k: v for k, v in d.items() if k not in ("transformers_version", "_name_or_path")}
    parsed: dict[str, Any] = json.loads(json.dumps(d, default=str))
    return parsed


def pretrain(tokenizer_dir: str | os.PathLike[str], model_config: Mapping[str, Any],
             train_texts: Sequence[str], heldout_texts: Sequence[str],
             out_dir: str | os.PathLike[str], settings: TrainSettings, *, resume: bool = True,
             progress: bool = True, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train a Llama from random initialisation (seeded) on next-token loss alone.

    Args:
        tokenizer_dir: a folder with tokenizer.json (or tokenizer.model) and tokenizer_config.json.
        model_config: LlamaConfig kwargs (hidden_size, num_hidden_layers, intermediate_size,
            num_attention_heads, ...); vocab_size, bos/eos_token_id default to the tokenizer's.
        train_texts, heldout_texts: documents (strings).
        out_dir: the Hugging Face folder to write (and OUT_DIR/checkpoint/ while training).
        settings: see TrainSettings (temperature and alpha are unused).
        resume: continue from OUT_DIR/checkpoint/ when present (settings must match).
        progress: show the progress bar on stderr.
        on_step: called with the step number after each step (raise to stop; the last
            checkpoint stays).

    Raises:
        CorpusError, TokenizerMismatchError, InvalidArgumentError, CheckpointMismatchError,
        DiskFullError: see the module docs; bad input is refused before OUT_DIR is created.
    """
    import torch
    from transformers import LlamaForCausalLM

    from .trainer import Run, resolve_device, sha256_tokens, train

    settings.validate()
    tdir, out = Path(tokenizer_dir), Path(out_dir)
    _check_out(out, tdir)
    tok = _load_tokenizer(tdir)
    kw = {k: v for k, v in dict(model_config).items() if k != "model_type"}
    kw.setdefault("vocab_size", len(tok))
    for key, tid in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id)):
        kw.setdefault(key, tid)
    config = _make_config({"model_type": "llama", **kw})
    _check_vocab_fits(tok, config.vocab_size, tdir)
    train_ids, held_ids = _streams(tok, train_texts, heldout_texts, settings)
    resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(config).float()  # type: ignore[no-untyped-call]
    identity = {"kind": "pretrain", "config": _config_identity(config),
                "tokenizer_sha256": _vocab_sha(tok), "train_sha256": sha256_tokens(train_ids),
                "heldout_sha256": sha256_tokens(held_ids)}
    facts = {"tokenizer_dir": str(tdir.resolve()), "model_config": _config_identity(config),
             "train_tokens": len(train_ids), "heldout_tokens": len(held_ids),
             "train_documents": len(train_texts), "heldout_documents": len(heldout_texts)}
    return train(Run(kind="pretrain", out_dir=out, student=model, teacher=None,
                     tokenizer_dir=tdir, train_ids=train_ids, heldout_ids=held_ids,
                     settings=settings, identity=identity, facts=facts, resume=resume,
                     progress=progress, on_step=on_step))


def distill(parent_dir: str | os.PathLike[str], train_texts: Sequence[str],
            heldout_texts: Sequence[str], out_dir: str | os.PathLike[str], shape: StudentShape,
            settings: TrainSettings, *, teacher: bool = True, resume: bool = True,
            progress: bool = True, tokenizer_dir: str | os.PathLike[str] | None = None,
            on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Distil the parent at parent_dir into a smaller student written to out_dir.

    Args:
        parent_dir: a Hugging Face folder (config.json, *.safetensors, tokenizer files).
        train_texts, heldout_texts: the student's documents (strings).
        out_dir: the Hugging Face folder to write (and OUT_DIR/checkpoint/ while training).
        shape: the student's size (see StudentShape).
        settings: see TrainSettings.
        teacher: False trains the same student on the data's loss alone (the baseline).
        resume: continue from OUT_DIR/checkpoint/ when present (settings must match).
        progress: show the progress bar on stderr.
        tokenizer_dir: a tokenizer the caller means to use; it must equal the parent's.
        on_step: called with the step number after each step (raise to stop).

    Raises:
        InvalidArgumentError: a student wider or deeper than the parent, bad settings.
        TokenizerMismatchError: tokenizer_dir's vocabulary differs from the parent's, or the
            parent's tokenizer does not fit its embedding.
        CorpusError: empty train or held-out texts, or too few tokens for one window.
        CheckpointMismatchError: OUT_DIR/checkpoint/ was made by another run (resume=True).
        DiskFullError: the disk filled while writing; the previous checkpoint stays valid.
        ModelFormatError, PickleRefusedError, UnsupportedError: the parent folder.
    Bad input is refused before OUT_DIR is created.
    """
    from .trainer import Run, resolve_device, sha256_tokens, train

    settings.validate()
    parent, out = Path(parent_dir), Path(out_dir)
    _check_out(out, parent)
    cfg, cfg_sha = _read_config(parent)
    plan = _plan(cfg, shape)
    s_cfg = student_config(cfg, shape)
    vocab = _pos_int(cfg, "vocab_size")
    given = _load_tokenizer(Path(tokenizer_dir)) if tokenizer_dir is not None else None
    if _has_tokenizer(parent):
        tok, tdir = _load_tokenizer(parent), parent
        if given is not None and tokenizer_dir is not None:
            _same_vocab(tok, parent, given, Path(tokenizer_dir))
    elif given is not None and tokenizer_dir is not None:
        tok, tdir = given, Path(tokenizer_dir)
    else:
        raise ModelFormatError(f"{parent}: no tokenizer (tokenizer.json or tokenizer.model); "
                               "pass tokenizer_dir")
    _check_vocab_fits(tok, vocab, tdir)
    train_ids, held_ids = _streams(tok, train_texts, heldout_texts, settings)
    resolve_device(settings.device)
    parent_model = _load_parent(parent)
    student = init_student(parent_model, shape)
    teacher_params = sum(p.numel() for p in parent_model.parameters())
    identity = {"kind": "distill", "teacher": teacher, "config": _config_identity(s_cfg),
                "layers": list(plan.layers), "parent_config_sha256": cfg_sha,
                "tokenizer_sha256": _vocab_sha(tok), "train_sha256": sha256_tokens(train_ids),
                "heldout_sha256": sha256_tokens(held_ids)}
    facts = {"parent": str(parent.resolve()), "parent_config_sha256": cfg_sha,
             "shape": asdict(shape), "layers": list(plan.layers), "teacher": teacher,
             "student_config": _config_identity(s_cfg), "train_tokens": len(train_ids),
             "heldout_tokens": len(held_ids), "train_documents": len(train_texts),
             "heldout_documents": len(heldout_texts), "tokenizer_dir": str(tdir.resolve())}
    return train(Run(kind="distill", out_dir=out, student=student,
                     teacher=parent_model if teacher else None, tokenizer_dir=tdir,
                     train_ids=train_ids, heldout_ids=held_ids, settings=settings,
                     identity=identity, facts=facts, resume=resume, progress=progress,
                     on_step=on_step, teacher_params=teacher_params if teacher else None))
