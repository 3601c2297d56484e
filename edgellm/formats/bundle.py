# SPDX-License-Identifier: MIT
"""Board bundles: a folder holding model.gguf and bundle.json, a manifest that says what it is.

A bundle is ``<out>/<node-as-dashes>-<board>-<recipe>/`` (``en-medical-rpi5-q4_0_mixed``)
with ``model.gguf`` and ``bundle.json``. The manifest (JSON, ``"schema": 1``) records the
files with their sha256 and size, the board and the ISA features it needs, the runtime
version, the quant recipe, the source and its hashes, the node path, version and lineage, the
model's config, its weight bytes and its evaluation scores. No timestamps: the same build
gives the same manifest.

Usage:

    s = ModelSummary.from_config(cfg, n_params)     # a runtime ModelConfig's dimensions
    b = write_manifest(folder, board="rpi5", config=s, ...)  # hashes files, writes bundle.json
    b = read_manifest(folder)                         # validated; typed errors
    b.verify()                                        # sha256 and size of every file
    for b in list_bundles("bundles"): print(b.node, b.board, b.model_size)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..errors import EdgeLLMError, InvalidArgumentError

if TYPE_CHECKING:
    from ..runtime.config import ModelConfig

SCHEMA = 1
MANIFEST_NAME = "bundle.json"
MODEL_NAME = "model.gguf"
DEFAULT_NODE = "master"
# A node path: "/"-separated segments of letters, digits, "_", "." and "-" (not "." or "..").
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # board ids, recipe names, file names
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 1 << 20  # read 1 MiB at a time when hashing


class BundleError(EdgeLLMError, ValueError):
    """A bundle folder or manifest is missing, malformed or inconsistent."""


class BundleSchemaError(BundleError):
    """A manifest of a schema version this edgellm does not read."""


class BundleIntegrityError(BundleError):
    """A bundle's file is missing, or its size or sha256 differs from the manifest's."""


# --- names ------------------------------------------------------------------------------


def check_node(node: str) -> str:
    """node, if it is a valid node path ("en/medical/cardiology").

    Raises:
        InvalidArgumentError: an empty path or a bad segment.
    """
    if not isinstance(node, str) or not node:
        raise InvalidArgumentError("a node path must be a non-empty string like 'en/medical'")
    for seg in node.split("/"):
        if not _SEGMENT_RE.match(seg):
            raise InvalidArgumentError(
                f"bad node path {node!r}: segments are letters, digits, '_', '.', '-' "
                "(e.g. 'en/medical/cardiology')")
    return node


def parse_parent(text: str) -> tuple[str, int | None]:
    """A --parent value "PATH@V" (or "PATH") as (node, version or None).

    Raises:
        InvalidArgumentError: a bad node path, or a version that is not a positive integer.
    """
    node, sep, ver = text.partition("@")
    check_node(node)
    if not sep:
        return node, None
    if not ver.isdigit() or int(ver) < 1:
        raise InvalidArgumentError(f"bad parent {text!r}: the version after '@' must be an "
                                   "integer >= 1 (e.g. 'en/medical@2')")
    return node, int(ver)


def bundle_dirname(node: str, board: str, recipe: str) -> str:
    """The folder name of a bundle: "<node-as-dashes>-<board>-<recipe>"."""
    check_node(node)
    for what, v in (("board", board), ("recipe", recipe)):
        if not _NAME_RE.match(v):
            raise InvalidArgumentError(f"bad {what} name {v!r}")
    return f"{node.replace('/', '-')}-{board}-{recipe}"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --- the manifest's parts ----------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file of a bundle (or of a source), by name relative to its folder."""

    name: str
    sha256: str
    size: int

    @classmethod
    def of(cls, path: str | os.PathLike[str], name: str | None = None) -> FileEntry:
        """The entry of an existing file (hashing it)."""
        p = Path(path)
        return cls(name or p.name, sha256_file(p), p.stat().st_size)


@dataclass(frozen=True)
class SourceInfo:
    """What a bundle was built from: the importer kind, the path given and the files' hashes."""

    kind: str  # "hf", "llama2c" or "gguf"
    name: str  # the source's file or folder name
    path: str  # the path the build was given, resolved
    files: tuple[FileEntry, ...]


@dataclass(frozen=True)
class Lineage:
    """Where a node came from: its parent node and the parent's version, when known."""

    parent: str | None = None
    parent_version: int | None = None


