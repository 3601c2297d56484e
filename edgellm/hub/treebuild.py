# SPDX-License-Identifier: MIT
"""`edgellm tree build/show/stale`: build a model tree in order and report on the registry.

``build_tree(tree, ...)`` walks the tree parents first. For each node that is missing or
stale (see Registry.stale) it:

1. trains a new version (the root: ``distill.pretrain`` from random init; a child:
   ``distill.distill`` from its parent's current checkpoint), into
   ``OUT/models/<node-as-dashes>/v<N>-<hash>/`` (an interrupted run resumes there);
2. builds a bundle per board and quant type with ``hub.build`` into
   ``OUT/builds/<node-as-dashes>/v<N>/``, scoring perplexity on every held-out set of the tree
   (``OUT/heldout/<set>.txt``);
3. fsyncs every file, then registers the version, its builds, files and scores in one
   transaction -- a failure before that (a full disk, a bad corpus, Ctrl-C) leaves the
   registry as it was.

A node whose version is current but lacks a build gets only the missing builds.

Usage::

    steps = build_tree(load_tree("tree.toml"), registry="hub/registry.sqlite", out="hub")
    print(format_table(show_rows(reg)))

.. versionadded:: 0.1
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .._fsutil import atomic_write, fsync_dir
from ..errors import DiskFullError, EdgeLLMError, TokenizerMismatchError
from ..formats.bundle import MANIFEST_NAME, FileEntry
from .registry import Expected, NewBuild, NewVersion, Registry, ScoreInfo, VersionInfo
from .tree import (
    NodeSpec,
    TreeData,
    TreeSpec,
    count_params,
    hf_config,
    node_configs,
    tokenizer_hash,
)

__all__ = ["DEFAULT_OUT", "ShowRow", "Step", "TreeBuildError", "build_tree", "format_table",
           "plan", "plot_scores", "show_rows"]

DEFAULT_OUT = "hub"
_QUALITY = ("f32", "f16", "q8_0", "q4_0_mixed", "q4_0")  # which build's scores `show` reports
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_WORDS = ("No space left", "StorageFull", "File too large", "FileTooLarge",
               "Disk quota", "os error 28", "os error 27", "code: 28", "code: 27")
_MARGIN = 32 << 20  # free bytes kept beyond the estimate of what a node writes


class TreeBuildError(EdgeLLMError, RuntimeError):
    """A node of the tree could not be built; the registry is unchanged for that node."""


@dataclass
class Step:
    """What `tree build` does for one node, and why."""

    node: str
    action: str  # "train" (new version + all builds), "builds" (missing builds only), "none"
    reasons: tuple[str, ...]
    builds: list[tuple[str, str]] = field(default_factory=list)  # (board, recipe) to build
    version: int | None = None  # the version it made or has


# --- planning ---------------------------------------------------------------------------


def expected(tree: TreeSpec, data: TreeData) -> dict[str, Expected]:
    """The hashes each node's current version must have to be fresh."""
    tok = tokenizer_hash(tree.tokenizer)
    return {n.path: Expected(data.corpus_hash(n.path), tree.config_hash(n.path), tok)
            for n in tree.order()}


def plan(tree: TreeSpec, reg: Registry, data: TreeData, only: str | None = None) -> list[Step]:
    """The steps a build would take, parents first (a node below a retrained one retrains)."""
    if only is not None:
        tree.node(only)
    wanted = [(b, q) for b in tree.boards for q in tree.quant_types]
    st = {s.node: s for s in reg.stale(expected(tree, data), wanted)}
    steps = []
    for n in tree.order():
        s = st[n.path]
        train = [r for r in s.reasons if not r.startswith("missing build")]
        if train:
            step = Step(n.path, "train", tuple(train), list(wanted))
        elif s.reasons:
            miss = [tuple(r.split(" ", 2)[2].split("/")) for r in s.reasons]
            step = Step(n.path, "builds", s.reasons, [(b, q) for b, q in miss])
        else:
            step = Step(n.path, "none", (), [], s.version)
        if only is None or n.path == only:
            steps.append(step)
    return steps


