"""Deterministic train/validation/test assignment from a hash of each document's text.

Hashing the content rather than drawing random numbers makes the split independent of input
order, process, machine and Python version (SHA-256, unlike :func:`hash`, is not salted), and it
sends identical texts to the same split, so a copy cannot leak from train into test.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

DEFAULT_SPLITS: dict[str, float] = {"train": 0.98, "validation": 0.01, "test": 0.01}


def validate_fractions(fractions: Mapping[str, float]) -> None:
    """Raise ``ValueError`` unless the fractions are non-negative, sum to 1 and name files safely."""
    if not fractions:
        raise ValueError("at least one split is needed")
    for name, fraction in fractions.items():
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"split name {name!r} must be letters, digits, '-' or '_' (it names a file)")
        if fraction < 0:
            raise ValueError(f"split {name!r} has a negative fraction {fraction}")
    total = sum(fractions.values())
    if not math.isclose(total, 1.0, abs_tol=1e-9):
        raise ValueError(f"split fractions must sum to 1, got {total} ({dict(fractions)})")


def unit_interval_hash(text: str, seed: str = "") -> float:
    """Map ``text`` to a number in [0, 1): the first 8 bytes of SHA-256(seed, NUL, text)."""
    digest = hashlib.sha256(seed.encode("utf-8") + b"\0" + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(text: str, fractions: Mapping[str, float] = DEFAULT_SPLITS, seed: str = "") -> str:
    """The split ``text`` belongs to: splits own consecutive ranges of [0, 1) in the given order.

    Changing ``seed`` reshuffles the assignment; keeping it fixed keeps every document where it
    was, even when documents are added to or removed from the corpus.
    """
    point = unit_interval_hash(text, seed)
    upper = 0.0
    name = ""
    for name, fraction in fractions.items():
        upper += fraction
        if point < upper:
            return name
    return name  # rounding left point just above the last bound: it belongs to the last split
