"""The data-preparation pipeline behind ``lmforge data prepare``.

Documents stream through the stages one at a time, so memory grows with the number of documents
kept (for the deduplication indexes), not with their size::

    read -> clean -> exact dedup -> quality filters -> near dedup -> decontaminate
         -> scrub PII -> split -> train.jsonl / validation.jsonl / test.jsonl

Cheap stages run first so the expensive ones (MinHash, n-gram lookups) see fewer documents.
Deduplication runs before PII scrubbing, so two documents that differ only in an e-mail address
are not merged; PII is scrubbed last, so its counts describe exactly what is written.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .atomic import AtomicFile, json_line
from .clean import clean_text
from .decontam import Decontaminator
from .dedup import ExactDeduplicator, NearDeduplicator
from .errors import DataError, ErrorLog
from .pii import scrub_pii
from .quality import QualityChecker, QualityConfig
from .readers import STDLIB_SOURCE, iter_documents
from .report import Report, SplitReport
from .split import DEFAULT_SPLITS, assign_split, validate_fractions


@dataclass
class DedupConfig:
    """Deduplication settings; see :mod:`lmforge.data.dedup`."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # Jaccard similarity of shingle sets
    num_perm: int = 128
    ngram: int = 5  # words per shingle
    seed: int = 1


@dataclass
class PrepareConfig:
    """Everything :func:`prepare` needs. Build it in Python or with :meth:`from_dict` from YAML.

    ``inputs`` are files, folders (searched recursively for .txt/.md/.rst/.jsonl/.parquet) or
    ``"builtin:stdlib"``, the embedded corpus of standard-library docstrings (the default).
    """

    inputs: list[str] = field(default_factory=lambda: [STDLIB_SOURCE])
    output_dir: str = "out/data"
    text_field: str = "text"
    on_error: str = "fail"  # "skip": count and report bad records instead of stopping
    max_documents: int | None = None  # stop after reading this many (quick trials)
    keep_indentation: bool = True
    quality_filter: bool = True
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    scrub_pii: bool = True
    #: evaluation files or folders; training documents sharing a word n-gram with them are dropped
    decontaminate: list[str] = field(default_factory=list)
    decontaminate_ngram: int = 13
    #: field of evaluation JSONL/Parquet records to read; None reads every string field
    eval_text_field: str | None = None
    splits: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLITS))
    split_seed: str = ""
    #: also write rejected.jsonl with every removed document and the reason
    write_rejected: bool = False
    max_examples: int = 3
    example_chars: int = 200
    progress: bool | None = None  # None: show a progress bar only on a terminal

    def validate(self) -> None:
        """Raise :class:`DataError` for settings that cannot work, before any file is touched."""
        if self.on_error not in ("skip", "fail"):
            raise DataError(f"on_error must be 'skip' or 'fail', got {self.on_error!r}")
        if not self.inputs:
            raise DataError("no inputs given")
        try:
            validate_fractions(self.splits)
        except ValueError as exc:
            raise DataError(f"splits: {exc}") from exc
        if not 0.0 < self.dedup.threshold <= 1.0:
            raise DataError(f"dedup.threshold must be in (0, 1], got {self.dedup.threshold}")
        if self.max_documents is not None and self.max_documents < 0:
            raise DataError(f"max_documents must be >= 0, got {self.max_documents}")
        output = Path(self.output_dir).resolve()
        for item in self.inputs:
            if item != STDLIB_SOURCE and Path(item).is_dir() and output.is_relative_to(Path(item).resolve()):
                raise DataError(
                    f"{self.output_dir}: the output folder is inside the input folder {item}; "
                    "a second run would read the first run's shards as input"
                )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrepareConfig:
        """Build from a mapping such as the ``data:`` section of a YAML config.

        Unknown keys raise :class:`DataError` naming them, so a typo does not silently fall back
        to a default. A single string is accepted where a list of paths is expected.
        """
        _reject_unknown(cls, data, "data")
        values = dict(data)
        if "quality" in values and isinstance(values["quality"], dict):
            try:
                values["quality"] = QualityConfig.from_dict(values["quality"])
            except ValueError as exc:
                raise DataError(str(exc)) from exc
        if "dedup" in values and isinstance(values["dedup"], dict):
            _reject_unknown(DedupConfig, values["dedup"], "dedup")
            values["dedup"] = DedupConfig(**values["dedup"])
        for key in ("inputs", "decontaminate"):
            if isinstance(values.get(key), (str, Path)):
                values[key] = [values[key]]
        for key in ("inputs", "decontaminate"):
            if key in values:
                values[key] = [str(v) for v in values[key]]
        if "output_dir" in values:
            values["output_dir"] = str(values["output_dir"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reject_unknown(cls: type, data: dict[str, Any], section: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DataError(
            f"unknown {section} setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


STAGES = {
    "cleaning": "Unicode NFC, control characters removed, whitespace normalised; documents that end up "
    "empty are removed.",
    "exact_dedup": "SHA-256 of the case-folded, whitespace-collapsed text; later copies are removed.",
    "quality": "Heuristic quality filters after the Gopher rules; the reason is the first filter failed.",
    "near_dedup": "MinHash + LSH over word shingles; later documents at or above the Jaccard threshold "
    "of a kept one are removed.",
    "decontamination": "Documents sharing a word n-gram with the evaluation files are removed.",
    "pii": "E-mails, phone numbers, IP addresses, Luhn-valid card numbers and US SSNs replaced by "
    "typed placeholders (documents are changed, not removed).",
}


def prepare(config: PrepareConfig | dict[str, Any]) -> Report:
    """Run the whole pipeline: read, clean, filter, deduplicate, decontaminate, scrub, split, write.

    Writes ``<split>.jsonl`` for every split (records ``{"id", "text", "meta"}``), ``report.json``,
    ``report.md`` and ``length_histogram.png`` into ``config.output_dir`` (and ``rejected.jsonl``
    with ``write_rejected``). Every file appears atomically; if anything fails, no new shard is
    left behind. Returns the :class:`Report`.
    """
    if not isinstance(config, PrepareConfig):
        config = PrepareConfig.from_dict(dict(config))
    config.validate()
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    report = Report(
        inputs=list(config.inputs),
        output_dir=str(output_dir),
        config=config.to_dict(),
        max_examples=config.max_examples,
        example_chars=config.example_chars,
    )
    if STDLIB_SOURCE in config.inputs:
        report.notes.append(
            f"{STDLIB_SOURCE}: docstrings of the Python {sys.version.split()[0]} standard library."
        )
    errors = ErrorLog(config.on_error, max_examples=config.max_examples)

    decontaminator = _build_decontaminator(config, errors, report)
    enabled = {
        "cleaning": True,
        "exact_dedup": config.dedup.exact,
        "quality": config.quality_filter,
        "near_dedup": config.dedup.near,
        "decontamination": decontaminator is not None,
        "pii": config.scrub_pii,
    }
    for name, on in enabled.items():
        if on:
            report.stage(name, STAGES[name])
    quality = QualityChecker(config.quality) if config.quality_filter else None
    exact = ExactDeduplicator() if config.dedup.exact else None
    near = (
        NearDeduplicator(config.dedup.threshold, config.dedup.num_perm, config.dedup.ngram, config.dedup.seed)
        if config.dedup.near
        else None
    )

    shards = {name: AtomicFile(output_dir / f"{name}.jsonl") for name in config.splits}
    for name, shard in shards.items():
        report.splits[name] = SplitReport(path=str(shard.path))
    rejected = AtomicFile(output_dir / "rejected.jsonl") if config.write_rejected else None
    all_files = [*shards.values(), *([rejected] if rejected else [])]

    def reject(
        stage: str, reason: str, doc_id: str, text: str, meta: dict[str, Any], detail: str = ""
    ) -> None:
        report.removed(stage, reason, doc_id, text, detail)
        if rejected is not None:
            record = {
                "id": doc_id,
                "stage": stage,
                "reason": reason,
                "detail": detail,
                "text": text,
                "meta": meta,
            }
            rejected.write(json_line(record))

    documents = iter_documents(config.inputs, config.text_field, errors, report.ignored_files)
    try:
        progress = tqdm(
            documents, desc="data prepare", unit="doc", disable=_progress_disabled(config.progress)
        )
        for doc in progress:
            if config.max_documents is not None and report.documents_in >= config.max_documents:
                report.stopped_early = True
                break
            report.documents_in += 1
            report.chars_in += len(doc.text)
            report.lengths_in.append(len(doc.text))

            text = clean_text(doc.text, keep_indentation=config.keep_indentation)
            if text != doc.text:
                report.stages["cleaning"].modified_documents += 1
            if not text.strip():
                reject("cleaning", "empty_after_cleaning", doc.id, doc.text, doc.meta)
                continue
            if exact is not None and (earlier := exact.check(doc.id, text)) is not None:
                reject("exact_dedup", "exact_duplicate", doc.id, text, doc.meta, f"duplicate of {earlier}")
                continue
            if quality is not None and (failed := quality.check(text)) is not None:
                reject("quality", failed.filter, doc.id, text, doc.meta, str(failed))
                continue
            if near is not None and (match := near.check(doc.id, text)) is not None:
                detail = f"similar to {match.of} (estimated Jaccard {match.similarity:.2f})"
                reject("near_dedup", "near_duplicate", doc.id, text, doc.meta, detail)
                continue
            if decontaminator is not None and (source := decontaminator.check(text)) is not None:
                detail = f"shares a {decontaminator.n}-gram with {source}"
                reject("decontamination", "eval_overlap", doc.id, text, doc.meta, detail)
                continue
            if config.scrub_pii:
                text, counts = scrub_pii(text)
                if counts:
                    report.stages["pii"].modified_documents += 1
                    for kind, count in counts.items():
                        report.pii[kind] = report.pii.get(kind, 0) + count

            split = assign_split(text, config.splits, config.split_seed)
            shards[split].write(json_line({"id": doc.id, "text": text, "meta": doc.meta}))
            report.splits[split].documents += 1
            report.splits[split].chars += len(text)
            report.documents_out += 1
            report.chars_out += len(text)
            report.lengths_out.append(len(text))
        progress.close()
        for shard in all_files:
            shard.commit()
    except BaseException:
        for shard in all_files:
            shard.abort()
        raise
    finally:
        documents.close()  # closes the file being read when max_documents stopped us early

    report.read_errors = errors.count
    report.read_error_examples = list(errors.examples)
    if rejected is not None:
        report.files["rejected"] = str(rejected.path)
    for name, split in report.splits.items():
        report.files[name] = split.path
    report.seconds = time.perf_counter() - started
    report.write(output_dir)
    return report


def _progress_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: ``None`` lets tqdm hide the bar when output is not a terminal."""
    return None if progress is None else not progress


def _build_decontaminator(config: PrepareConfig, errors: ErrorLog, report: Report) -> Decontaminator | None:
    """Index the evaluation files' n-grams, or return ``None`` when there are none to check."""
    if not config.decontaminate:
        return None
    decontaminator = Decontaminator(config.decontaminate_ngram)
    for doc in iter_documents(config.decontaminate, config.eval_text_field, errors):
        decontaminator.add_eval_text(doc.text, doc.id)
    report.decontamination_sources = {
        "evaluation documents": decontaminator.eval_documents,
        f"distinct {decontaminator.n}-grams": decontaminator.ngram_count,
    }
    return decontaminator
