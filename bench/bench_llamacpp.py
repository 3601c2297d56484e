# SPDX-License-Identifier: MIT
"""edgellm vs llama.cpp (llama-cpp-python) on the same GGUF files: prefill and decode tok/s.

For each model x type x threads one child process loads both engines and runs them
interleaved (A B, B A, ...) so both see the same machine load; medians of the repetitions
are reported with the ratio edgellm / llama.cpp and the memory-bandwidth bound. Separate
children measure edgellm's peak RSS and its Python overhead per generated token.

Human output goes to stderr, JSON lines to bench/out/bench-<time>.jsonl, a Markdown table
to bench/out/results-<time>.md (and into docs/benchmarks.md after a full default run).

Usage: python bench/bench_llamacpp.py [--models ...] [--types ...] [--threads 1,2] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

DECODE_TARGET = 0.8  # this milestone: edgellm decode >= 0.8x llama.cpp in every cell
RSS_SLACK = 64 * 2**20  # RSS goal: file size + KV cache + 64 MiB
OVERHEAD_TARGET = 3.0  # Python overhead per generated token, % of decode time (135M shape)
PROMPT_SEED = 1234
DOCS = common.REPO / "docs" / "benchmarks.md"
DOCS_BEGIN, DOCS_END = "<!-- bench:results:begin -->", "<!-- bench:results:end -->"


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    """BOS then n-1 fixed ordinary token ids (after <unk> <s> </s> and the 256 byte tokens)."""
    rng = np.random.default_rng(PROMPT_SEED)
    return [1] + [int(x) for x in rng.integers(259, vocab_size, n - 1)]


def emit(row: dict[str, Any]) -> None:
    """A child's result: one JSON line on stdout for the parent."""
    print(json.dumps(row), flush=True)


# --------------------------------------------------------------------------------------
# Engines: the same work on both sides. Prefill = one eval of the prompt (last logits);
# decode = n times (argmax of the last logits, eval of that one token), both from Python.


class EdgeEngine:
    name = "edgellm"

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        from edgellm.runtime.model import Model

        self.model = Model(path, n_threads=threads, n_ctx=n_ctx)
        self.session = self.model.session()

    def run(self, prompt: list[int], n_decode: int) -> dict[str, Any]:
        s = self.session
        s.truncate(0)
        t0 = time.perf_counter()
        logits = s.eval(prompt, logits="last")
        t1 = time.perf_counter()
        out = []
        for _ in range(n_decode):
            tok = int(np.argmax(logits))
            out.append(tok)
            logits = s.eval([tok], logits="last")
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": out}

    def close(self) -> None:
        self.session.close()
        self.model.close()


class LlamaEngine:
    name = "llama.cpp"

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        import llama_cpp

        self._lc = llama_cpp
        self.llm = llama_cpp.Llama(
            str(path),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            n_batch=512,
            verbose=False,
            use_mmap=True,
        )
        self.n_vocab = self.llm.n_vocab()

    def _last_logits(self) -> np.ndarray:  # -> [vocab_size], a view of llama.cpp's buffer
        ptr = self._lc.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def run(self, prompt: list[int], n_decode: int) -> dict[str, Any]:
        llm = self.llm
        llm.reset()  # type: ignore[no-untyped-call]  # n_tokens = 0; eval() drops the cache
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        out = []
        for _ in range(n_decode):
            tok = int(np.argmax(self._last_logits()))
            out.append(tok)
            llm.eval([tok])
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": out}

    def close(self) -> None:
        self.llm.close()


ENGINES: dict[str, Callable[[Path, int, int], Any]] = {
    "edgellm": EdgeEngine,
    "llama.cpp": LlamaEngine,
}


def child_cell(args: argparse.Namespace) -> int:
    """One model x type x threads: both engines loaded, runs interleaved, one line per run."""
    path = common.model_path(args.model, args.type)
    vocab = common.MODELS[args.model]["vocab_size"]
    prompt = prompt_ids(vocab, args.prompt_tokens)
    engines = []
    for name in args.engines.split(","):
        t = time.perf_counter()
        engines.append(ENGINES[name](path, args.threads, args.n_ctx))
        common.log(f"  loaded {name} in {time.perf_counter() - t:.1f} s")
    for e in engines:  # warm-up: page in the weights, start thread pools
        e.run(prompt, 4)
    for rep in range(args.reps):
        order = engines if rep % 2 == 0 else engines[::-1]
        for e in order:
            busy = common.wait_quiet(args.max_busy, args.quiet_wait)
            load = common.load_avg()
            r = e.run(prompt, args.decode_tokens)
            emit(
                {
                    "kind": "run",
                    "engine": e.name,
                    "rep": rep,
                    "load_before": load,
                    "busy_before": busy,
                    "load_after": common.load_avg(),
                    "prompt_tokens": len(prompt),
                    "decode_tokens": args.decode_tokens,
                    **r,
                }
            )
    for e in engines:
        e.close()
    return 0


