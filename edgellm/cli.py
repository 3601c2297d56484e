# SPDX-License-Identifier: MIT
"""The `edgellm` command: run, chat, convert and inspect models (`edgellm COMMAND --help`)."""

from __future__ import annotations

import argparse
import contextlib
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


def _add_lora(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter")
    g.add_argument("--lora", metavar="FILE", default=None,
                   help="apply a LoRA adapter (GGUF adapter layout, as llama.cpp's --lora reads)")
    g.add_argument("--lora-scale", metavar="S", type=float, default=1.0,
                   help="multiplier of the adapter's update (default 1.0; 0 = off)")


def _attach_lora(m: Any, a: argparse.Namespace) -> None:
    if a.lora:
        info = m.attach_adapter(a.lora, a.lora_scale)
        if a.verbose:
            print(f"[adapter {info.path.name}: {info.n_tensors} tensors, rank {info.rank}, "
                  f"alpha {info.alpha:g}, scale {info.scale:g}]", file=sys.stderr)


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
        _attach_lora(m, a)
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
        _attach_lora(m, a)
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


def cmd_tree(a: argparse.Namespace) -> int:
    """Build a model tree from its tree file, or show the registry (`edgellm tree --help`)."""
    import os

    from .hub import treebuild
    from .hub.registry import Registry
    from .hub.tree import load_tree

    action = a.tree_action
    if action == "build":
        tree = load_tree(a.tree)
        if a.checkpoints:
            tree = tree.with_checkpoints(a.checkpoints)
        steps = treebuild.build_tree(tree, registry=a.registry, out=a.out, only=a.only,
                                     dry_run=a.dry_run, device=a.device, n_threads=a.threads,
                                     log=sys.stderr, progress=sys.stderr.isatty())
        if a.json:
            print(json.dumps([vars(s) for s in steps], indent=2))
        return 0
    reg_path = a.registry or os.environ.get("EDGELLM_REGISTRY") or \
        os.path.join(treebuild.DEFAULT_OUT, "registry.sqlite")
    if not os.path.isfile(reg_path):
        from .errors import InvalidArgumentError

        raise InvalidArgumentError(f"no registry at {reg_path}; run `edgellm tree build "
                                   "TREE.toml` first or pass --registry FILE")
    expected = None
    if getattr(a, "tree", None):
        tree = load_tree(a.tree)
        expected = treebuild.expected(tree, tree.data())
    with Registry.open(reg_path) as reg:
        if action == "stale":
            rows = reg.stale(expected)
            if a.json:
                print(json.dumps([vars(s) for s in rows], indent=2))
            for s in rows if not a.json else []:
                print(f"{s.node} v{s.version or '-'}: "
                      + ("stale: " + "; ".join(s.reasons) if s.reasons else "current"))
            return 0
        show = treebuild.show_rows(reg, expected)
        if a.plot:
            print(f"wrote {treebuild.plot_scores(show, a.plot)}", file=sys.stderr)
        if a.json:
            print(json.dumps({**reg.to_dict(), "table": [vars(r) for r in show]}, indent=2))
        else:
            print(treebuild.format_table(show))
    return 0


def cmd_distill(a: argparse.Namespace) -> int:
    """Distil a Hugging Face parent into a smaller student (`edgellm distill --help`)."""
    from .hub.distill import StudentShape, TrainSettings, distill, read_documents

    def docs(files: list[str]) -> list[str]:
        return [d for f in files for d in read_documents(f)]

    shape = StudentShape(n_layers=a.layers, dim=a.dim, hidden_dim=a.hidden_dim, n_heads=a.heads,
                         n_kv_heads=a.kv_heads, shrink=a.shrink)
    settings = TrainSettings(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr,
                             warmup=a.warmup, temperature=a.temperature,
                             alpha=a.alpha, eval_every=a.eval_every,
                             checkpoint_every=a.checkpoint_every, seed=a.seed, device=a.device,
                             precision=a.precision)
    r = distill(a.parent, docs(a.train), docs(a.heldout), a.out, shape, settings,
                teacher=not a.no_teacher, resume=not a.no_resume, progress=not a.json)
    last = r.history[-1]
    if a.json:
        history = [{k: (v if v == v else None) for k, v in h.items()} for h in r.history]  # NaN: null
        print(json.dumps({"out": str(r.out_dir), "steps": r.steps, "params": r.params,
                          "teacher_params": r.teacher_params, "tokens_per_s": r.tokens_per_s,
                          "device": r.device, "seconds": r.seconds, "history": history},
                         indent=2))
        return 0
    print(f"student:   {r.out_dir} ({r.params:,} parameters"
          + (f", teacher {r.teacher_params:,})" if r.teacher_params else ", no teacher)"))
    print(f"held-out:  perplexity {r.history[0]['heldout_ppl']:.3f} at step 0 -> "
          f"{last['heldout_ppl']:.3f} at step {int(last['step'])}"
          + (f"; KL to the parent {r.history[0]['heldout_kl']:.4f} -> {last['heldout_kl']:.4f}"
             if r.teacher_params else ""))
    print(f"speed:     {r.tokens_per_s:,.0f} training tokens/s on {r.device}; {r.seconds:.1f} s")
    print(f"next:      edgellm convert {r.out_dir} --out student.gguf --type q8_0")
    return 0


# -- edgellm hub ACTION (issue 5): one subcommand; each action adds itself to HUB_ACTIONS ------

HUB_ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _hub_home_arg(p: argparse.ArgumentParser) -> None:
    import os
    p.add_argument("--home", default=os.environ.get("EDGELLM_HUB_HOME", "hub"), metavar="DIR",
                   help="the hub home folder (default $EDGELLM_HUB_HOME, else ./hub)")


def cmd_hub(a: argparse.Namespace) -> int:
    fn = HUB_ACTIONS.get(getattr(a, "hub_action", None) or "")
    if fn is None:
        print("edgellm hub: name an ACTION (edgellm hub --help lists them)", file=sys.stderr)
        return 2
    return fn(a)


def _hub_serve(a: argparse.Namespace) -> int:
    import logging
    import signal

    from .fleet.service import HubService
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    svc = HubService(a.home, reorder_timeout=a.reorder_timeout, batch_interval=a.batch_interval)
    for sig in (signal.SIGINT, signal.SIGTERM):  # commit, acknowledge, disconnect, exit 0
        signal.signal(sig, lambda *_: svc.stop())
    svc.run()
    return 0


def _fleet_db(a: argparse.Namespace) -> Any:
    from .fleet import store
    from .fleet.home import HubHome
    return store.connect(HubHome.open(a.home).registry_db)


def _hub_status(a: argparse.Namespace) -> int:
    from .fleet import store
    hours = store.parse_since(a.since)
    with contextlib.closing(_fleet_db(a)) as conn:
        st = store.fleet_status(conn, since_hours=hours, k=a.k)
    print(json.dumps(st, indent=2) if a.json else store.format_status(st, since_hours=hours, k=a.k))
    return 0


def _hub_usage(a: argparse.Namespace) -> int:
    from .fleet import store
    hours = store.parse_since(a.since)
    with contextlib.closing(_fleet_db(a)) as conn:
        rows = store.usage_summary(conn, hours, k=a.k, by=[c.strip() for c in a.by.split(",")])
    print(json.dumps({"since_hours": hours, "k": a.k, "groups": rows}, indent=2) if a.json
          else store.format_usage(rows, since_hours=hours, k=a.k))
    return 0


def _hub_init(a: argparse.Namespace) -> int:
    import time

    from .fleet.home import HubHome
    t0 = time.perf_counter()
    home = HubHome.init(a.dir or a.home, host=a.host, port=a.port, public_host=a.public_host,
                        max_packet_size=a.max_packet_size, server_days=a.days, force=a.force,
                        root_keys=a.root_keys, root_threshold=a.root_threshold)
    print(f"hub home {home.root} ({time.perf_counter() - t0:.2f} s): device CA, server CA, "
          f"broker config for {home.host}:{home.port} (TLS), registry.db, TUF repository "
          f"(root: {a.root_threshold} of {a.root_keys} keys in {home.keys_dir}/root)")
    print(f"next: edgellm hub add-device --home {home.root} --board rpi5\n"
          f"      edgellm hub broker --home {home.root}")
    return 0


def _hub_add_device(a: argparse.Namespace) -> int:
    from .fleet.home import HubHome
    home = HubHome.open(a.home)
    out = home.add_device(a.id, board=a.board, node=a.node, version=a.model_version,
                          days=a.days)  # no broker reload needed: the ACL has patterns only
    root = ", provisioned-root.json" if (out / "provisioned-root.json").is_file() else ""
    print(f"device {out.name}: provisioning bundle {out}/ (device.toml, device.crt, "
          f"device.key, server-ca.crt{root})")
    print(f"copy it to the device, then there: edgellm agent --config {out.name}/device.toml")
    return 0


def _hub_revoke_device(a: argparse.Namespace) -> int:
    from .fleet.home import HubHome
    home = HubHome.open(a.home)
    live = home.revoke_device(a.id, kick=not a.no_kick)
    print(f"device {a.id}: revoked (CRL and ACL); " + (
        "the running broker reloaded" + ("" if a.no_kick else " and its connection was closed")
        if live else "no broker runs now: it applies them when it starts"))
    return 0


def _hub_broker(a: argparse.Namespace) -> int:
    import signal

    from .fleet.broker import Broker
    from .fleet.home import HubHome
    home = HubHome.open(a.home)
    broker = Broker(home)
    stop = [False]

    def on_signal(*_: Any) -> None:  # only signal here: wait() below returns when it exits
        stop[0] = True
        if broker.proc is not None and broker.proc.poll() is None:
            broker.proc.terminate()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    broker.start()
    print(f"mosquitto (pid {broker.pid}) listens on {home.host}:{home.port} (TLS, client "
          f"certificates); log {home.broker_log}; Ctrl-C stops it", file=sys.stderr)
    rc = broker.wait()
    broker.stop()  # reaps it and removes the pid file
    if stop[0]:
        return 0
    from .errors import BrokerError
    raise BrokerError(f"mosquitto exited with status {rc}:\n{broker.log_tail()}")


def _hub_devices(a: argparse.Namespace) -> int:
    from .fleet.home import HubHome
    rows = HubHome.open(a.home).devices()
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'DEVICE':<16} {'BOARD':<18} {'NODE':<24} {'ISSUED':<20} {'EXPIRES':<20} REVOKED")
    for r in rows:
        print(f"{r['id']:<16} {r['board'] or '-':<18} {r['node'] or '-':<24} {r['issued']:<20} "
              f"{r['expires']:<20} {r['revoked'] or '-'}")
    return 0


