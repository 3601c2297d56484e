# SPDX-License-Identifier: MIT
"""One entry point that turns an HF folder, a llama2.c checkpoint or a GGUF file into an edgellm GGUF."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np

from .._version import __version__
from ..errors import InvalidArgumentError, ModelFormatError, PickleRefusedError, UnsupportedError
from . import gguf, quant
from .gguf import GGMLType, LazyTensor, RawTensor, TensorSource

# --type name -> ggml tensor type for 2-D weights, and general.file_type (llama_ftype).
TYPES: dict[str, GGMLType] = quant.TYPES
FILE_TYPES: dict[GGMLType, int] = {GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q4_0: 2,
                                   GGMLType.Q8_0: 7}
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION, for files holding Q4_0/Q8_0 blocks
_QUANTISED = (GGMLType.Q8_0, GGMLType.Q4_0)
# Keys convert() writes itself; dropped from a GGUF source before requantising.
_OWN_KEYS = ("general.alignment", "general.file_type", "general.quantization_version",
             "edgellm.source", "edgellm.converter_version")
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle")

#: A per-tensor type choice: (GGUF tensor name, numpy shape) -> ggml type (see hub/quantize.py).
Recipe = Callable[[str, tuple[int, ...]], GGMLType]


def detect_source(src: str | os.PathLike[str]) -> str:
    """The importer a source needs: "hf" (a folder), "gguf" (GGUF magic) or "llama2c".

    Raises:
        PickleRefusedError: a pickle/torch checkpoint file, or a folder of only those.
        InvalidArgumentError: the path does not exist.
    """
    p = Path(src)
    if p.is_dir():
        return "hf"
    if not p.is_file():
        raise InvalidArgumentError(f"no such file or folder: {p}")
    with open(p, "rb") as f:
        head = f.read(4)
    if head == gguf.GGUF_MAGIC:
        return "gguf"
    # torch.save writes a zip ("PK\3\4", never a valid llama2.c dim) or, in its legacy
    # form, a raw pickle (0x80, protocol 2..5), which a llama2.c header can also start with:
    # then only a header that fails llama2.c's exact size check counts as pickle.
    pickle = p.suffix in _PICKLE_SUFFIXES or head == b"PK\x03\x04"
    if not pickle and head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        from .llama2c import read_llama2c

        try:
            read_llama2c(p)
        except ModelFormatError:
            pickle = True
    if pickle:
        from .hf import PICKLE_HELP

        raise PickleRefusedError(f"{p} is a pickle/torch checkpoint: {PICKLE_HELP}")
    return "llama2c"


def tensor_type(name: str, shape: tuple[int, ...], target: GGMLType) -> GGMLType:
    """The ggml type convert() stores a tensor of numpy shape `shape` as.

    1-D tensors (norms, biases) stay F32; matrices get the target type, except that a row
    length that is not a multiple of 32 falls back to F16 for the quantised types.
    """
    if len(shape) < 2:
        return GGMLType.F32
    if target in _QUANTISED and shape[-1] % 32:
        return GGMLType.F16
    return target


class _Progress:
    """A one-line stderr progress display (only when the stream is a terminal)."""

    def __init__(self, log: IO[str] | None, show: bool | None) -> None:
        self.log = log
        self.show = bool(log is not None and (show if show is not None else log.isatty()))

    def __call__(self, i: int, n: int, name: str) -> None:
        if self.show and self.log is not None:
            self.log.write(f"\rconvert: {i}/{n} tensors  {name[:40]:<40}")
            if i == n:
                self.log.write("\n")
            self.log.flush()

    def note(self, text: str) -> None:
        if self.log is not None:
            self.log.write(f"convert: {text}\n")


def convert(src: str | os.PathLike[str], out: str | os.PathLike[str],
            type: str = "f16", *, tokenizer: str | os.PathLike[str] | None = None,
            name: str | None = None, log: IO[str] | None = sys.stderr,
            progress: bool | None = None, recipe: Recipe | None = None,
            extra_metadata: dict[str, Any] | None = None) -> Path:
    """Convert a model to an edgellm (llama.cpp-compatible) GGUF file.

    Args:
        src: an HF folder (LlamaForCausalLM / Qwen2ForCausalLM, safetensors), a llama2.c
            checkpoint, or a GGUF file to requantise.
        out: the .gguf file to write (atomically).
        type: f32, f16, q8_0 or q4_0, for 2-D weights; 1-D tensors stay F32.
        tokenizer: the tok*.bin of a llama2.c checkpoint (default: the one beside it).
        name: general.name (default: the source's folder or file name).
        log: where notes (F16 fallbacks) and progress go; None for silence.
        progress: show the progress line (default: when log is a terminal).
        recipe: chooses each tensor's type instead of tensor_type(name, shape, type); `type`
            still sets general.file_type (e.g. "q4_0" for a mostly-Q4_0 mix).
        extra_metadata: keys written after (and overriding) the ones convert() sets.

    Returns:
        The path written.

    Raises:
        InvalidArgumentError: an unknown type, a missing source, out == src.
        PickleRefusedError, ModelFormatError, UnsupportedError: from the readers.
    """
    if type not in TYPES:
        raise InvalidArgumentError(f"unknown type {type!r}; choose one of {', '.join(TYPES)}")
    target = TYPES[type]
    src_p, out_p = Path(src), Path(out)
    kind = detect_source(src_p)
    if out_p.exists() and out_p.resolve() == src_p.resolve():
        raise InvalidArgumentError(f"refusing to overwrite the source {src_p} in place")
    if tokenizer is not None and kind != "llama2c":
        raise InvalidArgumentError("tokenizer= applies only to llama2.c checkpoints")
    report = _Progress(log, progress)
    choose: Recipe = recipe or (lambda n, shape: tensor_type(n, shape, target))
    extra = dict(extra_metadata or {})
    if kind == "gguf":
        return _requantise(src_p, out_p, target, name, report, choose, extra)
    if kind == "hf":
        from .hf import import_hf

        model = import_hf(src_p)
    else:
        from .llama2c import import_llama2c

        model = import_llama2c(src_p, tokenizer)
    tensors: list[tuple[str, TensorSource, int]] = []
    for tname, lazy in model.tensors:
        t = choose(tname, tuple(lazy.shape))
        if t != target and t == GGMLType.F16:
            report.note(f"{tname}: row length {lazy.shape[-1]} is not a multiple of 32, "
                        "stored as F16")
        tensors.append((tname, lazy, t))
    meta = _general(model.arch, name or model.name, target)
    meta.update(model.metadata)
    meta.update(_edgellm_keys(model.source))
    meta.update(extra)
    return gguf.write_gguf(out_p, meta, tensors, progress=report)


def _general(arch: str, name: str, target: GGMLType) -> dict[str, Any]:
    meta: dict[str, Any] = {"general.architecture": arch, "general.name": name,
                            "general.file_type": FILE_TYPES[target]}
    if target in _QUANTISED:
        meta["general.quantization_version"] = QUANTIZATION_VERSION
    return meta


def _edgellm_keys(source: str) -> dict[str, Any]:
    return {"edgellm.source": source, "edgellm.converter_version": __version__}


def _requantise(src: Path, out: Path, target: GGMLType, name: str | None,
                report: _Progress, choose: Recipe, extra: dict[str, Any]) -> Path:
    """Rewrite a GGUF with 2-D weights in the target type, keeping every other key."""
    with gguf.read_gguf(src) as f:
        arch = f.architecture
        old_name = f.metadata.get("general.name")
        meta = _general(arch, name or (old_name if isinstance(old_name, str) else src.stem),
                        target)
        for key, value in f.fields.items():
            if key not in meta and key not in _OWN_KEYS:
                meta[key] = value
        meta.update(_edgellm_keys(f"gguf:{src.name}"))
        meta.update(extra)
        tensors: list[tuple[str, TensorSource, int]] = []
        for info in f.tensors.values():
            shape = info.shape[::-1]  # numpy order
            t = choose(info.name, tuple(shape))
            if t != target and t == GGMLType.F16:
                report.note(f"{info.name}: row length {shape[-1]} is not a multiple of 32, "
                            "stored as F16")
            if info.type == t:
                tensors.append((info.name, RawTensor(f.tensor_bytes(info.name), info.shape),
                                t))
                continue
            if info.type not in gguf.RUNNABLE_TYPES and info.type != GGMLType.BF16:
                raise UnsupportedError(
                    f"{src}: tensor {info.name!r} is {info.type_name}; edgellm can requantise "
                    "from F32, F16, BF16, Q8_0 and Q4_0 only")
            tensors.append((info.name, LazyTensor(shape, _decoder(f, info.name)), t))
        try:
            return gguf.write_gguf(out, meta, tensors, progress=report)
        finally:
            tensors.clear()  # drop the views before the mapping closes


def _decoder(f: gguf.GGUFFile, name: str) -> Any:
    def load() -> np.ndarray:
        info = f.tensors[name]
        shape = info.shape[::-1]
        if info.type == GGMLType.F32:
            return f.tensor_array(name)
        if info.type == GGMLType.F16:
            return f.tensor_array(name).astype(np.float32)
        if info.type == GGMLType.BF16:
            raw = np.frombuffer(f.tensor_bytes(name), dtype="<u2").reshape(shape)
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return quant.dequantize(f.tensor_bytes(name), info.type, shape)

    return load

