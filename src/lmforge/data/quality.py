"""Heuristic quality filters after the Gopher rules (MassiveText; Rae et al., 2021, appendix A).

Each filter measures one number about a document and compares it with a bound from
:class:`QualityConfig`; the first filter a document fails is recorded by name, with the measured
value, so the report can say *why* a document was dropped. Setting a bound to ``None`` turns that
filter off.

The Gopher paper tuned its bounds for web pages. The default corpus here is short docstrings
(many are a single sentence such as "Return the number of items."), so the defaults differ where
the web values would throw most of it away:

- ``min_words`` is 3, not 50: one-sentence docstrings are good text; one- and two-word ones
  ("Deprecated.", "Return self.") carry almost nothing.
- ``max_mean_word_length`` is 12, not 10: identifiers such as ``get_event_loop_policy`` are
  ordinary words in programming prose.
- ``min_alpha_words_fraction`` is 0.5, not 0.8: docstrings contain doctest output, numbers and
  signatures, which are useful text for a model of code documentation.
- ``max_symbol_char_ratio`` is 0.35 and ``min_alpha_char_ratio`` 0.4: they drop tables of
  numbers and ASCII art, not prose that mentions code.
- ``min_chars`` is 10: drops fragments such as "¶" or "TODO".
- The word n-gram repetition filters apply only to documents of at least
  ``repetition_min_words`` (50) words, the shortest document Gopher ever measured. In a
  ten-word sentence one repeated pair ("Returns True if self is even. Assumes self is an
  integer.") already covers 25% of the characters, which says nothing about repetitive text.
  Duplicate lines and paragraphs are still checked on short documents.

The remaining Gopher bounds (symbol-to-word ratio, bullet and ellipsis lines, duplicate lines and
paragraphs, n-gram repetition) are kept at the paper's values. For web text use
:meth:`QualityConfig.gopher`, which restores the paper's values everywhere.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

BULLETS = ("-", "*", "•", "‣", "◦", "●", "▪", "–", "—")
ELLIPSES = ("...", "…")


def _default_top_ngram() -> dict[int, float]:
    return {2: 0.20, 3: 0.18, 4: 0.16}


def _default_dup_ngram() -> dict[int, float]:
    return {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


@dataclass
class QualityConfig:
    """Bounds of the quality filters; ``None`` disables a filter. See the module docstring."""

    min_chars: int | None = 10
    max_chars: int | None = 100_000
    min_words: int | None = 3
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 12.0
    #: ('#' count + '...' count) / words; Gopher: 0.1
    max_symbol_word_ratio: float | None = 0.1
    #: fraction of non-empty lines starting with a bullet; Gopher: 0.9
    max_bullet_lines_fraction: float | None = 0.9
    #: fraction of non-empty lines ending with an ellipsis; Gopher: 0.3
    max_ellipsis_lines_fraction: float | None = 0.3
    #: fraction of words containing at least one letter; Gopher: 0.8
    min_alpha_words_fraction: float | None = 0.5
    #: letters / non-whitespace characters
    min_alpha_char_ratio: float | None = 0.4
    #: characters that are neither letters, digits nor whitespace / non-whitespace characters
    max_symbol_char_ratio: float | None = 0.35
    max_duplicate_lines_fraction: float | None = 0.30
    max_duplicate_paragraphs_fraction: float | None = 0.30
    max_duplicate_line_chars_fraction: float | None = 0.20
    max_duplicate_paragraph_chars_fraction: float | None = 0.20
    #: n -> bound on the characters covered by the most frequent repeated word n-gram
    max_top_ngram_chars_fraction: dict[int, float] = field(default_factory=_default_top_ngram)
    #: n -> bound on the characters covered by all repeated word n-grams
    max_duplicate_ngram_chars_fraction: dict[int, float] = field(default_factory=_default_dup_ngram)
    #: the n-gram filters above skip documents with fewer words than this
    repetition_min_words: int = 50

    @classmethod
    def gopher(cls) -> QualityConfig:
        """The bounds of the Gopher paper, meant for web pages rather than docstrings."""
        return cls(
            min_chars=None,
            max_chars=None,
            min_words=50,
            max_words=100_000,
            max_mean_word_length=10.0,
            min_alpha_words_fraction=0.8,
            min_alpha_char_ratio=None,
            max_symbol_char_ratio=None,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QualityConfig:
        """Build from a mapping (e.g. parsed YAML); unknown keys are an error, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown quality setting(s): {', '.join(unknown)}; known: {sorted(known)}")
        values = dict(data)
        for key in ("max_top_ngram_chars_fraction", "max_duplicate_ngram_chars_fraction"):
            if values.get(key) is not None:
                values[key] = {int(n): float(v) for n, v in values[key].items()}
        return cls(**values)


