# SPDX-License-Identifier: MIT
"""Decode tokens/s and peak memory of the TFLite/LiteRT path against the native C runtime.

For stories260K and the demo cardiology leaf, one file per backend and weight type:

- ``native-f32`` / ``native-q8_0``: the GGUF run by edgellm's C core;
- ``tflite-f32`` / ``tflite-int8`` / ``tflite-int8-dynamic``: edgellm.tflite.export of the
  same weights (int8: weight-only, what ``edgellm build --board coral-dev-board`` writes;
  int8-dynamic: int8 arithmetic) run by ai-edge-litert on the CPU (XNNPACK), no delegate.

Each measurement runs in its own child process (so peak RSS is that model's): load, prefill a
fixed 16-token prompt, 4 warm-up steps, then ``--steps`` greedy decode steps through
``Session.eval([token])``, the public API both backends share. Rounds alternate the order of
the configurations so both backends see the same machine load; tables show medians. Memory is
the child's peak RSS (VmHWM) and that peak less the RSS before loading (python, numpy and
edgellm imported; the interpreter's import counts as the tflite path's). One JSON
line per child goes to bench/out/tflite_vs_native-<time>.jsonl; a table goes to stdout.

    python bench/tflite_vs_native.py                   # both models, 3 rounds, 128 steps
    python bench/tflite_vs_native.py --models stories --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import OUT_DIR, REPO, JsonLines, context, cpu_busy, log

STORIES = REPO / "tests" / "data" / "stories260K" / "stories260K.bin"
LEAF = REPO / "edgellm" / "demo" / "bundles" / "en-medical-cardiology-rpi5-q8_0" / "model.gguf"
CONFIGS = ("native-f32", "native-q8_0", "tflite-f32", "tflite-int8", "tflite-int8-dynamic")
PROMPT_LEN = 16


def _status_mib(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, MiB. VmHWM, unlike ru_maxrss, starts
    afresh at exec, so a child does not inherit the parent's peak."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def prepare(model: str, work: Path, reuse: bool = False) -> dict[str, Path]:
    """The files of each configuration, in bench/out/tflite/<model>/ (exports are redone
    unless reuse: they depend on the exporter's code)."""
    from edgellm.formats.convert import convert
    from edgellm.tflite.export import export_tflite

    src = STORIES if model == "stories" else LEAF
    d = work / model
    d.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for t in ("f32", "q8_0"):
        p = d / f"native-{t}" / "model.gguf"
        if not p.is_file():
            p.parent.mkdir(exist_ok=True)
            convert(src, p, type=t, log=None)
        paths[f"native-{t}"] = p
    for mode, base in (("f32", "f32"), ("int8", "q8_0"), ("int8-dynamic", "q8_0")):
        folder = d / f"tflite-{mode}"
        if reuse and (folder / "model.tflite").is_file():
            log(f"reusing {folder / 'model.tflite'}")
        else:
            folder.mkdir(exist_ok=True)
            gguf = folder / "model.gguf"
            gguf.write_bytes(paths[f"native-{base}"].read_bytes())
            log(f"exporting {model} {mode}")
            export_tflite(gguf, folder / "model.tflite",
                          quantize=None if mode == "f32" else mode)
        paths[f"tflite-{mode}"] = folder
    return paths


def measure_one(path: str, steps: int, threads: int) -> dict[str, Any]:
    """In a child: load, prefill, decode; tokens/s and memory of this process."""
    import numpy as np

    import edgellm
    from edgellm.runtime import model as _model  # noqa: F401  (the C core: both paths load it)

    base = _status_mib("VmRSS")  # python, numpy and edgellm imported: what both paths carry
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"delegate": None} if not path.endswith(".gguf") else {}
    m = edgellm.Model(path, n_threads=threads, **kw)
    load_s = time.perf_counter() - t0
    prompt = [1] + [int(t) for t in np.arange(PROMPT_LEN - 1) * 37 % 400 + 3]
    with m, m.session() as s:
        t0 = time.perf_counter()
        s.eval(prompt)
        prefill_s = time.perf_counter() - t0
        tok = int(np.argmax(s._last))
        for _ in range(4):
            s.eval([tok])
            tok = int(np.argmax(s._last))
        t0 = time.perf_counter()
        for _ in range(steps):
            s.eval([tok])
            tok = int(np.argmax(s._last))
        decode_s = time.perf_counter() - t0
    peak = _status_mib("VmHWM")
    return {"decode_tokens_per_s": steps / decode_s, "prefill_tokens_per_s": PROMPT_LEN / prefill_s,
            "load_s": load_s, "peak_rss_mib": peak, "rss_before_load_mib": base,
            "model_peak_mib": peak - base, "type": type(m).__name__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="stories,leaf", help="comma list of stories, leaf")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="keep .tflite files of an earlier run")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: measure this path
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(measure_one(a.one, a.steps, a.threads)))
        return 0
    ctx = context()
    out = JsonLines("tflite_vs_native")
    from importlib.metadata import version

    versions = {p: version(p) for p in ("ai-edge-litert", "litert-torch", "ai-edge-quantizer")}
    log(f"machine: {ctx['machine']}  git {ctx['git']}  threads {a.threads}  {versions}")
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for model in a.models.split(","):
        paths = prepare(model, OUT_DIR / "tflite", a.reuse)
        for r in range(a.rounds):
            order = CONFIGS if r % 2 == 0 else CONFIGS[::-1]
            for cfg in order:
                busy = cpu_busy(0.3)
                p = subprocess.run([sys.executable, __file__, "--one", str(paths[cfg]), "--steps",
                                    str(a.steps), "--threads", str(a.threads)],
                                   capture_output=True, text=True, check=True, env=dict(os.environ))
                row = json.loads(p.stdout.strip().splitlines()[-1])
                f = paths[cfg] if cfg.startswith("native") else paths[cfg] / "model.tflite"
                row.update(model=model, config=cfg, round=r, steps=a.steps, threads=a.threads,
                           file_bytes=f.stat().st_size, cpu_busy_before=busy, **versions, **ctx)
                out.write(row)
                results.setdefault((model, cfg), []).append(row)
                log(f"{model} {cfg} round {r}: {row['decode_tokens_per_s']:.0f} tok/s, "
                    f"peak {row['peak_rss_mib']:.1f} MiB")
    print(f"| model | config | file bytes | decode tok/s (median of {a.rounds}) | "
          "peak RSS MiB | RSS over the imports MiB |")
    print("|---|---|--:|--:|--:|--:|")
    for (model, cfg), rows in results.items():
        med = statistics.median(x["decode_tokens_per_s"] for x in rows)
        peak = statistics.median(x["peak_rss_mib"] for x in rows)
        delta = statistics.median(x["model_peak_mib"] for x in rows)
        print(f"| {model} | {cfg} | {rows[0]['file_bytes']:,} | {med:,.0f} | {peak:.1f} | {delta:.1f} |")
    log(f"wrote {out.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
