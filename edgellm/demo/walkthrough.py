# SPDX-License-Identifier: MIT
"""The guided demo (`make demo`): from the shipped model tree to a bedside model that reports
its use to a hub and takes signed updates, each step explained as it runs.

    python -m edgellm.demo.walkthrough [--work build/demo] [--board rpi5] [--no-fleet]

1. the tree: the shipped registry (master -> en -> en/medical -> en/medical/cardiology), with
   every node's size and held-out perplexities;
2. the choice: the deepest node on the need's path whose build fits the board, and why the
   others lost;
3. the answer: the chosen model answers a cardiology question on this machine's C core;
4. the device: a hub home (device CA, broker certificate, ACLs, TUF repository) and a device
   provisioned by `edgellm flash --to dir:` (a folder as the SD card) and its first boot;
   a local Mosquitto started by edgellm, the hub service and the device's agent;
5. usage: the agent reports the answers' use -- counts and timings, never the text;
6. a signed improvement: `hub release` signs version 2 (the leaf's 8-bit build over the
   flashed 4-bit one); the device verifies it through TUF over MQTT, installs, health-checks
   and commits it, and reports; the rollout's status;
7. a forged update: one byte of version 3 changed on the hub's disk after signing; the device
   refuses it (hash_mismatch, an attack), keeps answering with version 2, the hub halts the
   rollout and flags the device;
8. `edgellm hub status` and `hub rollout status`.

Everything is written under --work; nothing outside it changes. A missing `mosquitto` binary
stops step 4 with the command that installs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

DEMO = Path(__file__).resolve().parent
NEED = "en/medical/cardiology"
QUESTIONS = (
    "Question: What are the symptoms of atrial fibrillation?\nAnswer:",
    "Question: What causes high blood pressure?\nAnswer:",
    "Question: How is heart failure treated?\nAnswer:",
)


def say(title: str, text: str = "") -> None:
    """A step's heading and its explanation, wrapped."""
    print(f"\n== {title}", flush=True)
    for para in text.strip().split("\n\n") if text else ():
        print(textwrap.fill(" ".join(para.split()), width=92), flush=True)


def step_tree() -> None:
    from ..hub.registry import Registry
    from ..hub.treebuild import format_table, show_rows

    say("1. The model tree", """A 15.7 M-parameter master was trained on general English and
        medical question-answer pairs; each tier below was distilled from its parent on its own
        corpus (docs/tree.md). Perplexity is measured on held-out text no node trained on: lower
        is better. The cardiology leaf has 1/9 of the master's parameters and scores as well
        on cardiology text, but badly on general text: it is a specialist.""")
    with Registry.open(DEMO / "hub" / "registry.sqlite") as reg:
        # The training checkpoints are not shipped, so the registry calls every node stale;
        # here that is expected, and the status column says nothing new.
        rows = [dataclasses.replace(r, stale=()) for r in show_rows(reg)]
    print(format_table(rows))


def step_select(board: str) -> Any:
    from ..boards import load_board
    from ..formats.bundle import list_bundles
    from ..hub.select import select

    say(f"2. Choosing a model for {board}", f"""select() walks the need's path from the leaf up
        ({NEED} -> en/medical -> en -> master) and takes the deepest node whose build runs on
        the board (ISA, backend, quant type), fits its RAM budget with a full KV cache at the
        context, and meets the speed floor. The table says why each other build lost.""")
    sel = select(load_board(board), NEED, list_bundles(DEMO / "bundles"), context=512,
                 min_tokens_per_s=5)
    print(sel.explain())
    return sel.require()


def step_answer(bundle: Any) -> list[Any]:
    from ..runtime.model import GenerationStats, Model

    say("3. Answering on this machine", f"""The chosen build ({bundle.recipe}, {bundle.model_path.
        stat().st_size / 2**20:.1f} MiB) runs on edgellm's C core: greedy decoding, so the text
        is the same on every run. The model learnt from MedQuAD answers, so it answers in
        their style; it is a 1.7 M-parameter demo, not a clinical tool.""")
    stats: list[GenerationStats] = []
    with Model(bundle.model_path) as m:
        m.usage_hook = stats.append
        q = QUESTIONS[0]
        print(q, end="", flush=True)
        for piece in m.generate(q, max_tokens=60, temperature=0, stream=True):
            print(piece, end="", flush=True)
        s = stats[-1]
        print(f"\n[{s.generated_tokens} tokens, {s.generated_tokens / max(s.decode_s, 1e-9):.0f} "
              f"tokens/s decode, {s.prompt_tokens} prompt tokens]")
    return stats


def _show_logs() -> None:
    """The device's and the hub's warnings go to stdout, in order with the steps and marked
    as log lines; paho's note that the network loop ran once after disconnect() is dropped."""
    import logging

    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(logging.Formatter("[log %(name)s] %(message)s"))
    h.addFilter(lambda r: not r.getMessage().startswith("Client is not connected"))
    root = logging.getLogger()
    root.addHandler(h)
    root.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgellm.demo.walkthrough", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="build/demo", help="folder for what the demo writes")
    ap.add_argument("--board", default="rpi5", help="the board to choose for (default rpi5)")
    ap.add_argument("--no-fleet", action="store_true",
                    help="stop after step 3 (no broker, no updates)")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    step_tree()
    bundle = step_select(a.board)
    step_answer(bundle)
    if not a.no_fleet:
        from .fleet_step import step_fleet

        _show_logs()

        step_fleet(work, bundle, a.board, QUESTIONS)
    say(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
