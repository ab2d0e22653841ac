"""The curation report: what came in, what each stage removed and why, what went out.

Every removed document is counted under its stage and reason, with the first few kept as
examples, so the numbers always add up: ``documents_in = read + removed by stages + written``,
and a surprising filter can be spotted by reading its examples.
"""

from __future__ import annotations

import io
import json
from array import array
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from .atomic import write_bytes_atomic, write_text_atomic

_NOT_SERIALISED = frozenset({"lengths_in", "lengths_out", "max_examples", "example_chars"})


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


@dataclass
class Example:
    """A removed (or changed) document, shortened for the report."""

    id: str
    detail: str
    text: str


@dataclass
class ReasonStats:
    """Documents removed for one reason (a quality filter's name, ``exact_duplicate``, ...)."""

    documents: int = 0
    chars: int = 0
    examples: list[Example] = field(default_factory=list)


@dataclass
class StageReport:
    """One pipeline stage: how many documents it removed, per reason, and how many it changed."""

    name: str
    description: str
    removed_documents: int = 0
    removed_chars: int = 0
    modified_documents: int = 0
    reasons: dict[str, ReasonStats] = field(default_factory=dict)


@dataclass
class SplitReport:
    path: str
    documents: int = 0
    chars: int = 0


@dataclass
class Report:
    """Returned by :func:`lmforge.data.prepare` and written as ``report.json`` / ``report.md``."""

    inputs: list[str]
    output_dir: str
    documents_in: int = 0
    chars_in: int = 0
    documents_out: int = 0
    chars_out: int = 0
    read_errors: int = 0
    read_error_examples: list[str] = field(default_factory=list)
    #: whole files passed over, as "path: reason"
    ignored_files: list[str] = field(default_factory=list)
    stopped_early: bool = False
    stages: dict[str, StageReport] = field(default_factory=dict)
    pii: dict[str, int] = field(default_factory=dict)
    splits: dict[str, SplitReport] = field(default_factory=dict)
    decontamination_sources: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    max_examples: int = 3
    example_chars: int = 200
    # Lengths (characters) of every document read and written, for the histogram; not serialised.
    lengths_in: array = field(default_factory=lambda: array("q"), repr=False)
    lengths_out: array = field(default_factory=lambda: array("q"), repr=False)

    def stage(self, name: str, description: str) -> StageReport:
        """The report of stage ``name``, created on first use (stages appear in pipeline order)."""
        if name not in self.stages:
            self.stages[name] = StageReport(name, description)
        return self.stages[name]

    def removed(self, stage: str, reason: str, doc_id: str, text: str, detail: str = "") -> None:
        """Count one document removed by ``stage`` for ``reason``; keep it as an example if among
        the first :attr:`max_examples` for that reason."""
        report = self.stages[stage]
        report.removed_documents += 1
        report.removed_chars += len(text)
        stats = report.reasons.setdefault(reason, ReasonStats())
        stats.documents += 1
        stats.chars += len(text)
        if len(stats.examples) < self.max_examples:
            stats.examples.append(Example(doc_id, detail or reason, self.shorten(text)))

    def shorten(self, text: str) -> str:
        if len(text) <= self.example_chars:
            return text
        return text[: self.example_chars] + f"… [{len(text) - self.example_chars} more chars]"

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (the per-document length arrays are left out)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in _NOT_SERIALISED}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n"

    def to_markdown(self) -> str:
        """A human-readable summary; the JSON file has the same numbers for scripts."""
        lines = [
            "# Data preparation report",
            "",
            f"Inputs: {', '.join(f'`{i}`' for i in self.inputs)}  ",
            f"Output: `{self.output_dir}`  ",
            f"Time: {self.seconds:.1f} s",
            "",
            "| | documents | characters |",
            "|---|---:|---:|",
            f"| read | {self.documents_in:,} | {self.chars_in:,} |",
        ]
        for stage in self.stages.values():
            if stage.removed_documents:
                lines.append(
                    f"| removed by {stage.name} | {stage.removed_documents:,} | {stage.removed_chars:,} |"
                )
        lines.append(f"| **written** | **{self.documents_out:,}** | **{self.chars_out:,}** |")
        lines += ["", "Written characters are counted after cleaning and PII scrubbing.", ""]
        if self.stopped_early:
            lines += ["Reading stopped early at `max_documents`.", ""]
        for note in self.notes:
            lines += [f"- {note}"]
        if self.notes:
            lines.append("")

        lines += ["## Splits", "", "| split | file | documents | characters |", "|---|---|---:|---:|"]
        for name, split in self.splits.items():
            lines.append(f"| {name} | `{Path(split.path).name}` | {split.documents:,} | {split.chars:,} |")
        lines.append("")

        if self.read_errors or self.ignored_files:
            lines += ["## Input problems", ""]
            if self.read_errors:
                lines.append(f"{self.read_errors} bad record(s) skipped (`on_error: skip`). First ones:")
                lines += ["", *[f"- `{e}`" for e in self.read_error_examples], ""]
            if self.ignored_files:
                lines.append(f"{len(self.ignored_files)} file(s) were passed over (all in report.json):")
                lines += ["", *[f"- `{f}`" for f in self.ignored_files[: self.max_examples]], ""]

        lines += ["## Stages", ""]
        for stage in self.stages.values():
            lines += [f"### {stage.name}", "", stage.description, ""]
            summary = f"Removed {stage.removed_documents:,} document(s), {stage.removed_chars:,} characters"
            if stage.modified_documents:
                summary += f"; changed {stage.modified_documents:,} document(s)"
            lines += [summary + ".", ""]
            if stage.reasons:
                lines += ["| reason | documents | characters |", "|---|---:|---:|"]
                for reason, stats in sorted(stage.reasons.items(), key=lambda kv: -kv[1].documents):
                    lines.append(f"| {reason} | {stats.documents:,} | {stats.chars:,} |")
                lines.append("")
                for reason, stats in stage.reasons.items():
                    for example in stats.examples:
                        text = example.text.replace("\n", "⏎ ").replace("`", "'")
                        lines.append(f"- **{reason}** `{example.id}` ({example.detail}): `{text}`")
                lines.append("")

        if self.pii:
            lines += ["## PII replaced", "", "| type | replacements |", "|---|---:|"]
            lines += [f"| {kind} | {count:,} |" for kind, count in sorted(self.pii.items())]
            lines.append("")
        if self.decontamination_sources:
            lines += ["## Decontamination index", ""]
            lines += [f"- {name}: {count:,}" for name, count in self.decontamination_sources.items()]
            lines.append("")
        return "\n".join(lines)

    def histogram_png(self) -> bytes:
        """PNG of the document length distribution, read vs. written, on a log scale.

        Uses matplotlib's object API with the Agg canvas directly, so it neither needs a display
        nor changes the process-wide backend of an interactive session.
        """
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        lengths_in = np.frombuffer(self.lengths_in, dtype=np.int64) if len(self.lengths_in) else np.zeros(0)
        lengths_out = (
            np.frombuffer(self.lengths_out, dtype=np.int64) if len(self.lengths_out) else np.zeros(0)
        )
        largest = max(int(lengths_in.max(initial=1)), int(lengths_out.max(initial=1)), 10)
        bins = np.logspace(0, np.log10(largest + 1), 50)
        ax.hist(
            np.maximum(lengths_in, 1),
            bins=bins,
            histtype="step",
            linewidth=1.5,
            label=f"read ({len(lengths_in):,} docs)",
        )
        ax.hist(
            np.maximum(lengths_out, 1),
            bins=bins,
            histtype="stepfilled",
            alpha=0.5,
            label=f"written ({len(lengths_out):,} docs)",
        )
        ax.set_xscale("log")
        ax.set_xlabel("document length (characters, log scale)")
        ax.set_ylabel("documents")
        ax.set_title("Document length distribution")
        ax.legend()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        return buffer.getvalue()

    def write(self, output_dir: str | Path) -> dict[str, str]:
        """Write ``report.json``, ``report.md`` and ``length_histogram.png`` atomically."""
        output_dir = Path(output_dir)
        paths = {
            "report_json": output_dir / "report.json",
            "report_md": output_dir / "report.md",
            "length_histogram": output_dir / "length_histogram.png",
        }
        self.files.update({key: str(path) for key, path in paths.items()})
        write_bytes_atomic(paths["length_histogram"], self.histogram_png())
        write_text_atomic(paths["report_md"], self.to_markdown())
        write_text_atomic(paths["report_json"], self.to_json())
        return dict(self.files)
