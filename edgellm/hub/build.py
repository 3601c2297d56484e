# SPDX-License-Identifier: MIT
"""Per-board builds: convert a model with a quant recipe, score it, and write a bundle.

``build(src, "rpi5", type="auto", eval_texts=[...])``:

1. loads the board profile and refuses a recipe outside its quant_types;
2. picks the recipe (``auto``: the highest-quality allowed one whose weights, KV cache at
   min(seq_len, 2048) positions, scratch and runtime -- the memory estimate `edgellm select`
   uses -- fit the board's RAM budget, in the order f16 > q8_0 > q4_0_mixed > q4_0);
3. converts once to a temporary GGUF and measures perplexity on each held-out text with it;
4. writes the final ``model.gguf``: the same tensor bytes, plus the node, version, lineage,
   board, recipe and scores as ``edgellm.*`` metadata (no timestamps, so the same source and
   options give a byte-identical file);
5. for a board with the "tflite" backend, exports ``model.gguf`` to ``model.tflite``
   (edgellm.tflite.export: prefill/decode signatures, int8 weights for q8_0) and records the
   backend, signatures and shapes in the manifest;
6. writes ``bundle.json`` beside it (see edgellm.formats.bundle).
"""

from __future__ import annotations

import hashlib
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from .._version import __version__
from ..errors import InvalidArgumentError, UnsupportedError
from ..formats import gguf
from ..formats.bundle import (
    DEFAULT_NODE,
    MODEL_NAME,
    Bundle,
    EvalScore,
    FileEntry,
    Lineage,
    ModelSummary,
    SourceInfo,
    bundle_dirname,
    check_node,
    parse_parent,
    write_manifest,
)
from ..formats.convert import convert, detect_source
from ..formats.gguf import GGUFValue, GGUFValueType, RawTensor, TensorSource
from ..runtime.config import ModelConfig
from .estimate import MemoryEstimate, memory_bytes
from .evaluate import PerplexityResult, perplexity
from .quantize import AUTO_ORDER, RECIPES, QuantRecipe, get_recipe

AUTO_MAX_CTX = 2048  # --type auto sizes the KV cache at min(seq_len, this) positions
# The runtime's default KV cache type: f32 for float models, f16 once any tensor is quantised.
_FLOAT_RECIPES = ("f32", "f16")
# edgellm.* keys a build writes; dropped from a GGUF source so no stale value survives.
_BUILD_KEYS = ("edgellm.node", "edgellm.version", "edgellm.parent", "edgellm.parent_version",
               "edgellm.board", "edgellm.recipe", "edgellm.isa_features")
_BUILD_PREFIXES = ("edgellm.eval.",)
_EVAL_NAME_RE = re.compile(r"[^a-z0-9_]+")


class BoardLike(Protocol):
    """What a build needs of a board profile (edgellm.boards.BoardProfile has all of it)."""

    @property
    def name(self) -> str: ...
    @property
    def isa_features(self) -> tuple[str, ...]: ...
    @property
    def backend(self) -> str: ...
    @property
    def quant_types(self) -> tuple[str, ...]: ...
    @property
    def ram_mb(self) -> int: ...
    @property
    def ram_share(self) -> float: ...
    @property
    def ram_budget_bytes(self) -> int: ...
    @property
    def cores(self) -> int: ...
    @property
    def tflite_delegate(self) -> str | None: ...


@dataclass(frozen=True)
class BuildResult:
    """What build() made: the bundle, the recipe and why, and the perplexity results.

    .. versionadded:: 0.1
    """

    bundle: Bundle
    recipe: str
    reason: str  # why this recipe (auto: the sizes it compared)
    results: dict[str, PerplexityResult]  # eval text name -> result


@dataclass(frozen=True)
class SourceModel:
    """A source read far enough to size it: its config, tensor shapes and identity.

    .. versionadded:: 0.1
    """

    kind: str
    config: ModelConfig
    tensors: list[tuple[str, tuple[int, ...]]]  # GGUF name, numpy shape
    node: str | None  # edgellm.node of a GGUF source
    info: SourceInfo


def load_board(board: str | BoardLike) -> BoardLike:
    """A board profile by name (boards/<name>.toml through edgellm.boards), or one given.

    Raises:
        BoardProfileError: from edgellm.boards (an unknown board lists the valid names).
    """
    if not isinstance(board, str):
        return board
    from ..boards import load_board as load

    return load(board)


def kv_elem_bytes(recipe: str) -> int:
    """Bytes per KV cache value the runtime uses by default for a model in this recipe."""
    return 4 if recipe in _FLOAT_RECIPES else 2