def _proc_status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(val.split()[0]) * 1024
    return out


def child_rss(args: argparse.Namespace) -> int:
    """Peak RSS of one engine alone: load, prefill the prompt, decode; n_ctx = the model's."""
    path = common.model_path(args.model, args.type)
    prompt = prompt_ids(common.MODELS[args.model]["vocab_size"], args.prompt_tokens)
    n_ctx = common.MODELS[args.model]["seq_len"]
    name = args.engines
    kv = None
    if name == "edgellm":
        import edgellm  # noqa: F401 - the baseline includes the imports

        base = _proc_status()
        e: Any = EdgeEngine(path, args.threads, n_ctx)
        kv = e.model.kv_cache_bytes(n_ctx)
    else:
        import llama_cpp  # noqa: F401

        base = _proc_status()
        e = LlamaEngine(path, args.threads, n_ctx)
    e.run(prompt, args.decode_tokens)
    st = _proc_status()
    emit(
        {
            "kind": "rss",
            "engine": name,
            "n_ctx": n_ctx,
            "kv_cache_bytes": kv,
            "baseline": base,
            **st,
        }
    )
    e.close()
    return 0


def child_overhead(args: argparse.Namespace) -> int:
    """Python's share of each generated token, timed inside the same runs.

    The runtime's `lib` is swapped for a proxy that times every one-token
    edgellm_session_eval call, so C time and total time come from the same tokens under the
    same load: overhead = (decode time - time inside C) / decode time. The proxy's own cost
    (two clock reads a call) lands on the Python side, so the figure is slightly pessimistic.
    """
    from edgellm.runtime import model as model_mod

    real = vars(model_mod)["lib"]  # the module global Session.eval calls through

    class TimedLib:
        def __init__(self) -> None:
            self.c_s, self.calls = 0.0, 0

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def edgellm_session_eval(self, h: Any, toks: Any, n: int, mode: int, out: Any) -> int:
            t = time.perf_counter()
            rc = real.edgellm_session_eval(h, toks, n, mode, out)
            if n == 1:  # decode steps only; the prompt's one batched call is prefill
                self.c_s += time.perf_counter() - t
                self.calls += 1
            return int(rc)

    timed = TimedLib()
    vars(model_mod)["lib"] = timed
    path = common.model_path(args.model, args.type)
    prompt = prompt_ids(common.MODELS[args.model]["vocab_size"], args.prompt_tokens)
    n = args.decode_tokens
    model = model_mod.Model(path, n_threads=args.threads, n_ctx=args.n_ctx)
    s = model.session()

    def generate() -> tuple[float, int]:
        s.truncate(0)
        s.generate(prompt, max_tokens=n, temperature=0)
        st = s.last_stats  # decode_s: from the end of prefill to the last token
        if st is None:
            raise RuntimeError("Session.generate left no stats")
        return st.decode_s, st.generated_tokens

    def eval_loop() -> tuple[float, int]:
        s.truncate(0)
        logits = s.eval(prompt)
        t = time.perf_counter()
        for _ in range(n):
            logits = s.eval([int(np.argmax(logits))])
        return time.perf_counter() - t, n

    eval_loop()  # warm-up
    for rep in range(args.reps):
        for name, fn in (("generate", generate), ("eval", eval_loop)):
            busy = common.wait_quiet(args.max_busy, args.quiet_wait)
            timed.c_s, timed.calls = 0.0, 0
            load = common.load_avg()
            total, n_tok = fn()
            emit(
                {
                    "kind": "overhead_run",
                    "mode": name,
                    "rep": rep,
                    "decode_s": total,
                    "c_s": timed.c_s,
                    "c_calls": timed.calls,
                    "generated_tokens": n_tok,
                    "load_before": load,
                    "busy_before": busy,
                }
            )
    s.close()
    model.close()
    return 0