def node_params(tree: TreeSpec) -> dict[str, int]:
    """Parameter count of each node's shape."""
    return {k: count_params(c) for k, c in node_configs(tree).items()}


# --- building ---------------------------------------------------------------------------


def build_tree(tree: TreeSpec, *, registry: str | os.PathLike[str] | None = None,
               out: str | os.PathLike[str] = DEFAULT_OUT, only: str | None = None,
               dry_run: bool = False, device: str | None = None, n_threads: int | None = None,
               log: IO[str] | None = sys.stderr, progress: bool = False) -> list[Step]:
    """Build or rebuild what is missing or stale in the tree, parents first.

    Args:
        tree: the validated tree file.
        registry: the registry file (default OUT/registry.sqlite).
        out: the folder for checkpoints, builds and held-out texts.
        only: build just this node (its parent must have a version).
        dry_run: print the plan and change nothing.
        device: training device ("cpu", "cuda", "auto"), overriding the tree file.
        n_threads: CPU threads for the perplexity runs.
        log: progress lines go here (None: silent).
        progress: show the trainer's own progress bars.

    Returns:
        The steps, with the versions made.

    Raises:
        CorpusError: a corpus is missing, empty, not UTF-8 or malformed (nothing is built).
        TokenizerMismatchError: a parent checkpoint's tokenizer is not the tree's.
        DiskFullError: not enough free space for a node, or a write ran out of space.
        TreeBuildError: training or a build failed (the message says which node and step).
        RegistryError, DatabaseError: from the registry.
    """
    say = _say(log)
    outp = Path(out)
    say(f"reading {len(tree.corpora)} corpora of {tree.path}")
    data = tree.data()
    bad = data.check_invariant()
    if bad:  # TreeData.load already excludes these; this guards the invariant itself
        raise TreeBuildError(f"held-out records would be trained on: {', '.join(bad[:5])}")
    for name in tree.heldout_sets:
        say(f"held-out set {name}: {len(data.heldout[name])} records, "
            f"{len(data.heldout_text(name)):,} characters")
    say(f"perplexity: windows of {tree.eval_window} tokens (+ BOS), first "
        f"{tree.eval.get('max_tokens', 'all')} tokens of each set")
    reg_path = Path(registry) if registry is not None else outp / "registry.sqlite"
    with Registry.open(reg_path) as reg:
        steps = plan(tree, reg, data, only)
        _print_plan(steps, data, node_params(tree), say)
        parent = tree.node(only).parent if only is not None else None
        if parent is not None:
            pstep = next(s for s in plan(tree, reg, data) if s.node == parent)
            if pstep.action == "train":
                say(f"warning: {only}'s parent {parent} is stale ({'; '.join(pstep.reasons)}); "
                    f"{only} learns from its current version and will be stale again once "
                    f"{parent} is rebuilt")
        if dry_run:
            return steps
        heldout_files = _write_heldout(tree, data, outp / "heldout")
        todo = [s for s in steps if s.action != "none"]
        for i, step in enumerate(todo, 1):
            say(f"[{i}/{len(todo)}] {step.node}: {step.action} ({'; '.join(step.reasons)})")
            t0 = time.perf_counter()
            try:
                _run_step(tree, data, reg, step, outp, heldout_files, device, n_threads, say,
                          progress)
            except BaseException as exc:
                say(f"{step.node}: failed; the registry is unchanged for {step.node}")
                mapped = _classify(exc, step.node)
                if mapped is exc:
                    raise
                raise mapped from exc
            say(f"{step.node}: registered v{step.version} ({time.perf_counter() - t0:.1f} s)")
        if not todo:
            say("everything is current")
    return steps


