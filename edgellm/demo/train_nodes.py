# SPDX-License-Identifier: MIT
"""Train every node of a tree file, parents first, and nothing else (no registry, no GGUF).

This is the GPU half of building the demo tree: a machine with torch and a GPU (but not
necessarily edgellm's C core) runs the same training code `edgellm tree build` runs, and
writes one Hugging Face folder per node; `edgellm tree build` on the hub then imports those
folders (``checkpoint = ...`` in the tree file) and converts, scores and registers them.
For the leaf it also trains the two baselines the issue compares against: the same shape
without a teacher from the parent's weights (``<leaf>.no-teacher``) and from random
initialisation (``<leaf>.scratch``).

    python -m edgellm.demo.train_nodes edgellm/demo/tree.toml --out runs --device cuda
    python -m edgellm.demo.train_nodes edgellm/demo/tree.toml --out runs --steps 20   # smoke

Everything is seeded by the tree file's ``seed`` values: the same command gives the same
weights on the same hardware and software (GPU kernels may differ across models of GPU).
``runs/summary.json`` records each run's parameters, steps, seconds and tokens per second.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgellm.demo.train_nodes",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tree", help="the tree file (e.g. edgellm/demo/tree.toml)")
    ap.add_argument("--out", required=True, help="folder for one Hugging Face folder per node")
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    ap.add_argument("--steps", type=int, default=None, help="override every node's steps (smoke tests)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the leaf's two baselines")
    ap.add_argument("--progress", action="store_true", help="show the trainer's progress bars")
    ap.add_argument("--export-f16", default=None, metavar="DIR",
                    help="also write each run's folder with float16 weights (no checkpoint) to "
                         "DIR: half the bytes, for moving the results off the GPU machine")
    a = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from ..hub import distill
    from ..hub.tree import count_params, hf_config, load_tree

    tree = load_tree(a.tree)
    data = tree.data()
    assert not data.check_invariant(), "held-out records in training data"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(tree.tokenizer))
    summary: dict[str, Any] = {"tree": str(tree.path), "device": a.device, "runs": {}}

    def settings(node_train: Any) -> distill.TrainSettings:
        kw = dict(node_train)
        kw["device"] = a.device
        if a.steps is not None:
            kw["steps"] = a.steps
            kw["eval_every"] = max(1, min(kw.get("eval_every", 100), a.steps))
            kw["checkpoint_every"] = max(1, min(kw.get("checkpoint_every", 200), a.steps))
        return distill.TrainSettings(**kw)

    def record(name: str, r: distill.TrainResult) -> None:
        summary["runs"][name] = {"params": r.params, "teacher_params": r.teacher_params,
                                 "steps": r.steps, "seconds": round(r.seconds, 2),
                                 "tokens_per_s": round(r.tokens_per_s, 1), "device": r.device,
                                 "last": r.history[-1] if r.history else {}}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"== {name}: {r.params:,} params, {r.steps} steps, {r.seconds:.1f} s, "
              f"{r.tokens_per_s:,.0f} tok/s on {r.device}; last {summary['runs'][name]['last']}",
              flush=True)

    order = tree.order()
    leaf = order[-1]
    for node in order:
        train_texts = [r.text for r in data.train[node.path]]
        held = [r.text for c in node.corpora for r in data.corpus_heldout[c]]
        held = held or [data.heldout_text(s) for s in tree.heldout_sets]
        dst = out / node.dashed
        t0 = time.perf_counter()
        print(f"-- {node.path}: {len(train_texts)} documents -> {dst}", flush=True)
        if node.parent is None:
            cfg = hf_config(node.model or {}, len(tok), tok.bos_token_id, tok.eos_token_id)
            print(f"   pretraining {count_params(cfg):,} parameters", flush=True)
            r = distill.pretrain(tree.tokenizer, cfg, train_texts, held, dst,
                                 settings(node.train), progress=a.progress)
        else:
            shape = distill.StudentShape(**(node.student or {}))
            parent = out / tree.node(node.parent).dashed
            r = distill.distill(parent, train_texts, held, dst, shape, settings(node.train),
                                teacher=node.teacher, progress=a.progress,
                                tokenizer_dir=tree.tokenizer)
        record(node.path, r)
        print(f"   {time.perf_counter() - t0:.1f} s", flush=True)

    if not a.no_baselines and leaf.parent is not None:
        train_texts = [r.text for r in data.train[leaf.path]]
        held = [r.text for c in leaf.corpora for r in data.corpus_heldout[c]]
        shape = distill.StudentShape(**(leaf.student or {}))
        parent = out / tree.node(leaf.parent).dashed
        r = distill.distill(parent, train_texts, held, out / f"{leaf.dashed}.no-teacher", shape,
                            settings(leaf.train), teacher=False, progress=a.progress,
                            tokenizer_dir=tree.tokenizer)
        record(f"{leaf.path}.no-teacher", r)
        pcfg = json.loads((parent / "config.json").read_text(encoding="utf-8"))
        scfg = distill.student_config(pcfg, shape)
        r = distill.pretrain(tree.tokenizer, scfg, train_texts, held, out / f"{leaf.dashed}.scratch",
                             settings(leaf.train), progress=a.progress)
        record(f"{leaf.path}.scratch", r)

    summary["heldout_ppl"] = _score_all(out, tree, data, tok, a.device)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for name, row in summary["heldout_ppl"].items():
        print(f"ppl {name:36s} " + "  ".join(f"{k} {v:8.2f}" for k, v in row.items()), flush=True)
    if a.export_f16:
        _export_f16(out, Path(a.export_f16))
    return 0


def _score_all(out: Path, tree: Any, data: Any, tok: Any, device: str) -> dict[str, dict[str, float]]:
    """Token-level perplexity of every run on every held-out set (first eval.max_tokens tokens
    of each, windows of the node's seq_len): the quick look; the registry's scores come from
    the GGUF builds through the edgellm runtime (protocol edgellm-ppl-v1)."""
    import torch
    from transformers import LlamaForCausalLM

    from ..hub.trainer import _evaluate, _heldout_chunks, encode_documents, resolve_device

    dev = resolve_device(device)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    max_tokens = int(tree.eval.get("max_tokens", 16384))
    sets = {s: encode_documents(tok, [r.text for r in data.heldout[s]], f"held-out {s}")
            for s in tree.heldout_sets}
    scores: dict[str, dict[str, float]] = {}
    for folder in sorted(p for p in out.iterdir() if (p / "config.json").is_file()):
        model: Any = LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
        model = model.to(dev)
        seq = int(model.config.max_position_embeddings)
        scores[folder.name] = {
            s: round(_evaluate(model, None, _heldout_chunks(ids, min(seq, 256), max_tokens), 16,
                               dev, amp)[0], 3)
            for s, ids in sets.items()}
        del model
    return scores


def _export_f16(out: Path, dst: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file

    from ..hub.trainer import write_safetensors

    for folder in sorted(p for p in out.iterdir() if (p / "model.safetensors").is_file()):
        d = dst / folder.name
        d.mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            if f.is_file() and f.name != "model.safetensors":
                shutil.copy2(f, d / f.name)
        sd = load_file(str(folder / "model.safetensors"))
        write_safetensors(d / "model.safetensors",
                          {k: v.to(torch.float16) for k, v in sd.items()}, {"format": "pt"})


if __name__ == "__main__":
    sys.exit(main())
