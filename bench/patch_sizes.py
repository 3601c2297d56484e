# SPDX-License-Identifier: MIT
"""Patch sizes as a share of the full bundle: deltas and adapter patches for stories260K and a
SmolLM-135M-shaped model.

Scenarios, per model:

- ``delta-2-tuned``: two weight matrices fine-tuned (relative step 1e-3, requantised for Q8_0);
- ``delta-all-tuned``: every 2-D weight fine-tuned the same way (a whole re-distillation step);
- ``delta-last-blocks``: the last blocks replaced by new weights (a partial re-distillation);
- ``delta-metadata``: only a metadata key changes (a new version number);
- ``adapter-rN``: a LoRA adapter of rank N on attn_q and attn_v of every block.

Each patch is made with edgellm.fleet.patch (lzma unless --codec zlib), applied back to check
it rebuilds the file byte for byte, and timed. One JSON line per (model, scenario) goes to
bench/out/patch_sizes-<time>.jsonl; a table goes to stdout.

    python bench/patch_sizes.py                         # stories260K + smollm-135m-q8_0 if present
    python bench/patch_sizes.py --models stories260K --codec zlib
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO, JsonLines, context, log, model_path

from edgellm.fleet.patch import apply_patch, make_adapter_patch, make_delta, read_patch
from edgellm.formats.adapter import write_adapter
from edgellm.formats.convert import convert
from edgellm.formats.gguf import LazyTensor, RawTensor, read_gguf, write_gguf
from edgellm.formats.quant import dequantize

STORIES = REPO / "tests" / "data" / "stories260K"
Change = Callable[[str, np.ndarray], "np.ndarray | None"]  # float weights -> new ones or None


def variant(src: Path, dst: Path, change: Change, extra: dict[str, Any] | None = None) -> Path:
    """Copy a GGUF; tensors change() returns an array for are re-encoded in their own type."""
    with read_gguf(src) as f:
        tensors: list[tuple[str, Any, int]] = []
        for t in f.tensors.values():
            shape = t.shape[::-1]
            w = dequantize(f.tensor_bytes(t.name), t.type, shape).astype(np.float32)
            new = change(t.name, w)
            if new is None:
                tensors.append((t.name, RawTensor(f.tensor_bytes(t.name), t.shape), t.type))
            else:
                arr = np.ascontiguousarray(new, np.float32)
                tensors.append((t.name, LazyTensor(arr.shape, lambda a=arr: a), t.type))
        write_gguf(dst, {**dict(f.fields), **(extra or {})}, tensors, alignment=f.alignment)
    return dst


def tuned(names: Callable[[str], bool], seed: int, step: float = 1e-3) -> Change:
    rng = np.random.default_rng(seed)

    def change(name: str, w: np.ndarray) -> np.ndarray | None:
        if w.ndim != 2 or not names(name):
            return None
        return w * (1 + step * rng.standard_normal(w.shape).astype(np.float32))
    return change


def replaced(names: Callable[[str], bool], seed: int) -> Change:
    rng = np.random.default_rng(seed)

    def change(name: str, w: np.ndarray) -> np.ndarray | None:
        if not names(name):
            return None
        return (rng.standard_normal(w.shape) * (w.std() or 1.0)).astype(np.float32)
    return change


def _blocks(path: Path) -> int:
    with read_gguf(path) as f:
        return int(f.metadata["llama.block_count"])


def measure(base: Path, new: Path, codec: str, out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    data = make_delta(base, new, codec=codec)
    make_s = time.perf_counter() - t0
    out.write_bytes(data)
    p = read_patch(out)
    got = bytearray()
    t0 = time.perf_counter()
    apply_patch(p, base, got.extend)
    apply_s = time.perf_counter() - t0
    if bytes(got) != new.read_bytes():
        raise SystemExit(f"{out}: the delta did not rebuild {new} byte for byte")
    changed = sum(1 for t in p.tensors if t.src != "base")
    return {"patch_bytes": len(data), "tensors_changed": changed, "tensors": len(p.tensors),
            "xor_tensors": sum(1 for t in p.tensors if t.src == "xor"), "make_s": make_s,
            "apply_s": apply_s}


def adapter_case(base: Path, rank: int, codec: str, tmp: Path) -> dict[str, Any]:
    rng = np.random.default_rng(rank)
    with read_gguf(base) as f:
        meta = f.metadata
        pairs = {}
        for t in f.tensors.values():
            if t.name.endswith(("attn_q.weight", "attn_v.weight")):
                n_in, n_out = t.shape[0], t.shape[1]
                pairs[t.name] = (rng.standard_normal((rank, n_in)).astype(np.float32) * 0.01,
                                 rng.standard_normal((n_out, rank)).astype(np.float32) * 0.01)
    adapter = write_adapter(tmp / f"adapter-r{rank}.gguf", meta, pairs, float(rank))
    t0 = time.perf_counter()
    data = make_adapter_patch(adapter, base, codec=codec)
    return {"patch_bytes": len(data), "adapter_bytes": adapter.stat().st_size,
            "tensors_changed": len(pairs), "make_s": time.perf_counter() - t0}


def run_model(label: str, base: Path, codec: str, tmp: Path, rows: JsonLines) -> None:
    full = base.stat().st_size
    n_blocks = _blocks(base)
    last = {f"blk.{i}." for i in range(n_blocks - max(1, n_blocks // 8), n_blocks)}
    two = {"blk.0.attn_q.weight", f"blk.{n_blocks - 1}.ffn_down.weight"}
    cases: dict[str, tuple[Change, dict[str, Any] | None]] = {
        "delta-2-tuned": (tuned(lambda n: n in two, 1), None),
        "delta-all-tuned": (tuned(lambda n: True, 2), None),
        "delta-last-blocks": (replaced(lambda n: any(n.startswith(b) for b in last), 3), None),
        "delta-metadata": (lambda n, w: None, {"edgellm.version": 2}),
    }
    for name, (change, extra) in cases.items():
        log(f"{label}: {name}")
        new = variant(base, tmp / f"{label}-{name}.gguf", change, extra)
        r = measure(base, new, codec, tmp / f"{label}-{name}.patch")
        row = {"model": label, "scenario": name, "codec": codec, "bundle_bytes": full,
               "share": r["patch_bytes"] / full, **r}
        rows.write({**row, **CONTEXT})
        new.unlink()
    for rank in (4, 16):
        log(f"{label}: adapter r{rank}")
        r = adapter_case(base, rank, codec, tmp)
        rows.write({"model": label, "scenario": f"adapter-r{rank}", "codec": codec,
                    "bundle_bytes": full, "share": r["patch_bytes"] / full, **r, **CONTEXT})


CONTEXT: dict[str, Any] = {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["stories260K-f32", "stories260K-q8_0",
                                                    "smollm-135m-q8_0"],
                    help="stories260K-f32, stories260K-q8_0, or a bench model <name>-<type>")
    ap.add_argument("--codec", choices=("lzma", "zlib"), default="lzma")
    a = ap.parse_args(argv)
    CONTEXT.update(context())
    rows = JsonLines("patch_sizes")
    with tempfile.TemporaryDirectory(prefix="edgellm-patch-") as d:
        tmp = Path(d)
        for label in a.models:
            if label.startswith("stories260K-"):
                base = convert(STORIES / "stories260K.bin", tmp / f"{label}.gguf",
                               type=label.split("-", 1)[1], tokenizer=STORIES / "tok512.bin",
                               log=None)
            else:
                name, _, qtype = label.rpartition("-")
                base = model_path(name, qtype)
                if not base.is_file():
                    log(f"{label}: {base} is missing (python bench/make_models.py); skipped")
                    continue
            run_model(label, base, a.codec, tmp, rows)
    print("| model | scenario | bundle | patch | share | changed tensors | make s | apply s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows.rows:
        print(f"| {r['model']} | {r['scenario']} | {r['bundle_bytes']:,} | {r['patch_bytes']:,} | "
              f"{100 * r['share']:.2f}% | {r['tensors_changed']} | {r['make_s']:.2f} | "
              f"{r.get('apply_s', float('nan')):.2f} |")
    log(f"wrote {rows.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
