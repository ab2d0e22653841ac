"""Errors raised by the data pipeline and the log that applies the ``on_error`` policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

OnError = Literal["skip", "fail"]


class DataError(ValueError):
    """Bad input data or configuration; the message always names the file (and line when known)."""


def location(path: object, line: int | None = None) -> str:
    """Format ``path:line`` the way compilers do, so editors can jump to it."""
    return f"{path}:{line}" if line is not None else str(path)


@dataclass
class ErrorLog:
    """Collects bad records according to the ``on_error`` policy.

    With ``fail`` the first bad record raises :class:`DataError`. With ``skip`` the record is
    dropped, but it is counted and the first few messages are kept for the report, so that
    nothing disappears without a trace.
    """

    policy: OnError = "fail"
    max_examples: int = 3
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in ("skip", "fail"):
            raise DataError(f"on_error must be 'skip' or 'fail', got {self.policy!r}")

    def record(self, path: object, line: int | None, message: str) -> None:
        """Report one bad record: raise under ``fail``, count and remember under ``skip``."""
        text = f"{location(path, line)}: {message}"
        if self.policy == "fail":
            raise DataError(text)
        self.count += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(text)
