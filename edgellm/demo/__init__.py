# SPDX-License-Identifier: MIT
"""The demo model tree: tree.toml, its corpora (with attribution) and tokenizer (repository only, not in the wheel)."""
