"""The built-in knowledge base: the standard library's docstrings, and a question set generated from them.

Each docstring (`lmforge.data.stdlib_corpus`) is one document titled with its qualified name: the title
is shown with the passage and indexed by BM25, the docstring alone is embedded. For evaluation, each sampled public
function, method or class gives a query: its docstring's summary sentence with the object's name removed
("Return a list of the words in the string, using sep as the delimiter string."); the relevant document
is that object's. Summaries shared by several objects are left out, since they have no single answer.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from lmforge.data.document import Document

QUESTION_KINDS = ("function", "method", "class")


def stdlib_documents(limit: int | None = None, modules: Sequence[str] | None = None) -> list[Document]:
    """The docstrings as retrieval documents; `modules` keeps only those modules (and their submodules)."""
    from lmforge.data.stdlib_corpus import iter_stdlib_docstrings

    out = []
    for doc in iter_stdlib_docstrings():
        module = doc.meta["module"]
        if modules is not None and not any(module == m or module.startswith(m + ".") for m in modules):
            continue
        meta = doc.meta
        out.append(Document(doc.id, doc.text, {
            "source": f"{meta['path']}:{meta['lineno']}", "title": meta["qualname"], "module": module,
            "qualname": meta["qualname"], "kind": meta["kind"], "sections": []}))  # fmt: skip
        if limit is not None and len(out) >= limit:
            break
    return out


def summary_sentence(docstring: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    paragraph = re.split(r"\n\s*\n", docstring.strip(), maxsplit=1)[0]
    paragraph = " ".join(paragraph.split())
    m = re.search(r"(?<=[.!?])\s", paragraph)
    return paragraph[: m.start()] if m else paragraph


def remove_name(summary: str, qualname: str) -> str:
    """The summary without the object's name: the name alone or dotted (`json.dumps`, `Class.method`),
    with call parentheses and quotes, case-insensitively."""
    parts = [p for p in qualname.split(".") if p and p != "<locals>"]
    names = [".".join(parts[i:]) for i in range(len(parts))]  # the dotted tails all end with the name
    text = summary
    for name in sorted(set(names), key=len, reverse=True):
        text = re.sub(rf"[`'\"]*\b{re.escape(name)}\b(\(\))?[`'\"]*", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"\s+([.,;:!?)])", r"\1", " ".join(text.split()))
    return text.strip(" ,;:-")


def stdlib_questions(
    documents: Iterable[Document], n: int | None = 200, seed: int = 0, min_words: int = 5
) -> list[dict[str, Any]]:
    """Up to `n` questions {query, relevant: [doc id], qualname, summary}, sampled with `seed`."""
    candidates = []
    for doc in documents:
        meta = doc.meta
        if meta.get("kind") not in QUESTION_KINDS:
            continue
        if any(part.startswith("_") for part in meta["qualname"].split(".")):
            continue  # private names and dunder methods
        summary = summary_sentence(doc.text)
        query = remove_name(summary, meta["qualname"])
        if len(query.split()) >= min_words:
            candidates.append((doc, summary, query))
    counts = Counter(q.lower() for _, _, q in candidates)
    unique = [(d, s, q) for d, s, q in candidates if counts[q.lower()] == 1]
    rng = random.Random(seed)
    chosen = unique if n is None or n >= len(unique) else rng.sample(unique, n)
    return [
        {"query": q, "relevant": [d.id], "qualname": d.meta["qualname"], "summary": s} for d, s, q in chosen
    ]
