# SPDX-License-Identifier: MIT
"""Run an exported ``.tflite`` model behind edgellm's Model/Session API (LiteRT interpreter).

``edgellm.Model(path)`` returns a ``TFLiteModel`` when path is a ``.tflite`` file (its
``model.gguf`` beside it gives the tokenizer and config) or a bundle folder holding
``model.tflite``. Tokenizer, sampler, generate/streaming/stop strings and chat come from
edgellm.runtime unchanged: only the four cache operations (eval, step, truncate, close) differ.

Interpreters (``runtime=``): ``ai_edge_litert`` (supported, the default), else
``tflite_runtime`` for f32 models with numpy < 2 only: tflite-runtime 2.14 (its last release)
is built against numpy 1 and gives wrong results for dynamic-range int8 models, so those
combinations are refused with TFLiteRuntimeError (see check_runtime and docs/tflite.md).

Delegates (``delegate=``): "board" (default) loads the library the bundle's board profile
names (``tflite_delegate``) and raises TFLiteDelegateError when it is not installed; None
runs on the CPU (XNNPACK); a path or library name loads that library. The environment
variable EDGELLM_TFLITE_DELEGATE ("none" or a library) replaces "board" (for the CLI).

Public API: TFLiteModel, TFLiteSession, check_runtime, SUPPORTED_RUNTIMES.
"""

from __future__ import annotations

import itertools
import json
import os
from importlib import import_module
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import (
    ContextFullError,
    InvalidArgumentError,
    ModelFormatError,
    StateError,
    TFLiteDelegateError,
    TFLiteRuntimeError,
    UnsupportedError,
)
from ..formats.bundle import MANIFEST_NAME, MODEL_NAME
from ..formats.gguf import read_gguf
from ..runtime.config import ModelConfig
from ..runtime.model import Model, Session, default_threads
from ..runtime.tokenizer import Tokenizer
from . import TFLITE_NAME

# module name -> distribution name, in the order "auto" tries them
SUPPORTED_RUNTIMES = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}
BOARD = "board"  # delegate=: the library the bundle's board profile names
# Overrides delegate="board" (the default, and all the CLI can pass): "none" runs on the CPU,
# anything else names the library.
DELEGATE_ENV = "EDGELLM_TFLITE_DELEGATE"
OUTPUTS = ("logits", "k_new", "v_new")  # what an edgellm export's signatures return
_SESSION_IDS = itertools.count(1)


def _major_minor(v: str) -> tuple[int, int]:
    parts = (v.split("+")[0].split(".") + ["0", "0"])[:2]
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except ValueError:
        return 0, 0


def check_runtime(runtime: str, version: str, numpy_version: str, dynamic_int8: bool) -> None:
    """Refuse an interpreter/numpy/model combination known not to load or to be wrong.

    Args:
        runtime: "ai_edge_litert" or "tflite_runtime".
        version: the interpreter package's version.
        numpy_version: numpy's version.
        dynamic_int8: the model has int8 weights with float activations (dynamic range).

    Raises:
        TFLiteRuntimeError: tflite-runtime <= 2.14 with numpy >= 2 (built against numpy 1:
            it does not import), or with a dynamic-range int8 model (wrong results).
    """
    if runtime not in SUPPORTED_RUNTIMES:
        raise InvalidArgumentError(f"runtime must be one of {sorted(SUPPORTED_RUNTIMES)}, got {runtime!r}")
    if runtime != "tflite_runtime" or _major_minor(version) > (2, 14):
        return
    if _major_minor(numpy_version) >= (2, 0):
        raise TFLiteRuntimeError(
            f"tflite-runtime {version} is built against numpy 1 and cannot run with numpy "
            f"{numpy_version}; install ai-edge-litert (pip install 'edgellm[tflite]'), or use "
            "numpy<2 for f32 models")
    if dynamic_int8:
        raise TFLiteRuntimeError(
            f"tflite-runtime {version} gives wrong results for dynamic-range int8 models like "
            "this one; run it with ai-edge-litert (pip install ai-edge-litert), or export "
            "with quantize='int8' (weight-only) or None for tflite-runtime")