def footprint(recipe: QuantRecipe, src: SourceModel, n_threads: int = 4) -> MemoryEstimate:
    """What the source in a recipe needs resident with one session of min(seq_len, AUTO_MAX_CTX)
    positions: weights, KV cache, the C core's scratch and the Python runtime
    (edgellm.hub.estimate.memory_bytes, the estimate `edgellm select` uses too)."""
    cfg = src.config
    kv_type = "f32" if kv_elem_bytes(recipe.name) == 4 else "f16"
    return memory_bytes(cfg, recipe.weights_bytes(src.tensors), min(cfg.seq_len, AUTO_MAX_CTX),
                        kv_type, n_threads=n_threads)


def _fit(est: MemoryEstimate, ctx: int) -> str:
    return (f"{_mib(est.weights)} weights + {_mib(est.kv_cache)} KV cache at {ctx} positions + "
            f"{_mib(est.scratch + est.runtime_overhead)} scratch and runtime = {_mib(est.total)}")


def choose_recipe(board: BoardLike, src: SourceModel) -> tuple[QuantRecipe, str]:
    """The highest-quality recipe the board allows whose weights + KV cache fit its RAM budget.

    Returns:
        The recipe and a one-paragraph reason naming the sizes compared.

    Raises:
        InvalidArgumentError: nothing allowed fits (the message gives each size).
    """
    budget = board.ram_budget_bytes
    ctx = min(src.config.seq_len, AUTO_MAX_CTX)
    tried = []
    for name in AUTO_ORDER:
        if name not in board.quant_types:
            tried.append(f"{name}: not allowed on {board.name}")
            continue
        recipe = RECIPES[name]
        est = footprint(recipe, src, board.cores)
        if est.total <= budget:
            tried.append(f"{name}: {_fit(est, ctx)} fits the budget {_mib(budget)}")
            reason = (f"auto chose {name} for {board.name} (RAM budget {_mib(budget)} = "
                      f"{board.ram_mb} MiB x {board.ram_share}); tried, best first: "
                      + "; ".join(tried))
            return recipe, reason
        tried.append(f"{name}: {_fit(est, ctx)} exceeds the budget {_mib(budget)}")
    if "f32" in board.quant_types:
        tried.append("f32: never chosen by auto (ask for --type f32)")
    raise InvalidArgumentError(f"no allowed recipe fits {board.name}: " + "; ".join(tried))


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def _check_recipe(board: BoardLike, name: str) -> QuantRecipe:
    recipe = get_recipe(name)
    if name not in board.quant_types:
        raise InvalidArgumentError(
            f"board {board.name} does not allow recipe {name!r}; allowed: "
            f"{', '.join(board.quant_types)}")
    return recipe


def inspect_source(src: str | Path, tokenizer: str | Path | None = None) -> SourceModel:
    """Read a source's config, tensor shapes and file hashes without converting it.

    Raises:
        InvalidArgumentError, PickleRefusedError, ModelFormatError, UnsupportedError: from
            the readers.
    """
    p = Path(src)
    kind = detect_source(p)
    node: str | None = None
    files: list[Path]
    if kind == "gguf":
        with gguf.read_gguf(p) as gf:
            meta = dict(gf.metadata)
            embd = gf.tensors.get("token_embd.weight")
            vocab = embd.shape[1] if embd is not None and len(embd.shape) > 1 else None
            tensors = [(t.name, tuple(t.shape[::-1])) for t in gf.tensors.values()]
        cfg = ModelConfig.from_metadata(meta, vocab_from_tensor=vocab)
        n = meta.get("edgellm.node")
        node = n if isinstance(n, str) else None
        files = [p]
    else:
        if kind == "hf":
            from ..formats.hf import import_hf

            model = import_hf(p)
            files = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
        else:
            from ..formats.llama2c import find_tokenizer, import_llama2c, read_llama2c

            model = import_llama2c(p, tokenizer)
            tok = (Path(tokenizer) if tokenizer is not None
                   else find_tokenizer(p, read_llama2c(p).config.vocab_size))
            files = [p, tok]
        tensors = [(name, tuple(t.shape)) for name, t in model.tensors]
        embd_shape = dict(tensors).get("token_embd.weight")
        cfg = ModelConfig.from_metadata({"general.architecture": model.arch, **model.metadata},
                                        vocab_from_tensor=embd_shape[0] if embd_shape else None)
    info = SourceInfo(kind=kind, name=p.name, path=str(p.resolve()),
                      files=tuple(FileEntry.of(f) for f in files))
    return SourceModel(kind, cfg, tensors, node, info)


def _eval_name(path: Path, taken: set[str]) -> str:
    name = _EVAL_NAME_RE.sub("_", path.stem.lower()).strip("_") or "text"
    if name in taken:
        raise InvalidArgumentError(f"two eval texts are both named {name!r}; rename one")
    taken.add(name)
    return name


