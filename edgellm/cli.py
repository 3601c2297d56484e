# SPDX-License-Identifier: MIT
"""The `edgellm` command: run, chat, convert and inspect models (`edgellm COMMAND --help`)."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from typing import Any, Callable

from ._version import __version__
from .errors import EdgeLLMError

EPILOG = """\
examples:
  edgellm info                                   # build, CPU features, kernel table
  edgellm convert stories260K.bin --out s.gguf --type q8_0
  edgellm convert ./my-hf-llama --out m.gguf --type q4_0
  edgellm run s.gguf "Once upon a time" -n 64 --temp 0
  edgellm chat m.gguf
"""


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("-n", "--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    g.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.8,
                   help="sampling temperature; 0 = greedy, deterministic (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens; 0 = all (default 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    g.add_argument("--seed", type=int, default=None, help="RNG seed: the same seed gives the same text")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end generation at TEXT (repeatable)")
    g = p.add_argument_group("runtime")
    g.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all available)")
    g.add_argument("-c", "--ctx", type=int, default=None, help="context length in tokens (default: model's, max 4096)")


def _sampling_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return {"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "seed": a.seed, "stop": a.stop}


def cmd_info(a: argparse.Namespace) -> int:
    """Print what this build can do, and optionally what a model file holds."""
    from . import _native

    info = _native.build_info()
    out: dict[str, Any] = {"edgellm": __version__, "core": info}
    if a.model:
        from .formats.gguf import read_gguf
        from .runtime.config import ModelConfig

        with read_gguf(a.model) as gf:
            cfg = ModelConfig.from_metadata(gf.metadata)
            types: dict[str, int] = {}
            for t in gf.tensors.values():
                types[t.type_name] = types.get(t.type_name, 0) + 1
            out["model"] = {
                "path": str(a.model),
                "config": cfg.__dict__,
                "tensor_types": types,
                "parameters": sum(t.n_elements for t in gf.tensors.values()),
                "name": gf.metadata.get("general.name"),
                "edgellm": {k: v for k, v in gf.metadata.items() if k.startswith("edgellm.")},
            }
    if a.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(f"edgellm {__version__}")
    print(f"  core:          version {info.get('version')}, {info.get('compiler')}")
    print(f"  built with:    {', '.join(info['built_with'])}")
    print(f"  CPU can run:   {', '.join(info['has'])}")
    print(f"  CPU features:  {' '.join(info['cpu_features']) or '-'}")
    print(f"  kernel table:  {info['active']}  (force one with EDGELLM_ISA=name)")
    if "model" in out:
        m = out["model"]
        print(f"model {m['path']}")
        print(f"  name:          {m['name']}")
        print(f"  parameters:    {m['parameters']:,}")
        print(f"  tensor types:  {', '.join(f'{k} x{v}' for k, v in m['tensor_types'].items())}")
        for k, v in m["config"].items():
            print(f"  {k + ':':<14} {v}")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    """Complete one prompt and stream the text to stdout."""
    from .runtime.model import Model

    with Model(a.model, n_threads=a.threads, n_ctx=a.ctx) as m, m.session() as s:
        for piece in s.generate(a.prompt, a.max_tokens, stream=True, **_sampling_kwargs(a)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        st = s.last_stats
        if a.verbose and st is not None:
            print(
                f"[{st.prompt_tokens} prompt tokens in {st.prefill_s * 1e3:.1f} ms; "
                f"{st.generated_tokens} generated at {st.decode_tokens_per_s:.1f} tok/s; "
                f"stop: {st.stop_reason}]",
                file=sys.stderr,
            )
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    """A multi-turn conversation on stdin/stdout using the model's chat template."""
    from .runtime.model import Model

    interactive = sys.stdin.isatty()
    with Model(a.model, n_threads=a.threads, n_ctx=a.ctx) as m, m.session() as s:
        messages: list[dict[str, str]] = []
        if a.system:
            messages.append({"role": "system", "content": a.system})
        if interactive:
            print("edgellm chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.",
                  file=sys.stderr)
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                break
            text = line.rstrip("\n")
            if text.strip() == "/exit":
                break
            if text.strip() == "/reset":
                messages = messages[:1] if a.system else []
                s.truncate(0)
                continue
            if not text.strip():
                continue
            messages.append({"role": "user", "content": text})
            reply = []
            for piece in s.chat(messages, a.max_tokens, stream=True, **_sampling_kwargs(a)):
                sys.stdout.write(piece)
                sys.stdout.flush()
                reply.append(piece)
            sys.stdout.write("\n")
            sys.stdout.flush()
            messages.append({"role": "assistant", "content": "".join(reply).strip()})
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    """Convert a Hugging Face or llama2.c checkpoint (or a GGUF) to a GGUF of the given type."""
    from .formats.convert import convert

    out = convert(a.src, a.out, type=a.type, tokenizer=a.tokenizer)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    """Perplexity of a model on a text file (protocol edgellm-ppl-v1, docs/evaluation.md)."""
    from .errors import InvalidArgumentError
    from .hub.evaluate import perplexity
    from .runtime.model import Model

    try:
        with open(a.text, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"cannot read {a.text}: {exc}") from None

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty() or done == total:
            sys.stderr.write(f"\reval: {done}/{total} windows")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    with Model(a.model, n_threads=a.threads, n_ctx=a.ctx) as m:
        r = perplexity(m, text, window=a.window, stride=a.stride, max_tokens=a.max_tokens,
                       progress=progress)
    if a.json:
        print(json.dumps({"model": str(a.model), "text": str(a.text), **r.as_dict()}, indent=2))
        return 0
    print(f"perplexity:     {r.ppl:.4f}")
    print(f"mean nll:       {r.nll:.5f} nats/token")
    print(f"tokens scored:  {r.n_scored} of {r.n_tokens}")
    print(f"windows:        {r.n_windows} of {r.window} tokens, stride {r.stride}"
          f"{', BOS first' if r.bos else ''}")
    print(f"time:           {r.seconds:.2f} s ({r.n_tokens / max(r.seconds, 1e-9):.0f} tokens/s)")
    print(f"protocol:       {r.protocol}")
    return 0


