"""Token-based chunking with overlap, preferring paragraph, then sentence boundaries.

Sizes count tokens of the embedding model's tokenizer (without its [CLS]/[SEP]), so a chunk never gets
truncated when embedded. A document is cut into sentence units (paragraph starts marked); a sentence
longer than a chunk is cut at token boundaries. Units are packed greedily up to `chunk_tokens`; when a
paragraph boundary lies in the second half of a full chunk, the chunk ends there instead. The next chunk
starts with the last sentences of the previous one, up to `overlap_tokens`.

Only the chunk text is embedded and counted: the source, title and section travel as metadata.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Any

from lmforge.data.document import Document

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
# a sentence ends at . ! ? (optionally followed by closing quotes/brackets) before whitespace
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


@dataclass
class Chunk:
    doc_id: str
    text: str
    start: int  # character offsets of the chunk in the document's text
    end: int
    n_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)  # source, title, section, the document's fields
    id: int = -1  # assigned by the index

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "doc_id": self.doc_id, "start": self.start, "end": self.end,
                "n_tokens": self.n_tokens, "text": self.text, "meta": self.meta}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Chunk:
        return cls(d["doc_id"], d["text"], d["start"], d["end"], d["n_tokens"], d.get("meta", {}), d["id"])

    @property
    def citation(self) -> str:
        """`source › section` for showing where a passage comes from."""
        source = self.meta.get("source", self.doc_id)
        section = self.meta.get("section")
        return f"{source} › {section}" if section else str(source)


@dataclass
class _Unit:
    start: int
    end: int
    n_tokens: int
    paragraph_start: bool


def _spans(text: str, pattern: re.Pattern, start: int, end: int) -> list[tuple[int, int]]:
    """Pieces of text[start:end] between matches of `pattern`, trimmed of whitespace."""
    out, pos = [], start
    for m in pattern.finditer(text, start, end):
        out.append((pos, m.start()))
        pos = m.end()
    out.append((pos, end))
    trimmed = []
    for s, e in out:
        piece = text[s:e]
        s2 = s + len(piece) - len(piece.lstrip())
        e2 = e - (len(piece) - len(piece.rstrip()))
        if e2 > s2:
            trimmed.append((s2, e2))
    return trimmed


def token_starts(tokenizer, text: str) -> list[int]:
    """Character offset where each token of `text` begins (no special tokens)."""
    return [s for s, _ in tokenizer.backend.encode(text, add_special_tokens=False).offsets]


def chunk_text(
    text: str, starts: list[int], chunk_tokens: int, overlap_tokens: int
) -> list[tuple[int, int, int]]:
    """(start, end, n_tokens) of each chunk of `text`, given its tokens' start offsets."""
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be >= 1")
    if not 0 <= overlap_tokens < chunk_tokens:
        raise ValueError("overlap_tokens must be in [0, chunk_tokens)")

    def count(s: int, e: int) -> int:
        return bisect.bisect_left(starts, e) - bisect.bisect_left(starts, s)

    units: list[_Unit] = []
    for p_start, p_end in _spans(text, _PARAGRAPH, 0, len(text)):
        for i, (s, e) in enumerate(_spans(text, _SENTENCE_END, p_start, p_end)):
            n = count(s, e)
            if n <= chunk_tokens:
                units.append(_Unit(s, e, n, i == 0))
                continue
            first = bisect.bisect_left(starts, s)  # a sentence longer than a chunk: cut at tokens
            last = bisect.bisect_left(starts, e)
            for t in range(first, last, chunk_tokens):
                piece_end = starts[t + chunk_tokens] if t + chunk_tokens < last else e
                piece = text[starts[t] : piece_end].rstrip()
                units.append(
                    _Unit(
                        starts[t], starts[t] + len(piece), min(chunk_tokens, last - t), i == 0 and t == first
                    )
                )

    # spans are counted as a whole (the whitespace between units can be tokens of its own)
    chunks: list[tuple[int, int, int]] = []
    i = 0
    while i < len(units):
        j = i + 1
        while j < len(units) and count(units[i].start, units[j].end) <= chunk_tokens:
            j += 1
        if j < len(units):  # the chunk is full: end it at a paragraph boundary in its second half, if any
            for k in range(j - 1, i, -1):
                if units[k].paragraph_start and count(units[i].start, units[k - 1].end) >= chunk_tokens // 2:
                    j = k
                    break
        chunks.append((units[i].start, units[j - 1].end, count(units[i].start, units[j - 1].end)))
        if j >= len(units):
            break
        # the next chunk repeats the last sentences, up to overlap_tokens, and must still gain unit j
        k = j
        while (
            k - 1 > i
            and count(units[k - 1].start, units[j - 1].end) <= overlap_tokens
            and count(units[k - 1].start, units[j].end) <= chunk_tokens
        ):
            k -= 1
        i = k
    return chunks


def section_at(sections: list, offset: int) -> str | None:
    """The heading in effect at `offset`, from a document's `sections` meta ([[offset, heading], ...])."""
    best = None
    for start, title in sections:
        if start <= offset:
            best = title
        else:
            break
    return best


def chunk_document(
    doc: Document, tokenizer, chunk_tokens: int = 200, overlap_tokens: int = 32
) -> list[Chunk]:
    """The chunks of one document, each with source, title, section and the document's other meta."""
    meta = {k: v for k, v in doc.meta.items() if k != "sections"}
    meta.setdefault("source", doc.id)
    sections = doc.meta.get("sections") or []
    out = []
    for start, end, n in chunk_text(
        doc.text, token_starts(tokenizer, doc.text), chunk_tokens, overlap_tokens
    ):
        section = section_at(sections, start)
        chunk_meta = dict(meta)
        if section is not None:
            chunk_meta["section"] = section
        out.append(Chunk(doc.id, doc.text[start:end], start, end, n, chunk_meta))
    return out
