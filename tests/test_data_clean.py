"""Cleaning: NFC, control characters, whitespace."""

from lmforge.data import clean_text


def test_nfc_composes_accents():
    assert clean_text("cafe\u0301") == "caf\u00e9"


def test_control_characters_dropped_but_tab_and_newline_kept():
    assert clean_text("a\x00b\x07c\x1b[0m\td\ne\x7f") == "abc[0m d\ne"


def test_line_endings_and_bom():
    assert clean_text("\ufeffone\r\ntwo\rthree\u2028four") == "one\ntwo\nthree\nfour"


def test_whitespace_runs_collapse_and_trailing_spaces_go():
    assert clean_text("a  b\t\tc   \nd \u00a0 e  ") == "a b c\nd e"


def test_indentation_kept_by_default_and_collapsed_on_request():
    text = "Example:\n\n    >>> f(1,  2)\n    3"
    assert clean_text(text) == "Example:\n\n    >>> f(1, 2)\n    3"
    assert clean_text(text, keep_indentation=False) == "Example:\n\n >>> f(1, 2)\n 3"


def test_at_most_two_blank_lines_and_outer_blank_lines_stripped():
    assert clean_text("\n\n a\n\n\n\n\n\nb\n\n") == " a\n\n\nb"


def test_whitespace_only_becomes_empty():
    assert clean_text(" \t\n \x00\n") == ""