def _hub_release(a: argparse.Namespace) -> int:
    from .fleet.release import publish_release
    from .fleet.rollout import parse_share, parse_waves
    devices = [d.strip() for d in a.devices.split(",") if d.strip()] if a.devices else None
    rel = publish_release(
        a.home, a.node, a.node_version, board=a.board, bundle=a.bundle, registry=a.registry,
        recipe=a.recipe, delta_from=a.delta_from, adapter=a.adapter, health=not a.no_health,
        prompt=a.prompt, max_ms_per_token=a.max_ms_per_token,
        canary=parse_share(a.canary, "--canary"), halt_at=parse_share(a.halt_at, "--halt-at"),
        waves=parse_waves(a.waves) if a.waves else None, devices=devices,
        wave_timeout=a.wave_timeout, start_rollout=not a.no_rollout)
    if a.json:
        print(json.dumps(rel.to_dict(), indent=2))
        return 0
    print(f"release {rel.release} of {rel.node}: v{rel.version} for {rel.board} from "
          f"{rel.source}")
    for kind, name in rel.targets.items():
        print(f"  {kind:<8} {name}  ({rel.sizes[kind]:,} bytes)")
    print("  health: " + (f"golden prompt, {len(rel.health.expected)} tokens" if rel.health
                          else "files only"))
    if rel.rollout is None:
        print("published only (no rollout)")
    else:
        print(f"rollout {rel.rollout}: {len(rel.devices)} devices in waves of "
              f"{', '.join(map(str, rel.waves))} (cumulative); `edgellm hub serve` sends the "
              f"offers; watch: edgellm hub rollout status {rel.rollout}")
    return 0


