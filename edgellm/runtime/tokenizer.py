# SPDX-License-Identifier: MIT
"""Tokenizers rebuilt from GGUF metadata, matching llama.cpp's SPM ("llama") and BPE ("gpt2") kinds.

Pure Python: no torch, transformers or ``tokenizers`` on the device. The "gpt2" kind needs the
``regex`` package (for ``\\p{L}``-style classes in the pre-tokenizer patterns); "llama" needs
nothing beyond the standard library.
"""

from __future__ import annotations

import codecs
import enum
import heapq
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..errors import InvalidArgumentError, ModelFormatError, UnsupportedError
from .chat import apply_chat_template

__all__ = ["PRE_TOKENIZERS", "StreamDecoder", "TokenType", "Tokenizer"]


class TokenType(enum.IntEnum):
    """Token kinds as ``tokenizer.ggml.token_type`` numbers them (llama.cpp's llama_token_type)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# --- pre-tokenizers ---------------------------------------------------------------------
# Each kind is a list of patterns applied in turn, as llama.cpp's unicode_regex_split does:
# every piece is cut at each pattern's matches, and the text between matches is kept as a
# piece too (Hugging Face's Split(behavior="isolated")). Patterns are llama.cpp's spellings.

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")

#: Pattern lists by canonical ``tokenizer.ggml.pre`` name.
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    # llama.cpp's fallback for a file without (or with "default") pre-tokenizer name.
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2,),
    "llama-bpe": (_LLAMA3,),  # Llama 3: digits in runs of up to three
    "qwen2": (_QWEN2,),  # Qwen2: one digit per piece
    "smollm": (r"\p{N}", _GPT2),  # SmolLM/StarCoder: digits isolated, then GPT-2
}
# Other names llama.cpp gives the same patterns.
_PRE_ALIASES = {
    "gpt2": "gpt-2", "phi-2": "gpt-2", "roberta-bpe": "gpt-2", "mpt": "gpt-2", "olmo": "gpt-2",
    "jais": "gpt-2", "gigachat": "gpt-2", "jina-es": "gpt-2", "jina-de": "gpt-2",
    "jina-v1-en": "gpt-2", "jina-v2-es": "gpt-2", "jina-v2-de": "gpt-2", "jina-v2-code": "gpt-2",
    "llama3": "llama-bpe", "llama-v3": "llama-bpe", "falcon3": "llama-bpe", "dbrx": "llama-bpe",
    "smaug-bpe": "llama-bpe", "stablelm2": "qwen2", "megrez": "qwen2", "starcoder": "smollm",
    "refact": "smollm", "command-r": "smollm", "codeshell": "smollm", "exaone": "smollm",
    "minerva-7b": "smollm",
}
# Kinds whose Hugging Face BPE has ignore_merges (a word already in the vocab is one token)
# and that add BOS unless the file says otherwise (llama.cpp's LLAMA3 group).
_IGNORE_MERGES = frozenset({"llama-bpe"})


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves,
    the other 68 bytes to U+0100 onwards in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}
_SPACE = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Token texts llama.cpp treats as end of generation (and forces to CONTROL) in any vocabulary.
_EOG_TEXTS = frozenset({"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                        "<|eom_id|>", "<EOT>"})
# Tokens matched in text before tokenising (control and unknown only with parse_special).
_SPECIAL_TYPES = (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
_BPE_CACHE_MAX = 16384  # words; the cache is cleared when full (cheap, keeps memory bounded)
_KEY = "tokenizer.ggml."


def _merge(symbols: list[str], priority: Callable[[str, str], float | None]) -> list[str]:
    """Greedy pair merging shared by both kinds: join the adjacent pair with the lowest
    priority (leftmost on ties) until no adjacent pair has one.

    Args:
        symbols: the starting symbols (characters), in order.
        priority: (left, right) -> priority of merging them, or None when they don't merge.

    Returns:
        The merged symbols, in order.
    """
    n = len(symbols)
    if n < 2:
        return symbols
    text = list(symbols)
    nxt = [*range(1, n), -1]
    prv = list(range(-1, n - 1))
    heap: list[tuple[float, int, int, str]] = []

    def push(left: int, right: int) -> None:
        p = priority(text[left], text[right])
        if p is not None:
            heapq.heappush(heap, (p, left, right, text[left] + text[right]))

    for i in range(n - 1):
        push(i, i + 1)
    while heap:
        _, left, right, joined = heapq.heappop(heap)
        # Skip entries made stale by an earlier merge of either side.
        if (not text[left] or not text[right] or nxt[left] != right
                or text[left] + text[right] != joined):
            continue
        text[left], text[right] = joined, ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        if prv[left] >= 0:
            push(prv[left], left)
        if nxt[left] >= 0:
            push(left, nxt[left])
    return [t for t in text if t]


# --- metadata validation ----------------------------------------------------------------


def _as_list(value: Any, key: str) -> list[Any]:
    """A metadata array (list, tuple or numpy array) as a python list."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ModelFormatError(f"GGUF key {key} must be an array, got {type(value).__name__}")
    tolist = getattr(value, "tolist", None)
    return list(tolist() if callable(tolist) else value)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _get_bool(md: Mapping[str, Any], key: str, default: bool) -> tuple[bool, bool]:
    """(value, whether the metadata set it)."""
    v = md.get(key)
    if v is None:
        return default, False
    if not isinstance(v, bool):
        raise ModelFormatError(f"GGUF key {key} must be a bool, got {v!r}")
    return v, True