def _interpreter_module(runtime: str | None, dynamic_int8: bool | None) -> tuple[Any, str]:
    """The interpreter module to use and its name, after check_runtime."""
    names = list(SUPPORTED_RUNTIMES) if runtime in (None, "auto") else [str(runtime)]
    missing = []
    for name in names:
        if name not in SUPPORTED_RUNTIMES:
            raise InvalidArgumentError(
                f"runtime must be 'auto' or one of {sorted(SUPPORTED_RUNTIMES)}, got {name!r}")
        try:
            ver = dist_version(SUPPORTED_RUNTIMES[name])
        except PackageNotFoundError:
            missing.append(SUPPORTED_RUNTIMES[name])
            continue
        # An unknown int8-ness (a bare file) is checked again once the interpreter is built.
        check_runtime(name, ver, np.__version__, bool(dynamic_int8))
        try:
            return import_module(f"{name}.interpreter"), name
        except ImportError as exc:
            raise TFLiteRuntimeError(f"{SUPPORTED_RUNTIMES[name]} {ver} does not import: {exc}") from None
    raise TFLiteRuntimeError(
        f"no TFLite interpreter is installed ({', '.join(missing)} missing): pip install "
        "'edgellm[tflite]' on the device (ai-edge-litert)")


class TFLiteModel(Model):
    """A ``.tflite`` export run by the LiteRT interpreter, with the native Model's API.

    - ``m = edgellm.Model("bundles/x-coral-dev-board-q8_0")`` (or the ``model.tflite`` in it)
      builds an interpreter, loading the board's delegate (``delegate=None``: CPU only).
    - ``m.generate(...)``, ``m.session()``, ``m.logits(...)``, ``m.tokenize(...)`` behave
      as the native runtime's; adapters are not supported.

    The interpreter is shared by the model's sessions; each session keeps its own KV cache
    (numpy arrays fed to every call). Single-threaded, as the native Model's sessions.
    """

    def __init__(self, path: str | os.PathLike[str], n_threads: int | None = None,
                 n_ctx: int | None = None, kv_type: str | None = None, *,
                 delegate: str | None = BOARD, runtime: str | None = "auto") -> None:
        """Load a .tflite model.

        Args:
            path: a bundle folder holding model.tflite, or a .tflite file with model.gguf
                (the tokenizer and config) beside it.
            n_threads: interpreter threads (default: the CPUs available).
            n_ctx: default session length (default and maximum: the exported cache length).
            kv_type: only "f32" (the exported cache's type).
            delegate: "board", None or a delegate library (see the module docstring).
            runtime: "auto", "ai_edge_litert" or "tflite_runtime".

        Raises:
            ModelFormatError: no model.gguf beside the .tflite file, or missing signatures.
            TFLiteRuntimeError: no interpreter, or a combination known to be wrong.
            TFLiteDelegateError: the delegate is not installed.
        """
        import threading

        self._gguf = None
        self._buffers: list[Any] = []
        self._c: Any = None
        self._adapter = None
        self._adapter_epoch = 0
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._interp: Any = None
        self._sigs: dict[str, _Signature] = {}
        p = Path(path)
        folder = p if p.is_dir() else p.parent
        self.path = folder / TFLITE_NAME if p.is_dir() else p
        manifest = _manifest(folder)
        backend = manifest.get("backend", {}) if isinstance(manifest.get("backend"), dict) else {}
        gguf_path = folder / MODEL_NAME
        if not gguf_path.is_file():
            raise ModelFormatError(f"{self.path}: no {MODEL_NAME} beside it (the tokenizer and config "
                                   "come from it; a tflite bundle holds both)")
        with read_gguf(gguf_path) as gf:
            self.metadata = dict(gf.metadata)
            embd = gf.tensors.get("token_embd.weight")
            vocab = embd.shape[1] if embd is not None and len(embd.shape) > 1 else None
        self.config = ModelConfig.from_metadata(self.metadata, vocab_from_tensor=vocab)
        self.tokenizer = Tokenizer.from_metadata(self.metadata)
        quant = backend.get("quantize")
        dynamic: bool | None = None if quant is None else quant == "int8-dynamic"
        module, self.runtime = _interpreter_module(runtime, dynamic)
        self.n_threads = default_threads() if n_threads is None else int(n_threads)
        if self.n_threads < 1:
            raise InvalidArgumentError(f"n_threads must be >= 1, got {self.n_threads}")
        self.delegate = self._delegate_path(delegate, manifest.get("board"))
        delegates = [module.load_delegate(self.delegate)] if self.delegate else []
        self._interp = module.Interpreter(model_path=str(self.path), num_threads=self.n_threads,
                                          experimental_delegates=delegates)
        if quant is None:  # a bare file: tell its quantisation from its tensors
            quant = _quantization(self._interp.get_tensor_details())
            check_runtime(self.runtime, dist_version(SUPPORTED_RUNTIMES[self.runtime]),
                          np.__version__, quant == "int8-dynamic")
        self.quantize = str(quant)  # "none", "int8" or "int8-dynamic"
        sigs = self._interp.get_signature_list()
        if not {"prefill", "decode"} <= set(sigs):
            raise ModelFormatError(f"{self.path}: signatures {sorted(sigs)}; an edgellm export has "
                                   "'prefill' and 'decode'")
        self._sigs = {name: _Signature(self._interp.get_signature_runner(name))
                      for name in ("prefill", "decode")}
        for name, sig in self._sigs.items():
            outs = set(sig.runner.get_output_details())
            if not set(OUTPUTS) <= outs:
                raise ModelFormatError(
                    f"{self.path}: signature {name!r} returns {sorted(outs)}, not "
                    f"{', '.join(OUTPUTS)}: exported by another (older) edgellm; export it again")
        ins = self._sigs["prefill"].runner.get_input_details()
        self.prefill_len = int(ins["tokens"]["shape"][1])
        self.cache_shape = tuple(int(x) for x in ins["k_cache"]["shape"])  # [n_layers, n_ctx, kv_dim]
        self.max_ctx = self.cache_shape[1]
        self.n_ctx = self.max_ctx if n_ctx is None else int(n_ctx)
        if not 1 <= self.n_ctx <= self.max_ctx:
            raise InvalidArgumentError(f"n_ctx must be in [1, {self.max_ctx}] (the exported cache), "
                                       f"got {self.n_ctx}")
        if kv_type not in (None, "f32"):
            raise InvalidArgumentError(f"a .tflite export has an f32 KV cache; kv_type {kv_type!r}")
        self.kv_type = "f32"
        self.usage_hook = None

    @staticmethod
    def _delegate_path(delegate: str | None, board: object) -> str | None:
        env = os.environ.get(DELEGATE_ENV, "").strip()
        if delegate == BOARD and env:
            delegate = None if env.lower() == "none" else env
        if delegate is None:
            return None
        from ..boards import find_library, load_board

        if delegate != BOARD:
            found = find_library(delegate)
            if found is None:
                raise TFLiteDelegateError(f"TFLite delegate {delegate} is not installed here "
                                          "(not found by the dynamic loader)")
            return found
        if not isinstance(board, str):
            return None  # a bare .tflite file: no board, no delegate
        lib = load_board(board).tflite_delegate
        if lib is None:
            return None
        found = find_library(lib)
        if found is None:
            raise TFLiteDelegateError(
                f"board {board} runs TFLite models through the delegate {lib}, which is not "
                f"installed here; install it (Coral: apt-get install libedgetpu1-std), or pass "
                f"delegate=None ({DELEGATE_ENV}=none for the CLI) to run on the CPU")
        return found

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the interpreter; idempotent."""
        self._interp = None
        self._sigs = {}

    def _handle(self) -> Any:
        if self._interp is None:
            raise StateError("the model is closed")
        return self._interp

    # -- what differs from the native model ---------------------------------------------

    def attach_adapter(self, path: str | os.PathLike[str], scale: float = 1.0) -> Any:
        """Not supported: a .tflite export has its weights baked in."""
        raise UnsupportedError("LoRA adapters are not supported on the tflite backend; "
                               "export the merged model instead")

    def detach_adapter(self) -> None:
        """No-op: a .tflite model never has an adapter."""

    def kv_cache_bytes(self, n_ctx: int | None = None) -> int:
        """Bytes a session's KV cache takes (always the exported length: shapes are fixed)."""
        layers, ctx, kv_dim = self.cache_shape
        return 2 * layers * ctx * kv_dim * 4

    def session(self, n_ctx: int | None = None, n_threads: int | None = None) -> Session:
        """A new session with its own KV cache (n_threads is the model's: one interpreter)."""
        return TFLiteSession(self, n_ctx or self.n_ctx)

    def _call(self, decode: bool, session: TFLiteSession, tokens: np.ndarray,
              pos: np.ndarray) -> np.ndarray:  # -> logits [1, n, vocab_size]
        """Run one signature on session's cache, writing the new K/V rows into it."""
        self._handle()
        return self._sigs["decode" if decode else "prefill"].run(session, tokens, pos)