# --------------------------------------------------------------------------------------
# Parent: runs the children, aggregates, prints, writes.


def run_child(
    mode: str,
    model: str,
    qtype: str,
    threads: int,
    args: argparse.Namespace,
    engines: str = "edgellm,llama.cpp",
    decode_tokens: int | None = None,
) -> list[dict[str, Any]]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        "--model",
        model,
        "--type",
        qtype,
        "--threads-one",
        str(threads),
        "--reps",
        str(args.reps),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--decode-tokens",
        str(decode_tokens or args.decode_tokens),
        "--n-ctx",
        str(args.n_ctx),
        "--engines",
        engines,
        "--quiet-wait",
        str(args.quiet_wait),
        "--max-busy",
        str(args.max_busy),
    ]
    try:
        p = subprocess.run(
            cmd, stdout=subprocess.PIPE, text=True, timeout=args.child_timeout, check=False
        )
    except subprocess.TimeoutExpired:
        common.log(f"  {mode} {model} {qtype} t={threads}: timed out after {args.child_timeout} s")
        return [{"kind": "error", "error": f"timeout after {args.child_timeout} s"}]
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0:
        common.log(f"  {mode} {model} {qtype} t={threads}: child exited {p.returncode}")
        rows.append({"kind": "error", "error": f"child exit status {p.returncode}"})
    return rows


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing generated token; None when the sequences agree."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


