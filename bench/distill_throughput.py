# SPDX-License-Identifier: MIT
"""Training throughput of `edgellm.hub.distill`: student tokens/s with and without a teacher.

Builds a byte-level BPE tokenizer on Botchan, a random teacher (pretrain, 1 step), then runs
`distill` for a fixed number of steps per student shape and prints one JSON line per run:
tokens/s as TrainResult reports it (all steps) and steady-state tokens/s (after the warm-up
steps), with the device, torch version, shapes and git SHA. Human progress goes to stderr.

    python bench/distill_throughput.py                          # CPU here: ~1M student, ~4M teacher
    python bench/distill_throughput.py --device cuda --steps 200 --batch-size 32 \
        --teacher dim=1024,layers=16,hidden=2816,heads=16,kv=4 --vocab 8192 \
        --student layers=8,dim=512 --student layers=4,dim=256
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common  # puts this checkout's edgellm first on sys.path

CORPUS = common.REPO / "tests" / "data" / "corpora" / "botchan.txt"
TEACHER_KEYS = {"dim": "hidden_size", "layers": "num_hidden_layers", "hidden": "intermediate_size",
                "heads": "num_attention_heads", "kv": "num_key_value_heads"}
STUDENT_KEYS = {"layers": "n_layers", "dim": "dim", "hidden": "hidden_dim", "heads": "n_heads",
                "kv": "n_kv_heads", "shrink": "shrink"}


def _kv(spec: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in spec.split(",") if part)


def _tokenizer(folder: Path, vocab: int, texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                            eos_token="<|end_of_text|>").save_pretrained(folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="dim=256,layers=4,hidden=688,heads=8,kv=4",
                    help="teacher shape (default: ~4.2M parameters with --vocab 2048)")
    ap.add_argument("--student", action="append", default=None,
                    help="student shape, repeatable (default layers=2,dim=128: ~0.9M parameters)")
    ap.add_argument("--vocab", type=int, default=2048, help="tokenizer size (default 2048)")
    ap.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    ap.add_argument("--warmup-steps", type=int, default=5,
                    help="steps left out of the steady-state figure (default 5)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the student")
    a = ap.parse_args()

    import torch

    from edgellm.hub.distill import StudentShape, TrainSettings, distill, pretrain

    lines = [x.strip() for x in CORPUS.read_text(encoding="utf-8").splitlines()]
    docs = [x for x in lines[40:] if x]
    train, held = docs[:-100], docs[-100:]
    teacher_cfg = {TEACHER_KEYS[k]: int(v) for k, v in _kv(a.teacher).items()}
    teacher_cfg["max_position_embeddings"] = max(a.seq_len, 256)
    students = a.student or ["layers=2,dim=128"]
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        root = Path(tmp)
        _tokenizer(root / "tok", a.vocab, docs)
        common.log(f"teacher {teacher_cfg}, vocab {a.vocab}")
        t = pretrain(root / "tok", teacher_cfg, train, held, root / "teacher",
                     TrainSettings(steps=1, batch_size=2, seq_len=a.seq_len, warmup=0,
                                   device=a.device, eval_tokens=512), progress=False)
        for spec in students:
            kw: dict[str, Any] = {STUDENT_KEYS[k]: (float(v) if k == "shrink" else int(v))
                                  for k, v in _kv(spec).items()}
            for teacher in (True, False):
                marks: dict[int, float] = {}
                dev = torch.device(t.device)

                def on_step(step: int, marks: dict[int, float] = marks,
                            dev: torch.device = dev) -> None:
                    if step in (a.warmup_steps, a.steps):
                        if dev.type == "cuda":
                            torch.cuda.synchronize(dev)
                        marks[step] = time.perf_counter()

                s = TrainSettings(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                                  warmup=0, eval_every=10**9, checkpoint_every=10**9,
                                  eval_tokens=512, device=a.device, precision=a.precision,
                                  compile=a.compile)
                out = root / f"s-{len(marks)}-{teacher}-{spec.replace(',', '_').replace('=', '')}"
                r = distill(root / "teacher", train, held, out, StudentShape(**kw), s,
                            teacher=teacher, progress=False, on_step=on_step)
                steady = None
                if a.warmup_steps < a.steps and len(marks) == 2:
                    steady = ((a.steps - a.warmup_steps) * a.batch_size * a.seq_len
                              / (marks[a.steps] - marks[a.warmup_steps]))
                rec = {
                    "bench": "distill_throughput", "time": common.stamp(), "git": common.git_sha(),
                    "device": r.device,
                    "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                                    else common.cpu_model()),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "precision": a.precision, "compile": a.compile, "teacher": teacher,
                    "teacher_config": teacher_cfg, "vocab": a.vocab, "student": kw,
                    "teacher_params": t.params, "student_params": r.params,
                    "steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
                    "tokens_per_s": round(r.tokens_per_s, 1),
                    "steady_tokens_per_s": round(steady, 1) if steady else None,
                }
                print(json.dumps(rec), flush=True)
                common.log(f"{spec} teacher={teacher}: {r.tokens_per_s:,.0f} tokens/s "
                           f"(steady {steady or 0:,.0f}) on {r.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
