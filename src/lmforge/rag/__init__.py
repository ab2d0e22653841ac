"""Retrieval-augmented generation: ingest documents, chunk them, index them (BM25 + dense), retrieve, and
answer with citations, abstention and a groundedness check.

    from lmforge.rag import Index, ask, load_documents
    index = Index.create("my-index")                 # all-MiniLM-L6-v2 embeddings, exact FAISS search
    index.add_documents(load_documents(["docs/"]))
    index.save()
    print(ask(index, "How do I configure logging?").text)

Names load on first use (PEP 562), so `lmforge --help` does not import numpy, torch, faiss or bm25s.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Answer": "answer",
    "Citation": "answer",
    "Generator": "answer",
    "ask": "answer",
    "check_groundedness": "answer",
    "Chunk": "chunking",
    "chunk_document": "chunking",
    "evaluate": "evaluate",
    "read_qa": "evaluate",
    "Hit": "index",
    "Index": "index",
    "IndexMismatchError": "index",
    "RagIndexError": "index",
    "load_documents": "ingest",
    "summarize": "summarize",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmforge.rag' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lmforge.rag.{_EXPORTS[name]}"), name)
