# SPDX-License-Identifier: MIT
"""Training corpora as records with stable ids, a fixed held-out split, and their hashes.

A corpus file yields *records* (one document each) with ids that do not change between runs
or machines:

- ``.jsonl`` / ``.jsonl.gz``: one JSON object a line; the id joins the ``id`` fields with
  "/" (MedQuAD: ``["collection", "qid"]`` gives ``6_NINDS_QA/0000012-3``) and the text fills
  a template (``"Question: {question}\\nAnswer: {answer}"``);
- ``.tsv`` / ``.tsv.gz``: a header row, then one record a row (id from columns, text from a
  template, as for JSON lines);
- ``.txt`` (any other suffix): split into documents by ``split``: ``"blank"`` (blank-line
  blocks), ``"wikitext"`` (WikiText articles, each starting at a `` = Title = `` line) or
  ``"lines"`` (blocks of ``lines`` lines); ids are ``<file-stem>:<index>``.

Held-out membership is a pure function of (base id, salt, fraction) -- see `is_heldout` --
plus an optional explicit id list, so the split is the same every time. A base id is the id
without the ``#n`` suffix a repeated id gets, so every copy of a repeated id lands on the same
side. `corpus_hash` hashes the ids and texts a node actually trains on.

Usage::

    spec = CorpusSpec(name="medquad", path=Path("medquad.jsonl"), id_fields=("collection", "qid"),
                      text="Question: {question}\\nAnswer: {answer}", heldout="medical",
                      fraction=0.05, salt="demo")
    records = load_records(spec)                   # [Record(id, text)], typed errors
    train, held = split_records(records, spec)

.. versionadded:: 0.1
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import os
import re
import string
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CorpusError

__all__ = ["FORMATS", "SPLITS", "CorpusError", "CorpusSpec", "Record", "base_id", "corpus_hash",
           "detect_format", "heldout_value", "is_heldout", "load_records", "split_records",
           "text_key", "train_tokenizer"]

FORMATS = ("jsonl", "tsv", "text")
SPLITS = ("blank", "wikitext", "lines")
# A WikiText article title line: " = Title = " (sections are " = = Section = = ").
_WIKI_TITLE_RE = re.compile(r"^ = [^=].* = $")
_EDGE_BLANK_RE = re.compile(r"\A(?:[ \t]*\n)+|(?:\n[ \t]*)+\Z")


@dataclass(frozen=True)
class Record:
    """One document of a corpus: a stable id and its text."""

    id: str
    text: str


@dataclass(frozen=True)
class CorpusSpec:
    """How to read one corpus file and split it (a ``[corpora.NAME]`` table of a tree file).

    .. versionadded:: 0.1
    """

    name: str
    path: Path
    format: str = "text"  # one of FORMATS
    split: str = "blank"  # text files: one of SPLITS
    lines: int = 40  # split = "lines": lines per document
    strip_gutenberg: bool = False  # text files: drop a Project Gutenberg header and licence
    id_fields: tuple[str, ...] = ("id",)  # jsonl/tsv: fields joined with "/" into the id
    text: str = "{text}"  # jsonl/tsv: str.format template over the record's fields
    heldout: str | None = None  # the held-out set this corpus's held-out records go to
    fraction: float = 0.0  # share of records held out (by hash of the base id)
    salt: str = ""  # hash salt: change it to draw a different split
    heldout_ids: tuple[str, ...] = ()  # ids held out whatever their hash
    # jsonl/tsv: keep only records whose field matches the pattern (re.search, any case), for
    # every (field, pattern) pair: a topic slice of a bigger file without a second copy.
    match: tuple[tuple[str, str], ...] = ()


def detect_format(path: Path) -> str:
    """The format a corpus file's suffix implies: jsonl, tsv or text."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".tsv"):
        return "tsv"
    return "text"


def base_id(record_id: str) -> str:
    """A record id without the "#n" suffix given to the second and later copies of an id."""
    head, sep, tail = record_id.rpartition("#")
    return head if sep and tail.isdigit() else record_id