def _get_id(md: Mapping[str, Any], key: str, n: int, default: int | None) -> int | None:
    v = md.get(key)
    if v is None:
        return default if default is not None and default < n else None
    if not _is_int(v) or not 0 <= int(v) < n:
        raise ModelFormatError(f"GGUF key {key} = {v!r} is not a token id in [0, {n})")
    return int(v)


class Tokenizer:
    """A llama.cpp-compatible tokenizer built from GGUF ``tokenizer.*`` metadata.

    - ``tok = Tokenizer.from_metadata(gguf.metadata)``
    - ``ids = tok.encode("Hello")`` (BOS added when the model asks for it);
      ``tok.encode(prompt, parse_special=True)`` also turns "<|im_start|>"-style texts into ids.
    - ``tok.decode(ids)``, or ``dec = tok.stream_decoder(prev_id=ids[-1])`` then
      ``dec.feed(id)`` per generated token and ``dec.flush()`` at the end.
    - ``tok.apply_chat_template(messages)`` renders the model's chat template.

    Immutable after construction except for an internal word cache; one instance may be
    shared by threads (the cache is only a dict).

    .. versionadded:: 0.1
    """

    def __init__(self, *, kind: str, tokens: Sequence[str], types: Sequence[int],
                 scores: Sequence[float], merges: Sequence[str], pre: str | None,
                 bos_id: int | None, eos_id: int | None, unk_id: int | None,
                 pad_id: int | None, eos_ids: Sequence[int], add_bos: bool, add_eos: bool,
                 add_space_prefix: bool, chat_template: str | None) -> None:
        """Use :meth:`from_metadata`; this takes already-validated parts."""
        self._kind = kind
        self._tokens = list(tokens)
        self._types = list(types)
        self._scores = list(scores)
        self._pre = pre
        self._bos_id, self._eos_id, self._unk_id, self._pad_id = bos_id, eos_id, unk_id, pad_id
        self._eos_ids = tuple(eos_ids)
        self._add_bos, self._add_eos = add_bos, add_eos
        self._add_space_prefix = add_space_prefix
        self._chat_template = chat_template
        self._token_to_id = {t: i for i, t in enumerate(self._tokens)}  # later duplicates win
        # Text that may be matched before tokenising: user-defined always, control/unknown
        # only with parse_special; longest first, as llama.cpp's special-token cache.
        specials = sorted((i for i, t in enumerate(self._types) if t in _SPECIAL_TYPES),
                          key=lambda i: -len(self._tokens[i]))
        self._specials_all = [(self._tokens[i], i) for i in specials]
        self._specials_user = [(self._tokens[i], i) for i in specials
                               if self._types[i] == TokenType.USER_DEFINED]
        self._pieces: dict[tuple[int, bool], bytes] = {}
        if kind == "llama":
            # SentencePiece merges only into normal and user-defined pieces; unused pieces
            # may be formed but are split back into their halves.
            mergeable = (TokenType.NORMAL, TokenType.UNDEFINED, TokenType.USER_DEFINED,
                         TokenType.UNUSED)
            self._mergeable = {t: i for i, t in enumerate(self._tokens)
                               if self._types[i] in mergeable}
            self._byte_ids: dict[int, int] = {}
            for i, t in enumerate(self._tokens):
                m = _BYTE_PIECE.fullmatch(t)
                if m and self._types[i] == TokenType.BYTE:
                    self._byte_ids.setdefault(int(m.group(1), 16), i)
        else:
            # Only the gpt2 kind needs regex (checked in from_metadata); it ships no stubs.
            import regex  # type: ignore[import-untyped,unused-ignore]

            self._patterns: list[Any] = [regex.compile(p) for p in PRE_TOKENIZERS[pre or "default"]]
            self._ranks: dict[str, int] = {}
            for rank, merge in enumerate(merges):
                self._ranks.setdefault(merge, rank)  # first occurrence wins, as llama.cpp
            self._ignore_merges = pre in _IGNORE_MERGES
            self._bpe_cache: dict[str, list[int]] = {}

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes (the standard llama.cpp keys).

        Missing optional keys take llama.cpp's defaults: for "llama", BOS 1, EOS 2, UNK 0,
        add_bos true, add_space_prefix true; for "gpt2", no special ids (not llama.cpp's
        GPT-2 guess of 11), add_bos false except for Llama-3 style pre-tokenizers, pre
        "default". Without ``token_type`` every token is normal, except "<0xXX>" pieces
        (byte) in "llama" and the named special ids (control, or unknown for UNK).

        Args:
            metadata: GGUF key -> python value, as edgellm's GGUF reader gives them (arrays
                may be lists or numpy arrays).

        Returns:
            The tokenizer.

        Raises:
            ModelFormatError: a key is missing, of the wrong type, of inconsistent length,
                or names a token id outside the vocabulary.
            UnsupportedError: the tokenizer kind or pre-tokenizer is not one edgellm runs,
                or the "gpt2" kind is asked for without the ``regex`` package.
        """
        kind = metadata.get(_KEY + "model")
        if kind is None:
            raise ModelFormatError("GGUF metadata has no tokenizer.ggml.model")
        if not isinstance(kind, str):
            raise ModelFormatError(f"GGUF key tokenizer.ggml.model must be a string, got {kind!r}")
        if kind not in ("llama", "gpt2"):
            raise UnsupportedError(
                f"tokenizer kind {kind!r} is not supported (edgellm runs 'llama' and 'gpt2')")
        raw = metadata.get(_KEY + "tokens")
        if raw is None:
            raise ModelFormatError("GGUF metadata has no tokenizer.ggml.tokens")
        tokens = []
        for i, t in enumerate(_as_list(raw, _KEY + "tokens")):
            if isinstance(t, bytes):
                try:
                    t = t.decode("utf-8")
                except UnicodeDecodeError:
                    raise ModelFormatError(f"token {i} is not valid UTF-8") from None
            if not isinstance(t, str):
                raise ModelFormatError(f"token {i} must be a string, got {type(t).__name__}")
            tokens.append(t or f"[EMPTY_{i}]")  # llama.cpp's name for an empty token
        n = len(tokens)
        if n == 0:
            raise ModelFormatError("GGUF key tokenizer.ggml.tokens is empty")

        scores = [0.0] * n
        if metadata.get(_KEY + "scores") is not None:
            scores = _as_list(metadata[_KEY + "scores"], _KEY + "scores")
            if len(scores) != n:
                raise ModelFormatError(
                    f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
            for i, s in enumerate(scores):
                if not isinstance(s, numbers.Real) or isinstance(s, bool) or math.isnan(s):
                    raise ModelFormatError(f"score of token {i} is not a number: {s!r}")
            scores = [float(s) for s in scores]

        have_types = metadata.get(_KEY + "token_type") is not None
        types = [int(TokenType.NORMAL)] * n
        if have_types:
            types = _as_list(metadata[_KEY + "token_type"], _KEY + "token_type")
            if len(types) != n:
                raise ModelFormatError(
                    f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
            for i, t in enumerate(types):
                if not _is_int(t) or not 0 <= int(t) <= 6:
                    raise ModelFormatError(f"token {i} has type {t!r}, not one of 0..6")
            types = [int(t) for t in types]
        elif kind == "llama":
            types = [TokenType.BYTE if _BYTE_PIECE.fullmatch(t) else TokenType.NORMAL
                     for t in tokens]

        pre: str | None = None
        merges: list[str] = []
        if kind == "gpt2":
            pre_raw = metadata.get(_KEY + "pre", "default")
            if not isinstance(pre_raw, str):
                raise ModelFormatError(
                    f"GGUF key tokenizer.ggml.pre must be a string, got {pre_raw!r}")
            pre = _PRE_ALIASES.get(pre_raw, pre_raw)
            if pre not in PRE_TOKENIZERS:
                known = ", ".join(sorted({*PRE_TOKENIZERS, *_PRE_ALIASES}))
                raise UnsupportedError(
                    f"pre-tokenizer {pre_raw!r} is not supported (edgellm knows: {known})")
            try:
                import regex  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
            except ImportError:
                raise UnsupportedError(
                    "gpt2-kind tokenizers need the 'regex' package: pip install regex") from None
            if metadata.get(_KEY + "merges") is None:
                raise ModelFormatError("gpt2 tokenizer without tokenizer.ggml.merges")
            merges = _as_list(metadata[_KEY + "merges"], _KEY + "merges")
            for i, m in enumerate(merges):
                if not isinstance(m, str) or not 0 < m.find(" ", 1) < len(m) - 1:
                    raise ModelFormatError(
                        f"merge {i} is not two pieces separated by a space: {m!r}")

        llama = kind == "llama"
        bos_id = _get_id(metadata, _KEY + "bos_token_id", n, 1 if llama else None)
        eos_id = _get_id(metadata, _KEY + "eos_token_id", n, 2 if llama else None)
        unk_id = _get_id(metadata, _KEY + "unknown_token_id", n, 0 if llama else None)
        pad_id = _get_id(metadata, _KEY + "padding_token_id", n, None)
        eot_id = _get_id(metadata, _KEY + "eot_token_id", n, None)
        eom_id = _get_id(metadata, _KEY + "eom_token_id", n, None)
        if not have_types:
            for special in (bos_id, eos_id, pad_id, eot_id, eom_id):
                if special is not None:
                    types[special] = TokenType.CONTROL
            if unk_id is not None:
                types[unk_id] = TokenType.UNKNOWN
        # End of generation: EOS, EOT, EOM and llama.cpp's well-known end texts.
        eog = [i for i in (eos_id, eot_id, eom_id) if i is not None]
        for i, t in enumerate(tokens):
            if t in _EOG_TEXTS:
                eog.append(i)
                types[i] = TokenType.CONTROL  # llama.cpp overrides a mislabelled one too
        eos_ids = list(dict.fromkeys(eog))

        add_bos, bos_set = _get_bool(metadata, _KEY + "add_bos_token",
                                     llama or pre in _IGNORE_MERGES)
        add_eos, _ = _get_bool(metadata, _KEY + "add_eos_token", False)
        if add_bos and bos_id is None:
            if bos_set:
                raise ModelFormatError(
                    "tokenizer.ggml.add_bos_token is true but no BOS id is known")
            add_bos = False
        if add_eos and eos_id is None:
            raise ModelFormatError("tokenizer.ggml.add_eos_token is true but no EOS id is known")
        add_space_prefix, _ = _get_bool(metadata, _KEY + "add_space_prefix", llama)

        for i in range(n):
            if types[i] == TokenType.BYTE and not _BYTE_PIECE.fullmatch(tokens[i]):
                raise ModelFormatError(f"byte token {i} is {tokens[i]!r}, not of the form <0xXX>")
        template = metadata.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise ModelFormatError("GGUF key tokenizer.chat_template must be a string")
        return cls(kind=kind, tokens=tokens, types=types, scores=scores, merges=merges, pre=pre,
                   bos_id=bos_id, eos_id=eos_id, unk_id=unk_id, pad_id=pad_id, eos_ids=eos_ids,
                   add_bos=add_bos, add_eos=add_eos, add_space_prefix=llama and add_space_prefix,
                   chat_template=template)

    # --- properties ---------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """The tokenizer kind: "llama" (SentencePiece BPE, byte fallback) or "gpt2" (byte BPE)."""
        return self._kind

    @property
    def pre(self) -> str | None:
        """The canonical pre-tokenizer name (gpt2 kind), or None."""
        return self._pre

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: EOS first, then EOT/EOM and e.g. "<|im_end|>"."""
        return self._eos_ids

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def add_bos(self) -> bool:
        """Whether encode() adds BOS by default."""
        return self._add_bos

    @property
    def add_eos(self) -> bool:
        """Whether encode() adds EOS by default."""
        return self._add_eos

    @property
    def add_space_prefix(self) -> bool:
        """Whether text after the start (or a special token) gets a leading space (llama kind)."""
        return self._add_space_prefix

    @property
    def chat_template(self) -> str | None:
        """The model's Jinja chat template (``tokenizer.chat_template``), or None."""
        return self._chat_template

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry for token_id, as stored ("▁the", "Ġthe", "<0x0A>", "<s>")."""
        return self._tokens[self._check_id(token_id)]

    def token_type(self, token_id: int) -> TokenType:
        return TokenType(self._types[self._check_id(token_id)])

    def token_id(self, text: str) -> int | None:
        """The id whose vocabulary entry is exactly text, or None."""
        return self._token_to_id.get(text)

    def _check_id(self, token_id: int) -> int:
        if not _is_int(token_id) or not 0 <= token_id < len(self._tokens):
            raise InvalidArgumentError(
                f"token id {token_id!r} is outside the vocabulary [0, {len(self._tokens)})")
        return int(token_id)

    # --- encoding -----------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool | None = None, add_eos: bool | None = None,
               parse_special: bool = False) -> list[int]:
        """Token ids of text, as llama.cpp's ``llama_tokenize`` gives them.

        Args:
            text: the text.
            add_bos: prepend BOS; None follows the model (:attr:`add_bos`).
            add_eos: append EOS; None follows the model (:attr:`add_eos`).
            parse_special: turn the texts of control tokens (e.g. "<|im_start|>") into their
                ids, as for a rendered chat prompt. User-defined tokens are always matched;
                without it, control-token texts are tokenised as plain text.

        Returns:
            The ids.

        Raises:
            InvalidArgumentError: text is not a str, or BOS/EOS is asked for but the
                vocabulary has none.
            ModelFormatError: the vocabulary cannot spell a character (no byte tokens, no UNK).
        """
        if not isinstance(text, str):
            raise InvalidArgumentError(f"encode() takes a str, got {type(text).__name__}")
        out: list[int] = []
        if self._add_bos if add_bos is None else add_bos:
            if self._bos_id is None:
                raise InvalidArgumentError("this vocabulary has no BOS token")
            out.append(self._bos_id)
        fragments = self._partition(text, parse_special) if text else []
        if self._kind == "llama":
            after_special = True  # llama.cpp: a space prefix at the start and after a special
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    after_special = True
                else:
                    self._encode_spm(" " + frag if self._add_space_prefix and after_special
                                     else frag, out)
                    after_special = False
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    for word in self._pretokenize(frag):
                        out.extend(self._encode_word(word))
        if self._add_eos if add_eos is None else add_eos:
            if self._eos_id is None:
                raise InvalidArgumentError("this vocabulary has no EOS token")
            out.append(self._eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split text at special-token texts, longest token first (llama.cpp's order)."""
        frags: list[str | int] = [text]
        for tok, tid in self._specials_all if parse_special else self._specials_user:
            if tok not in text:
                continue
            split: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or tok not in frag:
                    split.append(frag)
                    continue
                for k, part in enumerate(frag.split(tok)):
                    if k:
                        split.append(tid)
                    if part:
                        split.append(part)
            frags = split
        return frags

    def _encode_spm(self, text: str, out: list[int]) -> None:
        """SentencePiece BPE: merge the highest-scoring pair whose piece is in the vocabulary,
        then spell whatever is not a piece with byte tokens."""
        mergeable, scores = self._mergeable, self._scores
        unused: dict[str, tuple[str, str]] = {}

        def priority(a: str, b: str) -> float | None:
            tid = mergeable.get(a + b)
            if tid is None:
                return None
            if self._types[tid] == TokenType.UNUSED:
                unused[a + b] = (a, b)
            return -scores[tid]

        def emit(piece: str) -> None:
            if piece in unused:  # an unused piece goes out as the two pieces it joined
                for half in unused[piece]:
                    emit(half)
                return
            tid = mergeable.get(piece)
            if tid is not None:
                out.append(tid)
                return
            for b in piece.encode("utf-8"):
                bid = self._byte_ids.get(b, self._unk_id)
                if bid is None:
                    raise ModelFormatError(
                        f"the vocabulary cannot spell {piece!r}: no byte tokens and no UNK")
                out.append(bid)

        for piece in _merge(list(text.replace(" ", _SPACE)), priority):
            emit(piece)

    def _pretokenize(self, text: str) -> list[str]:
        """Cut text with each pattern of the pre-tokenizer in turn (matches and gaps kept)."""
        pieces = [text]
        for pattern in self._patterns:
            cut: list[str] = []
            for piece in pieces:
                pos = 0
                for m in pattern.finditer(piece):
                    start, end = m.span()
                    if start > pos:
                        cut.append(piece[pos:start])
                    if end > start:
                        cut.append(piece[start:end])
                    pos = max(pos, end)
                if pos < len(piece):
                    cut.append(piece[pos:])
            pieces = cut
        return pieces

    def _encode_word(self, word: str) -> list[int]:
        """Byte-level BPE of one pre-tokenised word: bytes to GPT-2 characters, merges by rank."""
        cached = self._bpe_cache.get(word)
        if cached is not None:
            return cached
        mapped = "".join([_BYTE_TO_CHAR[b] for b in word.encode("utf-8")])
        whole = self._token_to_id.get(mapped) if self._ignore_merges else None
        if whole is not None:
            ids = [whole]
        else:
            ranks = self._ranks
            pieces = _merge(list(mapped), lambda a, b: ranks.get(a + " " + b))
            ids = []
            for piece in pieces:
                tid = self._token_to_id.get(piece)
                if tid is not None:
                    ids.append(tid)
                    continue
                # A merge whose result is not in the vocabulary: spell it per character,
                # UNK (or nothing, as llama.cpp) for a character the vocabulary lacks.
                for ch in piece:
                    cid = self._token_to_id.get(ch, self._unk_id)
                    if cid is not None:
                        ids.append(cid)
        if len(self._bpe_cache) >= _BPE_CACHE_MAX:
            self._bpe_cache.clear()
        self._bpe_cache[word] = ids
        return ids

    # --- decoding -----------------------------------------------------------------------

    def token_to_bytes(self, token_id: int, *, skip_special: bool = True) -> bytes:
        """The bytes token_id stands for (llama.cpp ``token_to_piece``), without the
        leading-space rule of :meth:`decode`. Control and unknown tokens give b"" when
        skip_special, else their text; a byte token gives its byte, which may be part of a
        multi-byte character: use :class:`StreamDecoder` to turn a stream into text."""
        key = (self._check_id(token_id), skip_special)
        piece = self._pieces.get(key)
        if piece is None:
            piece = self._make_piece(*key)
            self._pieces[key] = piece
        return piece

    def _make_piece(self, i: int, skip_special: bool) -> bytes:
        t, text = self._types[i], self._tokens[i]
        if t in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.UNUSED):
            return b"" if skip_special else text.encode("utf-8")
        if t == TokenType.USER_DEFINED:
            return text.encode("utf-8")
        if t == TokenType.BYTE:
            return bytes([int(text[3:5], 16)])
        if self._kind == "llama":
            return text.replace(_SPACE, " ").encode("utf-8")
        return b"".join([bytes([_CHAR_TO_BYTE[c]]) if c in _CHAR_TO_BYTE else c.encode("utf-8")
                         for c in text])

    def _piece_after(self, prev_id: int | None, token_id: int, skip_special: bool) -> bytes:
        """token_to_bytes, minus the space prefix encode() puts before the first word: at the
        start of a sequence (prev_id None) and after a special token such as BOS (llama2.c's
        run.c strips it after BOS; sentencepiece after every special token)."""
        piece = self.token_to_bytes(token_id, skip_special=skip_special)
        if (self._add_space_prefix and piece[:1] == b" "
                and (prev_id is None or self._types[prev_id] in _SPECIAL_TYPES)
                and self._types[token_id] in (TokenType.NORMAL, TokenType.UNDEFINED)):
            return piece[1:]
        return piece

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of a whole id sequence. Bytes that are not valid UTF-8 become U+FFFD.

        The llama kind (with add_space_prefix) drops the space encode() put before the first
        word, at the start and after a special token such as BOS, so
        ``decode(encode(text)) == text``. Special tokens are left out when skip_special.
        """
        parts: list[bytes] = []
        prev: int | None = None
        for i in ids:
            parts.append(self._piece_after(prev, i, skip_special))
            prev = i
        return b"".join(parts).decode("utf-8", errors="replace")

    def stream_decoder(self, *, skip_special: bool = True,
                       prev_id: int | None = None) -> StreamDecoder:
        """A :class:`StreamDecoder` for tokens that follow prev_id (None: a new sequence)."""
        return StreamDecoder(self, skip_special=skip_special, prev_id=prev_id)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                            add_generation_prompt: bool = True, engine: str = "auto") -> str:
        """Render messages with this model's chat template and its BOS/EOS texts
        (see :func:`edgellm.runtime.chat.apply_chat_template`). Encode the result with
        ``parse_special=True``; if it starts with the BOS text, pass ``add_bos=False``."""
        return apply_chat_template(
            self._chat_template, messages, add_generation_prompt,
            bos_token="" if self._bos_id is None else self._tokens[self._bos_id],
            eos_token="" if self._eos_id is None else self._tokens[self._eos_id],
            engine=engine)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *,
                    add_generation_prompt: bool = True, engine: str = "auto") -> list[int]:
        """Ids of a conversation rendered with the chat template (:meth:`apply_chat_template`),
        special-token texts parsed, and BOS added only when the model wants it and the
        template did not already write it (Llama-2/3 templates do)."""
        prompt = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                          engine=engine)
        bos_text = "" if self._bos_id is None else self._tokens[self._bos_id]
        written = bool(bos_text) and prompt.startswith(bos_text)
        return self.encode(prompt, add_bos=self._add_bos and not written, parse_special=True)

    def __repr__(self) -> str:
        pre = f", pre={self._pre!r}" if self._pre else ""
        return f"Tokenizer(kind={self._kind!r}{pre}, vocab_size={len(self._tokens)})"


class StreamDecoder:
    """Turns generated ids into text one at a time, never emitting half a UTF-8 character.

    - ``dec = StreamDecoder(tok, prev_id=prompt_ids[-1])``: prev_id is the token the stream
      follows (BOS, or the prompt's last token), which decides whether the first word's
      leading space is kept; None means the stream is a whole sequence.
    - ``text = dec.feed(token_id)`` for each token: the newly completed text, maybe "".
    - ``text = dec.flush()`` at the end: what is still held (an unfinished character comes
      out as U+FFFD).

    Joining every feed() and the flush() gives exactly ``tok.decode(ids)`` when prev_id is
    None. Not thread-safe.

    .. versionadded:: 0.1
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True,
                 prev_id: int | None = None) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special
        self._prev = None if prev_id is None else tokenizer._check_id(prev_id)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """Add one token; return the text it completes."""
        piece = self._tok._piece_after(self._prev, token_id, self._skip_special)
        self._prev = token_id
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Return whatever is held back, and start over on a clean UTF-8 state."""
        return self._utf8.decode(b"", final=True)
