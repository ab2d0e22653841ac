"""Reading documents for retrieval: text, Markdown, HTML, PDF and JSONL files, folders recursively.

Each file becomes one `Document` (JSONL: one per line) whose text is what gets chunked, with meta:
    source    the file (JSONL: `file:line`)
    title     Markdown's first `# heading`, HTML's <title>, the PDF's title, a JSONL `title` field,
              else the file name
    sections  [[char_offset, "Heading > Subheading"], ...]: the heading in effect from each offset
              (Markdown and HTML headings, PDF pages), so a chunk can say which section it came from
Character offsets always index `Document.text`: for Markdown the file itself, for HTML and PDF the
extracted text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser
from pathlib import Path

from lmforge.data.document import Document

TEXT_SUFFIXES = (".txt", ".text", ".rst")
MARKDOWN_SUFFIXES = (".md", ".markdown")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
PDF_SUFFIXES = (".pdf",)
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz")
ALL_SUFFIXES = TEXT_SUFFIXES + MARKDOWN_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES + JSONL_SUFFIXES


class IngestError(ValueError):
    """A file that cannot be read; the message names it."""


def file_format(path: Path) -> str | None:
    name = path.name.lower()
    for fmt, suffixes in (("text", TEXT_SUFFIXES), ("markdown", MARKDOWN_SUFFIXES), ("html", HTML_SUFFIXES),
                          ("pdf", PDF_SUFFIXES), ("jsonl", JSONL_SUFFIXES)):  # fmt: skip
        if name.endswith(suffixes):
            return fmt
    return None


def expand_paths(paths: Iterable[str | Path], skipped: list[str] | None = None) -> Iterator[Path]:
    """Files named directly, and the readable files inside folders (recursively, sorted, hidden skipped)."""
    for item in paths:
        path = Path(item)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                rel = child.relative_to(path)
                if not child.is_file() or any(part.startswith(".") for part in rel.parts):
                    continue
                if file_format(child) is None:
                    if skipped is not None:
                        skipped.append(f"{child}: unknown file type")
                    continue
                yield child
        elif path.is_file():
            if file_format(path) is None:
                raise IngestError(f"{path}: unknown file type; expected one of {', '.join(ALL_SUFFIXES)}")
            yield path
        else:
            raise IngestError(f"{path}: no such file or folder")


def load_documents(
    paths: Iterable[str | Path], text_field: str = "text", skipped: list[str] | None = None
) -> Iterator[Document]:
    """Every document under `paths`, in a deterministic order. Empty documents are skipped."""
    readers = {"text": read_text, "markdown": read_markdown, "html": read_html, "pdf": read_pdf}
    for path in expand_paths(paths, skipped):
        fmt = file_format(path)
        docs = read_jsonl(path, text_field) if fmt == "jsonl" else [readers[fmt](path)]
        for doc in docs:
            if doc.text.strip():
                yield doc


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise IngestError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def read_text(path: Path) -> Document:
    return Document(
        str(path), _decode(path, path.read_bytes()), {"source": str(path), "title": path.stem, "sections": []}
    )


# --------------------------------------------------------------------------------------------------
# Markdown: the text is kept as written (offsets index the file); ATX (`## x`) and setext headings
# outside fenced code blocks mark sections.

_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def markdown_sections(text: str) -> list[tuple[int, str, int]]:
    """(char offset of the heading line, heading text, level) for each heading, in order."""
    out = []
    offset, in_fence, previous = 0, False, None  # previous: (offset, line) of the last plain line
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        if _FENCE.match(stripped):
            in_fence = not in_fence
        elif not in_fence:
            m = _ATX.match(stripped)
            if m:
                out.append((offset, m.group(2).strip(), len(m.group(1))))
            elif _SETEXT.match(stripped) and previous is not None and previous[1].strip():
                out.append((previous[0], previous[1].strip(), 1 if stripped.strip()[0] == "=" else 2))
        previous = (offset, stripped) if not in_fence and stripped.strip() else None
        offset += len(line)
    return out


def _section_paths(headings: list[tuple[int, str, int]]) -> list[list]:
    """Headings with levels -> [[offset, "H1 > H2 > H3"], ...]."""
    stack: list[tuple[int, str]] = []
    out = []
    for offset, title, level in headings:
        stack = [(lv, t) for lv, t in stack if lv < level] + [(level, title)]
        out.append([offset, " > ".join(t for _, t in stack)])
    return out


def read_markdown(path: Path) -> Document:
    text = _decode(path, path.read_bytes())
    headings = markdown_sections(text)
    title = next((t for _, t, level in headings if level == 1), path.stem)
    return Document(
        str(path), text, {"source": str(path), "title": title, "sections": _section_paths(headings)}
    )


# --------------------------------------------------------------------------------------------------
# HTML: visible text only (no script/style/template), block elements end lines, headings mark sections.

_BLOCK = {"p", "div", "section", "article", "header", "footer", "main", "aside", "nav", "li", "ul", "ol",
          "table", "tr", "blockquote", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "br", "hr", "dt", "dd",
          "figure", "figcaption", "form", "details", "summary"}  # fmt: skip
_HIDDEN = {"script", "style", "noscript", "template", "svg", "head"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.length = 0
        self.hidden = 0
        self.title: list[str] = []
        self.in_title = False
        self.heading: tuple[int, int, list[str]] | None = None  # (level, offset, text pieces)
        self.headings: list[tuple[int, str, int]] = []

    def _newline(self, blank: bool) -> None:
        """End the current line; a blank line after paragraphs, headings, tables and pre blocks."""
        if not self.length:
            return
        tail = "".join(self.parts[-2:])
        have = len(tail) - len(tail.rstrip("\n"))
        want = 2 if blank else 1
        if have < want:
            self.parts.append("\n" * (want - have))
            self.length += want - have

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "title":
            self.in_title = True
        if tag in _HIDDEN:
            self.hidden += 1
        elif tag in _BLOCK:
            self._newline(
                blank=tag in ("p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "pre", "blockquote")
            )
            if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
                self.heading = (int(tag[1]), self.length, [])

    def handle_endtag(self, tag) -> None:
        if tag == "title":
            self.in_title = False
        if tag in _HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in _BLOCK:
            if self.heading is not None and tag == f"h{self.heading[0]}":
                level, offset, pieces = self.heading
                text = " ".join("".join(pieces).split())
                if text:
                    self.headings.append((offset, text, level))
                self.heading = None
            self._newline(
                blank=tag in ("p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "pre", "blockquote")
            )

    def handle_data(self, data) -> None:
        if self.in_title:
            self.title.append(data)
        if self.hidden:
            return
        text = re.sub(r"\s+", " ", data)
        if self.length == 0 or "".join(self.parts[-1:]).endswith("\n"):
            text = text.lstrip()
        if not text:
            return
        if self.heading is not None:
            self.heading[2].append(text)
        self.parts.append(text)
        self.length += len(text)


def html_to_text(html: str) -> tuple[str, str | None, list[tuple[int, str, int]]]:
    """(visible text, <title>, headings as (offset in the text, text, level))."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    title = " ".join("".join(parser.title).split()) or None
    return text.rstrip(), title, parser.headings


