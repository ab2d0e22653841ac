"""Exact and MinHash near-duplicate detection."""

import pytest

from lmforge.data import ExactDeduplicator, NearDeduplicator, text_hash
from lmforge.data.dedup import shingles

# 100 distinct words so the shingle sets are what the test says they are.
WORDS = [f"w{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(100)]
BASE = " ".join(WORDS)


def test_exact_duplicates_ignore_case_and_layout():
    dedup = ExactDeduplicator()
    assert dedup.check("a", "Hello   world\nagain") is None
    assert dedup.check("b", "hello world again") == "a"
    assert dedup.check("c", "hello world again!") is None
    assert text_hash("Hello  World") == text_hash("hello world")
    assert text_hash("x") == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"


def test_near_duplicate_with_one_word_changed_is_found():
    changed = list(WORDS)
    changed[50] = "different"
    dedup = NearDeduplicator(threshold=0.8)
    assert dedup.check("original", BASE) is None
    match = dedup.check("copy", " ".join(changed))
    assert match is not None and match.of == "original" and match.similarity >= 0.8


def test_unrelated_document_is_kept():
    dedup = NearDeduplicator(threshold=0.8)
    dedup.check("original", BASE)
    other = " ".join(f"x{w}" for w in WORDS)
    assert dedup.check("other", other) is None
    assert dedup.check("third", " ".join(WORDS[:50])) is None  # half of it: Jaccard about 0.45


def test_threshold_is_respected():
    changed = list(WORDS)
    for i in (10, 30, 50, 70, 90):  # five edits: Jaccard about 0.65
        changed[i] = f"edit{i}"
    lenient, strict = NearDeduplicator(threshold=0.5), NearDeduplicator(threshold=0.8)
    for dedup in (lenient, strict):
        dedup.check("original", BASE)
    assert lenient.check("copy", " ".join(changed)) is not None
    assert strict.check("copy", " ".join(changed)) is None


def test_shingles():
    assert shingles("A b, c d", 2) == {"a b", "b c", "c d"}
    assert shingles("too short", 5) == set()
    assert shingles("", 5) == set()


def test_short_texts_are_never_near_duplicates():
    dedup = NearDeduplicator(threshold=0.8)
    assert dedup.check("truediv", "Return self / other.") is None
    assert dedup.check("floordiv", "Return self // other.") is None


def test_invalid_settings():
    with pytest.raises(ValueError, match="threshold"):
        NearDeduplicator(threshold=0)
    with pytest.raises(ValueError, match="shingle"):
        NearDeduplicator(ngram=0)
