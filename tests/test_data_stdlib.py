"""The embedded corpus of standard-library docstrings."""

from pathlib import Path

import pytest

from lmforge.data import iter_stdlib_docstrings
from lmforge.data.stdlib_corpus import module_name


@pytest.fixture(scope="module")
def corpus():
    """The whole corpus, built once for this module (about 2-3 s)."""
    return list(iter_stdlib_docstrings())


def test_corpus_is_large_and_has_qualified_names(corpus):
    assert sum(len(d.text) for d in corpus) > 1_000_000
    by_qualname = {d.meta["qualname"]: d for d in corpus}
    decode = by_qualname["json.decoder.JSONDecoder.decode"]
    assert decode.meta["module"] == "json.decoder"
    assert decode.meta["kind"] == "method"
    assert decode.meta["path"] == "json/decoder.py"
    assert decode.id == f"stdlib:json/decoder.py:{decode.meta['lineno']}"
    assert by_qualname["json"].meta["kind"] == "module"
    assert by_qualname["json.decoder.JSONDecoder"].meta["kind"] == "class"
    assert by_qualname["json.dumps"].meta["kind"] == "function"
    assert len({d.id for d in corpus}) == len(corpus)


def test_skipped_folders_are_absent(corpus):
    skipped = {"test", "tests", "idlelib", "lib2to3", "site-packages"}
    assert not any(set(d.meta["path"].split("/")[:-1]) & skipped for d in corpus)


def test_deterministic(corpus):
    """A second pass over the first files gives exactly the same documents in the same order."""
    again = list(iter_stdlib_docstrings(max_files=40))
    assert len(again) > 50
    assert [(d.id, d.text, d.meta) for d in again] == [(d.id, d.text, d.meta) for d in corpus[: len(again)]]
    paths = [d.meta["path"] for d in corpus]
    first_seen = list(dict.fromkeys(paths))
    assert first_seen == sorted(first_seen)


def test_source_order_nesting_and_parse_errors(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""Package doc."""\n', encoding="utf-8")
    (pkg / "mod.py").write_text(
        '"""Module doc."""\n'
        "import sys\n"
        "if sys.platform:\n"
        "    class A:\n"
        '        """Class doc."""\n'
        "        async def run(self):\n"
        '            """Method doc.\n\n            Indented body.\n            """\n'
        "def outer():\n"
        '    """Outer doc."""\n'
        "    def inner():\n"
        '        """Inner doc."""\n'
        "def undocumented():\n"
        "    pass\n",
        encoding="utf-8",
    )
    (pkg / "broken.py").write_text("def f(:\n", encoding="utf-8")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text('"""Skipped."""\n', encoding="utf-8")
    failures = []
    docs = list(iter_stdlib_docstrings(root=tmp_path, on_parse_error=lambda p, e: failures.append(p.name)))
    assert [(d.meta["qualname"], d.meta["kind"], d.text) for d in docs] == [
        ("pkg", "module", "Package doc."),
        ("pkg.mod", "module", "Module doc."),
        ("pkg.mod.A", "class", "Class doc."),
        ("pkg.mod.A.run", "method", "Method doc.\n\nIndented body."),
        ("pkg.mod.outer", "function", "Outer doc."),
        ("pkg.mod.outer.<locals>.inner", "function", "Inner doc."),
    ]
    assert failures == ["broken.py"]
    assert docs[3].meta == {
        "source": "stdlib",
        "module": "pkg.mod",
        "qualname": "pkg.mod.A.run",
        "kind": "method",
        "path": "pkg/mod.py",
        "lineno": 6,
    }


def test_module_name():
    assert module_name(Path("json/decoder.py")) == "json.decoder"
    assert module_name(Path("json/__init__.py")) == "json"
    assert module_name(Path("os.py")) == "os"