def _hub_rollout(a: argparse.Namespace) -> int:
    import time

    from .errors import InvalidArgumentError
    from .fleet import rollout
    with contextlib.closing(_fleet_db(a)) as conn:
        if a.what == "status":
            rows = [rollout.status(conn, a.id)] if a.id is not None else rollout.rollouts(conn)
            print(json.dumps(rows, indent=2) if a.json
                  else rollout.format_status(rows, detail=a.id is not None))
            return 0
        if a.id is None:
            raise InvalidArgumentError(f"edgellm hub rollout {a.what} needs a rollout ID")
        with conn:
            (rollout.halt if a.what == "halt" else rollout.resume)(conn, a.id, time.time())
        st = rollout.status(conn, a.id)
    print(json.dumps(st, indent=2) if a.json else rollout.format_status([st]))
    return 0


def _add_hub_actions(hsub: Any) -> None:
    """The `edgellm hub` actions (the PKI/broker ones and the fleet service ones)."""
    def action(name: str, fn: Callable[[argparse.Namespace], int], help: str,
               epilog: str) -> argparse.ArgumentParser:
        hp: argparse.ArgumentParser = hsub.add_parser(
            name, help=help, description=help, epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        hp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks (serve: debug logging)")
        _hub_home_arg(hp)
        HUB_ACTIONS[name] = fn
        return hp

    # -- certificates and broker: init, add-device, revoke-device, broker, devices --
    # (edgellm/fleet/home.py, pki.py, broker.py)
    hp = action("init", _hub_init, "create a hub home: device CA, server CA, broker config "
                "(TLS + client certificates + ACL), registry.db, signing-key folders",
                "examples:\n  edgellm hub init /srv/hub\n"
                "  edgellm hub init /srv/hub --host 0.0.0.0 --public-host hub.ward3.example.org\n"
                "  edgellm hub init ./hub --port 18883 --force     # replace it: new CAs!\n"
                "the broker listens on HOST:PORT with TLS only; devices dial PUBLIC_HOST (in the\n"
                "server certificate). Keys are written 0600; back up HOME/ca (docs/fleet.md). The TUF\n"
                "repository (HOME/tuf, keys in HOME/keys) signs releases; every provisioning\n"
                "bundle gets its root (provisioned-root.json). Move HOME/keys/root offline.")
    hp.add_argument("dir", nargs="?", default=None, metavar="DIR",
                    help="the folder (default --home)")
    hp.add_argument("--host", default="127.0.0.1",
                    help="address the broker listens on (default 127.0.0.1; 0.0.0.0 = all)")
    hp.add_argument("--port", type=int, default=8883, help="TLS port (default 8883)")
    hp.add_argument("--public-host", default=None, metavar="NAME",
                    help="the name or address devices connect to (default --host)")
    hp.add_argument("--max-packet-size", type=int, default=256 * 1024, metavar="BYTES",
                    help="the broker's MQTT maximum packet size (default 262144)")
    hp.add_argument("--days", type=int, default=825,
                    help="validity of the broker's server certificate (default 825)")
    hp.add_argument("--force", action="store_true",
                    help="replace an existing hub home (every device must be provisioned again)")
    hp.add_argument("--root-keys", type=int, default=1, metavar="N",
                    help="TUF root keys to make (default 1; e.g. 3, kept offline apart)")
    hp.add_argument("--root-threshold", type=int, default=1, metavar="K",
                    help="root keys that must sign each new root (default 1; e.g. 2 of 3)")
    hp = action("add-device", _hub_add_device, "issue a device certificate and write its "
                "provisioning bundle (HOME/devices/ID/: device.toml, certificate, key, CA)",
                "examples:\n  edgellm hub add-device --board rpi5              # a fresh pseudonym\n"
                "  edgellm hub add-device d-ward3bed7 --board rpi5 --node en/medical/cardiology\n"
                "ids: 3-63 of a-z, 0-9, '-', never a serial number or bed; names starting with\n"
                "'hub' are reserved. An id is never issued twice, even after revocation.")
    hp.add_argument("id", nargs="?", default=None,
                    help="device id (default: a fresh pseudonym d-xxxxxxxxxxxx)")
    hp.add_argument("--board", required=True, help="board profile, e.g. rpi5")
    hp.add_argument("--node", default=None, help="model node it serves, e.g. en/medical")
    hp.add_argument("--model-version", type=int, default=None, metavar="N",
                    help="that node's version (default 1)")
    hp.add_argument("--days", type=int, default=825,
                    help="certificate validity in days (default 825)")
    hp = action("revoke-device", _hub_revoke_device, "revoke a device: CRL, ACL deny, and a "
                "running broker drops it within a second",
                "examples:\n  edgellm hub revoke-device d-3k9x2q7m4p1a --home /srv/hub\n"
                "new connections are refused (CRL); the device's open connection is closed and\n"
                "its queued messages dropped; it can publish and receive nothing (docs/fleet.md).")
    hp.add_argument("id", help="the device id")
    hp.add_argument("--no-kick", action="store_true",
                    help="do not close its open connection (the ACL still cuts it off)")
    action("broker", _hub_broker, "run mosquitto with the hub's config in the foreground",
           "examples:\n  edgellm hub broker --home /srv/hub\n"
           "  EDGELLM_MOSQUITTO=/opt/mosquitto/sbin/mosquitto edgellm hub broker\n"
           "regenerates HOME/broker/mosquitto.conf and acl from hub.toml and the registry, then\n"
           "runs mosquitto (Debian: sudo apt install mosquitto); Ctrl-C stops it.")
    hp = action("devices", _hub_devices, "list the device certificates issued and revoked",
                "example:\n  edgellm hub devices --home /srv/hub --json")
    hp.add_argument("--json", action="store_true", help="machine-readable output")

    # -- the fleet service: serve, status, usage (edgellm/fleet/service.py, store.py) --
    hp = action("serve", _hub_serve, "run the hub service: collect the fleet's births, deaths "
                "and usage reports from the broker into the hub database",
                "examples:\n  edgellm hub serve --home /srv/hub\n"
                "  edgellm hub serve --home /srv/hub --reorder-timeout 120 -v\n"
                "connects with the hub's certificate (HOME/hub/hub.crt) to the broker in hub.toml\n"
                "(start it first: edgellm hub broker); one service per home. A message is\n"
                "acknowledged only after it is committed to HOME/registry.db, so stopping or\n"
                "killing the service loses nothing. Ctrl-C or SIGTERM stops it cleanly.")
    hp.add_argument("--reorder-timeout", type=float, default=60.0, metavar="S",
                    help="seconds a seq gap waits for late reports before it is final and the "
                         "device is asked to rebirth (default 60)")
    hp.add_argument("--batch-interval", type=float, default=0.1, metavar="S",
                    help="most seconds a report waits for its batch's commit (default 0.1)")
    for name, fn, help, ex in (
            ("status", _hub_status, "the fleet at a glance: devices, state, versions, "
             "tokens/s by board, missing reports and refused messages",
             "examples:\n  edgellm hub status --home /srv/hub\n"
             "  edgellm hub status --home /srv/hub --since 7d --json\n"
             "MISSING counts a device's report seqs that never arrived (not the ones it said it\n"
             "dropped); tokens/s by board cover --since (default 1d)."),
            ("usage", _hub_usage, "usage over a time window, by node, board and version: "
             "requests, tokens, latency and tokens/s percentiles, errors, ratings",
             "examples:\n  edgellm hub usage --home /srv/hub --since 1d\n"
             "  edgellm hub usage --since 2w --by node,version --json\n"
             "windows are whole hours, the current one included (12h, 1d, 2w). A group with\n"
             "fewer than k = 11 reports prints as <11 with no numbers (privacy). Percentiles are\n"
             "the request-weighted median of the reports' own p50/p90/p99 (docs/fleet.md).")):
        hp = action(name, fn, help, ex)
        hp.add_argument("--since", default="1d", help="the window: 12h, 1d, 2w (default 1d)")
        hp.add_argument("--k", type=int, default=11,
                        help="smallest group shown (default 11; lower is refused)")
        hp.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "usage":
            hp.add_argument("--by", default="node,board,version",
                            help="group by these of node, board, version, adapter "
                                 "(default node,board,version)")

    # -- releases and rollouts (edgellm/fleet/release.py, rollout.py; docs/updates.md) --
    hp = action("release", _hub_release, "publish a node version for a board (signed TUF "
                "targets) and roll it out to the fleet in waves",
                "examples:\n  edgellm hub release en/medical/cardiology --version 3 --board rpi5\n"
                "  edgellm hub release en/medical --version 2 --canary 5% --halt-at 10%\n"
                "  edgellm hub release en --version 4 --delta-from 3 --waves 10%,50%,100%\n"
                "  edgellm hub release stories --version 1 --bundle out/stories-x86 --no-rollout\n"
                "  edgellm hub release en/medical --version 2 --devices d-abc,d-def\n"
                "takes the build from the model registry (HOME/registry.sqlite: edgellm tree build\n"
                "--out HOME) or a bundle folder (--bundle), records the golden-prompt health check,\n"
                "signs model, manifest (and delta/adapter patches) with a new release counter, and\n"
                "starts a rollout: the running `edgellm hub serve` offers it to a canary share\n"
                "first, then the rest; a wave whose failure share (rolled back or refused over\n"
                "reported) passes --halt-at halts it. See docs/updates.md, \"Releases and rollouts\".")
    hp.add_argument("node", help="the node path, e.g. en/medical/cardiology")
    hp.add_argument("--version", dest="node_version", type=int, required=True, metavar="V",
                    help="the node version to release")
    hp.add_argument("--board", default=None, metavar="B",
                    help="board id (default: the bundle's, or the registry's only board)")
    hp.add_argument("--bundle", default=None, metavar="DIR",
                    help="release this bundle folder (model.gguf + bundle.json) instead")
    hp.add_argument("--registry", default=None, metavar="FILE",
                    help="the model registry (default HOME/registry.sqlite)")
    hp.add_argument("--recipe", default=None, help="which build of the board (default: best)")
    hp.add_argument("--delta-from", type=int, default=None, metavar="V0",
                    help="also publish a delta from released version V0")
    hp.add_argument("--adapter", default=None, metavar="GGUF",
                    help="also publish this LoRA adapter (an adapter patch) for the model")
    hp.add_argument("--canary", default="10%", help="the first wave's share (default 10%%)")
    hp.add_argument("--waves", default=None, metavar="LIST",
                    help="cumulative wave shares instead, e.g. 10%%,50%%,100%%")
    hp.add_argument("--halt-at", default="20%",
                    help="halt when a wave's failure share passes this (default 20%%)")
    hp.add_argument("--wave-timeout", type=float, default=None, metavar="S",
                    help="seconds a wave waits for silent devices (default: forever)")
    hp.add_argument("--devices", default=None, metavar="ID,...",
                    help="only these devices (signed into the targets)")
    hp.add_argument("--prompt", default="Once upon a time",
                    help="the health check's golden prompt")
    hp.add_argument("--max-ms-per-token", type=float, default=1000.0, metavar="MS",
                    help="p95 decode budget on the device (default 1000)")
    hp.add_argument("--no-health", action="store_true",
                    help="no golden-prompt check: devices only verify the files")
    hp.add_argument("--no-rollout", action="store_true",
                    help="publish the targets only (no offers)")
    hp.add_argument("--json", action="store_true", help="machine-readable output")
    hp = action("rollout", _hub_rollout, "show, halt or resume rollouts",
                "examples:\n  edgellm hub rollout status            # every rollout, newest first\n"
                "  edgellm hub rollout status 4 --json   # waves and devices of rollout 4\n"
                "  edgellm hub rollout halt 4            # no further offers\n"
                "  edgellm hub rollout resume 4          # accept the halted wave, go on\n"
                "a halt stops offers at once (the running hub service reads the database); devices\n"
                "already offered may still install the release (each one checks its health and\n"
                "rolls back on its own).")
    hp.add_argument("what", choices=("status", "halt", "resume"), help="the action")
    hp.add_argument("id", nargs="?", type=int, default=None, help="the rollout id")
    hp.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_patch(a: argparse.Namespace) -> int:
    """Make, inspect and apply update patches (`edgellm patch --help`)."""
    import os

    from .fleet import patch

    if a.patch_action in ("delta", "adapter"):
        if a.patch_action == "delta":
            data = patch.make_delta(a.base, a.new, node=a.node, codec=a.codec)
            full = os.path.getsize(a.new)
        else:
            data = patch.make_adapter_patch(a.adapter, a.base, node=a.node, codec=a.codec)
            full = os.path.getsize(a.base)
        with open(a.out, "wb") as f:
            f.write(data)
        print(f"wrote {a.out}: {len(data):,} bytes ({100 * len(data) / full:.2f}% of "
              f"{full:,})", file=sys.stderr)
        return 0
    p = patch.read_patch(a.patch)
    if a.patch_action == "info":
        info = {"kind": p.kind, "node": p.node, "codec": p.codec, "size": p.size,
                "base": {"sha256": p.base_sha256, "size": p.base_size},
                "result": {"sha256": p.result_sha256, "size": p.result_size},
                "tensors": {src: sum(1 for t in p.tensors if t.src == src)
                            for src in ("base", "patch", "xor")}, "extra": p.extra}
        print(json.dumps(info, indent=2) if a.json else "\n".join(
            f"{k}: {v}" for k, v in info.items()))
        return 0
    tmp = a.out + ".tmp"
    try:
        with open(tmp, "wb") as f:
            digest = patch.apply_patch(p, a.base, f.write)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, a.out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {a.out}: sha256 {digest} (verified)", file=sys.stderr)
    return 0


def cmd_agent(a: argparse.Namespace) -> int:
    """The device agent: birth, usage reports, death (`edgellm agent --help`)."""
    import logging
    import signal

    from .fleet.agent import Agent
    from .fleet.device_config import load_device_config

    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(load_device_config(a.config))

    def _interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)  # a clean stop: death certificate, disconnect
    try:
        agent.run(once=a.once)
    except KeyboardInterrupt:
        pass
    st = agent.stats
    print(f"agent {agent.cfg.device_id}: {st['reports']} report(s) queued, {st['acked']} "
          f"acknowledged, {st['oversized']} dropped as oversized, {st['connects']} "
          f"connection(s)", file=sys.stderr)
    return 0 if not a.once or st["acked"] >= st["reports"] else 1


