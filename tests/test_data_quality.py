"""Quality filters: each one rejects a document crafted to fail it and passes a good document."""

import pytest

from lmforge.data import QualityChecker, QualityConfig
from lmforge.data.quality import TextStats, filter_names

GOOD = (
    "The module provides a small set of helpers for reading configuration files written in a "
    "simple format. Each section starts with a name in brackets, followed by key and value pairs "
    "separated by an equals sign. Comments begin with a semicolon and run to the end of their line. "
    "Values keep their surrounding quotes unless the parser is told to strip them, which makes it "
    "possible to store strings containing leading spaces. Errors name the file and the line number "
    "where parsing stopped, so that mistakes are quick to find."
)

_UNIQUE = [f"token{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(80)]


def _with_repeated(gram: str, every: int = 3, total_unique: int = 48) -> str:
    """Unique words with ``gram`` inserted after every ``every`` of them."""
    out: list[str] = []
    for i, word in enumerate(_UNIQUE[:total_unique]):
        out.append(word)
        if i % every == every - 1:
            out.append(gram)
    return " ".join(out)


# Unique words, then the first 25 of them again: a 25-word span repeated, so every n <= 25 fails.
_REPEATED_SPAN = " ".join(_UNIQUE[:60] + _UNIQUE[:25])

FAILING = {
    "char_count": "Tiny doc.",
    "word_count": "Deprecated alias.",
    "mean_word_length": "a b c d e f g h i j k l",
    "symbol_word_ratio": "# Title\n# Section one\n# Section two ... and more",
    "alpha_char_ratio": "Values 1234 5678 9012 3456 7890 1111",
    "symbol_char_ratio": "x.__hash__() <==> hash(x)",
    "alpha_words_fraction": "Values: 1 2 3 4 5 6 7 8 9 10",
    "bullet_lines_fraction": "- first item\n- second item\n* third item",
    "ellipsis_lines_fraction": "Wait for it...\nStill waiting…\nDone at last.",
    "duplicate_lines_fraction": "Same line here.\nSame line here.\nSame line here.\nOther line.",
    "duplicate_line_chars_fraction": "Same line here.\nSame line here.\nSame line here.\nOther line.",
    "duplicate_paragraphs_fraction": "First paragraph.\n\nFirst paragraph.\n\nSecond one.",
    "duplicate_paragraph_chars_fraction": "First paragraph.\n\nFirst paragraph.\n\nSecond one.",
    "top_2gram_chars_fraction": _with_repeated("big dog", every=2),
    "top_3gram_chars_fraction": _with_repeated("big red dog", every=2),
    "top_4gram_chars_fraction": _with_repeated("the big red dog", every=3),
    **{f"duplicate_{n}gram_chars_fraction": _REPEATED_SPAN for n in range(5, 11)},
}


def _filters():
    return {f.name: f for f in QualityChecker().filters}


def test_every_default_filter_has_a_failing_example():
    assert sorted(FAILING) == sorted(filter_names())


@pytest.mark.parametrize("name", sorted(FAILING))
def test_filter_rejects_crafted_document(name):
    rejection = _filters()[name].check(TextStats(FAILING[name]))
    assert rejection is not None and rejection.filter == name


@pytest.mark.parametrize("name", sorted(FAILING))
def test_filter_passes_good_document(name):
    assert _filters()[name].check(TextStats(GOOD)) is None


def test_good_document_passes_the_checker():
    assert QualityChecker().check(GOOD) is None


def test_upper_bounds():
    checker = QualityChecker(QualityConfig(max_chars=50, max_words=5))
    assert checker.check("one two three four five six seven").filter == "word_count"
    assert checker.check("x" * 40 + " " + "y" * 20).filter == "char_count"
    long_words = "Supercalifragilistic antidisestablishmentarianism pneumonoultramicroscopic"
    assert QualityChecker().check(long_words).filter == "mean_word_length"


def test_rejection_records_filter_value_and_bound():
    rejection = QualityChecker().check("Deprecated alias.")
    assert (rejection.filter, rejection.value, rejection.bound) == ("word_count", 2, "< min 3")
    assert str(rejection) == "word_count: 2 < min 3"


def test_short_documents_skip_ngram_repetition_filters():
    # "self is" twice covers 25% of a ten-word sentence: not a sign of repetitive text.
    assert QualityChecker().check("Returns True if self is even. Assumes self is an integer.") is None
    strict = QualityChecker(QualityConfig(repetition_min_words=0))
    assert strict.check("Returns True if self is even. Assumes self is an integer.").filter == (
        "top_2gram_chars_fraction"
    )


def test_none_disables_a_filter_and_gopher_preset():
    assert "word_count" not in filter_names(QualityConfig(min_words=None, max_words=None))
    short = "A short but perfectly good sentence about reading files."
    assert QualityChecker().check(short) is None
    assert QualityChecker(QualityConfig.gopher()).check(short).filter == "word_count"  # < 50 words


def test_from_dict_rejects_unknown_keys_and_parses_ngram_maps():
    config = QualityConfig.from_dict({"min_words": 5, "max_top_ngram_chars_fraction": {"2": 0.3}})
    assert config.min_words == 5 and config.max_top_ngram_chars_fraction == {2: 0.3}
    with pytest.raises(ValueError, match="min_wrods"):
        QualityConfig.from_dict({"min_wrods": 5})
