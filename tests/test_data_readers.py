"""Streaming readers: text/Markdown folders, JSONL (with the on_error policy) and Parquet."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data import DataError, ErrorLog, iter_documents, iter_jsonl, iter_parquet


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("# Two\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("one", encoding="utf-8")
    (tmp_path / "notes.csv").write_text("x,y", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("secret", encoding="utf-8")
    ignored: list[str] = []
    docs = list(iter_documents([tmp_path], ignored=ignored))
    assert [d.text for d in docs] == ["one", "# Two\n"]
    assert docs[0].id == str(tmp_path / "a.txt") and docs[0].meta == {"source": str(tmp_path / "a.txt")}
    assert ignored == [f"{tmp_path / 'notes.csv'}: unknown file type"]


def test_unknown_or_missing_explicit_input_is_an_error(tmp_path):
    (tmp_path / "data.csv").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="data.csv: unknown input type"):
        list(iter_documents([tmp_path / "data.csv"]))
    with pytest.raises(DataError, match="nope.txt: no such file"):
        list(iter_documents([tmp_path / "nope.txt"]))


def test_jsonl_fields_meta_and_blank_lines(tmp_path):
    path = _write_jsonl(
        tmp_path / "c.jsonl",
        ['{"text": "first", "lang": "en"}', "", '{"id": "x7", "text": "second", "meta": {"k": 1}}'],
    )
    first, second = iter_jsonl(path)
    assert first.id == f"{path}:1" and first.meta == {"lang": "en", "source": str(path), "line": 1}
    # A nested "meta" (as in this pipeline's own output) is merged; a record's own id is kept in meta.
    assert second.id == f"{path}:3" and second.meta == {"k": 1, "id": "x7", "source": str(path), "line": 3}


def test_jsonl_custom_field_and_gzip(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write('{"body": "hello", "meta": {"k": 1}}\n')
    (doc,) = iter_jsonl(path, text_field="body")
    assert doc.text == "hello" and doc.meta == {"k": 1, "source": str(path), "line": 1}


BAD_LINES = [
    '{"text": "good one"}',
    '{"text": "good two"}',
    '{"text": "broken',
    "[1, 2]",
    '{"title": "no text"}',
    '{"text": 42}',
    '{"text": "good three"}',
]


def test_malformed_jsonl_fails_with_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    with pytest.raises(DataError) as info:
        list(iter_jsonl(path, errors=ErrorLog("fail")))
    assert str(info.value).startswith(f"{path}:3: malformed JSON")


def test_malformed_jsonl_skipped_and_counted(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    errors = ErrorLog("skip")
    docs = list(iter_jsonl(path, errors=errors))
    assert [d.text for d in docs] == ["good one", "good two", "good three"]
    assert errors.count == 4
    assert errors.examples == [
        f"{path}:3: malformed JSON: Unterminated string starting at (column 10)",
        f"{path}:4: expected a JSON object, got list",
        f"{path}:5: missing field 'text' (fields: title)",
    ]


def test_invalid_utf8_reports_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not valid UTF-8"):
        list(iter_jsonl(path))
    text_file = tmp_path / "latin1.txt"
    text_file.write_bytes(b"line one\nline two caf\xe9\n")
    with pytest.raises(DataError, match=r"latin1.txt:2: not valid UTF-8"):
        list(iter_documents([text_file]))


def test_all_string_fields_when_text_field_is_none(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", ['{"question": "Why?", "answers": ["Because.", 3]}'])
    (doc,) = iter_jsonl(path, text_field=None)
    assert doc.text == "Why?\nBecause."


def test_parquet_streams_rows_with_metadata(tmp_path):
    path = tmp_path / "corpus.parquet"
    table = pa.table({"text": ["alpha", None, "gamma"], "lang": ["en", "de", "fr"]})
    pq.write_table(table, path, row_group_size=2)
    errors = ErrorLog("skip")
    docs = list(iter_parquet(path, errors=errors, batch_size=1))
    assert [(d.id, d.text, d.meta) for d in docs] == [
        (f"{path}:1", "alpha", {"lang": "en", "source": str(path), "row": 1}),
        (f"{path}:3", "gamma", {"lang": "fr", "source": str(path), "row": 3}),
    ]
    assert errors.examples == [f"{path}: row 2: column 'text' is NoneType, expected a string"]
    assert [d.text for d in iter_documents([path], errors=ErrorLog("skip"))] == ["alpha", "gamma"]


def test_parquet_missing_column_and_corrupt_file(tmp_path):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(DataError, match=r"corpus.parquet: no column 'text' \(columns: body\)"):
        list(iter_parquet(path))
    bad = tmp_path / "bad.parquet"
    bad.write_text(json.dumps({"not": "parquet"}), encoding="utf-8")
    with pytest.raises(DataError, match="bad.parquet: cannot read as Parquet"):
        list(iter_parquet(bad))
