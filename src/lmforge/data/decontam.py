"""Decontamination: drop training documents that overlap evaluation data.

A benchmark score means little when the model saw the test questions during training. Following
GPT-3 (Brown et al., 2020), a training document is contaminated when it shares any word
13-gram with an evaluation text; such documents are removed whole.

Words are compared lower-cased with punctuation removed, so "Hello, World!" and "hello world"
match. Limitation: evaluation texts shorter than 13 words contribute no 13-gram and so cannot
contaminate anything; lower ``n`` for short-answer benchmarks.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

_PUNCTUATION = re.compile(r"[^\w\s]")


def normalized_words(text: str) -> list[str]:
    """Lower-cased words with punctuation characters removed (``don't`` -> ``dont``)."""
    return _PUNCTUATION.sub("", text.lower()).split()


def _ngram_key(words: list[str]) -> bytes:
    # A 64-bit digest instead of the n-gram itself keeps the index small; collisions are
    # negligible (about one in 10^19 per pair).
    return hashlib.blake2b(" ".join(words).encode("utf-8"), digest_size=8).digest()


def ngram_keys(text: str, n: int) -> Iterable[bytes]:
    """Keys of all word n-grams of ``text`` after :func:`normalized_words`."""
    words = normalized_words(text)
    for i in range(len(words) - n + 1):
        yield _ngram_key(words[i : i + n])


class Decontaminator:
    """Index of the word n-grams of the evaluation texts, queried once per training document."""

    def __init__(self, n: int = 13) -> None:
        if n < 1:
            raise ValueError(f"decontamination n-gram size must be at least 1, got {n}")
        self.n = n
        self._index: dict[bytes, str] = {}
        self.eval_documents = 0

    def add_eval_text(self, text: str, source: str) -> None:
        """Index one evaluation text; ``source`` (e.g. ``eval.jsonl:3``) is reported on a match."""
        self.eval_documents += 1
        for key in ngram_keys(text, self.n):
            self._index.setdefault(key, source)

    @property
    def ngram_count(self) -> int:
        """Distinct evaluation n-grams indexed."""
        return len(self._index)

    def check(self, text: str) -> str | None:
        """The evaluation source ``text`` shares an n-gram with, or ``None`` when it is clean."""
        if not self._index:
            return None
        for key in ngram_keys(text, self.n):
            source = self._index.get(key)
            if source is not None:
                return source
        return None