def cmd_build(a: argparse.Namespace) -> int:
    """Convert, evaluate and bundle a model for one board (model.gguf + bundle.json)."""
    from .hub.build import build

    r = build(a.model, a.board, type=a.type, node=a.node, version=a.version, parent=a.parent,
              eval_texts=a.eval_text, out=a.out, tokenizer=a.tokenizer,
              max_eval_tokens=a.eval_max_tokens, n_threads=a.threads, log=sys.stderr)
    b = r.bundle
    if a.json:
        print(json.dumps({"folder": str(b.folder), "reason": r.reason, **b.to_dict()}, indent=2))
        return 0
    print(f"bundle:   {b.folder}")
    print(f"model:    {b.model_path} ({b.model_size:,} bytes)")
    print(f"node:     {b.node} v{b.version}" + (f"  (parent {b.lineage.parent}"
          + (f"@{b.lineage.parent_version}" if b.lineage.parent_version else "") + ")"
          if b.lineage.parent else ""))
    print(f"board:    {b.board}  recipe: {b.recipe}")
    for name, sc in b.scores.items():
        print(f"eval:     {name}: ppl {sc.ppl:.4f} ({sc.n_scored} tokens, {sc.protocol})")
    return 0


def cmd_select(a: argparse.Namespace) -> int:
    """Pick the build of a need's node (or its nearest ancestor) that fits a board."""
    import os

    from .boards import load_board
    from .formats.bundle import list_bundles
    from .hub.select import select

    folder = a.bundles or os.environ.get("EDGELLM_BUNDLES") or "bundles"
    sel = select(load_board(a.board), a.need, list_bundles(folder), context=a.context,
                 min_tokens_per_s=a.min_tokens_per_s)
    if a.json:
        print(json.dumps(sel.to_dict(), indent=2))
    else:
        print(sel.explain())
    if sel.choice is None:
        print(f"edgellm select: error: nothing fits: {sel.shortfall}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    """Measure a model's speed and memory on this machine beside a board profile's estimates."""
    import platform

    from .boards import load_board
    from .hub.bench import run_bench

    name = a.board or ("x86-host" if platform.machine() in ("x86_64", "AMD64") else None)
    board = load_board(name) if name else None
    import io

    records = run_bench(a.model, board=board, threads=a.threads or (), prompt_tokens=a.prompt_tokens,
                        gen_tokens=a.gen_tokens, reps=a.reps, n_ctx=a.ctx, kernels=a.kernels,
                        log=io.StringIO() if a.json else sys.stderr)
    for r in records:
        print(json.dumps(r, separators=(",", ":")))
    return 0


def cmd_boards(a: argparse.Namespace) -> int:
    """List the board profiles, show one, or measure this machine's memory bandwidth."""
    import time

    from . import boards

    action = a.boards_action or "list"
    if action == "show":
        prof = boards.load_board(a.name, a.dir)
        if a.json:
            print(json.dumps({**prof.to_dict(), "host_problems": prof.host_problems(),
                              "sources": boards.field_sources(prof)}, indent=2))
        else:
            print(boards.format_profile(prof))
        return 0
    if action == "calibrate":
        prof = boards.load_board(a.board, a.dir)
        mib = a.mib or boards.default_calibration_mib()
        threads = a.threads or boards.usable_cpus()
        gbs = boards.calibrate_bandwidth(mib, a.repeats, threads)
        how = (f"{boards.host_cpu_name()} with `edgellm boards calibrate` ({mib} MiB, "
               f"{threads} threads, best of {a.repeats}), {time.strftime('%Y-%m-%d')}")
        lines = boards.calibration_toml(prof, gbs, how)
        if a.json:
            print(json.dumps({"board": prof.name, "bandwidth_gbs": gbs, "mib": mib,
                              "threads": threads, "repeats": a.repeats, "toml": lines}, indent=2))
            return 0
        print(f"sustained read bandwidth: {gbs:.1f} GB/s ({mib} MiB, {threads} threads, "
              f"best of {a.repeats})")
        print(f"{prof.name} profile now: {prof.mem_bandwidth_gbs:g} GB/s peak x "
              f"{prof.sustained_factor:g} = {prof.sustained_bandwidth_bytes_per_s / 1e9:.1f} GB/s")
        print(f"to record it, put these lines into a copy of {prof.path.name}:")
        for line in lines:
            print(f"  {line}")
        print(f'or in Python: load_board("{prof.name}", bandwidth_gbs={gbs:.1f})')
        return 0
    profs = boards.load_all(a.dir)
    if a.json:
        print(json.dumps([{**p.to_dict(), "host_problems": p.host_problems()}
                          for p in profs.values()], indent=2))
    else:
        print(boards.format_table(profs.values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgellm",
        description="Run, convert and inspect small language models on edge boards.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"edgellm {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and timing details")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, epilog: str = "") -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=fn)
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and timing details")
        return sp

    sp = add("info", cmd_info, "show the build, CPU features and kernel table; with MODEL, the model's facts",
             "example:\n  edgellm info\n  edgellm info model.gguf --json")
    sp.add_argument("model", nargs="?", help="a GGUF file to describe")
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = add("run", cmd_run, "complete a prompt and print the text as it is generated",
             'examples:\n  edgellm run model.gguf "The heart has" -n 64\n'
             "  edgellm run model.gguf --temp 0 -n 256     # greedy from BOS alone")
    sp.add_argument("model", help="a GGUF model file")
    sp.add_argument("prompt", nargs="?", default="", help="the prompt (default: empty, i.e. BOS alone)")
    _add_sampling(sp)

    sp = add("chat", cmd_chat, "chat with a model in the terminal (applies its chat template)",
             "example:\n  edgellm chat model.gguf --system 'You are a concise assistant.'")
    sp.add_argument("model", help="a GGUF model file")
    sp.add_argument("--system", default=None, help="a system message to start the conversation")
    _add_sampling(sp)

    sp = add("convert", cmd_convert,
             "convert a Hugging Face (safetensors) or llama2.c checkpoint, or a GGUF, to GGUF",
             "examples:\n  edgellm convert ./hf-llama-dir --out m.gguf --type q8_0\n"
             "  edgellm convert stories260K.bin --tokenizer tok512.bin --out s.gguf --type f32\n"
             "pickle checkpoints (.bin/.pt from torch.save) are refused: convert them to safetensors first.")
    sp.add_argument("src", help="HF checkpoint directory, llama2.c .bin, or .gguf")
    sp.add_argument("--out", required=True, help="the GGUF file to write")
    sp.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0", "q4_0"],
                    help="weight type of the 2-D tensors (default f16); norms stay f32")
    sp.add_argument("--tokenizer", default=None, help="llama2.c tokenizer (tok*.bin); default: found beside SRC")

    sp = add("eval", cmd_eval,
             "measure a model's perplexity on a text file (protocol edgellm-ppl-v1)",
             "examples:\n  edgellm eval model.gguf --text held_out.txt\n"
             "  edgellm eval model.gguf --text held_out.txt --window 256 --stride 128 --json\n"
             "  edgellm eval model.gguf --text book.txt --max-tokens 2000\n"
             "windows of N tokens start from an empty cache (BOS first) and advance by the stride;\n"
             "each token is scored once (docs/evaluation.md).")
    sp.add_argument("model", help="a GGUF model file")
    sp.add_argument("--text", required=True, help="a UTF-8 text file to score")
    sp.add_argument("--window", type=int, default=None,
                    help="text tokens per window (default: min(context - 1, 512))")
    sp.add_argument("--stride", type=int, default=None, help="tokens between windows (default window/2)")
    sp.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all available)")
    sp.add_argument("-c", "--ctx", type=int, default=None, help="context length (default: model's, max 4096)")

    sp = add("build", cmd_build,
             "build a model for a board: quantise, evaluate, write model.gguf + bundle.json",
             "examples:\n  edgellm build stories260K.bin --board rpi5                 # --type auto\n"
             "  edgellm build ./hf-llama --board rpi4 --type q4_0_mixed --node en/medical \\\n"
             "      --version 2 --parent en@3 --eval-text held_out.txt --out bundles\n"
             "the bundle goes to OUT/<node-as-dashes>-<board>-<recipe>/; the same source and options\n"
             "give a byte-identical model.gguf. auto picks the best recipe the board allows whose\n"
             "weights + KV cache (at min(seq_len, 2048)) + scratch + runtime fit its RAM budget.")
    sp.add_argument("model", help="HF checkpoint directory, llama2.c .bin, or .gguf")
    sp.add_argument("--board", required=True, help="board id (boards/<id>.toml), e.g. rpi5")
    sp.add_argument("--type", default="auto",
                    choices=["auto", "f32", "f16", "q8_0", "q4_0", "q4_0_mixed"],
                    help="quant recipe (default auto: best that fits the board)")
    sp.add_argument("--node", default=None,
                    help="node path, e.g. en/medical/cardiology (default: the GGUF's edgellm.node or master)")
    sp.add_argument("--version", type=int, default=1, help="the node's version (default 1)")
    sp.add_argument("--parent", default=None, metavar="PATH@V", help="the parent node and version, e.g. en@3")
    sp.add_argument("--eval-text", action="extend", nargs="+", default=[], metavar="FILE",
                    help="held-out text(s) to score (default: none)")
    sp.add_argument("--eval-max-tokens", type=int, default=None, help="score only the first N tokens of each text")
    sp.add_argument("--out", default="bundles", help="folder for the bundle folder (default ./bundles)")
    sp.add_argument("--tokenizer", default=None, help="llama2.c tokenizer (tok*.bin); default: found beside MODEL")
    sp.add_argument("-t", "--threads", type=int, default=None, help="CPU threads for the evaluation")
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = add("select", cmd_select,
             "choose the build of a node (or its nearest ancestor) that fits a board",
             "examples:\n  edgellm select --board rpi5 --need en/medical/cardiology\n"
             "  edgellm select --board rpi4 --need en/medical --context 4096 --min-tokens-per-s 8\n"
             "  edgellm select --board rpi-zero-2w --need en --bundles /srv/bundles --json\n"
             "the deepest node on the need's path whose build runs on the board, fits its RAM budget\n"
             "at the context (weights + KV cache + scratch + runtime) and meets the speed floor wins;\n"
             "within a node the best recipe (f16 > q8_0 > q4_0_mixed > q4_0), then the newest version.\n"
             "exit status 1 when nothing fits, with the smallest shortfall (docs/selection.md).")
    sp.add_argument("--board", required=True, help="board id (boards/<id>.toml), e.g. rpi5")
    sp.add_argument("--need", required=True, help="node path, e.g. en/medical/cardiology")
    sp.add_argument("--context", type=int, default=2048, help="context length to hold (default 2048)")
    sp.add_argument("--min-tokens-per-s", type=float, default=None, metavar="N",
                    help="slowest acceptable decode speed (default: no floor)")
    sp.add_argument("--bundles", default=None, metavar="DIR",
                    help="folder of bundle folders (default: $EDGELLM_BUNDLES, else ./bundles)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = add("bench", cmd_bench,
             "measure prefill/decode tok/s and peak RSS on this machine beside a board's estimates",
             "examples:\n  edgellm bench model.gguf --board rpi5\n"
             "  edgellm bench model.gguf --threads 1 4 --prompt-tokens 128 --gen-tokens 128 --reps 5\n"
             "  edgellm bench model.gguf --board rpi4 --kernels > rpi4.jsonl\n"
             "the board profile, kernel table, threads and build come first on stderr; one JSON line\n"
             "per thread count goes to stdout (git commit, ISA, board, model sha256, numbers).\n"
             "default board: x86-host on x86-64, none elsewhere (then no estimates).")
    sp.add_argument("model", help="a GGUF model file")
    sp.add_argument("--board", default=None, help="board profile for the estimates, e.g. rpi5")
    sp.add_argument("-t", "--threads", type=int, nargs="+", default=None, metavar="N",
                    help="thread counts to run (default: 1 and all available)")
    sp.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    sp.add_argument("--gen-tokens", type=int, default=128, help="tokens to generate (default 128)")
    sp.add_argument("--reps", type=int, default=3, help="repetitions; medians are reported (default 3)")
    sp.add_argument("-c", "--ctx", type=int, default=None,
                    help="session context (default prompt + gen tokens, at least 64)")
    sp.add_argument("--kernels", action="store_true",
                    help="also measure per-core kernel rates (kernel_gbs.* for the board's measured table)")
    sp.add_argument("--json", action="store_true",
                    help="JSON lines only: no human report on stderr")
    sp = add("boards", cmd_boards,
             "list the board profiles, show one with its sources, or calibrate this machine",
             "examples:\n  edgellm boards                       # table: RAM, budget, bandwidth, ISA, this host?\n"
             "  edgellm boards show rpi5             # every field with its unit and source\n"
             "  edgellm boards show rpi5 --json\n"
             "  edgellm boards calibrate             # this machine's read bandwidth for x86-host\n"
             "  edgellm boards calibrate --board rpi5   # run on the Pi: its sustained_factor\n"
             "profiles are boards/<name>.toml (docs/boards.md); $EDGELLM_BOARDS_DIR or --dir picks\n"
             "another folder.")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--dir", default=None, help="folder of profiles (default: the shipped boards/)")
    bsub = sp.add_subparsers(dest="boards_action", metavar="ACTION")
    bp = bsub.add_parser("list", help="the table of profiles (the default)",
                         description="the table of profiles (the default)")
    bp.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    bp = bsub.add_parser("show", help="one profile: every field, its unit and its source",
                         description="one profile: every field, its unit and its source",
                         epilog="example:\n  edgellm boards show jetson-orin-nano --json",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    bp.add_argument("name", help="board name, e.g. rpi5")
    bp.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    bp = bsub.add_parser("calibrate", help="measure this machine's sustained memory read bandwidth",
                         description="measure this machine's sustained memory read bandwidth "
                                     "(NumPy sums over a large array, best of N) and print the "
                                     "profile lines that record it",
                         epilog="examples:\n  edgellm boards calibrate\n"
                                "  edgellm boards calibrate --board rpi5 --mib 512 --repeats 10",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    bp.add_argument("--board", default="x86-host", help="the profile it is for (default x86-host)")
    bp.add_argument("--mib", type=int, default=None, help="array size in MiB (default 256, or RAM/8)")
    bp.add_argument("--repeats", type=int, default=5, help="timed passes; the best counts (default 5)")
    bp.add_argument("-t", "--threads", type=int, default=None, help="reader threads (default: all CPUs)")
    bp.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    for bp in bsub.choices.values():
        bp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edgellm` command; returns the exit status."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(a.func(a))
    except EdgeLLMError as exc:
        if a.verbose:
            traceback.print_exc()
        print(f"edgellm {a.command}: error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"edgellm {a.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
