"""Data curation: read corpora, clean, filter, deduplicate, scrub PII, decontaminate and split.

The one-call entry point is :func:`prepare` (what ``lmforge data prepare`` runs)::

    from lmforge.data import PrepareConfig, prepare

    report = prepare(PrepareConfig(inputs=["builtin:stdlib"], output_dir="out/data"))
    print(report.documents_out, report.splits["train"].documents)

Each stage is also usable on its own: :func:`clean_text`, :class:`QualityChecker`,
:class:`ExactDeduplicator`, :class:`NearDeduplicator`, :func:`scrub_pii`,
:class:`Decontaminator`, :func:`assign_split`, and the streaming readers
:func:`iter_documents` / :func:`iter_stdlib_docstrings`. See ``docs/data.md``.
"""

from .clean import clean_text
from .decontam import Decontaminator
from .dedup import ExactDeduplicator, NearDeduplicator, text_hash
from .document import Document
from .errors import DataError, ErrorLog
from .pii import scrub_pii
from .pipeline import DedupConfig, PrepareConfig, prepare
from .quality import QualityChecker, QualityConfig, Rejection
from .readers import STDLIB_SOURCE, iter_documents, iter_jsonl, iter_parquet, iter_text_file
from .report import Report
from .split import assign_split
from .stdlib_corpus import iter_stdlib_docstrings

__all__ = [
    "STDLIB_SOURCE",
    "DataError",
    "DedupConfig",
    "Decontaminator",
    "Document",
    "ErrorLog",
    "ExactDeduplicator",
    "NearDeduplicator",
    "PrepareConfig",
    "QualityChecker",
    "QualityConfig",
    "Rejection",
    "Report",
    "assign_split",
    "clean_text",
    "iter_documents",
    "iter_jsonl",
    "iter_parquet",
    "iter_stdlib_docstrings",
    "iter_text_file",
    "prepare",
    "scrub_pii",
    "text_hash",
]