def _classify(exc: BaseException, node: str) -> BaseException:
    """A disk-full OSError (or a library's wrapped one) as DiskFullError; others as they are,
    or as TreeBuildError for non-edgellm exceptions."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit, EdgeLLMError)):
        return exc
    text = str(exc)
    if (isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS) or \
            any(w in text for w in _DISK_WORDS):
        return DiskFullError(f"{node}: out of disk space while building ({text}); free space "
                             "and rerun `edgellm tree build` (training resumes from its last "
                             "checkpoint; the registry is unchanged)")
    return TreeBuildError(f"{node}: {type(exc).__name__}: {text}")


def _say(log: IO[str] | None) -> Any:
    def say(text: str) -> None:
        if log is not None:
            log.write(f"tree: {text}\n")
            log.flush()

    return say


def _print_plan(steps: Sequence[Step], data: TreeData, params: dict[str, int],
                say: Any) -> None:
    root = max(params.values())
    for s in steps:
        n = len(data.train[s.node])
        extra = f", {data.excluded[s.node]} held out elsewhere" if data.excluded[s.node] else ""
        extra += f"; {params[s.node]:,} parameters (1/{root / params[s.node]:.1f} of the root)"
        if s.action == "none":
            say(f"plan: {s.node}: current (v{s.version}); {n} training records{extra}")
        else:
            why = "; ".join(s.reasons)
            say(f"plan: {s.node}: {s.action} -- {why}; {n} training records{extra}")


def _write_heldout(tree: TreeSpec, data: TreeData, folder: Path) -> list[Path]:
    """Each held-out set as OUT/heldout/<set>.txt (rewritten only when its text changes)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in tree.heldout_sets:
        p = folder / f"{name}.txt"
        text = data.heldout_text(name)
        if not p.is_file() or p.read_text(encoding="utf-8") != text:
            atomic_write(p, text.encode("utf-8"))
        out.append(p)
    return out


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under root (artifacts are on disk before registering)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(Path(dirpath) / f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))
    fsync_dir(root.parent)


def _check_space(folder: Path, params: int, n_builds: int, train: bool, say: Any) -> None:
    """Refuse to start a node when the disk cannot hold what it writes (a rough upper bound:
    fp32 weights plus optimizer state for training, and f16-sized files per build)."""
    need = (params * 4 * 4 if train else 0) + n_builds * params * 2 + _MARGIN
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DiskFullError(f"{folder}: {free / 2**20:.0f} MiB free, the next node needs about "
                            f"{need / 2**20:.0f} MiB ({params:,} parameters, {n_builds} builds); "
                            "free space or use --out on a larger disk")
    say(f"disk: {free / 2**20:,.0f} MiB free, about {need / 2**20:,.0f} MiB needed")


def _run_dir(out: Path, step: Step, number: int, key: str) -> Path:
    return out / "models" / step.node.replace("/", "-") / f"v{number}-{key[:12]}"


