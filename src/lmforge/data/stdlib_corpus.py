"""The embedded default corpus: docstrings of the running interpreter's standard library.

Every Python installation carries a few megabytes of carefully written English prose about
programming in its standard library's docstrings. That makes a corpus which needs no download,
is the same on every machine with the same Python version, and is small enough to train a toy
model or index for retrieval in minutes.

Documents are yielded in a deterministic order (sorted file paths, then source order inside each
file), and each keeps its qualified name (``json.decoder.JSONDecoder.decode``), module, kind and
source path, which the retrieval feature uses to cite where an answer came from.
"""

from __future__ import annotations

import ast
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from .document import Document

#: Folders that are skipped wherever they appear below the stdlib root: test suites, the IDLE
#: editor, the removed-soon lib2to3, installed third-party packages and bytecode caches.
DEFAULT_SKIP_DIRS: frozenset[str] = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
)

_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_root() -> Path:
    """Where the running interpreter's standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_files(
    root: Path | None = None, skip_dirs: frozenset[str] = DEFAULT_SKIP_DIRS
) -> Iterator[Path]:
    """Yield the ``.py`` files of the standard library in sorted (hence reproducible) order."""
    root = Path(root) if root is not None else stdlib_root()
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        if not any(part in skip_dirs for part in path.relative_to(root).parts[:-1]):
            yield path


def module_name(relative: Path) -> str:
    """``json/decoder.py`` -> ``json.decoder``; ``json/__init__.py`` -> ``json``."""
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def iter_stdlib_docstrings(
    root: Path | None = None,
    skip_dirs: frozenset[str] = DEFAULT_SKIP_DIRS,
    on_parse_error: Callable[[Path, Exception], None] | None = None,
    max_files: int | None = None,
) -> Iterator[Document]:
    """Yield one :class:`Document` per module, class and function docstring of the stdlib.

    The source is parsed with :mod:`ast`, never imported, so no stdlib code runs and modules that
    need missing C extensions still contribute. Docstrings come from :func:`ast.get_docstring`
    with ``clean=True``, which applies :func:`inspect.cleandoc` (strip the common indentation
    and leading/trailing blank lines).

    Files that fail to parse or decode are skipped; ``on_parse_error(path, exc)`` is told about
    each so the caller can report them. ``max_files`` stops after that many files, for quick runs.

    Metadata of each document: ``source`` (``"stdlib"``), ``module``, ``qualname`` (Python's own
    ``__qualname__`` convention, so functions nested in functions read ``f.<locals>.g``),
    ``kind`` (``module``, ``class``, ``function`` or ``method``), ``path`` (relative to the stdlib
    root, with ``/``) and ``lineno`` (line of the ``def``/``class``; 1 for modules).
    """
    root = Path(root) if root is not None else stdlib_root()
    for index, path in enumerate(iter_stdlib_files(root, skip_dirs)):
        if max_files is not None and index >= max_files:
            return
        relative = path.relative_to(root)
        try:
            with warnings.catch_warnings():
                # Old stdlib files contain invalid escape sequences that newer parsers warn about.
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            if on_parse_error is not None:
                on_parse_error(path, exc)
            continue
        yield from _docstrings_of(tree, module_name(relative), relative.as_posix())


def _docstrings_of(tree: ast.Module, module: str, rel_path: str) -> Iterator[Document]:
    """Walk one parsed module in source order, yielding each docstring with its qualified name."""

    def make(node: ast.AST, qualname: str, kind: str, lineno: int) -> Document | None:
        text = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if not text:
            return None
        meta = {
            "source": "stdlib",
            "module": module,
            "qualname": qualname,
            "kind": kind,
            "path": rel_path,
            "lineno": lineno,
        }
        return Document(id=f"stdlib:{rel_path}:{lineno}", text=text, meta=meta)

    def visit(body: list[ast.stmt], prefix: str, in_class: bool) -> Iterator[Document]:
        for node in body:
            if isinstance(node, _DEFINITIONS):
                qualname = f"{prefix}.{node.name}"
                if isinstance(node, ast.ClassDef):
                    kind = "class"
                else:
                    kind = "method" if in_class else "function"
                doc = make(node, qualname, kind, node.lineno)
                if doc is not None:
                    yield doc
                if isinstance(node, ast.ClassDef):
                    yield from visit(node.body, qualname, in_class=True)
                else:
                    yield from visit(node.body, f"{qualname}.<locals>", in_class=False)
            else:
                # Definitions inside if/try/with/for blocks (platform-specific code) still count.
                for child_body in _nested_bodies(node):
                    yield from visit(child_body, prefix, in_class)

    doc = make(tree, module, "module", 1)
    if doc is not None:
        yield doc
    yield from visit(tree.body, module, in_class=False)


def _nested_bodies(node: ast.stmt) -> Iterator[list[ast.stmt]]:
    """The statement lists inside a compound statement (``if``, ``try``, ``with``, ...), in order."""
    for name in ("body", "orelse", "finalbody"):
        child = getattr(node, name, None)
        if isinstance(child, list):
            yield child
        if name == "body":
            for handler in getattr(node, "handlers", []) or []:
                yield handler.body
            for case in getattr(node, "cases", []) or []:
                yield case.body