def cmd_firstboot(a: argparse.Namespace) -> int:
    """Provision this device from its SD card's flash package (`edgellm firstboot --help`)."""
    from .flash.firstboot import run_firstboot

    active = run_firstboot(a.boot, a.sysroot, root=a.root, exe=a.exe)
    print(f"firstboot: installed {active.describe()} into {a.sysroot.rstrip('/')}{a.root}; "
          "edgellm-agent.service enabled; the one-shot hook removed", file=sys.stderr)
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    """Check this device: CPU, memory, storage, broker, clock, model (`edgellm doctor --help`)."""
    from .doctor import format_report, run_checks

    checks = run_checks(config=a.config, board=a.board, timeout=a.timeout)
    if a.json:
        print(json.dumps([c.to_dict() for c in checks], indent=2))
    else:
        print(format_report(checks))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def cmd_flash(a: argparse.Namespace) -> int:
    """Put a build and a device identity on a device (`edgellm flash --help`)."""
    from pathlib import Path

    from .flash.targets import flash

    ssh = {"known_hosts": Path(a.known_hosts).expanduser(), "remote_python": a.remote_python,
           "agent": a.agent, "sysroot": a.sysroot, "connect_timeout": a.connect_timeout}
    if a.ssh_key:
        ssh["key"] = Path(a.ssh_key).expanduser()
    res = flash(board=a.board, device_id=a.device, target=a.to, home=a.home, need=a.need,
                model=a.model, bundles=a.bundles, context=a.context, ssh_options=ssh,
                force=a.force, show_progress=None if not a.no_progress else False)
    print(res.line())
    for note in res.notes:
        print(f"  {note}", file=sys.stderr)
    return 0