@dataclass(frozen=True)
class Rejection:
    """Why a document failed: the filter's name, the measured value and the bound it crossed."""

    filter: str
    value: float
    bound: str

    def __str__(self) -> str:
        return f"{self.filter}: {self.value:.4g} {self.bound}"


class TextStats:
    """Lazily computed measurements of one text, shared by all filters."""

    def __init__(self, text: str) -> None:
        self.text = text

    @cached_property
    def words(self) -> list[str]:
        return self.text.split()

    @cached_property
    def lower_words(self) -> list[str]:
        return [w.lower() for w in self.words]

    @cached_property
    def lines(self) -> list[str]:
        """Non-empty lines, stripped; blank lines separate paragraphs and are not lines of text."""
        return [s for s in (line.strip() for line in self.text.split("\n")) if s]

    @cached_property
    def paragraphs(self) -> list[str]:
        return [s for s in (p.strip() for p in re.split(r"\n\s*\n", self.text)) if s]

    @cached_property
    def line_duplicates(self) -> tuple[float, float]:
        return _duplicate_fractions(self.lines)

    @cached_property
    def paragraph_duplicates(self) -> tuple[float, float]:
        return _duplicate_fractions(self.paragraphs)

    @cached_property
    def non_space_chars(self) -> int:
        return sum(1 for c in self.text if not c.isspace())

    @cached_property
    def word_chars(self) -> int:
        return sum(len(w) for w in self.words)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in such repeats)."""
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return _ratio(dup_items, len(items)), _ratio(dup_chars, sum(len(i) for i in items))


def top_ngram_chars_fraction(words: list[str], n: int) -> float:
    """Characters covered by the most frequent word n-gram, over all word characters.

    Counted only when that n-gram occurs at least twice: in a short text every n-gram is the
    "most frequent" one, and counting it would reject every short document for repetition.
    """
    if len(words) < n:
        return 0.0
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return _ratio(count * sum(len(w) for w in gram), sum(len(w) for w in words))


def duplicate_ngram_chars_fraction(words: list[str], n: int) -> float:
    """Characters in words covered by any word n-gram that occurs more than once, over all word
    characters. Each word is counted once even when several repeated n-grams overlap it."""
    if len(words) < n:
        return 0.0
    starts: dict[tuple[str, ...], list[int]] = {}
    for i in range(len(words) - n + 1):
        starts.setdefault(tuple(words[i : i + n]), []).append(i)
    covered = [False] * len(words)
    for positions in starts.values():
        if len(positions) > 1:
            for i in positions:
                covered[i : i + n] = [True] * n
    return _ratio(sum(len(w) for w, c in zip(words, covered) if c), sum(len(w) for w in words))


Metric = Callable[[TextStats], float]


@dataclass(frozen=True)
class QualityFilter:
    """One named measurement with an optional lower and upper bound."""

    name: str
    metric: Metric
    minimum: float | None = None
    maximum: float | None = None

    def check(self, stats: TextStats) -> Rejection | None:
        value = self.metric(stats)
        if self.minimum is not None and value < self.minimum:
            return Rejection(self.name, value, f"< min {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            return Rejection(self.name, value, f"> max {self.maximum:g}")
        return None


def _symbol_word_ratio(s: TextStats) -> float:
    symbols = s.text.count("#") + sum(s.text.count(e) for e in ELLIPSES)
    return _ratio(symbols, len(s.words))


def _symbol_char_ratio(s: TextStats) -> float:
    symbols = sum(1 for c in s.text if not (c.isalnum() or c.isspace()))
    return _ratio(symbols, s.non_space_chars)


def build_filters(config: QualityConfig) -> list[QualityFilter]:
    """The enabled filters, cheapest first, so most rejections cost little."""
    c = config
    candidates: list[tuple[str, Metric, float | None, float | None]] = [
        ("char_count", lambda s: len(s.text), c.min_chars, c.max_chars),
        ("word_count", lambda s: len(s.words), c.min_words, c.max_words),
        (
            "mean_word_length",
            lambda s: _ratio(s.word_chars, len(s.words)),
            c.min_mean_word_length,
            c.max_mean_word_length,
        ),
        ("symbol_word_ratio", _symbol_word_ratio, None, c.max_symbol_word_ratio),
        (
            "alpha_char_ratio",
            lambda s: _ratio(sum(1 for ch in s.text if ch.isalpha()), s.non_space_chars),
            c.min_alpha_char_ratio,
            None,
        ),
        ("symbol_char_ratio", _symbol_char_ratio, None, c.max_symbol_char_ratio),
        (
            "alpha_words_fraction",
            lambda s: _ratio(sum(1 for w in s.words if any(ch.isalpha() for ch in w)), len(s.words)),
            c.min_alpha_words_fraction,
            None,
        ),
        (
            "bullet_lines_fraction",
            lambda s: _ratio(sum(1 for line in s.lines if line.startswith(BULLETS)), len(s.lines)),
            None,
            c.max_bullet_lines_fraction,
        ),
        (
            "ellipsis_lines_fraction",
            lambda s: _ratio(sum(1 for line in s.lines if line.endswith(ELLIPSES)), len(s.lines)),
            None,
            c.max_ellipsis_lines_fraction,
        ),
        (
            "duplicate_lines_fraction",
            lambda s: s.line_duplicates[0],
            None,
            c.max_duplicate_lines_fraction,
        ),
        (
            "duplicate_line_chars_fraction",
            lambda s: s.line_duplicates[1],
            None,
            c.max_duplicate_line_chars_fraction,
        ),
        (
            "duplicate_paragraphs_fraction",
            lambda s: s.paragraph_duplicates[0],
            None,
            c.max_duplicate_paragraphs_fraction,
        ),
        (
            "duplicate_paragraph_chars_fraction",
            lambda s: s.paragraph_duplicates[1],
            None,
            c.max_duplicate_paragraph_chars_fraction,
        ),
    ]
    gate = c.repetition_min_words

    def top_ngram(n: int) -> Metric:
        return lambda s: top_ngram_chars_fraction(s.lower_words, n) if len(s.words) >= gate else 0.0

    def duplicate_ngram(n: int) -> Metric:
        return lambda s: duplicate_ngram_chars_fraction(s.lower_words, n) if len(s.words) >= gate else 0.0

    for n, bound in sorted((c.max_top_ngram_chars_fraction or {}).items()):
        candidates.append((f"top_{n}gram_chars_fraction", top_ngram(n), None, bound))
    for n, bound in sorted((c.max_duplicate_ngram_chars_fraction or {}).items()):
        candidates.append((f"duplicate_{n}gram_chars_fraction", duplicate_ngram(n), None, bound))
    return [
        QualityFilter(name, metric, low, high)
        for name, metric, low, high in candidates
        if low is not None or high is not None
    ]


def filter_names(config: QualityConfig | None = None) -> list[str]:
    """Names of the enabled filters, in the order they run."""
    return [f.name for f in build_filters(config or QualityConfig())]


class QualityChecker:
    """Applies the enabled filters of a config; build once, call :meth:`check` per document."""

    def __init__(self, config: QualityConfig | None = None) -> None:
        self.config = config or QualityConfig()
        self.filters = build_filters(self.config)

    def check(self, text: str) -> Rejection | None:
        """The first filter ``text`` fails, or ``None`` when it passes them all."""
        stats = TextStats(text)
        for quality_filter in self.filters:
            rejection = quality_filter.check(stats)
            if rejection is not None:
                return rejection
        return None

    def measure(self, text: str) -> dict[str, float]:
        """Every enabled filter's value for ``text``: handy for tuning bounds on a new corpus."""
        stats = TextStats(text)
        return {f.name: f.metric(stats) for f in self.filters}