def build(src: str | Path, board: str | BoardLike, *, type: str = "auto",
          node: str | None = None, version: int = 1, parent: str | None = None,
          eval_texts: Sequence[str | Path] = (), out: str | Path = "bundles",
          tokenizer: str | Path | None = None, name: str | None = None,
          window: int | None = None, stride: int | None = None,
          max_eval_tokens: int | None = None, n_threads: int | None = None,
          log: IO[str] | None = sys.stderr) -> BuildResult:
    """Build a model for a board: convert, evaluate, write model.gguf and bundle.json.

    Args:
        src: an HF folder, a llama2.c checkpoint or a GGUF file.
        board: a board id ("rpi5") or a loaded profile.
        type: "auto" or a recipe name (f32, f16, q8_0, q4_0, q4_0_mixed) the board allows.
        node: the node path (default: a GGUF source's edgellm.node, else "master").
        version: the node's version, >= 1.
        parent: the parent as "PATH@V" or "PATH".
        eval_texts: held-out UTF-8 text files to score (default: none); each is named by its
            file stem (lowercase, [a-z0-9_]).
        out: the folder the bundle folder goes in.
        tokenizer: a llama2.c checkpoint's tok*.bin (default: found beside it).
        name: general.name (default: the source's name).
        window, stride, max_eval_tokens: perplexity() options.
        n_threads: threads for the evaluation (default: all available).
        log: progress and the recipe's reason go here (None for silence).

    Returns:
        The BuildResult.

    Raises:
        UnsupportedError: a board with a backend edgellm does not build for.
        MissingToolError: a tflite board without the ``tflite`` extra installed.
        InvalidArgumentError: a recipe the board does not allow, nothing fits (auto), bad
            node/version/parent, unreadable eval text.
        ModelFormatError, PickleRefusedError: from the source readers.
    """
    prof = load_board(board)
    if prof.backend not in ("native", "tflite"):
        raise UnsupportedError(
            f"board {prof.name} uses the {prof.backend!r} backend, which edgellm build does not "
            "produce; build for a board with the native or tflite backend")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidArgumentError(f"version must be an integer >= 1, got {version!r}")
    lineage = Lineage(*parse_parent(parent)) if parent is not None else Lineage()
    if type != "auto":
        recipe = _check_recipe(prof, type)
    texts: list[tuple[str, str]] = []
    taken: set[str] = set()
    for t in eval_texts:
        tp = Path(t)
        try:
            body = tp.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"cannot read eval text {tp}: {exc}") from None
        texts.append((_eval_name(tp, taken), body))

    say = _Log(log)
    source = inspect_source(src, tokenizer)
    node = check_node(node if node is not None else (source.node or DEFAULT_NODE))
    if type == "auto":
        recipe, reason = choose_recipe(prof, source)
    else:
        est = footprint(recipe, source, prof.cores)
        reason = (f"{recipe.name} as requested ({_fit(est, min(source.config.seq_len, AUTO_MAX_CTX))};"
                  f" {prof.name} budget {_mib(prof.ram_budget_bytes)})")
    say(reason)
    folder = Path(out) / bundle_dirname(node, prof.name, recipe.name)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".build-", dir=folder) as tmp:
            first = Path(tmp) / MODEL_NAME
            say(f"converting {source.info.name} with recipe {recipe.name}")
            convert(src, first, type=recipe.base_type, recipe=recipe, tokenizer=tokenizer,
                    name=name, log=log, progress=False)
            results = _evaluate(first, texts, say, n_threads=n_threads, window=window,
                                stride=stride, max_tokens=max_eval_tokens)
            scores = {tname: score for tname, (_, score) in results.items()}
            keys = _build_keys(node, version, lineage, prof, recipe, scores)
            weights, n_params = _rewrite_with_keys(first, folder / MODEL_NAME, keys)
        files, backend = [MODEL_NAME], None
        if prof.backend == "tflite":
            from ..tflite.export import export_for_recipe  # torch + litert-torch: hub side only

            say(f"exporting to .tflite for {prof.name} (delegate {prof.tflite_delegate})")
            exp = export_for_recipe(folder / MODEL_NAME, folder, recipe.name)
            files.append(exp.path.name)
            backend = exp.manifest()
        bundle = write_manifest(folder, board=prof.name, isa_features=prof.isa_features,
                                recipe=recipe.name, source=source.info, node=node,
                                config=_summary(source.config, n_params),
                                weights_bytes=weights, version=version, lineage=lineage,
                                scores=scores, created_by=f"edgellm {__version__} build",
                                files=files, backend=backend)
    except BaseException:
        if created and not any(folder.iterdir()):
            folder.rmdir()  # leave no empty bundle folder behind a failed build
        raise
    say(f"wrote {folder} ({bundle.model_size:,} bytes, "
        f"sha256 {bundle.file(MODEL_NAME).sha256[:16]})")
    return BuildResult(bundle=bundle, recipe=recipe.name, reason=reason,
                       results={tname: r for tname, (r, _) in results.items()})