def _run_step(tree: TreeSpec, data: TreeData, reg: Registry, step: Step, out: Path,
              heldout_files: list[Path], device: str | None, n_threads: int | None, say: Any,
              progress: bool) -> None:
    node = tree.node(step.node)
    cur = reg.current(node.path)
    parent: VersionInfo | None = None
    if node.parent is not None:
        parent = reg.current(node.parent)
        if parent is None:
            raise TreeBuildError(f"{node.path}: its parent {node.parent} has no version; build "
                                 f"it first (edgellm tree build without --only)")
        _check_tokenizer(tree, node.path, parent)
    if step.action == "builds":
        if cur is None:  # plan() gives "builds" only to a node with a version
            raise TreeBuildError(f"{node.path}: no version to add builds to")
        _check_space(out, cur.params, len(step.builds), False, say)
        builds = _builds(tree, node.path, cur.version, node.parent, parent, cur.checkpoint,
                         step.builds, out, heldout_files, n_threads, say)
        reg.add_builds(node.path, cur.version, builds)
        step.version = cur.version
        return
    number = (cur.version if cur else 0) + 1
    corpus = data.corpus_hash(node.path)
    config = tree.config_hash(node.path)
    key = hashlib.sha256(f"{corpus}:{config}:{parent.id if parent else 0}".encode()).hexdigest()
    run = _run_dir(out, step, number, key)
    train_texts = [r.text for r in data.train[node.path]]
    own_held = [r.text for c in node.corpora for r in data.corpus_heldout[c]]
    heldout_texts = own_held or [data.heldout_text(s) for s in tree.heldout_sets]
    if node.checkpoint is not None:
        params, summary = _import(tree, node.path, node.checkpoint, run, len(step.builds), out,
                                  say)
    else:
        params, summary = _train(tree, node, parent, run, number, train_texts, heldout_texts,
                                 len(step.builds), out, device, say, progress)
    builds = _builds(tree, node.path, number, node.parent, parent, run, step.builds, out,
                     heldout_files, n_threads, say)
    _fsync_tree(run)
    info = reg.register(NewVersion(
        node=node.path, parent=node.parent, parent_version=parent.version if parent else None,
        corpus_hash=corpus, config_hash=config, tokenizer_hash=tokenizer_hash(tree.tokenizer),
        config=tree.config(node.path), checkpoint=run, params=params,
        n_train_records=len(train_texts), train=summary), builds)
    step.version = info.version


def _train(tree: TreeSpec, node: NodeSpec, parent: VersionInfo | None, run: Path, number: int,
           train_texts: list[str], heldout_texts: list[str], n_builds: int, out: Path,
           device: str | None, say: Any, progress: bool) -> tuple[int, dict[str, Any]]:
    """Train a node's new version into run: (parameters, training summary)."""
    settings = _settings(node.train, device)
    from . import distill

    if parent is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tree.tokenizer))
        cfg = hf_config(node.model or {}, len(tok), tok.bos_token_id, tok.eos_token_id)
        params = count_params(cfg)
        _check_space(out, params, n_builds, True, say)
        say(f"{node.path}: pretraining v{number} from random init: {params:,} parameters, "
            f"{len(train_texts)} documents, {settings.steps} steps -> {run}")
        result = distill.pretrain(tree.tokenizer, cfg, train_texts, heldout_texts, run,
                                  settings, resume=True, progress=progress)
    else:
        shape = distill.StudentShape(**(node.student or {}))
        pcfg = json.loads((parent.checkpoint / "config.json").read_text(encoding="utf-8"))
        params = count_params(distill.student_config(pcfg, shape))
        _check_space(out, params, n_builds, True, say)
        how = "distilling" if node.teacher else "training without teacher (baseline)"
        say(f"{node.path}: {how} v{number} from {node.parent}@{parent.version}: "
            f"{params:,} parameters, {len(train_texts)} documents, {settings.steps} steps "
            f"-> {run}")
        result = distill.distill(parent.checkpoint, train_texts, heldout_texts, run, shape,
                                 settings, teacher=node.teacher, resume=True, progress=progress,
                                 tokenizer_dir=tree.tokenizer)
    say(f"{node.path}: trained {result.steps} steps in {result.seconds:.1f} s on "
        f"{result.device} ({result.tokens_per_s:,.0f} tokens/s)")
    last = result.history[-1] if result.history else {}
    return result.params, {"steps": result.steps, "seconds": round(result.seconds, 3),
                           "device": result.device, "tokens_per_s": round(result.tokens_per_s, 1),
                           "teacher_params": result.teacher_params, "last": last}


_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size")