def heldout_value(record_id: str, salt: str) -> float:
    """A record's position in [0, 1) for the held-out split: sha256 of salt, NUL, base id."""
    digest = hashlib.sha256(f"{salt}\0{base_id(record_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


def is_heldout(record_id: str, salt: str, fraction: float,
               explicit: Iterable[str] = ()) -> bool:
    """Whether a record is held out: its base id is listed, or heldout_value < fraction.

    The same (id, salt, fraction) gives the same answer on every machine, and a record held
    out at one fraction stays held out at every larger fraction with the same salt.
    """
    bid = base_id(record_id)
    if record_id in explicit or bid in explicit:
        return True
    return fraction > 0 and heldout_value(record_id, salt) < fraction


def text_key(text: str) -> str:
    """The sha256 of a text: how the tree recognises the same document under two ids."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def corpus_hash(records: Iterable[Record]) -> str:
    """sha256 over the records' ids and texts, in order (what a node trains on)."""
    h = hashlib.sha256()
    for r in records:
        for part in (r.id, r.text):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def split_records(records: Sequence[Record], spec: CorpusSpec) -> tuple[list[Record], list[Record]]:
    """(training records, held-out records) of a corpus under its own split."""
    explicit = frozenset(spec.heldout_ids)
    train: list[Record] = []
    held: list[Record] = []
    for r in records:
        (held if is_heldout(r.id, spec.salt, spec.fraction, explicit) else train).append(r)
    return train, held


# --- reading ---------------------------------------------------------------------------


def load_records(spec: CorpusSpec | str | os.PathLike[str]) -> list[Record]:
    """Read a corpus file into records with stable, unique ids (a repeated id gets "#2"...).

    Args:
        spec: a CorpusSpec, or a file path read with the defaults for its suffix (JSON lines
            with "id" and "text" fields; text split at blank lines).

    Raises:
        CorpusError: the file is missing or unreadable, not UTF-8 (the message gives the byte
            offset), yields no record with text, or has a malformed line (the message gives
            the line number and a fix).
    """
    if not isinstance(spec, CorpusSpec):
        p = Path(spec)
        spec = CorpusSpec(name=p.name, path=p, format=detect_format(p))
    path = spec.path
    if not path.is_file():
        raise CorpusError(f"corpus {spec.name!r}: {path} does not exist (fix the path in the "
                          "tree file; relative paths are relative to the tree file's folder)")
    raw = _read_bytes(spec)
    text = _decode(spec, raw)
    if spec.format == "jsonl":
        records = list(_jsonl(spec, text))
    elif spec.format == "tsv":
        records = list(_tsv(spec, text))
    elif spec.format == "text":
        records = list(_text(spec, text))
    else:
        raise CorpusError(f"corpus {spec.name!r}: unknown format {spec.format!r}; "
                          f"use one of {', '.join(FORMATS)}")
    out = _unique(records)
    if not out:
        raise CorpusError(f"corpus {spec.name!r}: {path} is empty (no record with text); "
                          "point the tree file at a corpus with documents in it")
    return out


def _read_bytes(spec: CorpusSpec) -> bytes:
    try:
        if spec.path.name.lower().endswith(".gz"):
            with gzip.open(spec.path, "rb") as f:
                return f.read()
        return spec.path.read_bytes()
    except (OSError, EOFError) as exc:
        raise CorpusError(f"corpus {spec.name!r}: cannot read {spec.path}: {exc}") from None


def _decode(spec: CorpusSpec, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise CorpusError(
            f"corpus {spec.name!r}: {spec.path} is not UTF-8 (byte offset {exc.start}, line "
            f"{line}: {raw[exc.start:exc.start + 4]!r}); re-encode it, e.g. "
            f"`iconv -f latin1 -t utf-8`") from None
    if text.startswith(codecs.BOM_UTF8.decode("utf-8")):
        text = text[1:]  # a UTF-8 byte order mark is not text
    return text.replace("\r\n", "\n")


def _fill(spec: CorpusSpec, fields: dict[str, Any], where: str) -> tuple[str, str]:
    """(id, text) of a structured record."""
    parts = []
    for f in spec.id_fields:
        v = fields.get(f)
        if v is None or isinstance(v, (dict, list)) or str(v) == "":
            raise CorpusError(f"corpus {spec.name!r}: {where} has no id field {f!r} (fields: "
                              f"{', '.join(sorted(fields)) or 'none'}); set `id` in the tree "
                              "file to the fields that identify a record")
        parts.append(str(v))
    try:
        text = string.Formatter().vformat(spec.text, (), fields)
    except (KeyError, IndexError) as exc:
        raise CorpusError(f"corpus {spec.name!r}: {where} has no field {exc} that the `text` "
                          f"template {spec.text!r} uses") from None
    return "/".join(parts), text


def _jsonl(spec: CorpusSpec, text: str) -> Iterator[Record]:
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"corpus {spec.name!r}: {spec.path} line {n} is not JSON "
                              f"({exc.msg}); each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise CorpusError(f"corpus {spec.name!r}: {spec.path} line {n} is not a JSON object")
        rid, body = _fill(spec, obj, f"{spec.path} line {n}")
        if body.strip() and _matches(spec, obj):
            yield Record(rid, body)


def _matches(spec: CorpusSpec, fields: dict[str, Any]) -> bool:
    return all(re.search(pattern, str(fields.get(name) or ""), re.IGNORECASE)
               for name, pattern in spec.match)


def _tsv(spec: CorpusSpec, text: str) -> Iterator[Record]:
    rows = [row for row in text.split("\n") if row.strip()]
    if not rows:
        return
    header = rows[0].split("\t")
    for n, row in enumerate(rows[1:], 2):
        cells = row.split("\t")
        if len(cells) != len(header):
            raise CorpusError(f"corpus {spec.name!r}: {spec.path} row {n} has {len(cells)} "
                              f"cells, the header has {len(header)}")
        fields = dict(zip(header, cells))
        rid, body = _fill(spec, fields, f"{spec.path} row {n}")
        if body.strip() and _matches(spec, fields):
            yield Record(rid, body)


def _text(spec: CorpusSpec, text: str) -> Iterator[Record]:
    if spec.strip_gutenberg:
        from .evaluate import gutenberg_body

        text = gutenberg_body(text)
    stem = spec.path.name.split(".")[0]
    if spec.split == "blank":
        docs = re.split(r"\n[ \t]*\n", text)
    elif spec.split == "wikitext":
        docs = _wikitext_articles(text)
    elif spec.split == "lines":
        if spec.lines < 1:
            raise CorpusError(f"corpus {spec.name!r}: lines must be >= 1, got {spec.lines}")
        lines = text.split("\n")
        docs = ["\n".join(lines[i:i + spec.lines]) for i in range(0, len(lines), spec.lines)]
    else:
        raise CorpusError(f"corpus {spec.name!r}: unknown split {spec.split!r}; use one of "
                          f"{', '.join(SPLITS)}")
    i = 0
    for d in docs:
        d = _EDGE_BLANK_RE.sub("", d)  # drop blank lines at either end
        if d.strip():
            yield Record(f"{stem}:{i}", d)
            i += 1


def _wikitext_articles(text: str) -> list[str]:
    """WikiText split at article titles (text before the first title is its own document)."""
    docs: list[list[str]] = [[]]
    for line in io.StringIO(text):
        if _WIKI_TITLE_RE.match(line.rstrip("\n")) and any(x.strip() for x in docs[-1]):
            docs.append([])
        docs[-1].append(line)
    return ["".join(d) for d in docs]


def _unique(records: Iterable[Record]) -> list[Record]:
    """Records with unique ids: an exact repeat is dropped, a repeated id with other text
    becomes "id#2", "id#3" (held-out membership still follows the base id)."""
    seen: dict[str, set[str]] = {}
    out: list[Record] = []
    for r in records:
        texts = seen.get(r.id)
        if texts is None:
            seen[r.id] = {r.text}
            out.append(r)
        elif r.text not in texts:
            texts.add(r.text)
            out.append(Record(f"{r.id}#{len(texts)}", r.text))
    return out



# --- tokenizer --------------------------------------------------------------------------

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"


def train_tokenizer(texts: Sequence[str], out: str | os.PathLike[str], *,
                    vocab_size: int = 4096) -> Path:
    """Train a byte-level BPE tokenizer (GPT-2 style) on texts and save it for transformers.

    BOS ``<s>`` is id 0 and EOS ``</s>`` id 1; encoding adds BOS (a TemplateProcessing
    post-processor and ``add_bos_token``), as Llama does. The same texts in the same order give
    the same tokenizer.json byte for byte. Writes tokenizer.json, tokenizer_config.json and
    special_tokens_map.json into out (AutoTokenizer.from_pretrained(out) loads them).

    Raises:
        CorpusError: no texts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if not any(t.strip() for t in texts):
        raise CorpusError("no text to train a tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, 0)])
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN,
           "eos_token": EOS_TOKEN, "add_bos_token": True, "add_eos_token": False,
           "clean_up_tokenization_spaces": False}
    for name, obj in (("tokenizer_config.json", cfg),
                      ("special_tokens_map.json", {"bos_token": BOS_TOKEN,
                                                   "eos_token": EOS_TOKEN})):
        (folder / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n",
                                   encoding="utf-8")
    return folder
