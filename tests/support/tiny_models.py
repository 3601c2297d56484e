# SPDX-License-Identifier: MIT
"""Deterministic tiny Llama / Qwen2 Hugging Face checkpoints with real trained tokenizers, for tests.

Usage (torch and transformers are needed here, never by edgellm itself):

    from support.tiny_models import make_tiny_llama, make_tiny_qwen2  # tests/ is on sys.path
    folder = make_tiny_llama(tmp_path / "llama")            # GQA, untied, byte-level BPE
    folder = make_tiny_qwen2(tmp_path / "qwen2", tied=True)  # q/k/v biases, ChatML template
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)

Every builder takes a seed; the same arguments give the same weights and tokenizer.
Norm weights and biases are randomised too (transformers initialises them to 1 and 0), so a
converter or runtime that drops or misplaces them fails the parity tests.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# A few KB of public-domain English (Project Gutenberg "Botchan"); the in-repo copy wins.
CORPUS_CANDIDATES = (
    REPO / "tests" / "data" / "corpora" / "botchan.txt",
    Path("/work/shared/data/corpora/general/botchan.txt"),
)
CORPUS_SLICE = slice(2000, 14000)  # skips the Gutenberg licence header

# Pre-tokenizer regexes of real model families (llama.cpp names them "llama-bpe", "qwen2").
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
    "+ '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")


@functools.lru_cache(maxsize=1)
def corpus_text() -> str:
    """The training text for the tiny tokenizers (about 12 KB)."""
    for p in CORPUS_CANDIDATES:
        if p.is_file():
            return p.read_text(encoding="utf-8")[CORPUS_SLICE]
    raise FileNotFoundError(f"no corpus for the tiny tokenizers; looked at {CORPUS_CANDIDATES}")


def train_bpe(style: str = "llama3", vocab_size: int = 384) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` trained on corpus_text().

    style "llama3": Llama-3's split regex, BOS <|begin_of_text|> added by the post-processor;
    style "qwen2": Qwen2's split regex, no BOS. vocab_size counts the special tokens, which
    come last (ids vocab_size - n_specials ...), as in the real models.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if style not in ("llama3", "qwen2"):
        raise ValueError(f"style must be 'llama3' or 'qwen2', not {style!r}")
    specials = LLAMA3_SPECIALS if style == "llama3" else QWEN2_SPECIALS
    split = LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_text().splitlines(keepends=True), trainer=trainer)
    tok.add_special_tokens(specials)
    if style == "llama3":
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
            special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def save_bpe_tokenizer(folder: Path, style: str = "llama3", vocab_size: int = 384) -> dict[str, Any]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja; return the ids."""
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(style, vocab_size)
    if style == "llama3":
        kw = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
              "chat_template": LLAMA3_CHAT_TEMPLATE}
    else:
        kw = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "chat_template": CHATML_TEMPLATE}
    PreTrainedTokenizerFast(tokenizer_object=tok, **kw).save_pretrained(folder)
    ids = {k: tok.token_to_id(v) for k, v in kw.items() if k.endswith("_token")}
    ids["n_tokens"] = tok.get_vocab_size()
    return ids


def save_spm_tokenizer(folder: Path, vocab_size: int = 320) -> dict[str, Any]:
    """Write a sentencepiece BPE tokenizer.model (byte fallback) and tokenizer_config.json."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_text().splitlines()), model_writer=model,
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, num_threads=1,
        character_coverage=1.0, minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer"}, indent=2))
    return {"bos_token": 1, "eos_token": 2, "unk_token": 0, "n_tokens": vocab_size}


def _randomise_norms_and_biases(model: Any, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _save(model: Any, folder: Path, dtype: str, max_shard_size: str | None) -> None:
    import torch

    dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    model = model.to(dt)
    kw: dict[str, Any] = {}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **kw)


def make_tiny_llama(folder: Path, *, seed: int = 0, n_layers: int = 2, dim: int = 64,
                    n_heads: int = 4, n_kv_heads: int = 2, hidden_dim: int = 128,
                    tied: bool = False, dtype: str = "float32", vocab_size: int = 384,
                    vocab_pad: int = 0, tokenizer: str = "bpe", seq_len: int = 256,
                    rope_theta: float = 10000.0, rope_linear_factor: float | None = None,
                    max_shard_size: str | None = None) -> Path:
    """A random LlamaForCausalLM (head_dim = dim / n_heads = 16) saved as safetensors.

    Args:
        tokenizer: "bpe" (Llama-3-style byte-level BPE tokenizer.json) or "spm" (a
            sentencepiece tokenizer.model, Llama-2 style; transformers may not load it
            without protobuf, edgellm's converter does).
        vocab_size: tokenizer size; the embedding has vocab_size + vocab_pad rows.
        dtype: "float32", "float16" or "bfloat16" weights on disk.
        max_shard_size: e.g. "100KB" to get model-0000x-of-0000n.safetensors + index.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = (save_bpe_tokenizer(folder, "llama3", vocab_size) if tokenizer == "bpe"
           else save_spm_tokenizer(folder, vocab_size))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_linear_factor is not None:
        rope = {"rope_type": "linear", "factor": rope_linear_factor, "rope_theta": rope_theta}
    cfg = LlamaConfig(vocab_size=ids["n_tokens"] + vocab_pad, hidden_size=dim,
                      intermediate_size=hidden_dim, num_hidden_layers=n_layers,
                      num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                      max_position_embeddings=seq_len, rms_norm_eps=1e-5,
                      rope_parameters=rope, tie_word_embeddings=tied, initializer_range=0.05,
                      bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    _randomise_norms_and_biases(model, seed)
    _save(model, folder, dtype, max_shard_size)
    return folder


def make_tiny_qwen2(folder: Path, *, seed: int = 0, n_layers: int = 2, dim: int = 64,
                    n_heads: int = 4, n_kv_heads: int = 2, hidden_dim: int = 128,
                    tied: bool = True, dtype: str = "float32", vocab_size: int = 384,
                    vocab_pad: int = 0, seq_len: int = 256, rope_theta: float = 1000000.0,
                    max_shard_size: str | None = None) -> Path:
    """A random Qwen2ForCausalLM (q/k/v biases, Qwen2-style BPE, ChatML) as safetensors."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = save_bpe_tokenizer(folder, "qwen2", vocab_size)
    cfg = Qwen2Config(vocab_size=ids["n_tokens"] + vocab_pad, hidden_size=dim,
                      intermediate_size=hidden_dim, num_hidden_layers=n_layers,
                      num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                      max_position_embeddings=seq_len, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                      tie_word_embeddings=tied, initializer_range=0.05,
                      bos_token_id=ids["pad_token"], eos_token_id=ids["eos_token"])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    _randomise_norms_and_biases(model, seed)
    _save(model, folder, dtype, max_shard_size)
    return folder