@dataclass(frozen=True)
class ModelSummary:
    """The model's dimensions (the shared dimension vocabulary) and parameter count."""

    arch: str
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    seq_len: int
    n_params: int

    @classmethod
    def from_config(cls, cfg: ModelConfig, n_params: int) -> ModelSummary:
        """The summary of a model read with ModelConfig.from_metadata, of n_params parameters."""
        return cls(arch=cfg.arch, dim=cfg.dim, hidden_dim=cfg.hidden_dim, n_layers=cfg.n_layers,
                   n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                   vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, n_params=n_params)

    def kv_cache_bytes(self, n_ctx: int, elem_bytes: int) -> int:
        """Bytes of a K and V cache of n_ctx positions, elem_bytes per value (4 f32, 2 f16)."""
        return 2 * self.n_layers * n_ctx * self.n_kv_heads * self.head_dim * elem_bytes


@dataclass(frozen=True)
class EvalScore:
    """One held-out text's perplexity under a named protocol."""

    ppl: float
    nll: float  # mean NLL per scored token, nats
    n_scored: int
    window: int
    stride: int
    protocol: str
    text_sha256: str  # of the text's UTF-8 bytes: which text, exactly
    kernels: str = ""  # the kernel table that ran it ("avx2", "neon_dotprod"): logits vary by ISA


