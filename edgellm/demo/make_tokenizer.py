# SPDX-License-Identifier: MIT
"""Train the demo tree's tokenizer on the tree's training records only (never held-out text).

Run from the repository root::

    python -m edgellm.demo.make_tokenizer                 # -> edgellm/demo/tokenizer/
    python -m edgellm.demo.make_tokenizer --tree my/tree.toml --vocab-size 8192

It reads the tree file, applies the held-out invariant (edgellm.hub.tree.TreeData), and trains
a byte-level BPE tokenizer (edgellm.hub.corpus.train_tokenizer) on every record some node
trains on, each text once, in tree order -- so the same corpora give the same tokenizer.json.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from edgellm.hub.corpus import train_tokenizer
from edgellm.hub.tree import load_tree

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", default=str(HERE / "tree.toml"), help="the tree file")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokens (default 4096)")
    p.add_argument("--out", default=None, help="folder (default: the tree's `tokenizer`)")
    a = p.parse_args(argv)
    tree = load_tree(a.tree)
    data = tree.data()
    seen: set[str] = set()
    texts = []
    for node in tree.order():
        for r in data.train[node.path]:
            if r.text not in seen:
                seen.add(r.text)
                texts.append(r.text)
    t0 = time.perf_counter()
    out = train_tokenizer(texts, a.out or tree.tokenizer, vocab_size=a.vocab_size)
    digest = hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    print(f"trained on {len(texts)} documents ({sum(map(len, texts)):,} characters) in "
          f"{time.perf_counter() - t0:.1f} s -> {out} (tokenizer.json sha256 {digest[:16]})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
