# SPDX-License-Identifier: MIT
"""The tree file (TOML): the nodes of a model tree, their corpora, shapes and training settings.

A tree file declares the corpora (each with its fixed held-out split), the nodes (path,
parent, corpora, the master's model shape or a child's student shape, training settings),
the tokenizer every node shares, and the quant types and boards to build. docs/tree.md gives
the format with an example. Loading validates everything and refuses a bad file with a
`TreeFileError` that names the file, the node and the field, and says how to fix it (a cycle,
a missing parent, two roots, an unknown key, a missing corpus, a student wider than its
parent, a non-positive step count).

`TreeSpec.data()` reads the corpora and applies the tree's held-out invariant: every node's
held-out records are collected, and no node trains on a record whose id or exact text is held
out anywhere in the tree.

Usage::

    tree = load_tree("edgellm/demo/tree.toml")      # validated TreeSpec
    for node in tree.order(): print(node.path, node.parent)
    data = tree.data()                                # TreeData: train records, held-out sets
    data.train["en/medical"]; data.heldout_text("cardiology"); data.corpus_hash("en")

.. versionadded:: 0.1
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgeLLMError
from ..formats.bundle import check_node
from .corpus import (
    FORMATS,
    SPLITS,
    CorpusSpec,
    Record,
    corpus_hash,
    detect_format,
    is_heldout,
    load_records,
    text_key,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10: tomli is the same parser
    import tomli as tomllib

__all__ = [
    "FORMAT_VERSION",
    "MODEL_KEYS",
    "SHAPE_KEYS",
    "TRAIN_KEYS",
    "NodeSpec",
    "TreeData",
    "TreeFileError",
    "TreeSpec",
    "checkpoint_hash",
    "count_params",
    "hf_config",
    "load_tree",
    "node_configs",
    "parse_tree",
    "tokenizer_hash",
    "tokenizer_info",
]

FORMAT_VERSION = 1
# The master's shape, in edgellm's dimension vocabulary, and the LlamaConfig kwarg each becomes.
MODEL_KEYS: dict[str, str] = {
    "dim": "hidden_size", "hidden_dim": "intermediate_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
    "seq_len": "max_position_embeddings", "vocab_size": "vocab_size", "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings"}
# A child's student shape: edgellm.hub.distill.StudentShape's fields.
SHAPE_KEYS = ("n_layers", "dim", "hidden_dim", "n_heads", "n_kv_heads", "shrink", "layers")
# Training settings: edgellm.hub.distill.TrainSettings's fields, with their types.
TRAIN_KEYS: dict[str, type | tuple[type, ...]] = {
    "steps": int, "batch_size": int, "seq_len": int, "lr": (int, float), "warmup": int,
    "weight_decay": (int, float), "grad_clip": (int, float), "temperature": (int, float),
    "alpha": (int, float), "eval_every": int, "checkpoint_every": int, "seed": int,
    "device": str, "precision": str, "eval_tokens": int, "log_every": int, "compile": bool}
_POSITIVE_TRAIN = ("steps", "batch_size", "seq_len", "lr", "eval_every", "checkpoint_every",
                   "eval_tokens", "log_every", "temperature")
_NONNEG_TRAIN = ("warmup", "weight_decay", "grad_clip", "seed")
_TOP_KEYS = ("format", "name", "tokenizer", "salt", "fraction", "boards", "quant_types",
             "heldout_sets", "eval", "train", "corpora", "nodes")
_EVAL_KEYS = ("max_tokens", "window", "stride")
_DEFAULT_SEQ_LEN = 256  # TrainSettings.seq_len's default
_CORPUS_KEYS = ("path", "format", "split", "lines", "strip_gutenberg", "id", "text", "heldout",
                "fraction", "salt", "heldout_ids", "match")
_NODE_KEYS = ("parent", "corpora", "model", "student", "train", "teacher", "checkpoint")
_QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_0_mixed")
_WIDTH_KEYS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads")


class TreeFileError(EdgeLLMError, ValueError):
    """A tree file is malformed or inconsistent; the message names the file, node, field and fix."""


@dataclass(frozen=True)
class NodeSpec:
    """One node of the tree file.

    .. versionadded:: 0.1
    """

    path: str  # "en/medical"
    parent: str | None  # None for the root (the master)
    corpora: tuple[str, ...]  # names of [corpora.*] tables it trains on
    model: Mapping[str, Any] | None  # the root: MODEL_KEYS values
    student: Mapping[str, Any] | None  # a child: SHAPE_KEYS values
    train: Mapping[str, Any]  # TrainSettings fields (tree defaults merged in)
    teacher: bool = True  # False: train the child without its parent's logits (a baseline)
    checkpoint: Path | None = None  # a trained HF folder to import instead of training

    @property
    def dashed(self) -> str:
        """The path with "/" as "-" (folder names)."""
        return self.path.replace("/", "-")


@dataclass(frozen=True)
class TreeSpec:
    """A validated tree file.

    - ``load_tree(path)`` reads and validates it;
    - ``order()`` gives the nodes parents first; ``ancestors``/``descendants`` walk it;
    - ``data()`` reads the corpora and applies the held-out invariant;
    - ``config_hash(node)`` fingerprints what a node's training depends on besides its data.

    .. versionadded:: 0.1
    """

    path: Path  # the tree file
    name: str
    tokenizer: Path  # a Hugging Face tokenizer folder (tokenizer.json, ...)
    salt: str
    boards: tuple[str, ...]
    quant_types: tuple[str, ...]
    heldout_sets: tuple[str, ...]
    eval: Mapping[str, int]
    corpora: Mapping[str, CorpusSpec]
    nodes: Mapping[str, NodeSpec]  # in parents-first order

    @property
    def root(self) -> NodeSpec:
        """The node without a parent."""
        return next(n for n in self.nodes.values() if n.parent is None)

    def order(self) -> list[NodeSpec]:
        """The nodes, every parent before its children."""
        return list(self.nodes.values())

    def node(self, path: str) -> NodeSpec:
        """A node by path.

        Raises:
            TreeFileError: no such node (the message lists them).
        """
        if path not in self.nodes:
            raise TreeFileError(f"{self.path}: no node {path!r}; the tree has "
                                f"{', '.join(self.nodes)}")
        return self.nodes[path]

    def ancestors(self, path: str) -> list[str]:
        """The node's parent, its parent's parent, ... up to the root."""
        out = []
        p = self.node(path).parent
        while p is not None:
            out.append(p)
            p = self.nodes[p].parent
        return out

    def descendants(self, path: str) -> list[str]:
        """Every node below path, parents first."""
        self.node(path)
        return [n.path for n in self.order() if path in self.ancestors(n.path)]

    @property
    def eval_window(self) -> int:
        """Text tokens per perplexity window: `eval.window`, else the shortest training
        sequence of the tree minus one (BOS takes a position), capped by the root's context.

        Scoring beyond the positions a model was trained on measures RoPE extrapolation, not
        the model: the demo master scores 35.1 on cardiology with 511-token windows and 9.0
        with 255 (trained at seq_len 256).
        """
        if "window" in self.eval:
            return int(self.eval["window"])
        lens = [int(n.train.get("seq_len", _DEFAULT_SEQ_LEN)) for n in self.order()]
        ctx = (self.root.model or {}).get("seq_len")
        if ctx is not None:
            lens.append(int(ctx))
        return max(min(lens) - 1, 1)

    def config(self, path: str) -> dict[str, Any]:
        """What a node's training depends on besides its data (JSON-ready)."""
        n = self.node(path)
        out: dict[str, Any] = {"kind": "pretrain" if n.parent is None else "distill",
                               "train": {k: v for k, v in sorted(n.train.items())
                                         if k != "device"},
                               "tokenizer_sha256": tokenizer_hash(self.tokenizer)}
        if n.checkpoint is not None:  # an imported checkpoint: its weights are the config
            out["checkpoint_sha256"] = checkpoint_hash(n.checkpoint)
        if n.parent is None:
            out["model"] = dict(sorted((n.model or {}).items()))
        else:
            out["student"] = {k: (list(v) if isinstance(v, tuple) else v)
                              for k, v in sorted((n.student or {}).items())}
            out["teacher"] = n.teacher
        return out

    def config_hash(self, path: str) -> str:
        """sha256 of the canonical JSON of config(path)."""
        blob = json.dumps(self.config(path), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def with_checkpoints(self, folder: str | Path) -> TreeSpec:
        """A copy in which every node with a trained folder ``folder/<node-as-dashes>/``
        (config.json inside; what ``python -m edgellm.demo.train_nodes --out`` writes) imports
        it instead of training."""
        root = Path(folder)
        nodes = {k: (dataclasses.replace(n, checkpoint=(root / n.dashed).resolve())
                     if (root / n.dashed / "config.json").is_file() else n)
                 for k, n in self.nodes.items()}
        return dataclasses.replace(self, nodes=nodes)

    def data(self) -> TreeData:
        """Read every corpus and split it (see TreeData).

        Raises:
            CorpusError: a corpus file is missing, empty, not UTF-8 or malformed.
            TreeFileError: a node trains on nothing after the held-out records are removed,
                or a held-out set is empty.
        """
        return TreeData.load(self)


def checkpoint_hash(folder: Path) -> str:
    """sha256 over a Hugging Face folder's config.json and *.safetensors files (name and bytes)."""
    files = [folder / "config.json"] + sorted(folder.glob("*.safetensors"))
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())
    return _checkpoint_hash(key)