def _import(tree: TreeSpec, node: str, src: Path, run: Path, n_builds: int, out: Path,
            say: Any) -> tuple[int, dict[str, Any]]:
    """Copy an externally trained HF folder into run after checking its tokenizer and shape:
    (parameters, training summary from its train.json)."""
    want_tok = tokenizer_hash(tree.tokenizer)
    tok = src / "tokenizer.json"
    have_tok = hashlib.sha256(tok.read_bytes()).hexdigest() if tok.is_file() else None
    if have_tok != want_tok:
        raise TokenizerMismatchError(
            f"{node}: tokenizer mismatch: the imported checkpoint {src} has tokenizer "
            f"{(have_tok or 'none')[:12]}, the tree's {tree.tokenizer} is {want_tok[:12]}; "
            "train it with the tree's tokenizer")
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    want = node_configs(tree)[node]
    for k in _SHAPE_FIELDS:
        if k in want and cfg.get(k, want[k]) != want[k]:
            raise TreeBuildError(f"{node}: the imported checkpoint {src} has {k} = {cfg.get(k)}, "
                                 f"the tree file's shape gives {want[k]}; import the right "
                                 "folder or fix the tree file")
    params = count_params(cfg)
    _check_space(out, params, n_builds, True, say)
    say(f"{node}: importing {src} ({params:,} parameters) -> {run}")
    if not (run / "config.json").is_file():
        tmp = run.with_name(run.name + ".importing")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in sorted(src.iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        _fsync_tree(tmp)
        os.replace(tmp, run)
    facts: dict[str, Any] = {}
    tj = src / "train.json"
    if tj.is_file():
        facts = json.loads(tj.read_text(encoding="utf-8"))
    summary = {"imported_from": str(src)}
    summary.update({k: facts[k] for k in ("steps", "seconds", "device", "tokens_per_s",
                                          "teacher_params") if k in facts})
    if facts.get("history"):
        summary["last"] = facts["history"][-1]
    return params, summary


def _settings(train: dict[str, Any] | Any, device: str | None) -> Any:
    from .distill import TrainSettings

    kw = dict(train)
    if device is not None:
        kw["device"] = device
    return TrainSettings(**kw)


def _check_tokenizer(tree: TreeSpec, node: str, parent: VersionInfo) -> None:
    want = tokenizer_hash(tree.tokenizer)
    have_file = parent.checkpoint / "tokenizer.json"
    have = hashlib.sha256(have_file.read_bytes()).hexdigest() if have_file.is_file() else None
    if have != want or parent.tokenizer_hash != want:
        raise TokenizerMismatchError(
            f"{node}: tokenizer mismatch: its parent {parent.node}@{parent.version} was trained "
            f"with tokenizer {(have or parent.tokenizer_hash)[:12]}, the tree's tokenizer "
            f"{tree.tokenizer} is {want[:12]}; a child must share its parent's vocabulary -- "
            f"rebuild {parent.node} first (edgellm tree build without --only)")


def _builds(tree: TreeSpec, node: str, version: int, parent_node: str | None,
            parent: VersionInfo | None, checkpoint: Path, wanted: Sequence[tuple[str, str]],
            out: Path, heldout_files: list[Path], n_threads: int | None,
            say: Any) -> list[NewBuild]:
    from .build import build

    folder = out / "builds" / node.replace("/", "-") / f"v{version}"
    lineage = f"{parent_node}@{parent.version}" if parent_node and parent else None
    made = []
    for board, recipe in wanted:
        say(f"{node}: building v{version} for {board} as {recipe}, scoring "
            f"{', '.join(p.stem for p in heldout_files)}")
        r = build(checkpoint, board, type=recipe, node=node, version=version, parent=lineage,
                  eval_texts=heldout_files, out=folder, max_eval_tokens=tree.eval.get("max_tokens"),
                  window=tree.eval_window, stride=tree.eval.get("stride"),
                  n_threads=n_threads, log=None)
        b = r.bundle
        _fsync_tree(b.folder)
        files = [(f.name, f.sha256, f.size) for f in b.files]
        m = FileEntry.of(b.folder / MANIFEST_NAME)
        files.append((m.name, m.sha256, m.size))
        scores = [ScoreInfo(p.stem, s.ppl, s.nll, s.n_scored, s.protocol, s.text_sha256,
                            s.window, s.stride)
                  for p in heldout_files for s in [b.scores[p.stem]]]  # the tree's set order
        say(f"{node}: {recipe}: {b.model_size:,} bytes; " +
            ", ".join(f"{s.heldout} ppl {s.ppl:.2f}" for s in scores))
        made.append(NewBuild(board, recipe, b.folder, b.weights_bytes, files, scores))
    return made


# --- reporting --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShowRow:
    """One node's line of `tree show`."""

    node: str
    version: int | None
    parent: str | None
    params: int | None
    sizes: dict[str, int]  # recipe -> model.gguf bytes (first board)
    ppl: dict[str, float]  # held-out set -> perplexity (best-quality build)
    ppl_recipe: str | None
    stale: tuple[str, ...]


def show_rows(reg: Registry, expected_: dict[str, Expected] | None = None) -> list[ShowRow]:
    """A row per registered node (current version), parents first."""
    stale = {s.node: s.reasons for s in reg.stale(expected_)}
    rows = []
    for node, parent in reg.nodes():
        cur = reg.current(node)
        if cur is None:
            rows.append(ShowRow(node, None, parent, None, {}, {}, None, stale.get(node, ())))
            continue
        builds = reg.builds(cur.id)
        board = builds[0].board if builds else None
        sizes = {b.recipe: next((s for n, _, s in b.files if n.endswith(".gguf")), b.size)
                 for b in builds if b.board == board}
        best = min(builds, key=lambda b: _QUALITY.index(b.recipe)
                   if b.recipe in _QUALITY else 99, default=None)
        ppl = {k: s.ppl for k, s in best.scores.items()} if best else {}
        rows.append(ShowRow(node, cur.version, parent, cur.params, sizes, ppl,
                            best.recipe if best else None, stale.get(node, ())))
    return rows


def format_table(rows: Sequence[ShowRow]) -> str:
    """The `tree show` table: node, version, parameters, file MiB per recipe, perplexities."""
    recipes = [q for q in _QUALITY if any(q in r.sizes for r in rows)]
    sets: list[str] = []
    for r in rows:
        sets += [s for s in r.ppl if s not in sets]
    head = ["node", "ver", "params"] + [f"{q} MiB" for q in recipes] + \
        [f"ppl {s}" for s in sets] + ["status"]
    body = []
    for r in rows:
        body.append([("  " * r.node.count("/")) + r.node,
                     f"v{r.version}" if r.version else "-",
                     f"{r.params:,}" if r.params else "-"]
                    + [f"{r.sizes[q] / 2**20:.2f}" if q in r.sizes else "-" for q in recipes]
                    + [f"{r.ppl[s]:.2f}" if s in r.ppl else "-" for s in sets]
                    + ["stale: " + "; ".join(r.stale) if r.stale else "current"])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [head, ["-" * w for w in widths], *body]]
    ref = {r.ppl_recipe for r in rows if r.ppl_recipe}
    if ref:
        lines.append(f"(perplexity: protocol edgellm-ppl-v1 on the {'/'.join(sorted(ref))} "
                     "build of each node)")
    return "\n".join(lines)


def plot_scores(rows: Sequence[ShowRow], path: str | os.PathLike[str]) -> Path:
    """A grouped bar chart of perplexity per node per held-out set, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in rows if r.ppl]
    sets: list[str] = []
    for r in rows:
        sets += [s for s in r.ppl if s not in sets]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) + 2), 4.5))
    width = 0.8 / max(len(sets), 1)
    for i, s in enumerate(sets):
        xs = [j + (i - (len(sets) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r.ppl.get(s, 0.0) for r in rows], width, label=s)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r.node}\nv{r.version}, {_count(r.params or 0)} params"
                        for r in rows], fontsize=8)
    ax.set_ylabel("perplexity (edgellm-ppl-v1, lower is better)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title("held-out perplexity per node")
    ax.legend(title="held-out set")
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"