def fmt_rate(x: float | None) -> str:
    return "-" if x is None else (f"{x:.1f}" if x < 100 else f"{x:.0f}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _agree(c: dict[str, Any]) -> str:
    """How many of the generated tokens both engines chose alike, before the first difference."""
    d = c.get("greedy_first_divergence")
    return (
        f"{c['decode_tokens']}/{c['decode_tokens']}" if d is None else f"{d}/{c['decode_tokens']}"
    )


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def bench_cells(
    args: argparse.Namespace, out: common.JsonLines, ctx: dict[str, Any], bw: dict[int, float]
) -> list[dict[str, Any]]:
    cells = []
    for model in args.models:
        for qtype in args.types:
            path = common.model_path(model, qtype)
            wb = common.weight_bytes_per_token(path)
            for threads in args.threads:
                n_dec = args.decode_tokens
                if model == "tinyllama-1.1b" and threads == 1 and args.decode_tokens_1b_1t:
                    n_dec = args.decode_tokens_1b_1t
                # Bandwidth again before every cell: the peak is what bounds, and a shared
                # machine hides it at times, so the run keeps the best it saw.
                common.wait_quiet(args.max_busy, args.quiet_wait)
                r = common.read_bandwidth(threads)
                out.write({**ctx, "kind": "bandwidth", **r, "load": common.load_avg()})
                bw[threads] = max(bw[threads], r["best_bytes_per_s"])
                common.log(
                    f"{model} {qtype} threads={threads}: prefill {args.prompt_tokens}, "
                    f"decode {n_dec}, {args.reps} reps, load {common.load_avg()}"
                )
                rows = run_child("cell", model, qtype, threads, args, decode_tokens=n_dec)
                base = {**ctx, "model": model, "type": qtype.upper(), "threads": threads}
                for r in rows:
                    short = {"tokens": r["tokens"][:16]} if r["kind"] == "run" else {}
                    out.write({**base, **r, **short})  # the first 16 tokens keep lines short
                runs = [r for r in rows if r["kind"] == "run"]
                cell: dict[str, Any] = {
                    **base,
                    "kind": "cell",
                    "prompt_tokens": args.prompt_tokens,
                    "decode_tokens": n_dec,
                    "reps": args.reps,
                    **wb,
                    "bandwidth_bytes_per_s": bw[threads],
                    "decode_bound_tok_s": bw[threads] / wb["bytes_per_token"],
                }
                for eng, key in (("edgellm", "edgellm"), ("llama.cpp", "llamacpp")):
                    mine = [r for r in runs if r["engine"] == eng]
                    if not mine:
                        cell[f"{key}_prefill_tok_s"] = cell[f"{key}_decode_tok_s"] = None
                        continue
                    cell[f"{key}_prefill_tok_s"] = common.median(
                        args.prompt_tokens / r["prefill_s"] for r in mine
                    )
                    cell[f"{key}_decode_tok_s"] = common.median(n_dec / r["decode_s"] for r in mine)
                    cell[f"{key}_decode_tok_s_all"] = [
                        round(n_dec / r["decode_s"], 2) for r in mine
                    ]
                    cell[f"{key}_prefill_tok_s_all"] = [
                        round(args.prompt_tokens / r["prefill_s"], 2) for r in mine
                    ]
                for ph in ("prefill", "decode"):
                    a, b = cell[f"edgellm_{ph}_tok_s"], cell[f"llamacpp_{ph}_tok_s"]
                    cell[f"{ph}_ratio"] = a / b if a and b else None
                e0 = [r for r in runs if r["engine"] == "edgellm"]
                l0 = [r for r in runs if r["engine"] == "llama.cpp"]
                cell["greedy_first_divergence"] = (
                    first_divergence(e0[0]["tokens"], l0[0]["tokens"]) if e0 and l0 else None
                )
                cell["load_range"] = [
                    min((r["load_before"][0] for r in runs), default=None),
                    max((r["load_after"][0] for r in runs), default=None),
                ]
                cell["busy_before_max"] = max((r["busy_before"] for r in runs), default=None)
                cell["errors"] = [r["error"] for r in rows if r["kind"] == "error"]
                cell["meets_decode_target"] = (
                    cell["decode_ratio"] is not None and cell["decode_ratio"] >= DECODE_TARGET
                )
                cells.append(cell)
                common.log(
                    f"  prefill {fmt_rate(cell['edgellm_prefill_tok_s'])} vs "
                    f"{fmt_rate(cell['llamacpp_prefill_tok_s'])} tok/s "
                    f"({fmt_ratio(cell['prefill_ratio'])}x); decode "
                    f"{fmt_rate(cell['edgellm_decode_tok_s'])} vs "
                    f"{fmt_rate(cell['llamacpp_decode_tok_s'])} tok/s "
                    f"({fmt_ratio(cell['decode_ratio'])}x), bound "
                    f"{fmt_rate(cell['decode_bound_tok_s'])} so far"
                )
    for cell in cells:  # the bound from the best bandwidth of the whole run
        t = cell["threads"]
        cell["bandwidth_bytes_per_s"] = bw[t]
        cell["decode_bound_tok_s"] = bw[t] / cell["bytes_per_token"]
        out.write(cell)
    return cells


def bench_rss(
    args: argparse.Namespace, out: common.JsonLines, ctx: dict[str, Any]
) -> list[dict[str, Any]]:
    res = []
    threads = max(args.threads)
    for model in args.models:
        for qtype in args.types:
            path = common.model_path(model, qtype)
            row: dict[str, Any] = {
                **ctx,
                "kind": "rss_summary",
                "model": model,
                "type": qtype.upper(),
                "threads": threads,
                "file_bytes": path.stat().st_size,
            }
            for eng in ("edgellm", "llama.cpp"):
                rows = run_child("rss", model, qtype, threads, args, engines=eng)
                for r in rows:
                    out.write(
                        {**ctx, "model": model, "type": qtype.upper(), "threads": threads, **r}
                    )
                got = [r for r in rows if r["kind"] == "rss"]
                key = "edgellm" if eng == "edgellm" else "llamacpp"
                row[f"{key}_peak_rss"] = got[0]["VmHWM"] if got else None
                if eng == "edgellm" and got:
                    row["kv_cache_bytes"] = got[0]["kv_cache_bytes"]
                    row["n_ctx"] = got[0]["n_ctx"]
                    row["edgellm_rss_anon"] = got[0]["RssAnon"]
                    row["edgellm_rss_file"] = got[0]["RssFile"]
                    row["edgellm_baseline_rss"] = got[0]["baseline"]["VmRSS"]
            if row.get("kv_cache_bytes") is not None:
                row["goal_bytes"] = row["file_bytes"] + row["kv_cache_bytes"] + RSS_SLACK
                row["meets_rss_goal"] = (
                    row["edgellm_peak_rss"] is not None
                    and row["edgellm_peak_rss"] <= row["goal_bytes"]
                )
            out.write(row)
            res.append(row)
            mib = 2**20
            common.log(
                f"RSS {model} {qtype}: edgellm {(row['edgellm_peak_rss'] or 0) / mib:.0f} "
                f"MiB (goal {row.get('goal_bytes', 0) / mib:.0f}), llama.cpp "
                f"{(row['llamacpp_peak_rss'] or 0) / mib:.0f} MiB"
            )
    return res


def bench_overhead(
    args: argparse.Namespace, out: common.JsonLines, ctx: dict[str, Any]
) -> list[dict[str, Any]]:
    res = []
    model = "smollm-135m"
    for qtype in args.types:
        for threads in args.threads:
            rows = run_child("overhead", model, qtype, threads, args, engines="edgellm")
            base = {**ctx, "model": model, "type": qtype.upper(), "threads": threads}
            for r in rows:
                out.write({**base, **r})
            runs = [r for r in rows if r["kind"] == "overhead_run"]
            if not runs:
                continue
            row: dict[str, Any] = {**base, "kind": "overhead", "decode_tokens": args.decode_tokens}
            for mode in ("generate", "eval"):
                mine = [r for r in runs if r["mode"] == mode and r["c_calls"]]
                row[f"{mode}_ms_per_token"] = common.median(
                    r["decode_s"] / r["c_calls"] * 1e3 for r in mine
                )
                row[f"{mode}_c_ms_per_token"] = common.median(
                    r["c_s"] / r["c_calls"] * 1e3 for r in mine
                )
                row[f"{mode}_python_us_per_token"] = common.median(
                    (r["decode_s"] - r["c_s"]) / r["c_calls"] * 1e6 for r in mine
                )
                row[f"{mode}_overhead_pct"] = common.median(
                    100 * (r["decode_s"] - r["c_s"]) / r["decode_s"] for r in mine
                )
            row["generated_tokens"] = runs[0]["generated_tokens"]
            row["meets_overhead_target"] = row["generate_overhead_pct"] <= OVERHEAD_TARGET
            out.write(row)
            res.append(row)
            common.log(
                f"overhead {model} {qtype} t={threads}: generate "
                f"{row['generate_ms_per_token']:.3f} ms/token, of which Python "
                f"{row['generate_python_us_per_token']:.0f} us = "
                f"{row['generate_overhead_pct']:.1f}% (target <= {OVERHEAD_TARGET}%); "
                f"Session.eval loop {row['eval_python_us_per_token']:.0f} us = "
                f"{row['eval_overhead_pct']:.1f}%"
            )
    return res


def markdown(
    ctx: dict[str, Any],
    bw: dict[int, float],
    cells: list[dict[str, Any]],
    rss: list[dict[str, Any]],
    ovh: list[dict[str, Any]],
    info: dict[str, Any],
) -> str:
    """The Markdown tables of one run; info: the run_info line (started, command, args)."""
    m = ctx["machine"]
    a = info["args"]
    lines = [
        f"Measured {info['started']} at commit `{ctx['git']}` on {m['cpu']} ({m['cores']} "
        f"cores, {m['arch']}), edgellm ISA `{ctx['isa']}` built with {ctx['compiler']} "
        f"(core sha256 `{ctx.get('native_sha256')}`, diff vs HEAD `{ctx.get('git_diff')}`), "
        f"llama-cpp-python {ctx['llama_cpp_python']}, by `{info['command']}`; prompt "
        f"{a['prompt_tokens']} tokens, {a['reps']} interleaved repetitions, medians. "
        "Read bandwidth: "
        + ", ".join(
            f"{bw[t] / 1e9:.1f} GB/s with {t} thread{'s' if t > 1 else ''}" for t in sorted(bw)
        )
        + ".",
    ]
    if cells:
        lines += [
            "",
            "| model | type | threads | prefill edgellm | prefill llama.cpp | ratio "
            "| decode edgellm | decode llama.cpp | ratio | bound | >= 0.8x | same greedy tokens "
            "| others' CPU |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|:-:|--:|--:|",
        ]
    for c in cells:
        ok = "yes" if c["meets_decode_target"] else "**no**"
        lines.append(
            f"| {common.MODELS[c['model']]['label']} | {c['type']} | {c['threads']} "
            f"| {fmt_rate(c['edgellm_prefill_tok_s'])} | {fmt_rate(c['llamacpp_prefill_tok_s'])} "
            f"| {fmt_ratio(c['prefill_ratio'])} | {fmt_rate(c['edgellm_decode_tok_s'])} "
            f"| {fmt_rate(c['llamacpp_decode_tok_s'])} | {fmt_ratio(c['decode_ratio'])} "
            f"| {fmt_rate(c['decode_bound_tok_s'])} | {ok} | {_agree(c)} "
            f"| {_pct(c['busy_before_max'])} |"
        )
    if cells:
        lines.append("")
        lines.append(
            "Rates are tokens/s; decode is over "
            + ", ".join(sorted({f"{c['decode_tokens']}" for c in cells}))
            + " generated tokens; bound = read bandwidth (the best seen during the "
            "run) / bytes of weights read per token; same greedy tokens = generated "
            "tokens before the engines' first difference (first repetition); "
            "others' CPU = the most CPU other processes used in the 0.5 s "
            "before any of the cell's runs (all cores = 100%)."
        )
    if rss:
        lines += [
            "",
            "| model | type | file | KV cache (n_ctx) | goal | edgellm peak RSS "
            "| llama.cpp peak RSS | meets goal |",
            "|---|---|--:|--:|--:|--:|--:|:-:|",
        ]
        mib = 2**20
        for r in rss:
            lines.append(
                f"| {common.MODELS[r['model']]['label']} | {r['type']} "
                f"| {r['file_bytes'] / mib:.0f} MiB "
                f"| {(r.get('kv_cache_bytes') or 0) / mib:.0f} MiB ({r.get('n_ctx')}) "
                f"| {r.get('goal_bytes', 0) / mib:.0f} MiB "
                f"| {(r['edgellm_peak_rss'] or 0) / mib:.0f} MiB "
                f"| {(r['llamacpp_peak_rss'] or 0) / mib:.0f} MiB "
                f"| {'yes' if r.get('meets_rss_goal') else '**no**'} |"
            )
    if ovh:
        lines += [
            "",
            "| model | type | threads | generate ms/token | in C | Python us/token "
            "| overhead | <= 3% | Session.eval loop: Python us/token | overhead |",
            "|---|---|--:|--:|--:|--:|--:|:-:|--:|--:|",
        ]
        for r in ovh:
            lines.append(
                f"| {common.MODELS[r['model']]['label']} | {r['type']} | {r['threads']} "
                f"| {r['generate_ms_per_token']:.2f} | {r['generate_c_ms_per_token']:.2f} "
                f"| {r['generate_python_us_per_token']:.0f} | {r['generate_overhead_pct']:.1f}% "
                f"| {'yes' if r['meets_overhead_target'] else '**no**'} "
                f"| {r['eval_python_us_per_token']:.0f} | {r['eval_overhead_pct']:.1f}% |"
            )
    return "\n".join(lines) + "\n"


def update_docs(table: str) -> None:
    text = DOCS.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        common.log(f"{DOCS} has no {DOCS_BEGIN} ... {DOCS_END} block; not updated")
        return
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    DOCS.write_text(f"{head}{DOCS_BEGIN}\n{table}{DOCS_END}{tail}")
    common.log(f"updated {DOCS}")


def report(args: argparse.Namespace) -> int:
    """Rebuild the Markdown tables of a finished run from its JSON lines (--report FILE)."""
    rows = [json.loads(line) for line in Path(args.report).read_text().splitlines() if line]
    info = next((r for r in rows if r["kind"] == "run_info"), None)
    if info is None:
        common.log(f"{args.report} has no run_info line (written by runs since 2026-11-26)")
        return 1
    cells = [r for r in rows if r["kind"] == "cell"]
    rss = [r for r in rows if r["kind"] == "rss_summary"]
    ovh = [r for r in rows if r["kind"] == "overhead"]
    bw: dict[int, float] = {}
    for r in rows:
        if r["kind"] == "bandwidth":
            bw[r["threads"]] = max(bw.get(r["threads"], 0.0), r["best_bytes_per_s"])
    table = markdown(info, bw, cells, rss, ovh, info)
    print(table, end="")
    if args.docs == "yes":
        update_docs(table)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models",
        default=",".join(common.MODELS),
        help=f"comma-separated, from {', '.join(common.MODELS)}",
    )
    ap.add_argument("--types", default=",".join(common.TYPES), help="q8_0,q4_0")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions per engine")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument(
        "--decode-tokens-1b-1t",
        type=int,
        default=0,
        help="fewer decode tokens for TinyLlama at 1 thread (0 = --decode-tokens)",
    )
    ap.add_argument("--n-ctx", type=int, default=512, help="context of the speed runs")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: speed,rss,overhead")
    ap.add_argument(
        "--docs",
        choices=("auto", "yes", "no"),
        default="auto",
        help="write the table into docs/benchmarks.md (auto: after a full default run)",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for the other processes "
        "to use less than --max-busy of the CPUs (0: no wait; busy is recorded)",
    )
    ap.add_argument("--max-busy", type=float, default=0.25)
    ap.add_argument("--child-timeout", type=int, default=3600)
    ap.add_argument(
        "--report",
        metavar="JSONL",
        help="print (with --docs yes: write into the docs) the tables of a finished run's "
        "bench/out/bench-*.jsonl instead of measuring",
    )
    # Internal: how the parent starts a child.
    ap.add_argument("--child", choices=("cell", "rss", "overhead"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--type", help=argparse.SUPPRESS)
    ap.add_argument("--threads-one", type=int, dest="threads_one", help=argparse.SUPPRESS)
    ap.add_argument("--engines", default="edgellm,llama.cpp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.types = [t.lower() for t in args.types.split(",") if t]
    args.threads = [int(t) for t in str(args.threads).split(",") if t]
    args.skip = {s for s in args.skip.split(",") if s}
    for m in args.models:
        if m not in common.MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(common.MODELS)}")
    for t in args.types:
        if t not in common.TYPES:
            ap.error(f"unknown type {t!r}; choose from {', '.join(common.TYPES)}")
    if args.prompt_tokens + args.decode_tokens + 8 > args.n_ctx:
        ap.error("--n-ctx must hold the prompt and the generated tokens")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        args.threads = args.threads_one
        return {"cell": child_cell, "rss": child_rss, "overhead": child_overhead}[args.child](args)

    if args.report:
        return report(args)
    snapshot = common.snapshot_package()  # this run measures one build, whoever rebuilds
    try:
        return measure(args, argv)
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


def measure(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The parent's run: bandwidth, speed cells, RSS, overhead, tables."""
    missing = [
        (m, t) for m in args.models for t in args.types if not common.model_path(m, t).exists()
    ]
    if missing:
        import make_models

        make_models.main(
            [
                "--models",
                ",".join(sorted({m for m, _ in missing})),
                "--types",
                ",".join(sorted({t for _, t in missing})),
            ]
        )
    ctx = common.context()
    out = common.JsonLines("bench")
    info = {
        "kind": "run_info",
        "started": common.stamp(),
        "command": shlex.join(["python", "bench/bench_llamacpp.py", *(argv or sys.argv[1:])]),
        "args": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()},
    }
    out.write({**ctx, **info})
    from edgellm import _native  # fail here, before any number, if the core does not load

    bi = _native.build_info()
    common.log(
        f"edgellm {ctx['git']}: ISA {bi['active']} (built {','.join(bi['built_with'])}; "
        f"CPU has {','.join(bi['has'])}), {bi['compiler']}; llama-cpp-python "
        f"{ctx['llama_cpp_python']}; {ctx['machine']['cpu']} x{ctx['machine']['cores']}; "
        f"threads {args.threads}; load {common.load_avg()}"
    )
    bw: dict[int, float] = {}
    for t in sorted(set(args.threads)):
        common.wait_quiet(args.max_busy, args.quiet_wait)
        r = common.read_bandwidth(t)
        bw[t] = r["best_bytes_per_s"]
        out.write({**ctx, "kind": "bandwidth", **r, "load": common.load_avg()})
        common.log(
            f"read bandwidth, {t} thread(s): {bw[t] / 1e9:.1f} GB/s best, "
            f"{r.get('median_bytes_per_s', bw[t]) / 1e9:.1f} GB/s median"
        )
    cells = [] if "speed" in args.skip else bench_cells(args, out, ctx, bw)
    rss = [] if "rss" in args.skip else bench_rss(args, out, ctx)
    ovh = (
        []
        if "overhead" in args.skip or "smollm-135m" not in args.models
        else bench_overhead(args, out, ctx)
    )
    table = markdown(ctx, bw, cells, rss, ovh, info)
    md = common.OUT_DIR / out.path.name.replace("bench-", "results-").replace(".jsonl", ".md")
    md.write_text(table)
    common.log("\n" + table)
    common.log(f"JSON lines: {out.path}\nMarkdown: {md}")
    default_run = (
        args.models == list(common.MODELS)
        and args.types == list(common.TYPES)
        and args.threads == [1, 2]
        and not args.skip
    )
    if args.docs == "yes" or (args.docs == "auto" and default_run):
        update_docs(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
