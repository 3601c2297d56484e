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
