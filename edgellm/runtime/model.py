# SPDX-License-Identifier: MIT
"""`Model` and `Session`: a GGUF file mapped read-only, run by the C core, behind a Python API."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
from typing_extensions import Self

from .. import _native
from .._native import ffi, lib
from ..errors import ContextFullError, InvalidArgumentError, ModelFormatError, StateError
from ..formats.adapter import AdapterInfo, LoraFile, read_adapter
from ..formats.gguf import GGUFFile, read_gguf
from .config import ModelConfig, tensor_roles
from .sampler import Sampler
from .tokenizer import StreamDecoder, Tokenizer

_KV_TYPES = {"f32": lib.EDGELLM_TYPE_F32, "f16": lib.EDGELLM_TYPE_F16}
_LOGITS = {None: lib.EDGELLM_LOGITS_NONE, "last": lib.EDGELLM_LOGITS_LAST, "all": lib.EDGELLM_LOGITS_ALL}


def default_threads() -> int:
    """Threads to use when the caller names none: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class GenerationStats:
    """What one generate() call did: counts and timings (fed to usage reporting)."""

    __slots__ = ("decode_s", "generated_tokens", "prefill_s", "prompt_tokens", "stop_reason")

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.stop_reason = ""

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__} | {
            "decode_tokens_per_s": self.decode_tokens_per_s
        }


