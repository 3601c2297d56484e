# SPDX-License-Identifier: MIT
"""The training engine behind `edgellm.hub.distill`: token windows, the loop, checkpoints, atomic writes.

Public API (re-exported by `edgellm.hub.distill`, which is where callers import it from):

- `TrainSettings`: steps, batch, learning-rate schedule, KL temperature and weight, seed, device.
- `TrainResult`: what a run did (history of evals, parameter counts, throughput).

The rest serves `distill.pretrain` and `distill.distill`: `encode_documents` turns documents
into one token stream, `Run` describes a run, `train` runs it (resuming from OUT_DIR/checkpoint/)
and writes the Hugging Face folder, and `write_safetensors` writes tensors without pickle.

The loop keeps the GPU busy: batches are gathered on the device from a token stream that lives
there, losses accumulate on the device, and the host reads them back (a sync) only every
`log_every` steps, at evaluations and at checkpoints. Batches are a pure function of
(seed, step), so a resumed run sees the same batches as an uninterrupted one.

.. versionadded:: 0.1
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .._fsutil import fsync_dir
from ..errors import CheckpointMismatchError, CorpusError, DiskFullError, InvalidArgumentError

__all__ = ["CHECKPOINT_FORMAT", "TOKENIZER_FILES", "Run", "TrainResult", "TrainSettings",
           "encode_documents", "resolve_device", "resolve_precision", "sha256_tokens", "train",
           "write_safetensors"]

CHECKPOINT_FORMAT = "edgellm-train-checkpoint-v1"
# Files copied from the tokenizer's folder into every output (those present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")
# Settings that decide the weights: a checkpoint resumes only when these match. device,
# precision, compile, eval_every, checkpoint_every and log_every may change between sessions.
RESULT_SETTINGS = ("steps", "batch_size", "seq_len", "lr", "warmup", "weight_decay", "grad_clip",
                   "temperature", "alpha", "seed", "eval_tokens")
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
              torch.bool: "BOOL"}


@dataclass(frozen=True)
class TrainSettings:
    """How to train: schedule, loss weights, evaluation and checkpoint cadence, seed, device.

    The learning rate rises linearly over `warmup` steps, then follows a cosine to lr / 10 at
    `steps`. loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(data), with T
    the temperature; without a teacher, loss = CE.

    .. versionadded:: 0.1
    """

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256  # tokens per training window (and per held-out chunk)
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0  # AdamW decay on 2-D weights (never norms)
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    temperature: float = 2.0  # KL temperature
    alpha: float = 0.5  # weight of the KL term (see above)
    eval_every: int = 100
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu; or "cpu", "cuda", "cuda:1"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16"
    eval_tokens: int = 65536  # held-out tokens scored per evaluation (the first N)
    log_every: int = 10  # steps between progress-bar updates of loss/KL (a device sync)
    compile: bool = False  # torch.compile the student's forward (CUDA; off: faster start)

    def validate(self) -> None:
        """Raise InvalidArgumentError for an out-of-range field."""
        positive = ("steps", "batch_size", "seq_len", "eval_every", "checkpoint_every",
                    "eval_tokens", "log_every")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidArgumentError(f"TrainSettings.{name} must be an integer >= 1, got {v!r}")
        for name in ("warmup", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InvalidArgumentError(f"TrainSettings.{name} must be an integer >= 0, got {v!r}")
        checks = [("lr", self.lr > 0, "> 0"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
                  ("grad_clip", self.grad_clip >= 0, ">= 0"),
                  ("temperature", self.temperature > 0, "> 0"),
                  ("alpha", 0 <= self.alpha <= 1, "in [0, 1]")]
        for name, ok, want in checks:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not ok:
                raise InvalidArgumentError(f"TrainSettings.{name} must be {want}, got {v!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise InvalidArgumentError(f"TrainSettings.precision must be auto, fp32 or bf16, "
                                       f"got {self.precision!r}")


@dataclass
class TrainResult:
    """What a training run did.

    history holds one dict per evaluation (step 0 first): step; loss, kl, ce (means over the
    training steps since the previous evaluation; kl is NaN without a teacher); heldout_ppl
    (token-level, from the torch model); heldout_kl (mean KL(teacher || student) per held-out
    token at T = 1; NaN without a teacher). tokens_per_s counts student training tokens per
    second of training steps (evaluations and checkpoints excluded); seconds is the run's
    wall time across resumed sessions.

    .. versionadded:: 0.1
    """

    out_dir: Path
    steps: int
    params: int
    teacher_params: int | None
    history: list[dict[str, float]]
    tokens_per_s: float
    device: str
    seconds: float


@dataclass
class Run:
    """One training run, as `distill` and `pretrain` prepare it for `train`."""

    kind: str  # "pretrain" or "distill"
    out_dir: Path
    student: Any  # a transformers PreTrainedModel (fp32, on the CPU)
    teacher: Any | None  # the parent, or None (pretraining, or the no-teacher baseline)
    tokenizer_dir: Path  # the tokenizer files to copy come from here
    train_ids: torch.Tensor  # [n_train] int32 token stream
    heldout_ids: torch.Tensor  # [n_heldout] int32 token stream
    settings: TrainSettings
    identity: dict[str, Any]  # must equal the checkpoint's to resume (settings added by train)
    facts: dict[str, Any]  # written into train.json
    resume: bool = True  # continue from OUT_DIR/checkpoint/ when there is one
    progress: bool = True  # the progress bar on stderr
    on_step: Callable[[int], None] | None = None  # called after every step; may raise to stop
    teacher_params: int | None = None


# --------------------------------------------------------------------------------------
# Devices and tokens


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; a named device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InvalidArgumentError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {name!r} asked for, but torch {torch.__version__} "
                                   "sees no CUDA GPU; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device {name!r} is not supported (cpu or cuda)")
    return dev


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 for "bf16" (and "auto" on a bf16-capable GPU), else None (fp32)."""
    if name == "bf16" or (name == "auto" and device.type == "cuda"
                          and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def encode_documents(tokenizer: Any, docs: Sequence[str], what: str) -> torch.Tensor:  # -> [n] int32
    """One token stream: each document as [BOS] tokens EOS (BOS where the tokenizer adds one).

    Raises:
        CorpusError: no document has text.
        InvalidArgumentError: a document is not a str, or the tokenizer has neither EOS nor BOS.
    """
    if isinstance(docs, str):
        raise InvalidArgumentError(f"{what} texts must be a sequence of documents, not one str")
    texts = []
    for i, d in enumerate(docs):
        if not isinstance(d, str):
            raise InvalidArgumentError(f"{what} document {i} is a {type(d).__name__}, not a str")
        if d.strip():
            texts.append(d)
    if not texts:
        raise CorpusError(f"no {what} text: {len(docs)} document(s), none with any text")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    uses_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    if eos is None and not uses_bos:
        raise InvalidArgumentError("the tokenizer has neither an EOS token nor a BOS it adds, "
                                   "so documents cannot be told apart")
    head = [bos] if uses_bos else []
    tail = [eos] if eos is not None else []
    parts: list[torch.Tensor] = []
    for i in range(0, len(texts), 1024):  # in batches: Python int lists of a big corpus are large
        ids: list[int] = []
        for row in tokenizer(texts[i : i + 1024], add_special_tokens=False)["input_ids"]:
            ids.extend(head)
            ids.extend(row)
            ids.extend(tail)
        parts.append(torch.tensor(ids, dtype=torch.int32))
    return torch.cat(parts)


def _batch_starts(seed: int, step: int, batch: int, n_starts: int) -> torch.Tensor:  # -> [batch]
    """Window starts of one step: a pure function of (seed, step), so resume sees the same."""
    g = torch.Generator().manual_seed((seed * 0x9E3779B1 + step * 0x85EBCA77 + 1) % (1 << 63))
    return torch.randint(0, n_starts, (batch,), generator=g)


def _heldout_chunks(ids: torch.Tensor, seq_len: int, max_tokens: int) -> list[torch.Tensor]:
    """Consecutive chunks of seq_len + 1 tokens overlapping by one: each target scored once."""
    ids = ids[: max_tokens + 1]
    return [ids[i : i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)
            if len(ids[i : i + seq_len + 1]) >= 2]


# --------------------------------------------------------------------------------------
# Files: safetensors without pickle, fsync, disk-full errors


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors as a safetensors file (streamed, one tensor at a time) and fsync it."""
    header: dict[str, Any] = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise InvalidArgumentError(f"{name}: dtype {t.dtype} has no safetensors name")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                f.write(flat.numpy().data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def _disk_full(what: str, path: Path, keep: str) -> Iterator[None]:
    """Turn ENOSPC into DiskFullError naming the path and what stays valid."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"disk full while writing the {what} at {path} "
                                f"({exc.filename or path}): {os.strerror(exc.errno)}; {keep}. "
                                "Free some space and run again to resume") from exc
        raise