def read_html(path: Path) -> Document:
    text, title, headings = html_to_text(_decode(path, path.read_bytes()))
    title = title or next((t for _, t, level in headings if level == 1), path.stem)
    return Document(
        str(path), text, {"source": str(path), "title": title, "sections": _section_paths(headings)}
    )


# --------------------------------------------------------------------------------------------------
# PDF (pypdf): the pages' text joined by blank lines; each page is a section "page N".


def read_pdf(path: Path) -> Document:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        raise IngestError(f"{path}: reading PDF needs pypdf (pip install pypdf)") from None
    try:
        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
        info_title = (reader.metadata or {}).get("/Title") if reader.metadata is not None else None
    except (PdfReadError, OSError, ValueError) as e:
        raise IngestError(f"{path}: cannot read PDF ({e})") from None
    parts, sections, offset = [], [], 0
    for i, page in enumerate(pages, 1):
        page = page.strip()
        if not page:
            continue
        if parts:
            parts.append("\n\n")
            offset += 2
        sections.append([offset, f"page {i}"])
        parts.append(page)
        offset += len(page)
    title = str(info_title).strip() if info_title else path.stem
    return Document(
        str(path), "".join(parts), {"source": str(path), "title": title or path.stem, "sections": sections}
    )


# --------------------------------------------------------------------------------------------------
# JSONL: one document per line; `text_field` holds the text, `id` and `title` are used when present,
# every other field is kept as metadata (and can be filtered on).


def read_jsonl(path: Path, text_field: str = "text") -> Iterator[Document]:
    from lmforge.data.errors import DataError
    from lmforge.data.readers import iter_jsonl

    try:
        for doc in iter_jsonl(path, text_field):
            meta = dict(doc.meta)
            doc_id = str(meta.pop("id", doc.id))
            meta["source"] = f"{path}:{meta.pop('line')}"
            meta.setdefault("title", path.stem)
            meta["sections"] = []
            yield Document(doc_id, doc.text, meta)
    except DataError as e:
        raise IngestError(str(e)) from None