def cmd_receive(a: argparse.Namespace) -> int:
    """Receive a flash package on the device and install it (`edgellm receive --help`)."""
    from .flash.receive import install_archive, receive_serial

    if a.serial:
        print(f"receive: waiting on {a.serial} at {a.baud} baud for `edgellm flash` ...",
              file=sys.stderr)
        active = receive_serial(a.serial, a.root, baud=a.baud, idle_timeout=a.timeout,
                                reprovision=a.reprovision)
    else:
        active = install_archive(a.file, a.root, reprovision=a.reprovision)
    print(f"receive: installed {active.describe()} into {a.root}")
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
             "  edgellm run model.gguf --temp 0 -n 256     # greedy from BOS alone\n"
             '  edgellm run model.gguf "The heart has" --lora update.gguf --lora-scale 0.5')
    sp.add_argument("model", help="a GGUF model file")
    sp.add_argument("prompt", nargs="?", default="", help="the prompt (default: empty, i.e. BOS alone)")
    _add_sampling(sp)
    _add_lora(sp)

    sp = add("chat", cmd_chat, "chat with a model in the terminal (applies its chat template)",
             "examples:\n  edgellm chat model.gguf --system 'You are a concise assistant.'\n"
             "  edgellm chat model.gguf --lora cardiology.gguf   # the node's latest adapter")
    sp.add_argument("model", help="a GGUF model file")
    sp.add_argument("--system", default=None, help="a system message to start the conversation")
    _add_sampling(sp)
    _add_lora(sp)

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
             "  edgellm build stories260K.bin --board coral-dev-board     # + model.tflite (int8)\n"
             "the bundle goes to OUT/<node-as-dashes>-<board>-<recipe>/; the same source and options\n"
             "give a byte-identical model.gguf. auto picks the best recipe the board allows whose\n"
             "weights + KV cache (at min(seq_len, 2048)) + scratch + runtime fit its RAM budget.\n"
             "a board with backend tflite also gets model.tflite (litert-torch export with prefill and\n"
             "decode signatures; needs pip install 'edgellm[tflite]', see docs/tflite.md).")
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

    sp = add("distill", cmd_distill,
             "distil a Hugging Face model into a smaller student trained on your text",
             "examples:\n"
             "  edgellm distill ./master --train med_train.jsonl --heldout med_held.jsonl \\\n"
             "      --out ./en-medical --layers 4 --dim 256 --steps 2000\n"
             "  edgellm distill ./en --train cardio.txt --heldout cardio_held.txt --out ./cardio \\\n"
             "      --shrink 0.5 --device cuda\n"
             "  edgellm distill ./en --train a.txt --heldout h.txt --out ./base --no-teacher   # baseline\n"
             "  edgellm convert ./en-medical --out en-medical.gguf --type q8_0   # then run it\n"
             "the student starts from the parent's weights (evenly spaced layers, sliced width) and\n"
             "learns alpha * T^2 * KL(parent || student) at temperature T plus (1 - alpha) * the\n"
             "data's next-token loss. Text files: UTF-8, one document per blank-line-separated\n"
             "block, or JSON lines with \"text\" or \"question\"/\"answer\" fields. Checkpoints\n"
             "go to OUT/checkpoint/; running the same command again resumes there. OUT gets\n"
             "config.json, model.safetensors, the tokenizer and train.json (the run's facts).")
    sp.add_argument("parent", help="the parent: a Hugging Face folder (config.json, *.safetensors, tokenizer)")
    sp.add_argument("--train", required=True, nargs="+", action="extend", metavar="FILE",
                    help="training text file(s)")
    sp.add_argument("--heldout", required=True, nargs="+", action="extend", metavar="FILE",
                    help="held-out text file(s) for perplexity and KL")
    sp.add_argument("--out", required=True, metavar="DIR", help="the student's folder")
    g = sp.add_argument_group("student shape (default: the parent's; each may only shrink it)")
    g.add_argument("--layers", type=int, default=None, metavar="N", help="transformer layers")
    g.add_argument("--dim", type=int, default=None, metavar="D",
                   help="hidden size (a multiple of the parent's head_dim)")
    g.add_argument("--hidden-dim", type=int, default=None, metavar="F",
                   help="FFN width (default: scaled with dim, a multiple of 32)")
    g.add_argument("--heads", type=int, default=None, metavar="H", help="query heads (default dim / head_dim)")
    g.add_argument("--kv-heads", type=int, default=None, metavar="H",
                   help="key/value heads (default: the parent's query:KV ratio)")
    g.add_argument("--shrink", type=float, default=None, metavar="F",
                   help="instead of the sizes above: scale layers and widths by F (0 < F <= 1)")
    g = sp.add_argument_group("training")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    g.add_argument("--batch-size", type=int, default=16, help="windows per step (default 16)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    g.add_argument("--warmup", type=int, default=50, help="warmup steps (default 50)")
    g.add_argument("--temperature", type=float, default=2.0, help="KL temperature T (default 2)")
    g.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the KL term; 1 - alpha weighs the data loss (default 0.5)")
    g.add_argument("--no-teacher", action="store_true",
                   help="train on the data's loss alone (the baseline distillation is compared with)")
    g.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations (default 100)")
    g.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints (default 200)")
    g.add_argument("--seed", type=int, default=0, help="seed of the init and the batches (default 0)")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--no-resume", action="store_true",
                   help="start over even if OUT/checkpoint/ exists (default: resume from it)")
    sp.add_argument("--json", action="store_true", help="print the result as JSON (no progress bar)")

    sp = add("tree", cmd_tree,
             "build a model tree (master -> en -> en/medical -> ...) and show its registry",
             "examples:\n  edgellm tree build edgellm/demo/tree.toml --dry-run   # the plan: what is stale, why\n"
             "  edgellm tree build edgellm/demo/tree.toml --out hub --device cuda\n"
             "  edgellm tree build tree.toml --only en/medical    # just that node\n"
             "  edgellm tree build tree.toml --checkpoints runs   # import runs/<node>/ trained elsewhere\n"
             "  edgellm tree show                        # table: params, MiB per quant, perplexities\n"
             "  edgellm tree show --plot ppl.png --json\n"
             "  edgellm tree stale tree.toml             # which nodes need a rebuild and why\n"
             "the tree file declares corpora (with a fixed held-out split), nodes, shapes and training\n"
             "settings (docs/tree.md). build trains what is missing or stale, parents first, builds a\n"
             "bundle per board and quant type, scores every held-out set and registers each version in\n"
             "OUT/registry.sqlite in one transaction (a failure leaves the registry as it was).")
    tsub = sp.add_subparsers(dest="tree_action", metavar="ACTION", required=True)
    tp = tsub.add_parser("build", help="train and build what is missing or stale, in order",
                         description="train and build what is missing or stale, parents first; "
                                     "an interrupted run resumes from its checkpoints",
                         epilog="example:\n  edgellm tree build edgellm/demo/tree.toml --out hub",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    tp.add_argument("tree", help="the tree file (TOML, docs/tree.md)")
    tp.add_argument("--only", default=None, metavar="NODE",
                    help="build only this node (its parent must have a version)")
    tp.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    tp.add_argument("--out", default="hub", metavar="DIR",
                    help="folder for checkpoints, builds and held-out texts (default ./hub)")
    tp.add_argument("--registry", default=None, metavar="FILE",
                    help="the registry database (default OUT/registry.sqlite)")
    tp.add_argument("--device", default=None, help="training device: cpu, cuda, auto (default: the tree file's)")
    tp.add_argument("--checkpoints", default=None, metavar="DIR",
                    help="import trained HF folders DIR/<node-as-dashes>/ (from `python -m "
                         "edgellm.demo.train_nodes --out DIR` on a GPU machine) instead of training")
    tp.add_argument("-t", "--threads", type=int, default=None, help="CPU threads for perplexity runs")
    tp.add_argument("--json", action="store_true", help="print the steps as JSON")
    for name, what in (("show", "the registry as a table: parameters, MiB per quant type, "
                                "held-out perplexities, staleness"),
                       ("stale", "which nodes need a new version or builds, and why")):
        tp = tsub.add_parser(name, help=what, description=what,
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             epilog=f"example:\n  edgellm tree {name} --registry hub/registry.sqlite")
        tp.add_argument("--registry", default=None, metavar="FILE",
                        help="the registry (default $EDGELLM_REGISTRY, else hub/registry.sqlite)")
        tp.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "show":
            tp.add_argument("--plot", default=None, metavar="PNG",
                            help="also draw perplexity per node per held-out set")
            tp.add_argument("--tree", default=None, metavar="TREE.toml",
                            help="also compare with the tree file (corpus/config changes)")
        else:
            tp.add_argument("tree", nargs="?", default=None,
                            help="the tree file, to include corpus/config/tokenizer changes")
    for tp in tsub.choices.values():
        tp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks")

    sp = add("patch", cmd_patch,
             "make, inspect and apply update patches (a GGUF delta N -> N+1, or an adapter)",
             "examples:\n  edgellm patch delta v1/model.gguf v2/model.gguf -o v1-v2.patch --node en\n"
             "  edgellm patch adapter lora.gguf --base v1/model.gguf -o lora.patch\n"
             "  edgellm patch info v1-v2.patch --json\n"
             "  edgellm patch apply v1-v2.patch --base v1/model.gguf -o v2.gguf   # verified\n"
             "a delta carries only the tensors that changed (compressed, or XOR against the old\n"
             "tensor when that is smaller) and rebuilds N+1 byte for byte; it is bound to its base\n"
             "by sha256 and refused on any other. Devices apply patches through the updater\n"
             "(docs/updates.md); these commands are for the hub and for inspection.")
    psub = sp.add_subparsers(dest="patch_action", metavar="ACTION", required=True)
    pp = psub.add_parser("delta", help="a delta that turns BASE into NEW",
                         description="a delta that turns the GGUF file BASE into NEW")
    pp.add_argument("base", help="version N (what devices hold)")
    pp.add_argument("new", help="version N+1")
    pp = psub.add_parser("adapter", help="an adapter patch bound to the model it adapts",
                         description="an adapter patch: the adapter GGUF compressed, bound to --base")
    pp.add_argument("adapter", help="the LoRA adapter GGUF")
    pp.add_argument("--base", required=True, help="the model file the adapter was trained for")
    for pp in (psub.choices["delta"], psub.choices["adapter"]):
        pp.add_argument("-o", "--out", required=True, help="the patch file to write")
        pp.add_argument("--node", default="master", help="the node path (default master)")
        pp.add_argument("--codec", choices=("lzma", "zlib"), default="lzma",
                        help="lzma: smaller (default); zlib: faster")
    pp = psub.add_parser("info", help="what a patch holds (validated)",
                         description="print a patch's header after validating it")
    pp.add_argument("patch")
    pp.add_argument("--json", action="store_true", help="machine-readable output")
    pp = psub.add_parser("apply", help="rebuild the result from a patch and its base, verified",
                         description="apply a patch to its base and write the verified result")
    pp.add_argument("patch")
    pp.add_argument("--base", required=True, help="the base model file")
    pp.add_argument("-o", "--out", required=True, help="the file to write (atomically)")
    for pp in psub.choices.values():
        pp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks")

    sp = add("hub", cmd_hub,
             "run the fleet hub: its certificates and broker, the fleet service, fleet status",
             "examples:\n  edgellm hub init /srv/hub              # CAs, broker config, registry\n"
             "  edgellm hub add-device --home /srv/hub --board rpi5\n"
             "  edgellm hub broker --home /srv/hub     # mosquitto, TLS only\n"
             "  edgellm hub serve --home /srv/hub     # collect the fleet's reports\n"
             "  edgellm hub status --home /srv/hub\n"
             "  edgellm hub usage --home /srv/hub --since 1d\n"
             "each action has its own --help; --home defaults to $EDGELLM_HUB_HOME, else ./hub "
             "(docs/fleet.md).")
    hsub = sp.add_subparsers(dest="hub_action", metavar="ACTION")
    _add_hub_actions(hsub)

    sp = add("agent", cmd_agent,
             "run the device agent: tell the hub what this device runs and how it is used",
             "examples:\n  edgellm agent --config /etc/edgellm/device.toml\n"
             "  edgellm agent --config device.toml --once   # one report, then a clean stop\n"
             "device.toml comes in the bundle `edgellm hub add-device` writes. The agent connects\n"
             "over TLS with the device certificate (trusting only the CA named there), publishes a\n"
             "birth certificate, sends a usage report (counts and latency percentiles, never text)\n"
             "every report_interval_s, keeps unsent reports in state_dir across restarts (capped\n"
             "at queue_max_bytes, oldest merged first) and publishes a death certificate when it\n"
             "stops (SIGINT/SIGTERM). Example text leaves only with share_examples = true, after\n"
             "redaction. See docs/fleet.md, \"The device agent\".\n"
             "Updates: when [model] models_dir (default models/) holds a model and the TUF root\n"
             "([update] tuf_root) is there, the hub's offers are verified (TUF, board, device,\n"
             "release counter) and applied inside [update] window or after idle_s idle seconds,\n"
             "with a health check and automatic rollback. See docs/updates.md.")
    sp.add_argument("--config", required=True, metavar="device.toml",
                    help="the device config (relative paths in it are relative to the file)")
    sp.add_argument("--once", action="store_true",
                    help="connect, send one report and what is queued, stop (exit 1 if not all "
                         "were acknowledged)")

    sp = add("firstboot", cmd_firstboot,
             "on a device's first boot: install the flash package from its SD card, enable the agent",
             "examples:\n  sudo edgellm firstboot --boot /boot/firmware      # Raspberry Pi OS\n"
             "  sudo edgellm firstboot --boot /boot               # Jetson (L4T)\n"
             "  edgellm firstboot --boot /mnt/bootfs --sysroot /mnt/rootfs   # a mounted image\n"
             "`edgellm flash --to dir:/media/bootfs` writes the package (edgellm/) and a one-shot\n"
             "hook onto the card; the hook runs this command once. It verifies the package and\n"
             "installs it into SYSROOT/var/lib/edgellm (the update path: atomic, health-checked),\n"
             "writes edgellm-agent.service and enables it as `systemctl enable` does, then removes\n"
             "the hook and the package (it holds the device key) from the card. Running it again\n"
             "changes nothing. See docs/flash.md, \"SD card and first boot\".")
    sp.add_argument("--boot", required=True, metavar="DIR",
                    help="the folder with edgellm/ and the hook (the boot partition)")
    sp.add_argument("--sysroot", default="/", metavar="DIR",
                    help="the device's root file system (default /)")
    sp.add_argument("--root", default="/var/lib/edgellm", metavar="PATH",
                    help="the device root as the device sees it (default /var/lib/edgellm)")
    sp.add_argument("--exe", default=None, metavar="CMD",
                    help="the edgellm command the agent unit runs (default: this edgellm)")

    sp = add("doctor", cmd_doctor,
             "check this device: CPU features, memory, storage, broker, clock, model",
             "examples:\n  edgellm doctor                                   # /var/lib/edgellm/device.toml\n"
             "  edgellm doctor --config device.toml --board rpi5 --json\n"
             "Each check prints PASS, WARN or FAIL and, unless it passed, how to fix it. The\n"
             "broker check opens a TLS connection to the configured host:port with the device\n"
             "certificate (short timeout); the clock check compares the time with this build's\n"
             "date and the broker certificate's validity; the model check verifies the served\n"
             "model's sha256. Exit status 1 when any check FAILs. See docs/flash.md, \"doctor\".")
    sp.add_argument("--config", default=None, metavar="device.toml",
                    help="the device config (default /var/lib/edgellm/device.toml when present)")
    sp.add_argument("--board", default=None, metavar="B",
                    help="the board profile to check against (default: device.toml's board)")
    sp.add_argument("--timeout", type=float, default=5.0, metavar="S",
                    help="seconds for the broker connection (default 5)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    import os

    sp = add("flash", cmd_flash,
             "put a model build and a device identity on a device over serial, SSH or an SD card",
             "examples:\n"
             "  edgellm flash --board rpi5 --device d-ward3bed7 --need en/medical/cardiology \\\n"
             "      --to ssh://pi@ward3-bed7.local/var/lib/edgellm\n"
             "  edgellm flash --board rpi5 --device d-ward3bed7 --need en/medical \\\n"
             "      --to serial:///dev/ttyACM0?baud=921600      # the device runs `edgellm receive`\n"
             "  edgellm flash --board rpi5 --device d-ward3bed8 --model en-medical-rpi5-q8_0 \\\n"
             "      --to dir:/media/$USER/bootfs                 # installs at first boot\n"
             "The build: --need selects it as `edgellm select` does (deepest node that runs on the\n"
             "board and fits its RAM at --context); --model takes one (a bundle folder, or its name\n"
             "under --bundles) and refuses it when the board lacks an ISA feature or the RAM.\n"
             "The identity: the hub's devices/<ID>/ (certificate, key, device.toml, TUF root); when\n"
             "the hub has none for ID it is issued now. Everything that can be checked before the\n"
             "transfer is (board, build, target, host key, free space); on the device the package\n"
             "installs through the update path (verified, atomic), so a failed flash leaves the\n"
             "previous model. SSH uses the system's ssh with key auth only, BatchMode and\n"
             "StrictHostKeyChecking=yes against --known-hosts; flashing the same build again\n"
             "copies nothing. See docs/flash.md.")
    sp.add_argument("--board", required=True, help="board id (boards/<id>.toml), e.g. rpi5")
    sp.add_argument("--device", required=True, metavar="ID",
                    help="the device's id at the hub (issued now if the hub has none)")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--need", metavar="NODE", help="node path to select a build for, e.g. en/medical")
    g.add_argument("--model", metavar="BUILD",
                   help="a bundle folder, or the name of one under --bundles")
    sp.add_argument("--to", required=True, metavar="TARGET",
                    help="serial:///dev/X[?baud=N], ssh://[user@]host[:port]/path or dir:/path")
    sp.add_argument("--home", default=os.environ.get("EDGELLM_HUB_HOME", "hub"), metavar="DIR",
                    help="the hub home folder (default $EDGELLM_HUB_HOME, else ./hub)")
    sp.add_argument("--bundles", default=None, metavar="DIR",
                    help="folder of bundle folders (default: $EDGELLM_BUNDLES, else ./bundles)")
    sp.add_argument("--context", type=int, default=None,
                    help="context length the device must hold (default 2048, or the builds' "
                         "longest seq_len when shorter)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = sp.add_argument_group("ssh targets")
    g.add_argument("--known-hosts", default="~/.ssh/known_hosts", metavar="FILE",
                   help="the only known_hosts file trusted (default ~/.ssh/known_hosts)")
    g.add_argument("--ssh-key", default=None, metavar="FILE",
                   help="private key to log in with (default: ssh's own, or ssh-agent)")
    g.add_argument("--remote-python", default="python3", metavar="CMD",
                   help="the device's python with edgellm installed (default python3)")
    g.add_argument("--agent", choices=("enable", "systemctl", "none"), default="enable",
                   help="enable: install and enable edgellm-agent.service (default); systemctl: "
                        "also start it now; none: leave the unit alone")
    g.add_argument("--sysroot", default="/", metavar="DIR",
                   help="the device's root file system (default /): files go to SYSROOT/PATH")
    g.add_argument("--connect-timeout", type=int, default=10, metavar="S",
                   help="seconds to wait for the SSH connection (default 10)")
    g.add_argument("--force", action="store_true",
                   help="copy and install even when the device has this package already")

    sp = add("receive", cmd_receive,
             "on the device: receive a flash package (serial cable, or a copied archive) and install it",
             "examples:\n"
             "  edgellm receive --serial /dev/ttyGS0 --root /var/lib/edgellm   # Pi 5 USB gadget\n"
             "  edgellm receive --serial /dev/ttyAMA0 --baud 921600 --root /var/lib/edgellm\n"
             "  edgellm receive --file /tmp/d-1.elpkg --root /var/lib/edgellm --reprovision\n"
             "      # what ssh:// runs (the SSH login already authenticated the operator)\n"
             "--serial waits for `edgellm flash --to serial://PORT` on the host. The link is framed\n"
             "(COBS, CRC32 per frame), windowed and acknowledged, so damaged or lost frames are sent\n"
             "again; a cut transfer resumes where the device's durable offset says (the partial\n"
             "archive waits in ROOT/.incoming/), and the whole archive must match the sender's\n"
             "sha256 or it is refused. Then every file is checked against flash.json before\n"
             "anything is written, and the model goes in through the update apply path: on any\n"
             "failure the device keeps the model and identity it had. See docs/flash.md,\n"
             "\"Serial protocol\".\n"
             "A provisioned device (ROOT has device.toml) takes only a package with its own\n"
             "identity (device id, broker, certificate, key, CA, TUF root); --reprovision lifts\n"
             "that for an operator who is logged in (ssh:// passes it). Never give it to an\n"
             "unattended serial receiver: anyone with a cable could replace the trust root.")
    g = sp.add_mutually_exclusive_group(required=True)
    g.add_argument("--serial", metavar="DEV", help="serial port to receive on, e.g. /dev/ttyGS0")
    g.add_argument("--file", metavar="ARCHIVE", help="a flash package archive (.elpkg) to install")
    sp.add_argument("--root", required=True, metavar="ROOT",
                    help="the device root (device.toml, identity, models/), e.g. /var/lib/edgellm")
    sp.add_argument("--baud", type=int, default=921600,
                    help="line rate; the same as the sender's (default 921600; a USB gadget "
                         "port ignores it)")
    sp.add_argument("--timeout", type=float, default=None, metavar="S",
                    help="give up after S seconds without a frame from the sender (default: wait)")
    sp.add_argument("--reprovision", action="store_true",
                    help="allow a package with another identity (device id, keys, TUF root) to "
                         "replace this device's; off by default (docs/flash.md, "
                         "\"Re-provisioning\")")
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