class Model:
    """A language model loaded from a GGUF file; weights stay mapped, never copied.

    - ``m = Model("model.gguf", n_threads=2)`` maps the file, checks it and builds the C model.
    - ``m.generate("Once upon a time", max_tokens=64)`` runs a fresh session and returns text;
      ``stream=True`` yields text pieces instead.
    - ``with m.session() as s:`` keeps the KV cache between calls (multi-turn chat).
    - ``m.attach_adapter("update.gguf", scale=1.0)`` applies a LoRA adapter to every session
      (between generations); ``m.detach_adapter()`` returns to the base weights.
    - ``m.close()`` (or ``with Model(...) as m:``) releases the C objects and the mapping.

    A Model may be shared by sessions, but each Session is single-threaded.

    A ``.tflite`` file or a bundle folder holding ``model.tflite`` gives an
    edgellm.tflite.runtime.TFLiteModel (same API; needs the ``tflite`` extra).
    """

    def __new__(cls, path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Model:
        if cls is Model and _is_tflite(path):
            from ..tflite.runtime import TFLiteModel  # imported only for a .tflite model

            return super().__new__(TFLiteModel)
        return super().__new__(cls)

    def __init__(
        self,
        path: str | os.PathLike[str],
        n_threads: int | None = None,
        n_ctx: int | None = None,
        kv_type: str | None = None,
    ) -> None:
        """Load a model.

        Args:
            path: a GGUF file (llama or qwen2 architecture; F32, F16, Q8_0, Q4_0 tensors).
            n_threads: worker threads per session (default: the CPUs available).
            n_ctx: default context length of sessions (default: the trained length, at most 4096).
            kv_type: "f32" or "f16" KV cache (default: f32 for float models, f16 when quantised).

        Raises:
            ModelFormatError: the file is malformed or inconsistent.
            UnsupportedError: an architecture or tensor type edgellm does not run.
        """
        self.path = Path(path)
        self._gguf: GGUFFile | None = read_gguf(self.path)
        self._buffers: list[Any] = []  # cffi views of the mapping, alive as long as the model
        self._c: Any = None
        self._adapter: _Attached | None = None
        self._adapter_epoch = 0  # bumped by attach/detach, as the C model's adapter_epoch
        self._busy = 0  # evals and generations in progress (attach/detach wait for none)
        self._busy_lock = threading.Lock()
        try:
            self._load(n_threads, n_ctx, kv_type)
        except BaseException:
            self.close()
            raise

    def _load(self, n_threads: int | None, n_ctx: int | None, kv_type: str | None) -> None:
        gf = self._gguf
        assert gf is not None
        self.metadata = gf.metadata
        embd = gf.tensors.get("token_embd.weight")
        self.config = ModelConfig.from_metadata(
            gf.metadata, vocab_from_tensor=embd.shape[1] if embd is not None and len(embd.shape) > 1 else None
        )
        self.tokenizer = Tokenizer.from_metadata(gf.metadata)
        cfg = self.config
        c_cfg = ffi.new("edgellm_config *")
        c_cfg.arch = lib.EDGELLM_ARCH_QWEN2 if cfg.arch == "qwen2" else lib.EDGELLM_ARCH_LLAMA
        for field in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                      "vocab_size", "seq_len", "rope_mode", "rope_dim", "rope_base", "rope_scale",
                      "norm_eps"):
            setattr(c_cfg, field, getattr(cfg, field))
        out = ffi.new("edgellm_model **")
        _native.check(lib.edgellm_model_new(c_cfg, out))
        self._c = ffi.gc(out[0], lib.edgellm_model_free)
        float_model = True
        for name, role, layer in tensor_roles(list(gf.tensors), cfg.n_layers):
            info = gf.tensors[name]
            buf = ffi.from_buffer(gf.tensor_bytes(name))
            self._buffers.append(buf)
            ne0 = info.shape[0]
            ne1 = info.shape[1] if len(info.shape) > 1 else 1
            if len(info.shape) > 2:
                raise InvalidArgumentError(f"tensor {name} has {len(info.shape)} dimensions, expected 1 or 2")
            if info.type not in (lib.EDGELLM_TYPE_F32, lib.EDGELLM_TYPE_F16):
                float_model = False
            role_id = getattr(lib, "EDGELLM_TENSOR_" + role)
            _native.check(
                lib.edgellm_model_set_tensor(self._c, role_id, layer, info.type, buf, ne0, ne1, info.nbytes)
            )
        _native.check(lib.edgellm_model_finalize(self._c))
        self.n_threads = default_threads() if n_threads is None else int(n_threads)
        if self.n_threads < 1:
            raise InvalidArgumentError(f"n_threads must be >= 1, got {self.n_threads}")
        self.n_ctx = min(cfg.seq_len, 4096) if n_ctx is None else int(n_ctx)
        kv = kv_type or ("f32" if float_model else "f16")
        if kv not in _KV_TYPES:
            raise InvalidArgumentError(f"kv_type must be one of {sorted(_KV_TYPES)}, got {kv!r}")
        self.kv_type = kv
        self.usage_hook: Callable[[GenerationStats], None] | None = None

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Free the C model and unmap the file; idempotent. Sessions must be closed first."""
        if self._adapter is not None:
            self._adapter.release()  # edgellm_adapter_free detaches it from the C model
            self._adapter = None
        if self._c is not None:
            ffi.release(self._c)  # runs edgellm_model_free now, not at GC
            self._c = None
        self._buffers.clear()
        if self._gguf is not None:
            self._gguf.close()
            self._gguf = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self) -> Any:
        if self._c is None:
            raise StateError("the model is closed")
        return self._c

    # -- adapters -------------------------------------------------------------------------

    @property
    def adapter(self) -> AdapterInfo | None:
        """The attached LoRA adapter (path, sha256, rank, alpha, scale, n_tensors), or None."""
        return self._adapter.info if self._adapter is not None else None

    def attach_adapter(self, path: str | os.PathLike[str], scale: float = 1.0) -> AdapterInfo:
        """Apply a LoRA adapter (llama.cpp's GGUF layout) to every session, replacing any attached.

        The base weights stay mapped as they are: the forward adds
        ``scale * alpha / rank * B (A x)`` to each adapted projection. A session's cached
        positions were computed without it, so generate() re-evaluates its prompt from the
        start; Session.eval() on a non-empty cache raises StateError until truncate(0).

        Args:
            path: the adapter GGUF (``general.type = adapter``, ``adapter.type = lora``).
            scale: the user's multiplier (llama.cpp's ``--lora-scaled``); 0 disables it.

        Returns:
            What Model.adapter reports from now on.

        Raises:
            ModelFormatError: not an adapter, another architecture, shapes or ranks that do
                not fit the base, a missing half of a pair, unknown tensors, NaN/Inf values.
            UnsupportedError: an adapter kind or tensor type edgellm does not run.
            StateError: a generation or eval is running on a session of this model.

        Nothing changes when it raises: the adapter attached before (if any) stays.

        .. versionadded:: 0.1
        """
        handle = self._handle()
        scale = float(scale)
        if not math.isfinite(scale):
            raise InvalidArgumentError(f"scale must be finite, got {scale}")
        lf = read_adapter(path)
        new: _Attached | None = None
        try:
            if lf.arch != self.config.arch:
                raise ModelFormatError(
                    f"{lf.path} is an adapter for architecture {lf.arch!r}; this model is {self.config.arch!r}")
            out = ffi.new("edgellm_adapter **")
            _native.check(lib.edgellm_adapter_new(handle, lf.alpha, out))
            new = _Attached(ffi.gc(out[0], lib.edgellm_adapter_free), lf)
            for pair in lf.pairs:
                role = getattr(lib, "EDGELLM_TENSOR_" + pair.role)
                for part, t in ((lib.EDGELLM_LORA_A, pair.a), (lib.EDGELLM_LORA_B, pair.b)):
                    buf = ffi.from_buffer(lf.gguf.tensor_bytes(t.name))
                    new.buffers.append(buf)
                    _native.check(lib.edgellm_adapter_set_tensor(
                        new.c, role, pair.layer, part, t.type, buf, t.shape[0], t.shape[1], t.nbytes))
            _native.check(lib.edgellm_adapter_finalize(new.c))
            info = new.info = AdapterInfo(path=lf.path, sha256=lf.sha256(), rank=lf.rank, alpha=lf.alpha,
                                          scale=scale, n_tensors=int(lib.edgellm_adapter_n_pairs(new.c)))
            with self._busy_lock:
                if self._busy:
                    raise StateError("cannot attach an adapter while a generation is running on this model")
                _native.check(lib.edgellm_model_attach_adapter(handle, new.c, scale))
                old, self._adapter = self._adapter, new
                self._adapter_epoch += 1
        except BaseException:
            if new is not None:
                new.release()
            else:
                lf.close()
            raise
        if old is not None:
            old.release()
        return info

    def detach_adapter(self) -> None:
        """Return to the base weights (no-op without an adapter); same rules as attach_adapter.

        Raises:
            StateError: a generation or eval is running on a session of this model.
        """
        handle = self._handle()
        with self._busy_lock:
            if self._busy:
                raise StateError("cannot detach the adapter while a generation is running on this model")
            old, self._adapter = self._adapter, None
            if old is None:
                return
            _native.check(lib.edgellm_model_detach_adapter(handle))
            self._adapter_epoch += 1
        old.release()

    def _enter(self) -> None:
        """Mark an eval or generation as running (attach/detach refuse meanwhile)."""
        with self._busy_lock:
            self._busy += 1

    def _leave(self) -> None:
        with self._busy_lock:
            self._busy -= 1

    # -- text -----------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """Token ids of text (BOS first when the model asks for it, unless add_bos says otherwise)."""
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of token ids (special tokens dropped)."""
        return self.tokenizer.decode(list(tokens))

    def kv_cache_bytes(self, n_ctx: int | None = None) -> int:
        """Bytes a session's KV cache takes at n_ctx positions."""
        return int(lib.edgellm_kv_cache_bytes(self._handle(), n_ctx or self.n_ctx, _KV_TYPES[self.kv_type]))

    # -- running --------------------------------------------------------------------------

    def session(self, n_ctx: int | None = None, n_threads: int | None = None) -> Session:
        """A new session with its own KV cache (n_ctx positions) and thread pool."""
        return Session(self, n_ctx or self.n_ctx, n_threads or self.n_threads)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:  # [n] -> [n, vocab_size]
        """Logits of every position of tokens, evaluated from an empty context."""
        with self.session(n_ctx=max(len(tokens), 1)) as s:
            return s.eval(tokens, logits="all")

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, **kwargs: Any) -> Any:
        """Complete a prompt in a fresh session; see Session.generate for the arguments."""
        s = self.session()
        if kwargs.get("stream"):
            def stream() -> Iterator[str]:
                with s:
                    yield from s.generate(prompt, max_tokens, **kwargs)
            return stream()
        with s:
            return s.generate(prompt, max_tokens, **kwargs)


