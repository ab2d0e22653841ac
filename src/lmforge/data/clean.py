"""Text cleaning: one canonical form for the same text, whatever editor or OS produced it.

Cleaning runs before every other stage so that filters, deduplication and decontamination all
see the same text: two copies of a paragraph that differ only in trailing spaces or in composed
vs. decomposed accents must hash alike.
"""

from __future__ import annotations

import re
import unicodedata

_NEWLINES = re.compile(r"\r\n?|[\u2028\u2029\x85]")
# Everything in Unicode category Cc except tab and newline: NUL, BEL, ESC, DEL, C1 controls...
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_HSPACE_RUN = re.compile(r"[^\S\n]+")  # whitespace other than newline: spaces, tabs, NBSP, ...
_LEADING_HSPACE = re.compile(r"^[^\S\n]*", re.MULTILINE)
_TRAILING_HSPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_MANY_BLANK_LINES = re.compile(r"\n{4,}")  # 4 newlines = 3 blank lines


def clean_text(text: str, keep_indentation: bool = True) -> str:
    """Return ``text`` normalised for training.

    - Unicode NFC, so "é" is one code point whichever way it was typed.
    - Line endings ``\\r\\n``, ``\\r`` and Unicode line/paragraph separators become ``\\n``.
    - Control characters are removed (tab and newline kept); a byte-order mark is dropped.
    - Runs of spaces and tabs collapse to one space and trailing spaces go. With
      ``keep_indentation`` (the default) the leading whitespace of each line is kept as is,
      because in docstrings, Markdown and code it carries structure (doctests, lists, blocks).
    - At most two consecutive blank lines; leading and trailing blank lines are stripped.
    """
    text = unicodedata.normalize("NFC", text)
    text = _NEWLINES.sub("\n", text)
    text = _CONTROL.sub("", text).replace("\ufeff", "")
    if keep_indentation:
        text = "\n".join(_collapse_inner(line) for line in text.split("\n"))
    else:
        text = _HSPACE_RUN.sub(" ", text)
    text = _TRAILING_HSPACE.sub("", text)
    text = _MANY_BLANK_LINES.sub("\n\n\n", text)
    return text.strip("\n") if keep_indentation else text.strip()


def _collapse_inner(line: str) -> str:
    """Collapse whitespace runs after the indentation of one line, leaving the indentation alone."""
    indent = _LEADING_HSPACE.match(line).group(0)  # type: ignore[union-attr]  # always matches
    return indent + _HSPACE_RUN.sub(" ", line[len(indent) :])
