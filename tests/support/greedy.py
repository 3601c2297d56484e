# SPDX-License-Identifier: MIT
"""Greedy token ids from edgellm and from llama.cpp (llama-cpp-python) on the same GGUF file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import edgellm


def llama_cpp_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False, logits_all=True)
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    llm.close()
    return out


def edgellm_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    with edgellm.Model(path, n_threads=2) as m, m.session() as s:
        s.eval(prompt)
        out = []
        for _ in range(n):
            nxt = int(np.argmax(s._last))
            out.append(nxt)
            s.eval([nxt])
    return out