def _json_safe(x: Any) -> Any:
    """NaN and infinities become null, so train.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _json_history(h: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [{k: (float("nan") if v is None else float(v)) for k, v in e.items()} for e in h]


# --------------------------------------------------------------------------------------
# Checkpoints: OUT_DIR/checkpoint/{model,optimizer,rng}.safetensors + state.json


def _param_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The model's parameters by HF name (a tied output appears once, as the embedding)."""
    return dict(model.named_parameters())


def _save_checkpoint(out: Path, model: Any, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any]) -> None:
    ckpt, old = out / "checkpoint", out / "checkpoint.old"
    tmp = out / f".checkpoint.tmp-{os.getpid()}"
    keep = (f"the previous checkpoint {ckpt} (step {_checkpoint_step(ckpt)}) is intact"
            if (ckpt / "state.json").is_file() else "no earlier checkpoint was kept")
    try:
        with _disk_full("checkpoint", tmp, keep):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            write_safetensors(tmp / "model.safetensors", _param_tensors(model), {"format": "pt"})
            sd = opt.state_dict()
            opt_tensors = {f"state.{i}.{k}": v for i, st in sd["state"].items()
                           for k, v in st.items() if isinstance(v, torch.Tensor)}
            write_safetensors(tmp / "optimizer.safetensors", opt_tensors)
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
                rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            write_safetensors(tmp / "rng.safetensors", rng)
            sched_state = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
            # state.json goes last: a folder without it is not a checkpoint.
            _write_json(tmp / "state.json", {
                "format": CHECKPOINT_FORMAT, **state, "param_groups": sd["param_groups"],
                "scheduler": sched_state, "history": _json_safe(state["history"])})
            fsync_dir(tmp)
            # Keep the previous checkpoint until the new one is in place.
            if ckpt.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(ckpt, old)
            os.replace(tmp, ckpt)
            fsync_dir(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _checkpoint_step(ckpt: Path) -> int | None:
    try:
        return int(json.loads((ckpt / "state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _find_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (checkpoint/, or checkpoint.old/ after a crash mid-swap)."""
    for name in ("checkpoint", "checkpoint.old"):
        if (out / name / "state.json").is_file():
            return out / name
    return None


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_identity(ckpt: Path, saved: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    a, b = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(now)))
    diffs = [f"{k}: checkpoint {a.get(k, '(none)')!r}, now {b.get(k, '(none)')!r}"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        raise CheckpointMismatchError(
            f"{ckpt} was made by a different run, so it cannot be resumed: "
            + "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
            + ". Use the same settings, or start over with resume=False (--no-resume)")


def _load_checkpoint(ckpt: Path, model: Any, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler,
                     identity: Mapping[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(f"{ckpt}: format {state.get('format')!r}, expected "
                                      f"{CHECKPOINT_FORMAT!r}")
    _check_identity(ckpt, state["identity"], identity)
    params = load_file(str(ckpt / "model.safetensors"))
    with torch.no_grad():
        for name, p in _param_tensors(model).items():
            p.copy_(params[name])
    flat = load_file(str(ckpt / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        _, idx, name = key.split(".", 2)
        opt_state.setdefault(int(idx), {})[name] = t
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    sched.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(opt.param_groups)})
    rng = load_file(str(ckpt / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    cuda = [rng[f"cuda.{i}"] for i in range(len(rng) - 1) if f"cuda.{i}" in rng]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    state["history"] = _json_history(state["history"])
    return dict(state)


# --------------------------------------------------------------------------------------
# The loop


def _lr_factor(settings: TrainSettings) -> Callable[[int], float]:
    """Linear warmup to 1, then a cosine from 1 down to 0.1 at the last step."""
    warm, total = settings.warmup, settings.steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * t))

    return factor


def _optimizer(model: Any, s: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": s.weight_decay},
                          {"params": rest, "weight_decay": 0.0}) if g["params"]]
    # fused AdamW: one kernel for all parameters on CUDA; the plain loop on the CPU.
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type == "cuda")


def _loss_terms(logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                s: TrainSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce) for logits [batch, seq, vocab] and targets [batch, seq]; kl 0 without teacher."""
    logits = logits.float().flatten(0, 1)
    ce = F.cross_entropy(logits, targets.flatten())
    if teacher_logits is None:
        return ce, torch.zeros_like(ce), ce
    t = s.temperature
    kl = F.kl_div(F.log_softmax(logits / t, dim=-1),
                  F.log_softmax(teacher_logits.float().flatten(0, 1) / t, dim=-1),
                  log_target=True, reduction="batchmean")
    return s.alpha * t * t * kl + (1.0 - s.alpha) * ce, kl, ce


@torch.no_grad()
def _evaluate(model: Any, teacher: Any | None, chunks: Sequence[torch.Tensor], batch: int,
              device: torch.device, amp: torch.dtype | None) -> tuple[float, float]:
    """(perplexity, mean KL(teacher || student) at T = 1) over the held-out chunks."""
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    kl = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    groups: dict[int, list[torch.Tensor]] = {}
    for c in chunks:
        groups.setdefault(len(c), []).append(c)
    for rows in groups.values():
        for i in range(0, len(rows), batch):
            w = torch.stack(rows[i : i + batch]).to(device=device, dtype=torch.long)
            x, y = w[:, :-1], w[:, 1:]
            with _autocast(device, amp):
                logits = model(input_ids=x, use_cache=False).logits
                tl = teacher(input_ids=x, use_cache=False).logits if teacher is not None else None
            lp = F.log_softmax(logits.float().flatten(0, 1), dim=-1)
            nll += F.nll_loss(lp, y.flatten(), reduction="sum").double()
            if tl is not None:
                kl += F.kl_div(lp, F.log_softmax(tl.float().flatten(0, 1), dim=-1),
                               log_target=True, reduction="sum").double()
            n += y.numel()
    model.train()
    ppl = math.exp(float(nll) / n)
    return ppl, (float(kl) / n if teacher is not None else float("nan"))


def _autocast(device: torch.device, amp: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def train(run: Run) -> TrainResult:
    """Train run.student, resuming from run.out_dir/checkpoint/ when identity matches, then
    write the Hugging Face folder (config.json, model.safetensors, tokenizer files, train.json).

    Raises:
        CheckpointMismatchError: a checkpoint made with other settings, data or parent.
        DiskFullError: the disk filled while writing; the previous checkpoint stays valid.
        CorpusError: the training stream is shorter than one window.
    """
    from tqdm import tqdm  # type: ignore[import-untyped]

    s, out = run.settings, run.out_dir
    device = resolve_device(s.device)
    amp = resolve_precision(s.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) on TF32
        torch.backends.cudnn.allow_tf32 = True
    n_train = len(run.train_ids)
    if n_train < s.seq_len + 1:
        raise CorpusError(f"the training text has {n_train} tokens; seq_len {s.seq_len} needs at "
                          f"least {s.seq_len + 1} (add text or lower seq_len)")
    ctx = getattr(run.student.config, "max_position_embeddings", None)
    if isinstance(ctx, int) and s.seq_len > ctx:
        raise InvalidArgumentError(f"seq_len {s.seq_len} is longer than the model's context "
                                   f"(max_position_embeddings {ctx})")
    identity = {**run.identity, "settings": {k: getattr(s, k) for k in RESULT_SETTINGS}}

    torch.manual_seed(s.seed)
    student = run.student.to(device)
    student.train()
    teacher = run.teacher
    if teacher is not None:
        teacher = teacher.to(device).eval()
        teacher.requires_grad_(False)
        if amp is not None:  # bf16 weights halve the teacher's memory and time; buffers (the
            for p in teacher.parameters():  # RoPE inverse frequencies) stay fp32 for accuracy
                p.data = p.data.to(amp)
    opt = _optimizer(student, s, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(s))
    st: dict[str, Any] = {"step": 0, "history": [], "acc": [0.0, 0.0, 0.0], "n_acc": 0,
                          "train_seconds": 0.0, "train_tokens": 0, "wall_seconds": 0.0}
    out.mkdir(parents=True, exist_ok=True)
    for stale in (*out.glob(".checkpoint.tmp-*"), *out.glob(".final.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a run that was killed mid-write
    ckpt = _find_checkpoint(out)
    if ckpt is not None and run.resume:
        st = _load_checkpoint(ckpt, student, opt, sched, identity)
    fwd = torch.compile(student) if s.compile else student

    stream = run.train_ids.to(device)
    offsets = torch.arange(s.seq_len + 1, device=device)
    chunks = _heldout_chunks(run.heldout_ids, s.seq_len, s.eval_tokens)
    if not chunks:
        raise CorpusError("the held-out text has fewer than 2 tokens")
    t_wall = time.perf_counter()
    wall0 = st["wall_seconds"]

    def evaluate_now() -> None:
        ppl, hkl = _evaluate(student, teacher, chunks, s.batch_size, device, amp)
        n = max(st["n_acc"], 1)
        loss, kl, ce = (a / n for a in st["acc"]) if st["n_acc"] else (math.nan,) * 3
        st["history"].append({"step": float(st["step"]), "loss": loss,
                              "kl": kl if teacher is not None else math.nan, "ce": ce,
                              "heldout_ppl": ppl, "heldout_kl": hkl})
        st["acc"], st["n_acc"] = [0.0, 0.0, 0.0], 0

    if not st["history"]:
        evaluate_now()
    bar = tqdm(total=s.steps, initial=st["step"], disable=not run.progress, file=sys.stderr,
               desc=f"{run.kind} {out.name}", unit="step", dynamic_ncols=True)
    acc = torch.tensor(st["acc"], dtype=torch.float64, device=device)
    # Every step's window starts, made up front and copied to the device once (no per-step copy).
    all_starts = torch.stack([_batch_starts(s.seed, k, s.batch_size, n_train - s.seq_len)
                              for k in range(st["step"], s.steps)] or
                             [torch.zeros(s.batch_size, dtype=torch.long)]).to(device)
    first = st["step"]
    t0 = time.perf_counter()

    def sync_time() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        st["train_seconds"] += time.perf_counter() - t0

    try:
        while st["step"] < s.steps:
            step = st["step"]
            w = stream[all_starts[step - first][:, None] + offsets].long()  # [batch, seq_len + 1]
            x, y = w[:, :-1], w[:, 1:]
            with _autocast(device, amp):
                logits = fwd(input_ids=x, use_cache=False).logits
                if teacher is not None:
                    with torch.no_grad():
                        tl = teacher(input_ids=x, use_cache=False).logits
                else:
                    tl = None
            loss, kl, ce = _loss_terms(logits, tl, y, s)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), s.grad_clip)
            opt.step()
            sched.step()
            acc += torch.stack([loss.detach(), kl.detach(), ce.detach()]).double()
            st["n_acc"] += 1
            st["step"] = step = step + 1
            st["train_tokens"] += s.batch_size * s.seq_len
            bar.update(1)
            do_eval = step % s.eval_every == 0 or step == s.steps
            do_ckpt = step % s.checkpoint_every == 0 or step == s.steps
            if do_eval or do_ckpt or step % s.log_every == 0:
                st["acc"] = acc.tolist()  # the one host sync between evaluations
                n = st["n_acc"]
                post = f"loss {st['acc'][0] / n:.3f}"
                if teacher is not None:
                    post += f" kl {st['acc'][1] / n:.4f}"
                bar.set_postfix_str(post + f" ppl {st['history'][-1]['heldout_ppl']:.2f}",
                                    refresh=False)
            if do_eval or do_ckpt:
                sync_time()
                if do_eval:
                    evaluate_now()
                    acc.zero_()
                    h = st["history"][-1]
                    bar.set_postfix_str(f"loss {h['loss']:.3f}" + (
                        f" kl {h['kl']:.4f}" if teacher is not None else "")
                        + f" ppl {h['heldout_ppl']:.2f}", refresh=False)
                if do_ckpt:
                    st["wall_seconds"] = wall0 + time.perf_counter() - t_wall
                    _save_checkpoint(out, student, opt, sched, {
                        "identity": identity, "step": step, "history": st["history"],
                        "acc": st["acc"],
                        "n_acc": st["n_acc"], "train_seconds": st["train_seconds"],
                        "train_tokens": st["train_tokens"], "wall_seconds": st["wall_seconds"]})
                t0 = time.perf_counter()
            if run.on_step is not None:
                run.on_step(step)
    finally:
        bar.close()
    st["wall_seconds"] = wall0 + time.perf_counter() - t_wall

    result = TrainResult(out_dir=out, steps=st["step"], params=_count(student),
                         teacher_params=run.teacher_params, history=st["history"],
                         tokens_per_s=st["train_tokens"] / max(st["train_seconds"], 1e-9),
                         device=str(device), seconds=st["wall_seconds"])
    _write_final(run, student, result, identity, amp)
    return result


def _write_final(run: Run, model: Any, r: TrainResult, identity: Mapping[str, Any],
                 amp: torch.dtype | None) -> None:
    """config.json, model.safetensors, tokenizer files, then train.json, each renamed into place."""
    out = run.out_dir
    tmp = out / f".final.tmp-{os.getpid()}"
    cfg = model.config
    cfg.architectures = [type(model).__name__]
    cfg_dict = cfg.to_dict()
    cfg_dict["dtype"] = "float32"
    facts = {**run.facts, "kind": run.kind, "params": r.params, "teacher_params": r.teacher_params,
             "steps": r.steps, "settings": asdict(run.settings), "seed": run.settings.seed,
             "identity": identity, "history": r.history, "tokens_per_s": r.tokens_per_s,
             "train_tokens_seen": r.steps * run.settings.batch_size * run.settings.seq_len,
             "device": r.device, "precision": "bf16" if amp is not None else "fp32",
             "seconds": r.seconds, "torch": torch.__version__,
             "transformers": _version("transformers")}
    names = []
    try:
        with _disk_full("model", tmp, "no file of the model was replaced"):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            write_safetensors(tmp / "model.safetensors", _param_tensors(model), {"format": "pt"})
            _write_json(tmp / "config.json", cfg_dict)
            names += ["model.safetensors", "config.json"]
            for n in TOKENIZER_FILES:
                if (run.tokenizer_dir / n).is_file():
                    shutil.copyfile(run.tokenizer_dir / n, tmp / n)
                    with open(tmp / n, "rb+") as f:
                        os.fsync(f.fileno())
                    names.append(n)
            _write_json(tmp / "train.json", _json_safe(facts))
            fsync_dir(tmp)
            # train.json last: its presence says the rest of the folder is complete.
            for n in [*names, "train.json"]:
                os.replace(tmp / n, out / n)
            fsync_dir(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def sha256_tokens(ids: torch.Tensor) -> str:
    """The sha256 of a token stream's int32 bytes (a run's data identity)."""
    return hashlib.sha256(ids.to(torch.int32).numpy().tobytes()).hexdigest()
