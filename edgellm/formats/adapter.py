# SPDX-License-Identifier: MIT
"""LoRA adapters in llama.cpp's GGUF adapter layout: a validating reader and a writer.

An adapter file is a GGUF with ``general.type = "adapter"``, ``adapter.type = "lora"``,
``general.architecture`` equal to its base model's, an optional ``adapter.lora.alpha``
(float32; 0 or absent = no alpha/rank scaling) and, for each adapted base tensor W
("blk.3.attn_q.weight", ...), a pair ``<W>.lora_a`` of GGUF shape [n_in, rank] (numpy
(rank, n_in)) and ``<W>.lora_b`` of GGUF shape [rank, n_out] (numpy (n_out, rank)). A model
running it computes ``W x + lora_scale(alpha, rank, scale) * B (A x)``.

Public API:

- ``read_adapter(path) -> LoraFile``: map and validate an adapter (pairs, shapes, names).
- ``write_adapter(path, base_metadata, tensors, alpha)``: write one, e.g. from the hub.
- ``lora_scale(alpha, rank, scale)``: the multiplier of B A (llama.cpp's rule).
- ``AdapterInfo``: what ``Model.adapter`` reports about the attached adapter.

.. versionadded:: 0.1
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgumentError, ModelFormatError, UnsupportedError
from ..runtime.config import tensor_roles
from .gguf import GGUFFile, GGUFValue, GGUFValueType, TensorInfo, read_gguf, write_gguf
from .quant import RUNNABLE_TYPES, GGMLType

if TYPE_CHECKING:  # annotations only: typing_extensions is not a runtime dependency
    from typing_extensions import Self

__all__ = ["AdapterInfo", "LoraFile", "LoraPair", "lora_scale", "read_adapter", "write_adapter"]

SUFFIX_A = ".lora_a"
SUFFIX_B = ".lora_b"
# Base tensors a LoRA pair may adapt: the projections edgellm's forward runs as matmuls.
PROJECTION_ROLES = frozenset(
    {"OUTPUT", "ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT", "FFN_GATE", "FFN_UP", "FFN_DOWN"})
# Layer indices are checked against the model when it attaches the adapter (C knows block_count).
_ANY_LAYER = 1 << 30
_WRITE_TYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16, "q8_0": GGMLType.Q8_0}


def lora_scale(alpha: float, rank: int, scale: float = 1.0) -> float:
    """The factor of B A in the forward: scale * alpha / rank, or scale when alpha is 0."""
    return scale * alpha / rank if alpha else scale


@dataclass(frozen=True)
class LoraPair:
    """One adapted base tensor: its name, C role and layer, and the infos of A and B."""

    base: str  # "blk.3.attn_q.weight"
    role: str  # edgellm_tensor_role name without the prefix: "ATTN_Q"
    layer: int  # -1 for output.weight
    a: TensorInfo  # GGUF shape [n_in, rank]
    b: TensorInfo  # GGUF shape [rank, n_out]

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])


@dataclass(frozen=True)
class AdapterInfo:
    """The attached adapter, as ``Model.adapter`` reports it."""

    path: Path
    sha256: str  # of the whole file, hex
    rank: int  # the largest rank of its pairs
    alpha: float  # adapter.lora.alpha (0: none)
    scale: float  # the user's scale given to attach_adapter
    n_tensors: int  # adapted base tensors (pairs; the file holds twice as many tensors)

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "rank": self.rank,
                "alpha": self.alpha, "scale": self.scale, "n_tensors": self.n_tensors}


class LoraFile:
    """A LoRA adapter GGUF mapped read-only and validated (tensor data stays in the mapping).

    - ``lf = read_adapter(path)`` checks the keys, names, pairs and shapes.
    - ``lf.pairs`` lists each adapted tensor; ``lf.gguf.tensor_bytes(p.a.name)`` is A's data.
    - ``lf.close()`` (or ``with read_adapter(path) as lf:``) releases the mapping.
    """

    def __init__(self, gguf: GGUFFile, arch: str, alpha: float, pairs: list[LoraPair]) -> None:
        self.gguf = gguf
        self.path = gguf.path
        self.arch = arch
        self.alpha = alpha
        self.pairs = pairs

    @property
    def rank(self) -> int:
        """The largest rank of the pairs."""
        return max(p.rank for p in self.pairs)

    def sha256(self) -> str:
        """SHA-256 of the whole file (hex), read through the mapping."""
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def close(self) -> None:
        self.gguf.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_adapter(path: str | os.PathLike[str]) -> LoraFile:
    """Map a LoRA adapter GGUF and check it is one llama.cpp would load.

    Shapes are checked against each other here and against the base model when a model
    attaches the adapter (``Model.attach_adapter``); non-finite values are refused there too.

    Raises:
        ModelFormatError: not a GGUF adapter (general.type), a tensor name that is not
            ``<base tensor>.lora_a``/``.lora_b`` of a projection, a pair missing one part,
            shapes of A and B that do not pair up, a bad alpha.
        UnsupportedError: another adapter.type (control vectors), a tensor type edgellm does
            not run, a token_embd adapter.
        InvalidArgumentError: the path does not exist.
    """
    gf = read_gguf(path)
    try:
        return _validate(gf)
    except BaseException:
        gf.close()
        raise


def _validate(gf: GGUFFile) -> LoraFile:
    meta = gf.metadata
    where = str(gf.path)
    gtype = meta.get("general.type")
    if gtype != "adapter":
        raise ModelFormatError(f"{where} is not an adapter (general.type = {gtype!r}, want 'adapter')")
    atype = meta.get("adapter.type")
    if not isinstance(atype, str):
        raise ModelFormatError(f"{where}: adapter.type is missing (want 'lora')")
    if atype != "lora":
        raise UnsupportedError(f"{where}: adapter.type {atype!r} is not supported (only 'lora')")
    arch = gf.architecture
    alpha_raw = meta.get("adapter.lora.alpha", 0.0)
    if isinstance(alpha_raw, bool) or not isinstance(alpha_raw, (int, float)):
        raise ModelFormatError(f"{where}: adapter.lora.alpha = {alpha_raw!r} is not a number")
    alpha = float(alpha_raw)
    if not math.isfinite(alpha) or alpha < 0:
        raise ModelFormatError(f"{where}: adapter.lora.alpha = {alpha} must be finite and >= 0")

    halves: dict[str, dict[str, TensorInfo]] = {}
    for name, info in gf.tensors.items():
        if name.endswith(SUFFIX_A):
            base, part = name[: -len(SUFFIX_A)], "a"
        elif name.endswith(SUFFIX_B):
            base, part = name[: -len(SUFFIX_B)], "b"
        else:
            raise ModelFormatError(
                f"{where}: tensor {name!r} is not a LoRA tensor (<base>.lora_a / <base>.lora_b)")
        if info.type not in RUNNABLE_TYPES:
            raise UnsupportedError(
                f"{where}: tensor {name!r} has type {info.type_name} (supported: F32, F16, Q8_0, Q4_0)")
        if len(info.shape) != 2:
            raise ModelFormatError(f"{where}: tensor {name!r} has {len(info.shape)} dims, want 2")
        halves.setdefault(base, {})[part] = info
    if not halves:
        raise ModelFormatError(f"{where}: the adapter has no tensors")

    pairs: list[LoraPair] = []
    for base, parts in halves.items():
        if base == "token_embd.weight":
            raise UnsupportedError(f"{where}: token_embd.weight adapters are not supported")
        try:
            ((_, role, layer),) = tuple(tensor_roles([base], _ANY_LAYER))
        except UnsupportedError:
            raise ModelFormatError(f"{where}: {base!r} is not a tensor of a llama/qwen2 model") from None
        if role not in PROJECTION_ROLES:
            raise ModelFormatError(f"{where}: {base!r} is not a projection; only matrices take LoRA pairs")
        if "a" not in parts or "b" not in parts:
            have, miss = ("lora_a", "lora_b") if "a" in parts else ("lora_b", "lora_a")
            raise ModelFormatError(f"{where}: {base} has {have} but no {miss}")
        a, b = parts["a"], parts["b"]
        if a.shape[1] != b.shape[0]:
            raise ModelFormatError(
                f"{where}: {base}: rank of lora_a (shape {list(a.shape)}: [n_in, rank]) differs from "
                f"lora_b's (shape {list(b.shape)}: [rank, n_out])")
        pairs.append(LoraPair(base, role, layer, a, b))
    return LoraFile(gf, arch, alpha, pairs)


def write_adapter(path: str | os.PathLike[str], base_metadata: Mapping[str, Any],
                  tensors: Mapping[str, tuple[np.ndarray, np.ndarray]], alpha: float, *,
                  type: str = "f32", name: str | None = None,
                  extra: Mapping[str, Any] | None = None) -> Path:
    """Write a LoRA adapter GGUF that edgellm and llama.cpp load (atomically, as write_gguf).

    Args:
        path: the file to write.
        base_metadata: the base model's GGUF metadata (its general.architecture is copied).
        tensors: base tensor name ("blk.0.attn_q.weight") -> (A, B) with A of numpy shape
            (rank, n_in) and B of shape (n_out, rank): the update of W is B @ A.
        alpha: adapter.lora.alpha (0: the forward scales B A by the user's scale alone).
        type: "f32", "f16" or "q8_0" for A and B (q8_0 needs n_in and rank multiples of 32).
        name: general.name (default: "<base name> LoRA").
        extra: more metadata (edgellm.* facts such as the base's sha256).

    Returns:
        The path written.

    Raises:
        InvalidArgumentError: no tensors, a name that is not a projection, shapes that do not
            pair up, non-finite values, a bad alpha or type.
    """
    if type not in _WRITE_TYPES:
        raise InvalidArgumentError(f"type must be one of {sorted(_WRITE_TYPES)}, got {type!r}")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise InvalidArgumentError(f"alpha = {alpha} must be finite and >= 0")
    arch = base_metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise InvalidArgumentError("base_metadata has no general.architecture string")
    if not tensors:
        raise InvalidArgumentError("an adapter needs at least one (A, B) pair")
    items: list[tuple[str, np.ndarray, int]] = []
    for base, pair in tensors.items():
        try:
            ((_, role, _),) = tuple(tensor_roles([base], _ANY_LAYER))
        except (UnsupportedError, ModelFormatError):
            raise InvalidArgumentError(f"{base!r} is not a llama/qwen2 tensor name") from None
        if role not in PROJECTION_ROLES:
            raise InvalidArgumentError(f"{base!r} is not a projection (attn_q/k/v/output, ffn_*, output)")
        a = np.ascontiguousarray(pair[0], dtype=np.float32)
        b = np.ascontiguousarray(pair[1], dtype=np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InvalidArgumentError(
                f"{base}: A {a.shape} and B {b.shape} do not pair up (A: (rank, n_in), B: (n_out, rank))")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise InvalidArgumentError(f"{base}: A or B holds NaN or Inf")
        items.append((base + SUFFIX_A, a, int(_WRITE_TYPES[type])))
        items.append((base + SUFFIX_B, b, int(_WRITE_TYPES[type])))
    base_name = base_metadata.get("general.name")
    meta: dict[str, Any] = {
        "general.architecture": arch,
        "general.type": "adapter",
        "general.name": name or (f"{base_name} LoRA" if isinstance(base_name, str) else "LoRA"),
        "adapter.type": "lora",
        "adapter.lora.alpha": GGUFValue(GGUFValueType.FLOAT32, alpha),
        **(extra or {}),
    }
    return write_gguf(path, meta, items)