@dataclass(frozen=True)
class Bundle:
    """A bundle's manifest, read and validated, and the folder it describes.

    - ``b.model_path`` / ``b.model_size``: the GGUF file and its size in bytes.
    - ``b.verify()`` checks every file's size and sha256 against the manifest.
    - ``b.to_dict()`` is the manifest's JSON object.

    .. versionadded:: 0.1
    """

    folder: Path
    files: tuple[FileEntry, ...]
    board: str
    isa_features: tuple[str, ...]
    runtime_version: str
    recipe: str
    source: SourceInfo
    node: str
    version: int
    lineage: Lineage
    config: ModelSummary
    weights_bytes: int
    scores: Mapping[str, EvalScore] = field(default_factory=dict)
    created_by: str = f"edgellm {__version__}"
    schema: int = SCHEMA
    # Non-native boards only (absent for native builds): {"name": "tflite", "file": ...,
    # "signatures": ...} as edgellm.tflite.export.TFLiteExport.manifest() writes it.
    backend: Mapping[str, Any] = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_NAME

    @property
    def model_size(self) -> int:
        """Bytes of model.gguf, as the manifest records them."""
        return self.file(MODEL_NAME).size

    def file(self, name: str) -> FileEntry:
        """The manifest entry of one file.

        Raises:
            BundleError: the manifest lists no such file.
        """
        for f in self.files:
            if f.name == name:
                return f
        raise BundleError(f"{self.folder}: the manifest lists no file {name!r}")

    def verify(self) -> Bundle:
        """Check that every listed file exists with the recorded size and sha256.

        Returns:
            self, for chaining.

        Raises:
            BundleIntegrityError: a file is missing, or its size or sha256 differs.
        """
        for f in self.files:
            p = self.folder / f.name
            if not p.is_file():
                raise BundleIntegrityError(f"{self.folder}: {f.name} is missing")
            size = p.stat().st_size
            if size != f.size:
                raise BundleIntegrityError(
                    f"{p}: size {size} bytes, but the manifest says {f.size}: the file was "
                    "changed or truncated after the build")
            digest = sha256_file(p)
            if digest != f.sha256:
                raise BundleIntegrityError(
                    f"{p}: sha256 {digest[:16]}..., but the manifest says {f.sha256[:16]}...: "
                    "the file was changed after the build")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The manifest as a JSON-ready dict (the folder is not part of it)."""
        d = dataclasses.asdict(self)
        del d["folder"]
        d["scores"] = {k: dataclasses.asdict(v) for k, v in sorted(self.scores.items())}
        if not d["backend"]:
            del d["backend"]  # native bundles keep the manifest they always had
        plain: dict[str, Any] = json.loads(json.dumps(d))  # tuples -> lists, as JSON reads back
        return plain


# --- writing and reading -------------------------------------------------------------------


def write_manifest(folder: str | os.PathLike[str], *, board: str, isa_features: Sequence[str],
                   recipe: str, source: SourceInfo, node: str, config: ModelSummary,
                   weights_bytes: int, version: int = 1, lineage: Lineage | None = None,
                   scores: Mapping[str, EvalScore] | None = None,
                   files: Iterable[str] = (MODEL_NAME,),
                   runtime_version: str = __version__,
                   created_by: str = f"edgellm {__version__}",
                   backend: Mapping[str, Any] | None = None) -> Bundle:
    """Hash the bundle's files and write bundle.json atomically (sorted keys, no timestamps).

    Args:
        folder: the bundle folder, holding the files already.
        board: the board id ("rpi5").
        isa_features: the ISA features the board profile requires.
        recipe: the quant recipe name.
        source: what the model was built from.
        node: the node path ("en/medical/cardiology").
        config: the model's dimensions.
        weights_bytes: bytes of the model's tensors.
        version: the node's version (>= 1).
        lineage: parent node and version.
        scores: text name -> evaluation score.
        files: file names in folder to list (model.gguf must be one).
        runtime_version, created_by: what made it.
        backend: a non-native board's runtime facts (tflite: file, signatures, shapes).

    Returns:
        The Bundle, as read_manifest would return it.

    Raises:
        BundleError: a listed file is missing, or a field is invalid.
    """
    root = Path(folder)
    names = list(files)
    if MODEL_NAME not in names:
        raise BundleError(f"a bundle must list {MODEL_NAME}")
    entries = []
    for name in names:
        p = root / name
        if not p.is_file():
            raise BundleError(f"{root}: cannot list {name}: no such file")
        entries.append(FileEntry.of(p, name))
    bundle = Bundle(folder=root, files=tuple(entries), board=board,
                    isa_features=tuple(isa_features), runtime_version=runtime_version,
                    recipe=recipe, source=source, node=node, version=version,
                    lineage=lineage or Lineage(), config=config, weights_bytes=weights_bytes,
                    scores=dict(scores or {}), created_by=created_by,
                    backend=dict(backend or {}))
    data = bundle.to_dict()
    checked = _from_dict(data, root)  # what we write must read back: one validator for both
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_NAME}.", suffix=".tmp", dir=root)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / MANIFEST_NAME)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return checked


def read_manifest(folder: str | os.PathLike[str]) -> Bundle:
    """Read and validate a bundle's manifest (it does not hash the files: see Bundle.verify).

    Raises:
        BundleError: no manifest, invalid JSON, a missing field or a field of the wrong type.
        BundleSchemaError: a schema version other than 1.
    """
    root = Path(folder)
    path = root / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(f"{root} is not a bundle: it has no {MANIFEST_NAME}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot read it: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON: {exc}") from None
    return _from_dict(data, root)


def list_bundles(folder: str | os.PathLike[str], *, skip_invalid: bool = False) -> list[Bundle]:
    """The bundles in the immediate subfolders of folder, sorted by node, board, recipe.

    Args:
        folder: a build output folder (``edgellm build --out``).
        skip_invalid: leave out subfolders whose manifest is invalid instead of raising.

    Raises:
        BundleError: a subfolder's manifest is invalid (unless skip_invalid).
        InvalidArgumentError: folder is not a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InvalidArgumentError(f"{root} is not a folder")
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if not (sub / MANIFEST_NAME).is_file():
            continue
        try:
            out.append(read_manifest(sub))
        except BundleError:
            if not skip_invalid:
                raise
    out.sort(key=lambda b: (b.node, b.board, b.recipe, b.version))
    return out


# --- validation --------------------------------------------------------------------------


class _Fields:
    """Typed access to one JSON object of the manifest; failures name the field's path."""

    def __init__(self, data: Any, where: str, path: Path) -> None:
        if not isinstance(data, dict):
            raise BundleError(f"{path}: {where or 'the manifest'} must be a JSON object")
        self.data, self.where, self.path = data, where, path

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, types: type | tuple[type, ...], *, optional: bool = False) -> Any:
        if key not in self.data:
            if optional:
                return None
            raise BundleError(f"{self.path}: missing field {self._name(key)!r}")
        v = self.data[key]
        if v is None and optional:
            return None
        # bool is an int in Python, never a valid count or version here
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in _tuple(types)):
            raise BundleError(f"{self.path}: field {self._name(key)!r} has the wrong type "
                              f"({type(v).__name__})")
        return v

    def count(self, key: str, minimum: int = 0, *, optional: bool = False) -> Any:
        v = self.get(key, int, optional=optional)
        if v is not None and v < minimum:
            raise BundleError(f"{self.path}: field {self._name(key)!r} must be >= {minimum}")
        return v

    def obj(self, key: str) -> _Fields:
        return _Fields(self.get(key, dict), self._name(key), self.path)


