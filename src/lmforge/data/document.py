"""The unit of data that flows through the curation pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """One document: a stable identifier, its text, and free-form metadata.

    ``id`` says where the document came from (``"notes/a.md"``, ``"corpus.jsonl:17"``,
    ``"stdlib:json/decoder.py:338"``) so that a line in the report can be traced back to its source.
    ``meta`` carries everything else the reader knew (source file, line, row, qualified name, ...)
    and is written unchanged next to the text in the output shards.
    """

    id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)
