"""Exact and near-duplicate removal; the first occurrence of each document is kept.

Duplicated text is over-weighted in training and is memorised verbatim, and copies that straddle
the train/validation split inflate validation scores. Two stages catch it:

- :class:`ExactDeduplicator`: SHA-256 of the text after whitespace collapsing and case folding,
  so copies differing only in layout or capitalisation count as the same. Memory: 32 bytes per
  kept document.
- :class:`NearDeduplicator`: MinHash signatures of word n-gram shingles, indexed with
  locality-sensitive hashing (``datasketch``). LSH proposes candidates whose estimated Jaccard
  similarity is probably above the threshold; each candidate is then confirmed by comparing the
  two signatures, so a document is dropped only when its estimated similarity to a kept document
  really is at least the threshold. Memory: about 1 KiB per kept document (signature plus index).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # datasketch pulls in scipy (~0.3 s); import it only when near-dedup is used
    from datasketch import MinHash

_WORD = re.compile(r"\w+")
#: datasketch >= 2.0 permutation scheme; pinned so signatures do not change with its default.
MINHASH_SCHEME = "affine32"


def normalized_for_hash(text: str) -> str:
    """The form in which two texts count as exact duplicates: words separated by single spaces,
    case-folded."""
    return " ".join(text.casefold().split())


def text_hash(text: str) -> str:
    """Hex SHA-256 of :func:`normalized_for_hash`; identical on every machine and Python run."""
    return hashlib.sha256(normalized_for_hash(text).encode("utf-8")).hexdigest()


class ExactDeduplicator:
    """Remembers the hash of every document it has kept."""

    def __init__(self) -> None:
        self._first_seen: dict[bytes, str] = {}

    def check(self, doc_id: str, text: str) -> str | None:
        """Return the id of the earlier identical document, or ``None`` (and remember this one)."""
        key = hashlib.sha256(normalized_for_hash(text).encode("utf-8")).digest()
        earlier = self._first_seen.get(key)
        if earlier is None:
            self._first_seen[key] = doc_id
        return earlier


def shingles(text: str, n: int) -> set[str]:
    """Lower-cased word n-grams of ``text`` (punctuation ignored); empty when it has fewer than
    ``n`` words."""
    words = _WORD.findall(text.lower())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class NearDuplicate:
    """The kept document a near-duplicate was matched to, and their estimated Jaccard similarity."""

    of: str
    similarity: float


class NearDeduplicator:
    """MinHash + LSH near-duplicate detector; keeps the first of each group of similar documents.

    ``threshold`` is the Jaccard similarity of the shingle sets above which a later document is
    a duplicate; ``ngram`` the shingle size in words. With 5-word shingles, changing one word of
    a 100-word text changes at most 5 of its 96 shingles (Jaccard about 0.9), while two
    unrelated texts share almost none. ``seed`` fixes the hash permutations, so results are
    reproducible.

    Texts shorter than ``ngram`` words have no shingles and are never near-duplicates: with
    punctuation ignored, "Return self / other." and "Return self // other." would look
    identical, and exact deduplication already catches true copies of short texts.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        if ngram < 1:
            raise ValueError(f"shingle size must be at least 1 word, got {ngram}")
        from datasketch import MinHash, MinHashLSH

        self.threshold = threshold
        self.num_perm = num_perm
        self.ngram = ngram
        self.seed = seed
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        # The index is keyed by position, so documents from different sources may share an id.
        self._signatures: list[np.ndarray] = []
        self._ids: list[str] = []
        # Generating the permutations is the slow part of creating a MinHash; do it once.
        self._permutations = MinHash(num_perm=num_perm, seed=seed, scheme=MINHASH_SCHEME).permutations

    def signature(self, text: str) -> MinHash:
        """The MinHash of ``text``'s shingles."""
        return self._signature(shingles(text, self.ngram))

    def _signature(self, grams: set[str]) -> MinHash:
        from datasketch import MinHash

        minhash = MinHash(
            num_perm=self.num_perm, seed=self.seed, permutations=self._permutations, scheme=MINHASH_SCHEME
        )
        if grams:
            minhash.update_batch([g.encode("utf-8") for g in sorted(grams)])
        return minhash

    def check(self, doc_id: str, text: str) -> NearDuplicate | None:
        """Return the best-matching earlier document when ``text`` is a near-duplicate of one;
        otherwise index this document as kept and return ``None``."""
        grams = shingles(text, self.ngram)
        if not grams:
            return None
        minhash = self._signature(grams)
        best: NearDuplicate | None = None
        for candidate in sorted(self._lsh.query(minhash)):
            similarity = float(np.mean(self._signatures[candidate] == minhash.hashvalues))
            if similarity >= self.threshold and (best is None or similarity > best.similarity):
                best = NearDuplicate(self._ids[candidate], similarity)
        if best is None:
            self._lsh.insert(len(self._ids), minhash, check_duplication=False)
            self._signatures.append(minhash.hashvalues)
            self._ids.append(doc_id)
        return best