def _tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _files(items: Any, where: str, path: Path) -> tuple[FileEntry, ...]:
    if not isinstance(items, list):
        raise BundleError(f"{path}: field {where!r} must be a list")
    out: list[FileEntry] = []
    for i, item in enumerate(items):
        f = _Fields(item, f"{where}[{i}]", path)
        name, sha, size = f.get("name", str), f.get("sha256", str), f.count("size")
        if not _SHA256_RE.match(sha):
            raise BundleError(f"{path}: {where}[{i}].sha256 is not a hex sha256")
        if not name or "/" in name or name in (".", ".."):
            raise BundleError(f"{path}: {where}[{i}].name {name!r} is not a plain file name")
        if name in {f.name for f in out}:
            raise BundleError(f"{path}: {where} lists {name!r} twice")
        out.append(FileEntry(name, sha, size))
    return tuple(out)


def _from_dict(data: Any, root: Path) -> Bundle:
    path = root / MANIFEST_NAME
    top = _Fields(data, "", path)
    schema = top.get("schema", int)
    if schema != SCHEMA:
        raise BundleSchemaError(f"{path}: manifest schema {schema}; this edgellm reads schema "
                                f"{SCHEMA} (upgrade edgellm for newer bundles)")
    files = _files(top.get("files", list), "files", path)
    if MODEL_NAME not in {f.name for f in files}:
        raise BundleError(f"{path}: 'files' does not list {MODEL_NAME}")
    isa = top.get("isa_features", list)
    if not all(isinstance(x, str) for x in isa):
        raise BundleError(f"{path}: field 'isa_features' must be a list of strings")
    src = top.obj("source")
    source = SourceInfo(src.get("kind", str), src.get("name", str), src.get("path", str),
                        _files(src.get("files", list), "source.files", path))
    lin = top.obj("lineage")
    parent = lin.get("parent", str, optional=True)
    if parent is not None:
        _checked(check_node, parent, path, "lineage.parent")
    lineage = Lineage(parent, lin.count("parent_version", 1, optional=True))
    cfg = top.obj("config")
    config = ModelSummary(
        arch=cfg.get("arch", str),
        **{k: cfg.count(k, 1) for k in ("dim", "hidden_dim", "n_layers", "n_heads",
                                          "n_kv_heads", "head_dim", "vocab_size", "seq_len",
                                          "n_params")})
    scores_obj = top.obj("scores")
    scores: dict[str, EvalScore] = {}
    for name in sorted(scores_obj.data):
        s = scores_obj.obj(name)
        ppl = s.get("ppl", (int, float))
        if not ppl > 0:
            raise BundleError(f"{path}: scores.{name}.ppl must be > 0")
        scores[name] = EvalScore(float(ppl), float(s.get("nll", (int, float))),
                                 s.count("n_scored", 1), s.count("window", 1),
                                 s.count("stride", 1), s.get("protocol", str),
                                 s.get("text_sha256", str), s.get("kernels", str))
    node = top.get("node", str)
    _checked(check_node, node, path, "node")
    board, recipe = top.get("board", str), top.get("recipe", str)
    for what, v in (("board", board), ("recipe", recipe)):
        if not _NAME_RE.match(v):
            raise BundleError(f"{path}: field {what!r} is not a valid name: {v!r}")
    return Bundle(folder=root, files=files, board=board, isa_features=tuple(isa),
                  runtime_version=top.get("runtime_version", str), recipe=recipe,
                  source=source, node=node, version=top.count("version", 1), lineage=lineage,
                  config=config, weights_bytes=top.count("weights_bytes", 1), scores=scores,
                  created_by=top.get("created_by", str), schema=schema,
                  backend=_backend(top, path))


def _backend(top: _Fields, path: Path) -> dict[str, Any]:
    """The optional "backend" object: a name, and the file it runs when it names one."""
    raw = top.get("backend", dict, optional=True)
    if raw is None:
        return {}
    b = _Fields(raw, "backend", path)
    b.get("name", str)
    name = b.get("file", str, optional=True)
    if name is not None and name not in {f["name"] for f in top.data.get("files", [])}:
        raise BundleError(f"{path}: backend.file {name!r} is not listed in 'files'")
    plain: dict[str, Any] = raw
    return plain


def _checked(check: Callable[[str], object], value: str, path: Path, what: str) -> None:
    try:
        check(value)
    except InvalidArgumentError as exc:
        raise BundleError(f"{path}: field {what!r}: {exc}") from None