class _Signature:
    """One signature, run with the KV cache kept in the interpreter's own input buffers.

    The session's cache (numpy, the master copy) is copied into the signature's k_cache/v_cache
    inputs only when another session (or state) ran there last; after each call the new rows
    go into both, so a decode step moves one row per layer instead of the whole cache. Where
    the interpreter gives no zero-copy view of a signature's tensors (tflite-runtime's API),
    the public signature runner is used, copying the cache in on every call.
    """

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.owner: tuple[int, int] | None = None  # (session.uid, session.version) loaded
        self.fast: tuple[Any, int, dict[str, int], dict[str, int]] | None = None
        try:
            w, sg = runner._interpreter_wrapper, int(runner._subgraph_index)
            ins, outs = dict(runner._inputs), dict(runner._outputs)
            w.AllocateTensors(sg)
            w.tensor(w, ins["k_cache"], sg)  # probe: a view into this subgraph's buffer
            self.fast = (w, sg, ins, outs)
        except (AttributeError, TypeError, KeyError, ValueError, RuntimeError):
            self.fast = None

    def run(self, s: TFLiteSession, tokens: np.ndarray, pos: np.ndarray) -> np.ndarray:
        n = int((pos >= 0).sum())
        start = int(pos[0])
        k, v = s._cache()
        if self.fast is None:
            out = self.runner(tokens=tokens, input_pos=pos, k_cache=k, v_cache=v)
            k[:, start : start + n] = out["k_new"][:, :n]
            v[:, start : start + n] = out["v_new"][:, :n]
            logits: np.ndarray = out["logits"]
            return logits
        w, sg, ins, outs = self.fast

        def view(index: int) -> np.ndarray:  # valid until the next invoke: never kept
            arr: np.ndarray = w.tensor(w, index, sg)
            return arr

        view(ins["tokens"])[...] = tokens
        view(ins["input_pos"])[...] = pos
        if self.owner != (s.uid, s.version):
            view(ins["k_cache"])[...] = k
            view(ins["v_cache"])[...] = v
        w.Invoke(sg)
        logits = np.array(view(outs["logits"]))
        for name, cache, master in (("k_new", "k_cache", k), ("v_new", "v_cache", v)):
            rows = view(outs[name])[:, :n]
            master[:, start : start + n] = rows
            view(ins[cache])[:, start : start + n] = rows
        s.version += 1
        self.owner = (s.uid, s.version)
        return logits


