"""Real English text that ships offline with Python, for recovery training and held-out evaluation.

Two sources, both part of every CPython install (nothing is downloaded):

- ``pydoc_data.topics``: the language reference topics ``help()`` shows (~1,500 usable sentences);
- the docstrings of the standard library's modules, classes and functions, read from the source
  files with :mod:`ast` (nothing is imported; ~10,000 sentences).

The held-out sentences come from the documentation topics only and never appear in the training
sentences (they are removed from both sources), so a quality measured on them is out of sample.
"""

from __future__ import annotations

import ast
import functools
import pydoc_data.topics
import random
import re
import sysconfig
from pathlib import Path

__all__ = ["english_sentences"]


def _sentences(text: str) -> set[str]:
    """Plain prose sentences of 6–30 words that start with a capitalised word and quote no code."""
    found = set()
    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        if 6 <= len(sentence.split()) <= 30 and re.match(r"^[A-Z][a-z]+ ", sentence) and "`" not in sentence:
            found.add(sentence)
    return found


def _docstrings() -> set[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "site-packages", "idlelib"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                found |= _sentences(ast.get_docstring(node) or "")
    return found


@functools.cache
def english_sentences(
    held_out: int = 160, docstrings: bool = True, seed: int = 1
) -> tuple[list[str], list[str]]:
    """(training, held-out) sentences, disjoint, each list in a fixed shuffled order."""
    topics = sorted(_sentences(" ".join(pydoc_data.topics.topics.values())))
    random.Random(seed).shuffle(topics)
    held = topics[:held_out]
    training = set(topics[held_out:]) | (_docstrings() if docstrings else set())
    ordered = sorted(training - set(held))
    random.Random(seed).shuffle(ordered)
    return ordered, held
