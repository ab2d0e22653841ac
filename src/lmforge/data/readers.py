"""Streaming readers: text/Markdown files, JSONL and Parquet, one :class:`Document` at a time.

All readers are generators, so a corpus larger than memory streams through the pipeline: a text
file is read whole (one file is one document), a JSONL file one line at a time and a Parquet file
one record batch at a time.

Bad records (a line that is not JSON, a missing or non-string text field, bytes that are not
UTF-8) go to an :class:`~lmforge.data.errors.ErrorLog`, which either raises a
:class:`~lmforge.data.errors.DataError` naming ``file:line`` or counts and skips the record.
A missing file, an unknown file type or a Parquet file without the text column always raise:
those are mistakes in the configuration, not in one record.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .document import Document
from .errors import DataError, ErrorLog
from .stdlib_corpus import iter_stdlib_docstrings

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
#: Input name for the embedded corpus of standard-library docstrings.
STDLIB_SOURCE = "builtin:stdlib"


def file_kind(path: Path) -> str | None:
    """``"text"``, ``"jsonl"`` or ``"parquet"`` from the file name, or ``None`` when unknown."""
    name = path.name.lower()
    for kind, suffixes in (("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("text", TEXT_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def expand_inputs(inputs: Iterable[str | Path], ignored: list[str] | None = None) -> Iterator[str | Path]:
    """Resolve folders to the readable files inside them (recursively, sorted, hidden entries
    skipped); pass files and :data:`STDLIB_SOURCE` through. Files of unknown type found inside a
    folder are appended to ``ignored`` as ``"path: reason"`` so the report can list them; an
    unknown file named explicitly is an error."""
    for item in inputs:
        if str(item) == STDLIB_SOURCE:
            yield STDLIB_SOURCE
            continue
        path = Path(item)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                relative = child.relative_to(path)
                if any(part.startswith(".") for part in relative.parts) or not child.is_file():
                    continue
                if file_kind(child) is None:
                    if ignored is not None:
                        ignored.append(f"{child}: unknown file type")
                    continue
                yield child
        elif path.is_file():
            if file_kind(path) is None:
                raise DataError(
                    f"{path}: unknown input type; expected one of "
                    f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)} or a folder"
                )
            yield path
        else:
            raise DataError(f"{path}: no such file or folder")


def iter_documents(
    inputs: Iterable[str | Path],
    text_field: str | None = "text",
    errors: ErrorLog | None = None,
    ignored: list[str] | None = None,
) -> Iterator[Document]:
    """Stream the documents of all ``inputs`` (files, folders or :data:`STDLIB_SOURCE`) in order.

    ``text_field`` names the JSONL key / Parquet column holding the text; ``None`` joins every
    string value of the record instead (useful for evaluation sets with question and answer
    fields). ``errors`` decides what happens to bad records (default: fail on the first).
    ``ignored`` collects ``"path: reason"`` for whole files that were passed over: files of
    unknown type in folders, and stdlib files that do not parse (always skipped, whatever the
    policy, since they are not the user's data).
    """
    errors = errors if errors is not None else ErrorLog("fail")

    def stdlib_parse_error(path: Path, exc: Exception) -> None:
        if ignored is not None:
            ignored.append(f"{path}: does not parse ({exc})")

    for item in expand_inputs(inputs, ignored):
        if item == STDLIB_SOURCE:
            yield from iter_stdlib_docstrings(on_parse_error=stdlib_parse_error)
            continue
        path = Path(item)
        kind = file_kind(path)
        if kind == "text":
            yield from iter_text_file(path, errors)
        elif kind == "jsonl":
            yield from iter_jsonl(path, text_field, errors)
        else:
            yield from iter_parquet(path, text_field, errors)


def iter_text_file(path: Path, errors: ErrorLog | None = None) -> Iterator[Document]:
    """A whole text or Markdown file as one document (id and ``source``: the path)."""
    errors = errors if errors is not None else ErrorLog("fail")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        errors.record(path, line, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
        return
    yield Document(id=str(path), text=text, meta={"source": str(path)})


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def iter_jsonl(
    path: Path, text_field: str | None = "text", errors: ErrorLog | None = None
) -> Iterator[Document]:
    """One document per JSON object line. Blank lines are allowed and ignored.

    The id is ``path:line``; ``meta`` holds ``source`` and ``line`` plus the record's other
    fields (a nested ``meta`` object, as written by this pipeline, is merged in, so output
    shards can be read back as input).
    """
    errors = errors if errors is not None else ErrorLog("fail")
    with _open_binary(path) as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.rstrip(b"\r\n").decode("utf-8"))
            except UnicodeDecodeError as exc:
                errors.record(path, lineno, f"not valid UTF-8 ({exc.reason} at byte {exc.start} of the line)")
                continue
            except json.JSONDecodeError as exc:
                errors.record(path, lineno, f"malformed JSON: {exc.msg} (column {exc.colno})")
                continue
            if not isinstance(record, dict):
                errors.record(path, lineno, f"expected a JSON object, got {type(record).__name__}")
                continue
            text, problem = _record_text(record, text_field)
            if problem is not None:
                errors.record(path, lineno, problem)
                continue
            meta = _record_meta(record, text_field)
            meta.update(source=str(path), line=lineno)
            yield Document(id=f"{path}:{lineno}", text=text, meta=meta)


def _record_text(record: dict[str, Any], text_field: str | None) -> tuple[str, str | None]:
    """``(text, None)`` for a good record, ``("", message)`` when its text field is unusable."""
    if text_field is None:
        return "\n".join(_all_strings(record)), None
    if text_field not in record:
        return "", f"missing field {text_field!r} (fields: {', '.join(sorted(record)) or 'none'})"
    value = record[text_field]
    if not isinstance(value, str):
        return "", f"field {text_field!r} is {type(value).__name__}, expected a string"
    return value, None


def _record_meta(record: dict[str, Any], text_field: str | None) -> dict[str, Any]:
    if text_field is None:
        return {}
    meta = {k: v for k, v in record.items() if k not in (text_field, "meta")}
    nested = record.get("meta")
    if isinstance(nested, dict):
        meta = {**nested, **meta}
    return meta


def _all_strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON value, depth first in key order of appearance."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _all_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _all_strings(item)


def iter_parquet(
    path: Path, text_field: str | None = "text", errors: ErrorLog | None = None, batch_size: int = 1024
) -> Iterator[Document]:
    """One document per row, read batch by batch with pyarrow so large files stream.

    The id is ``path:row`` (row counted from 1, like lines); other columns go to ``meta``.
    """
    import pyarrow.parquet as pq

    errors = errors if errors is not None else ErrorLog("fail")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt or non-Parquet file
        raise DataError(f"{path}: cannot read as Parquet: {exc}") from exc
    columns = parquet.schema_arrow.names
    if text_field is not None and text_field not in columns:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(columns)})")
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_size):
        for record in batch.to_pylist():
            row += 1
            if text_field is None:
                text: str | None = "\n".join(v for v in record.values() if isinstance(v, str))
            else:
                text = record.pop(text_field)
            if not isinstance(text, str):
                errors.record(
                    path,
                    None,
                    f"row {row}: column {text_field!r} is {type(text).__name__}, expected a string",
                )
                continue
            meta = {} if text_field is None else record
            meta.update(source=str(path), row=row)
            yield Document(id=f"{path}:{row}", text=text, meta=meta)