def _evaluate(path: Path, texts: list[tuple[str, str]], say: _Log, *, n_threads: int | None,
              window: int | None, stride: int | None,
              max_tokens: int | None) -> dict[str, tuple[PerplexityResult, EvalScore]]:
    """Score each (name, text) on the model at path: the result and what gets stored."""
    out: dict[str, tuple[PerplexityResult, EvalScore]] = {}
    if not texts:
        return out
    from .. import _native
    from ..runtime.model import Model

    kernels = str(_native.build_info()["active"])
    with Model(path, n_threads=n_threads) as m:
        for tname, body in texts:
            r = perplexity(m, body, window=window, stride=stride, max_tokens=max_tokens,
                           progress=say.windows(f"eval {tname}"))
            out[tname] = (r, _score(r, body, kernels))
            say(f"eval {tname}: ppl {r.ppl:.4f} over {r.n_scored} tokens "
                f"(windows: {r.n_windows}, {r.seconds:.2f} s, {r.protocol})")
    return out


def _score(r: PerplexityResult, text: str, kernels: str) -> EvalScore:
    return EvalScore(ppl=r.ppl, nll=r.nll, n_scored=r.n_scored, window=r.window,
                     stride=r.stride, protocol=r.protocol,
                     text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
                     kernels=kernels)


def _build_keys(node: str, version: int, lineage: Lineage, board: BoardLike,
                recipe: QuantRecipe, scores: dict[str, EvalScore]) -> dict[str, GGUFValue]:
    """The edgellm.* keys of a build, with explicit GGUF types, in a fixed order."""
    def s(v: str) -> GGUFValue:
        return GGUFValue(GGUFValueType.STRING, v)

    def u(v: int) -> GGUFValue:
        return GGUFValue(GGUFValueType.UINT32, v)

    def f(v: float) -> GGUFValue:
        return GGUFValue(GGUFValueType.FLOAT64, v)  # float64: the score survives exactly

    keys = {"edgellm.node": s(node), "edgellm.version": u(version)}
    if lineage.parent is not None:
        keys["edgellm.parent"] = s(lineage.parent)
    if lineage.parent_version is not None:
        keys["edgellm.parent_version"] = u(lineage.parent_version)
    keys["edgellm.board"] = s(board.name)
    keys["edgellm.recipe"] = s(recipe.name)
    keys["edgellm.isa_features"] = GGUFValue(GGUFValueType.ARRAY, list(board.isa_features),
                                             GGUFValueType.STRING)
    for tname in sorted(scores):
        sc, pre = scores[tname], f"edgellm.eval.{tname}."
        keys.update({pre + "ppl": f(sc.ppl), pre + "nll": f(sc.nll),
                     pre + "n_scored": u(sc.n_scored), pre + "window": u(sc.window),
                     pre + "stride": u(sc.stride), pre + "protocol": s(sc.protocol),
                     pre + "text_sha256": s(sc.text_sha256), pre + "kernels": s(sc.kernels)})
    return keys


def _rewrite_with_keys(first: Path, final: Path, keys: dict[str, GGUFValue]) -> tuple[int, int]:
    """Copy first's tensors byte for byte into final, with its metadata plus keys.

    Returns:
        (tensor bytes, parameter count).
    """
    with gguf.read_gguf(first) as gf:
        meta: dict[str, Any] = {}
        for key, value in gf.fields.items():
            stale = key in _BUILD_KEYS or key.startswith(_BUILD_PREFIXES)
            if not stale and key != "general.alignment":  # write_gguf writes it if needed
                meta[key] = value
        meta.update(keys)
        tensors: list[tuple[str, TensorSource, int]] = [
            (t.name, RawTensor(gf.tensor_bytes(t.name), t.shape), t.type)
            for t in gf.tensors.values()]
        weights = sum(t.nbytes for t in gf.tensors.values())
        n_params = sum(t.n_elements for t in gf.tensors.values())
        try:
            gguf.write_gguf(final, meta, tensors, alignment=gf.alignment)
        finally:
            tensors.clear()  # drop the views before the mapping closes
    return weights, n_params


def _summary(cfg: ModelConfig, n_params: int) -> ModelSummary:
    return ModelSummary.from_config(cfg, n_params)


class _Log:
    """Progress lines on stderr ("build: ..."), or nothing."""

    def __init__(self, log: IO[str] | None) -> None:
        self.log = log

    def __call__(self, text: str) -> None:
        if self.log is not None:
            self.log.write(f"build: {text}\n")
            self.log.flush()

    def windows(self, what: str) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            if self.log is not None and (done == total or done % 16 == 0):
                self.log.write(f"build: {what}: {done}/{total} windows\n")
                self.log.flush()

        return report