class Session:
    """One conversation: a KV cache that persists between calls, and a thread pool.

    - ``s.generate(prompt)`` reuses whatever prefix of the prompt is already cached.
    - ``s.chat(messages)`` applies the model's chat template and generates the reply.
    - ``s.eval(tokens)`` / ``s.truncate(n)`` give direct control of the cache.

    Single-threaded: one call at a time.
    """

    def __init__(self, model: Model, n_ctx: int, n_threads: int) -> None:
        self.model = model
        out = ffi.new("edgellm_session **")
        _native.check(
            lib.edgellm_session_new(model._handle(), n_ctx, _KV_TYPES[model.kv_type], n_threads, out)
        )
        self._c: Any = ffi.gc(out[0], lib.edgellm_session_free)
        self.n_ctx = n_ctx
        self.tokens: list[int] = []  # what the KV cache holds, position by position
        self._last = np.zeros(model.config.vocab_size, dtype=np.float32)  # logits after tokens[-1]
        self._last_c = ffi.from_buffer("float[]", self._last, require_writable=True)
        self._one = np.zeros(1, dtype=np.int32)  # the decode loop's input, reused every step
        self._one_c = ffi.from_buffer("int32_t[]", self._one)
        self.last_stats: GenerationStats | None = None
        self._epoch = model._adapter_epoch  # the model's adapter epoch the cache was filled under

    def close(self) -> None:
        """Free the KV cache and threads; idempotent."""
        if self._c is not None:
            ffi.release(self._c)  # runs edgellm_session_free now, not at GC
            self._c = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pos(self) -> int:
        """Positions held in the KV cache."""
        return len(self.tokens)

    def _handle(self) -> Any:
        if self._c is None:
            raise StateError("the session is closed")
        return self._c

    def eval(self, tokens: Sequence[int], logits: str | None = "last") -> np.ndarray:
        """Append tokens to the cache (batched prefill) and return logits.

        Args:
            tokens: ids to append at the current position.
            logits: "last" -> [vocab_size], "all" -> [n, vocab_size], None -> empty array.

        Raises:
            ContextFullError: the cache cannot hold them (nothing is appended).
            InvalidArgumentError: an id outside the vocabulary.
        """
        if logits not in _LOGITS:
            raise InvalidArgumentError(f"logits must be 'last', 'all' or None, got {logits!r}")
        toks = np.ascontiguousarray(tokens, dtype=np.int32)
        n = len(toks)
        vocab = self.model.config.vocab_size
        if n == 0:
            raise InvalidArgumentError("eval needs at least one token")
        out: np.ndarray
        if logits == "all":
            out = np.empty((n, vocab), dtype=np.float32)
            out_c = ffi.from_buffer("float[]", out, require_writable=True)
        elif logits == "last":
            out, out_c = self._last, self._last_c
        else:
            out, out_c = np.empty(0, dtype=np.float32), ffi.NULL
        model = self.model
        model._enter()
        try:
            if not self.tokens:
                self._epoch = model._adapter_epoch
            _native.check(
                lib.edgellm_session_eval(self._handle(), ffi.from_buffer("int32_t[]", toks), n, _LOGITS[logits], out_c)
            )
        finally:
            model._leave()
        self.tokens.extend(toks.tolist())
        if logits == "all":
            self._last[:] = out[-1]
        return out.copy() if logits == "last" else out

    def _step(self, token: int) -> None:
        """Append one token and refresh the last logits: eval() without its allocations."""
        self._one[0] = token
        _native.check(
            lib.edgellm_session_eval(self._handle(), self._one_c, 1, lib.EDGELLM_LOGITS_LAST, self._last_c)
        )
        self.tokens.append(token)

    def truncate(self, n_keep: int) -> None:
        """Keep the first n_keep cached positions (rewind)."""
        if not 0 <= n_keep <= self.pos:
            raise InvalidArgumentError(f"n_keep must be in [0, {self.pos}], got {n_keep}")
        _native.check(lib.edgellm_session_truncate(self._handle(), n_keep))
        del self.tokens[n_keep:]

    def _prefill(self, prompt: list[int]) -> None:
        """Make the cache hold exactly `prompt`, reusing the longest cached prefix."""
        common = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)  # re-evaluate at least one token for fresh logits
        if self._epoch != self.model._adapter_epoch:
            common = 0  # cached under another adapter (or none): recompute everything
        self.truncate(common)
        rest = prompt[common:]
        if len(prompt) > self.n_ctx:
            raise ContextFullError(f"prompt of {len(prompt)} tokens does not fit n_ctx={self.n_ctx}")
        self.eval(rest, logits="last")

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> Any:
        """Continue the conversation from prompt.

        Args:
            prompt: text (tokenised with BOS as the model asks) or token ids.
            max_tokens: most tokens to generate; generation also ends at an end-of-sequence
                token, a stop string, or a full context.
            temperature: 0 for greedy decoding; higher is more random.
            top_k: sample only among the k most likely tokens (0 = no limit).
            top_p: sample only among the most likely tokens whose probabilities sum to top_p.
            seed: RNG seed; the same seed gives the same text.
            stop: strings that end generation; they are not included in the result.
            stream: yield text pieces as they are decoded instead of returning one string.

        Returns:
            The generated text, or an iterator of text pieces when stream is true.
        """
        if max_tokens < 0:
            raise InvalidArgumentError(f"max_tokens must be >= 0, got {max_tokens}")
        sampler = Sampler(temperature, top_k, top_p, seed)
        ids = self.model.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise InvalidArgumentError("the prompt is empty (and the model adds no BOS token)")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        pieces = self._run(ids, max_tokens, sampler, stops)
        return pieces if stream else "".join(pieces)

    def _run(self, ids: list[int], max_tokens: int, sampler: Sampler, stops: list[str]) -> Iterator[str]:
        stats = GenerationStats()
        stats.prompt_tokens = len(ids)
        self.last_stats = stats
        self.model._enter()  # until the generator finishes: no adapter swap mid-answer
        try:
            yield from self._generate(ids, max_tokens, sampler, stops, stats)
        finally:
            self.model._leave()

    def _generate(self, ids: list[int], max_tokens: int, sampler: Sampler, stops: list[str],
                  stats: GenerationStats) -> Iterator[str]:
        t0 = time.perf_counter()
        self._prefill(ids)
        t1 = time.perf_counter()
        stats.prefill_s = t1 - t0
        tok = self.model.tokenizer
        decoder = StreamDecoder(tok, prev_id=ids[-1])  # spacing depends on what precedes
        eos = set(tok.eos_ids)
        held = ""  # decoded text not yet yielded because it may start a stop string
        stats.stop_reason = "length"
        try:
            for _ in range(max_tokens):
                nxt = sampler(self._last)
                if nxt in eos:
                    stats.stop_reason = "eos"
                    break
                stats.generated_tokens += 1
                held += decoder.feed(nxt)
                hit = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
                if hit >= 0:
                    stats.stop_reason = "stop"
                    held = held[:hit]
                    break
                # Yield everything that cannot be the beginning of a stop string.
                safe = len(held) - max((_overlap(held, s) for s in stops), default=0)
                if safe > 0:
                    yield held[:safe]
                    held = held[safe:]
                if self.pos >= self.n_ctx:
                    stats.stop_reason = "context"
                    break
                self._step(nxt)
            if stats.stop_reason != "stop":
                held += decoder.flush()
            if held:
                yield held
        finally:
            stats.decode_s = time.perf_counter() - t1
            hook = self.model.usage_hook
            if hook is not None:
                hook(stats)

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 256, **kwargs: Any) -> Any:
        """Reply to a conversation, formatted with the model's chat template.

        The whole conversation is re-tokenised each turn; the KV cache keeps the common prefix,
        so earlier turns are not recomputed.
        """
        ids = self.model.tokenizer.encode_chat(messages)  # BOS only if the template lacks it
        return self.generate(ids, max_tokens, **kwargs)


class _Attached:
    """A C adapter with the mapped file and cffi views its F32/F16 tensors point into."""

    def __init__(self, c: Any, lf: LoraFile) -> None:
        self.c = c
        self.file = lf
        self.buffers: list[Any] = []
        self.info: AdapterInfo | None = None

    def release(self) -> None:
        """Free the C adapter (detaching it if attached), then drop the views and the mapping."""
        if self.c is not None:
            ffi.release(self.c)  # runs edgellm_adapter_free now
            self.c = None
        self.buffers.clear()
        self.file.close()


def _is_tflite(path: str | os.PathLike[str]) -> bool:
    """Whether path is a .tflite flatbuffer ("TFL3" at byte 4) or a folder holding model.tflite."""
    p = Path(path)
    if p.is_dir():
        return (p / "model.tflite").is_file()
    try:
        with open(p, "rb") as f:
            return f.read(8)[4:8] == b"TFL3"
    except OSError:
        return False  # the GGUF reader reports it


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