class TFLiteSession(Session):
    """One conversation on a TFLiteModel: its KV cache as numpy arrays (see Session)."""

    def __init__(self, model: Model, n_ctx: int) -> None:
        if not isinstance(model, TFLiteModel):
            raise InvalidArgumentError("a TFLiteSession needs a TFLiteModel")
        if not 1 <= n_ctx <= model.max_ctx:
            raise InvalidArgumentError(f"n_ctx must be in [1, {model.max_ctx}], got {n_ctx}")
        self.model = model
        self._m = model
        self.n_ctx = n_ctx
        self.tokens: list[int] = []
        self._last = np.zeros(model.config.vocab_size, dtype=np.float32)
        self.last_stats = None
        self._epoch = 0
        self._k: np.ndarray | None = np.zeros(model.cache_shape, dtype=np.float32)
        self._v: np.ndarray = np.zeros(model.cache_shape, dtype=np.float32)
        self.version = 0  # bumped by every call that writes the cache (see _Signature)
        self.uid = next(_SESSION_IDS)  # never reused, unlike id()

    def close(self) -> None:
        """Drop the KV cache; idempotent."""
        self._k = None

    def _handle(self) -> Any:
        if self._k is None:
            raise StateError("the session is closed")
        return self._k

    def _cache(self) -> tuple[np.ndarray, np.ndarray]:  # ([n_layers, n_ctx, kv_dim],) * 2
        return self._handle(), self._v

    def _run_chunk(self, toks: np.ndarray, decode: bool) -> np.ndarray:  # [n] -> [n, vocab]
        """Evaluate up to prefill_len tokens at the current position; returns their logits."""
        n, start = len(toks), self.pos
        width = 1 if decode else self._m.prefill_len
        tokens = np.zeros((1, width), dtype=np.int32)
        tokens[0, :n] = toks
        pos = np.full(width, -1, dtype=np.int32)  # -1: padding, writes nothing
        pos[:n] = np.arange(start, start + n, dtype=np.int32)
        out = self._m._call(decode, self, tokens, pos)
        self.tokens.extend(int(t) for t in toks)
        logits: np.ndarray = out[0, :n]
        return logits

    def eval(self, tokens: Any, logits: str | None = "last") -> np.ndarray:
        """Append tokens to the cache (prefill in chunks) and return logits, as Session.eval."""
        if logits not in ("last", "all", None):
            raise InvalidArgumentError(f"logits must be 'last', 'all' or None, got {logits!r}")
        toks = np.ascontiguousarray(tokens, dtype=np.int32)
        n = len(toks)
        if n == 0:
            raise InvalidArgumentError("eval needs at least one token")
        vocab = self.model.config.vocab_size
        if toks.min() < 0 or toks.max() >= vocab:
            raise InvalidArgumentError(f"token ids must be in [0, {vocab}), got {toks.min()}..{toks.max()}")
        if self.pos + n > self.n_ctx:
            raise ContextFullError(f"{self.pos} + {n} tokens do not fit n_ctx={self.n_ctx}")
        self._handle()
        parts = []
        self.model._enter()
        try:
            step = self._m.prefill_len
            for i in range(0, n, step):
                chunk = toks[i : i + step]
                parts.append(self._run_chunk(chunk, decode=len(chunk) == 1))
        finally:
            self.model._leave()
        self._last[:] = parts[-1][-1]
        if logits == "all":
            return np.concatenate(parts).astype(np.float32, copy=False)
        if logits == "last":
            return self._last.copy()
        return np.empty(0, dtype=np.float32)

    def _step(self, token: int) -> None:
        """Append one token (the decode signature) and refresh the last logits."""
        self._last[:] = self._run_chunk(np.array([token], dtype=np.int32), decode=True)[0]

    def truncate(self, n_keep: int) -> None:
        """Keep the first n_keep positions: later slots are masked until they are rewritten."""
        if not 0 <= n_keep <= self.pos:
            raise InvalidArgumentError(f"n_keep must be in [0, {self.pos}], got {n_keep}")
        self._handle()
        del self.tokens[n_keep:]


def _quantization(tensors: list[dict[str, Any]]) -> str:
    """"int8-dynamic" when an int8 weight feeds an op directly (no f32 twin from a DEQUANTIZE),
    "int8" when every int8 weight is dequantised, "none" without int8 tensors."""
    int8 = {tuple(d["shape"]) for d in tensors if d["dtype"] == np.int8}
    if not int8:
        return "none"
    f32 = {tuple(d["shape"]) for d in tensors if d["dtype"] == np.float32}
    return "int8" if int8 <= f32 else "int8-dynamic"


def _manifest(folder: Path) -> dict[str, Any]:
    """The bundle.json beside a .tflite file as plain JSON ({} when there is none)."""
    p = folder / MANIFEST_NAME
    if not p.is_file():
        return {}
    from ..formats.bundle import read_manifest

    b = read_manifest(folder)  # validated; typed errors
    d: dict[str, Any] = json.loads(json.dumps(b.to_dict()))
    return d