@functools.lru_cache(maxsize=64)
def _checkpoint_hash(key: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in key:
        p = Path(name)
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_hash(folder: Path) -> str:
    """sha256 of a tokenizer folder's tokenizer.json (the vocabulary and merges)."""
    p = folder / "tokenizer.json"
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError as exc:
        raise TreeFileError(f"tokenizer {p} cannot be read ({exc}); train one with "
                            "`python -m edgellm.demo.make_tokenizer` (docs/tree.md) or fix "
                            "`tokenizer` in the tree file") from None


@dataclass
class TreeData:
    """The corpora of a tree, read and split.

    ``records[corpus]`` are a corpus's records and ``corpus_heldout[corpus]`` those its own
    split holds out; ``heldout[set]`` the held-out records of each held-out set (in corpus
    order); ``train[node]`` what the node trains on: its corpora's
    records that are held out nowhere in the tree (not by id, not by exact text), each text
    once. ``excluded[node]`` counts the records dropped because another corpus holds them out.
    """

    tree: TreeSpec
    records: dict[str, list[Record]] = field(default_factory=dict)
    heldout: dict[str, list[Record]] = field(default_factory=dict)
    corpus_heldout: dict[str, list[Record]] = field(default_factory=dict)
    train: dict[str, list[Record]] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    heldout_ids: frozenset[str] = frozenset()
    heldout_texts: frozenset[str] = frozenset()  # text_key of every held-out record

    @classmethod
    def load(cls, tree: TreeSpec) -> TreeData:
        """See TreeSpec.data()."""
        d = cls(tree)
        held_ids: set[str] = set()
        held_texts: set[str] = set()
        own_held: dict[str, set[str]] = {}
        for name, spec in tree.corpora.items():
            recs = load_records(spec)
            d.records[name] = recs
            explicit = frozenset(spec.heldout_ids)
            own_held[name] = {r.id for r in recs
                              if is_heldout(r.id, spec.salt, spec.fraction, explicit)}
            held = [r for r in recs if r.id in own_held[name]]
            d.corpus_heldout[name] = held
            if spec.heldout is not None:
                d.heldout.setdefault(spec.heldout, []).extend(held)
            held_ids.update(r.id for r in held)
            held_texts.update(text_key(r.text) for r in held)
        for s in tree.heldout_sets:
            if not d.heldout.get(s):
                raise TreeFileError(f"{tree.path}: held-out set {s!r} has no record; raise a "
                                    f"`fraction` of a corpus with heldout = {s!r}")
        d.heldout_ids, d.heldout_texts = frozenset(held_ids), frozenset(held_texts)
        for node in tree.order():
            seen: set[str] = set()
            out: list[Record] = []
            dropped = 0
            for name in node.corpora:
                for r in d.records[name]:
                    k = text_key(r.text)
                    if r.id in held_ids or k in held_texts:
                        if r.id not in own_held[name]:
                            dropped += 1
                        continue
                    if k not in seen:
                        seen.add(k)
                        out.append(r)
            if not out:
                raise TreeFileError(f"{tree.path}: node {node.path!r}: nothing to train on "
                                    "after removing held-out records; add a corpus or lower "
                                    "its `fraction`")
            d.train[node.path] = out
            d.excluded[node.path] = dropped
        return d

    def corpus_hash(self, node: str) -> str:
        """sha256 over the ids and texts the node trains on."""
        return corpus_hash(self.train[node])

    def heldout_text(self, name: str) -> str:
        """A held-out set as one text: its records joined by blank lines."""
        return "\n\n".join(r.text for r in self.heldout[name])

    def check_invariant(self) -> list[str]:
        """Every (node, record id) that breaks the held-out invariant (empty when it holds)."""
        bad = []
        for node, recs in self.train.items():
            for r in recs:
                if r.id in self.heldout_ids or text_key(r.text) in self.heldout_texts:
                    bad.append(f"{node}: {r.id}")
        return bad


# --- parameter counts -------------------------------------------------------------------


def hf_config(model: Mapping[str, Any], vocab_size: int, bos_id: int | None,
              eos_id: int | None) -> dict[str, Any]:
    """transformers LlamaConfig kwargs for the root's `model` table."""
    cfg: dict[str, Any] = {"model_type": "llama", "vocab_size": vocab_size,
                           "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
    for k, v in model.items():
        cfg[MODEL_KEYS[k]] = v
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if bos_id is not None:
        cfg["bos_token_id"] = bos_id
    if eos_id is not None:
        cfg["eos_token_id"] = eos_id
    return cfg


def node_configs(tree: TreeSpec) -> dict[str, dict[str, Any]]:
    """Each node's LlamaConfig kwargs (children through distill.student_config), with the
    vocabulary, BOS and EOS of the tree's tokenizer."""
    from .distill import StudentShape, student_config

    vocab, bos, eos = tokenizer_info(tree.tokenizer)
    cfgs: dict[str, dict[str, Any]] = {}
    for n in tree.order():
        if n.parent is None:
            cfgs[n.path] = hf_config(n.model or {}, vocab, bos, eos)
        else:
            cfgs[n.path] = student_config(cfgs[n.parent], StudentShape(**(n.student or {})))
    return cfgs


def tokenizer_info(folder: Path) -> tuple[int, int | None, int | None]:
    """(vocabulary size, BOS id, EOS id) of a tokenizer folder, read from its JSON files."""
    p = folder / "tokenizer.json"
    try:
        tj = json.loads(p.read_text(encoding="utf-8"))
        tc_path = folder / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise TreeFileError(f"tokenizer {p} cannot be read ({exc})") from None
    ids = dict(tj.get("model", {}).get("vocab", {}))
    ids.update({a["content"]: a["id"] for a in tj.get("added_tokens", [])})

    def special(kind: str) -> int | None:
        v = tc.get(f"{kind}_token")
        v = v.get("content") if isinstance(v, dict) else v
        return ids.get(v) if isinstance(v, str) else None

    return max(ids.values()) + 1, special("bos"), special("eos")


def count_params(cfg: Mapping[str, Any]) -> int:
    """Parameters of a Llama model from its LlamaConfig kwargs (embeddings counted once if tied)."""
    d, v = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    nh = int(cfg["num_attention_heads"])
    nkv = int(cfg.get("num_key_value_heads") or nh)
    hd = int(cfg.get("head_dim") or d // nh)
    ff, nl = int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
    per_layer = d * nh * hd * 2 + 2 * d * nkv * hd + 3 * d * ff + 2 * d
    emb = v * d * (1 if cfg.get("tie_word_embeddings", True) else 2)
    return emb + nl * per_layer + d


# --- loading and validation -------------------------------------------------------------


def load_tree(path: str | Path) -> TreeSpec:
    """Read and validate a tree file.

    Raises:
        TreeFileError: unreadable or invalid TOML, or any validation failure (the message
            names the file, the node, the field and the fix).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TreeFileError(f"{p}: cannot read the tree file ({exc})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TreeFileError(f"{p}: not valid TOML ({exc})") from None
    return parse_tree(raw, p)


def _unknown(keys: Sequence[str], allowed: Sequence[str], where: str) -> None:
    for k in keys:
        if k not in allowed:
            close = difflib.get_close_matches(k, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TreeFileError(f"{where}: unknown key {k!r}; {hint}allowed: {', '.join(allowed)}")


def _table(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise TreeFileError(f"{where}: must be a table, got {type(v).__name__}")
    return v


def _typed(v: Any, t: type | tuple[type, ...], where: str) -> Any:
    ok = isinstance(v, t) and not (isinstance(v, bool) and bool not in _tuple(t))
    if not ok:
        names = " or ".join(x.__name__ for x in _tuple(t))
        raise TreeFileError(f"{where}: must be {names}, got {v!r}")
    return v


def _tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _str_list(v: Any, where: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TreeFileError(f"{where}: must be a list of strings, got {v!r}")
    return tuple(v)


def _train(raw: Any, where: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    t = _table(raw, where)
    _unknown(list(t), list(TRAIN_KEYS), where)
    out = dict(defaults)
    for k, v in t.items():
        out[k] = _typed(v, TRAIN_KEYS[k], f"{where}.{k}")
    for k in _POSITIVE_TRAIN:
        if k in out and out[k] <= 0:
            raise TreeFileError(f"{where}.{k}: must be > 0, got {out[k]!r}; set a positive value")
    for k in _NONNEG_TRAIN:
        if k in out and out[k] < 0:
            raise TreeFileError(f"{where}.{k}: must be >= 0, got {out[k]!r}")
    if "alpha" in out and not 0 <= out["alpha"] <= 1:
        raise TreeFileError(f"{where}.alpha: must be in [0, 1], got {out['alpha']!r}")
    return out


def _positive_int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise TreeFileError(f"{where}: must be an integer >= 1, got {v!r}")
    return v


def _corpus(name: str, raw: Any, src: Path, salt: str, fraction: float) -> CorpusSpec:
    where = f"{src}: corpus {name!r}"
    t = _table(raw, where)
    _unknown(list(t), _CORPUS_KEYS, where)
    if "path" not in t:
        raise TreeFileError(f"{where}: missing `path` (the corpus file, relative to the tree file)")
    path = (src.parent / _typed(t["path"], str, f"{where}.path")).resolve()
    if not path.is_file():
        raise TreeFileError(f"{where}.path: {path} does not exist; fix the path (relative to "
                            f"{src.parent})")
    fmt = _typed(t.get("format", detect_format(path)), str, f"{where}.format")
    if fmt not in FORMATS:
        raise TreeFileError(f"{where}.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    split = _typed(t.get("split", "blank"), str, f"{where}.split")
    if split not in SPLITS:
        raise TreeFileError(f"{where}.split: {split!r} is not one of {', '.join(SPLITS)}")
    fr = _typed(t.get("fraction", fraction if "heldout" in t else 0.0), (int, float),
                f"{where}.fraction")
    if not 0 <= fr < 1:
        raise TreeFileError(f"{where}.fraction: must be in [0, 1), got {fr!r}")
    held = t.get("heldout")
    if held is not None:
        _typed(held, str, f"{where}.heldout")
    ids = t.get("id", ["id"])
    id_fields = (ids,) if isinstance(ids, str) else _str_list(ids, f"{where}.id")
    match = []
    for field_name, pattern in _table(t.get("match", {}), f"{where}.match").items():
        _typed(pattern, str, f"{where}.match.{field_name}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise TreeFileError(f"{where}.match.{field_name}: bad regular expression ({exc})") from None
        match.append((field_name, pattern))
    return CorpusSpec(
        name=name, path=path, format=fmt, split=split,
        lines=_positive_int(t.get("lines", 40), f"{where}.lines"),
        strip_gutenberg=_typed(t.get("strip_gutenberg", False), bool, f"{where}.strip_gutenberg"),
        id_fields=id_fields, text=_typed(t.get("text", "{text}"), str, f"{where}.text"),
        heldout=held, fraction=float(fr),
        salt=_typed(t.get("salt", salt), str, f"{where}.salt"),
        heldout_ids=_str_list(t.get("heldout_ids", []), f"{where}.heldout_ids"),
        match=tuple(match))


def _model(raw: Any, where: str) -> dict[str, Any]:
    t = _table(raw, where)
    _unknown(list(t), list(MODEL_KEYS), where)
    for k in ("dim", "hidden_dim", "n_layers", "n_heads"):
        if k not in t:
            raise TreeFileError(f"{where}: missing {k!r} (the root needs dim, hidden_dim, "
                                "n_layers and n_heads)")
    for k, v in t.items():
        if k in ("rope_theta", "norm_eps"):
            if _typed(v, (int, float), f"{where}.{k}") <= 0:
                raise TreeFileError(f"{where}.{k}: must be > 0")
        elif k == "tie_embeddings":
            _typed(v, bool, f"{where}.{k}")
        else:
            _positive_int(v, f"{where}.{k}")
    _check_heads(t, where)
    return dict(t)


def _student(raw: Any, where: str) -> dict[str, Any]:
    t = _table(raw, where)
    _unknown(list(t), SHAPE_KEYS, where)
    out: dict[str, Any] = {}
    for k, v in t.items():
        if k == "shrink":
            if not 0 < _typed(v, (int, float), f"{where}.shrink") <= 1:
                raise TreeFileError(f"{where}.shrink: must be in (0, 1], got {v!r}")
            out[k] = float(v)
        elif k == "layers":
            out[k] = tuple(_typed(x, int, f"{where}.layers") for x in _list(v, f"{where}.layers"))
            if not out[k] or len(set(out[k])) != len(out[k]) or min(out[k]) < 0:
                raise TreeFileError(f"{where}.layers: must be distinct parent layer indices "
                                    f">= 0, got {v!r}")
        else:
            out[k] = _positive_int(v, f"{where}.{k}")
    if "layers" in out and "n_layers" in out and out["n_layers"] != len(out["layers"]):
        raise TreeFileError(f"{where}: n_layers {out['n_layers']} differs from the "
                            f"{len(out['layers'])} layers listed; drop one of them")
    _check_heads(out, where)
    return out


def _list(v: Any, where: str) -> list[Any]:
    if not isinstance(v, list):
        raise TreeFileError(f"{where}: must be a list, got {v!r}")
    return v


def _check_heads(t: Mapping[str, Any], where: str) -> None:
    if "dim" in t and "n_heads" in t and t["dim"] % t["n_heads"]:
        raise TreeFileError(f"{where}: dim {t['dim']} is not a multiple of n_heads "
                            f"{t['n_heads']}; pick n_heads dividing dim")
    if "n_heads" in t and "n_kv_heads" in t and t["n_heads"] % t["n_kv_heads"]:
        raise TreeFileError(f"{where}: n_heads {t['n_heads']} is not a multiple of n_kv_heads "
                            f"{t['n_kv_heads']}")


def parse_tree(raw: Mapping[str, Any], src: Path) -> TreeSpec:
    """Validate a parsed tree file (see load_tree); src names it in errors and anchors paths."""
    where = str(src)
    _unknown(list(raw), _TOP_KEYS, where)
    fmt = raw.get("format", FORMAT_VERSION)
    if fmt != FORMAT_VERSION:
        raise TreeFileError(f"{where}: format {fmt!r} is not {FORMAT_VERSION}, the one this "
                            "edgellm reads")
    name = _typed(raw.get("name", src.stem), str, f"{where}: name")
    if "tokenizer" not in raw:
        raise TreeFileError(f"{where}: missing `tokenizer` (a Hugging Face tokenizer folder "
                            "every node shares, relative to the tree file)")
    # The folder may not exist yet: the demo's tokenizer is trained from this tree's records.
    tok = (src.parent / _typed(raw["tokenizer"], str, f"{where}: tokenizer")).resolve()
    salt = _typed(raw.get("salt", name), str, f"{where}: salt")
    fraction = _typed(raw.get("fraction", 0.05), (int, float), f"{where}: fraction")
    boards = _str_list(raw.get("boards", ["x86-host"]), f"{where}: boards")
    quants = _str_list(raw.get("quant_types", ["f16", "q8_0", "q4_0", "q4_0_mixed"]),
                       f"{where}: quant_types")
    for q in quants:
        if q not in _QUANTS:
            raise TreeFileError(f"{where}: quant_types: {q!r} is not one of {', '.join(_QUANTS)}")
    if not boards or not quants:
        raise TreeFileError(f"{where}: boards and quant_types must not be empty")
    ev = _table(raw.get("eval", {}), f"{where}: eval")
    _unknown(list(ev), _EVAL_KEYS, f"{where}: eval")
    evals = {k: _positive_int(v, f"{where}: eval.{k}") for k, v in ev.items()}
    defaults = _train(raw.get("train", {}), f"{where}: train", {})

    corpora: dict[str, CorpusSpec] = {}
    for cname, craw in _table(raw.get("corpora", {}), f"{where}: corpora").items():
        corpora[cname] = _corpus(cname, craw, src, salt, float(fraction))
    named = []
    for c in corpora.values():
        if c.heldout is not None and c.heldout not in named:
            named.append(c.heldout)
    sets = _str_list(raw.get("heldout_sets", named), f"{where}: heldout_sets")
    for s in sets:
        if s not in named:
            raise TreeFileError(f"{where}: heldout_sets: no corpus has heldout = {s!r}")

    nodes_raw = _table(raw.get("nodes", {}), f"{where}: nodes")
    if not nodes_raw:
        raise TreeFileError(f"{where}: no [nodes.*] table; declare at least the root")
    nodes: dict[str, NodeSpec] = {}
    for path, nraw in nodes_raw.items():
        nw = f"{where}: node {path!r}"
        try:
            check_node(path)
        except EdgeLLMError as exc:
            raise TreeFileError(f"{nw}: {exc}") from None
        t = _table(nraw, nw)
        _unknown(list(t), _NODE_KEYS, nw)
        parent = t.get("parent")
        if parent is not None:
            _typed(parent, str, f"{nw}: parent")
        cs = _str_list(t.get("corpora", []), f"{nw}: corpora")
        if not cs:
            raise TreeFileError(f"{nw}: corpora: list at least one corpus it trains on")
        for cn in cs:
            if cn not in corpora:
                raise TreeFileError(f"{nw}: corpora: no corpus {cn!r}; declare [corpora.{cn}] "
                                    f"or use one of {', '.join(corpora) or 'none declared'}")
        if parent is None:
            if "student" in t:
                raise TreeFileError(f"{nw}: the root has no parent, so no `student`; give its "
                                    "shape as `model`")
            if "model" not in t:
                raise TreeFileError(f"{nw}: the root needs a `model` table (dim, hidden_dim, "
                                    "n_layers, n_heads, ...)")
            model, student = _model(t["model"], f"{nw}: model"), None
        else:
            if "model" in t:
                raise TreeFileError(f"{nw}: a child's shape is `student` (it is distilled "
                                    "from its parent), not `model`")
            model, student = None, _student(t.get("student", {}), f"{nw}: student")
        train = _train(t.get("train", {}), f"{nw}: train", defaults)
        teacher = _typed(t.get("teacher", True), bool, f"{nw}: teacher")
        ckpt = None
        if "checkpoint" in t:
            ckpt = (src.parent / _typed(t["checkpoint"], str, f"{nw}: checkpoint")).resolve()
            if not (ckpt / "config.json").is_file():
                raise TreeFileError(f"{nw}: checkpoint: {ckpt} is not a Hugging Face folder "
                                    "(no config.json); fix the path or drop `checkpoint` to "
                                    "train the node")
        nodes[path] = NodeSpec(path, parent, cs, model, student, train, teacher, ckpt)

    ordered = _order(nodes, where)
    _check_widths(ordered, where)
    _check_exact(ordered, where)
    return TreeSpec(path=src, name=name, tokenizer=tok, salt=salt, boards=boards,
                    quant_types=quants, heldout_sets=sets, eval=evals, corpora=corpora,
                    nodes={n.path: n for n in ordered})


def _order(nodes: Mapping[str, NodeSpec], where: str) -> list[NodeSpec]:
    """The nodes parents first; refuses a missing parent, a cycle or other than one root."""
    for n in nodes.values():
        if n.parent is not None and n.parent not in nodes:
            close = difflib.get_close_matches(n.parent, list(nodes), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TreeFileError(f"{where}: node {n.path!r}: parent {n.parent!r} is not a node "
                                f"of the tree{hint}; declare [nodes.\"{n.parent}\"] or fix "
                                "`parent`")
    for n in nodes.values():
        seen = [n.path]
        p = n.parent
        while p is not None:
            if p in seen:
                cycle = " -> ".join(seen[seen.index(p):] + [p])
                raise TreeFileError(f"{where}: node {n.path!r}: parent links form a cycle "
                                    f"({cycle}); one node must be the root (no `parent`)")
            seen.append(p)
            p = nodes[p].parent
    roots = [n.path for n in nodes.values() if n.parent is None]
    if len(roots) != 1:
        raise TreeFileError(f"{where}: a tree has one root (a node without `parent`), this has "
                            f"{len(roots)}: {', '.join(roots) or 'none'}; give the others a "
                            "parent")
    out: list[NodeSpec] = []
    done: set[str] = set()

    def visit(path: str) -> None:
        out.append(nodes[path])
        done.add(path)
        for c in nodes.values():
            if c.parent == path and c.path not in done:
                visit(c.path)

    visit(roots[0])
    return out


def _check_widths(ordered: Sequence[NodeSpec], where: str) -> None:
    """Refuse a student wider (or deeper) than its parent where both shapes are explicit."""
    known: dict[str, dict[str, int]] = {}
    for n in ordered:
        if n.parent is None:
            m = dict(n.model or {})
            m.setdefault("n_kv_heads", m["n_heads"])
            known[n.path] = {k: m[k] for k in _WIDTH_KEYS}
            continue
        par = known[n.parent]
        s = dict(n.student or {})
        if "layers" in s:
            s.setdefault("n_layers", len(s["layers"]))
            if "n_layers" in par and max(s["layers"]) >= par["n_layers"]:
                raise TreeFileError(f"{where}: node {n.path!r}: student.layers: index "
                                    f"{max(s['layers'])} is past the parent's "
                                    f"{par['n_layers']} layers (indices 0..{par['n_layers'] - 1})")
        mine: dict[str, int] = {}
        for k in _WIDTH_KEYS:
            if k in s:
                if k in par and s[k] > par[k]:
                    raise TreeFileError(
                        f"{where}: node {n.path!r}: student.{k} = {s[k]} is wider than its "
                        f"parent {n.parent!r} ({k} = {par[k]}); a student is initialised from "
                        f"its parent's weights, so use {k} <= {par[k]}")
                mine[k] = s[k]
            elif k in par and "shrink" not in s and k in ("dim", "n_layers"):
                mine[k] = par[k]
        if "n_heads" not in mine and "dim" in mine and "dim" in par and "n_heads" in par:
            mine["n_heads"] = mine["dim"] // max(par["dim"] // par["n_heads"], 1)  # same head_dim
        known[n.path] = mine


def _check_exact(ordered: Sequence[NodeSpec], where: str) -> None:
    """Every student shape through distill.student_config, the rules training applies (whole
    heads of the parent's head_dim, GQA groups, layer indices); skipped without the hub extra."""
    try:
        from .distill import StudentShape, TrainSettings, student_config
    except ImportError:  # pragma: no cover - a device install has no torch
        return
    cfgs: dict[str, dict[str, Any]] = {}
    for n in ordered:
        try:
            TrainSettings(**n.train).validate()
        except EdgeLLMError as exc:
            raise TreeFileError(f"{where}: node {n.path!r}: train: {exc}") from None
        if n.parent is None:
            cfgs[n.path] = hf_config(n.model or {}, 256, None, None)
            continue
        try:
            cfgs[n.path] = student_config(cfgs[n.parent], StudentShape(**(n.student or {})))
        except EdgeLLMError as exc:
            raise TreeFileError(f"{where}: node {n.path!r}: student: {exc} (parent "
                                f"{n.parent!r}); fix `student`") from None

