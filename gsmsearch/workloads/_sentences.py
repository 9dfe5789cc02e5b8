"""English sentences from the standard library's ``pydoc_data.topics`` (Python's own docs).

Deterministic for a given Python version: topics in sorted order; paragraphs with tables,
headings, grammar rules or interactive sessions skipped; sentences split at ``.``/``?``/``!``
followed by a capital; kept when 6-40 words long with at least 90% letters and spaces (which drops
code); first occurrence of duplicates only.  About 1,500 sentences on CPython 3.11.
"""
from __future__ import annotations

import functools
import re
from typing import List, Tuple

__all__ = ["pydoc_sentences"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_MARKUP_LINE = re.compile(r"^\s*([*=~^\-]{3,}|\+[-+]+\+|\|)")


def _prose_paragraphs(text: str) -> List[str]:
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(_MARKUP_LINE.match(line) for line in lines):
            continue  # headings and tables
        if any(marker in block for marker in (">>>", "::=", "...:")):
            continue  # interactive sessions and grammar
        paragraphs.append(" ".join(line.strip() for line in lines))
    return paragraphs


def _is_sentence(candidate: str) -> bool:
    words = candidate.split()
    if not 6 <= len(words) <= 40 or not candidate[0].isupper():
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in candidate)
    return letters >= 0.9 * len(candidate) and candidate[-1] in ".!?"


@functools.lru_cache(maxsize=1)
def pydoc_sentences() -> Tuple[str, ...]:
    """Every usable sentence, in a fixed order, without duplicates."""
    from pydoc_data.topics import topics

    seen, sentences = set(), []
    for topic in sorted(topics):
        for paragraph in _prose_paragraphs(topics[topic]):
            for candidate in _SENTENCE_END.split(paragraph):
                candidate = candidate.strip()
                if _is_sentence(candidate) and candidate not in seen:
                    seen.add(candidate)
                    sentences.append(candidate)
    return tuple(sentences)
