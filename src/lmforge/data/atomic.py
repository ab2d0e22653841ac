"""Writing files so that a crash never leaves a half-written one behind.

Each file is written under a temporary name in the destination folder and moved into place with
:func:`os.replace`, which is atomic on POSIX and Windows when source and destination are on the
same file system. Readers see either the old file or the complete new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any


def _temp_file(path: Path) -> tuple[int, Path]:
    """Create a hidden temporary file next to ``path`` with the permissions a plain ``open`` would
    give (``mkstemp`` makes files private, 0600, which would surprise whoever shares the output)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, Path(tmp)


class AtomicFile:
    """A file (text, or bytes with binary=True) that appears under its final name only after
    :meth:`commit`.

    Use as a context manager: leaving the block normally commits, an exception discards the
    temporary file.
    """

    def __init__(self, path: str | Path, binary: bool = False) -> None:
        self.path = Path(path)
        fd, self.tmp_path = _temp_file(self.path)
        self.handle: IO = (
            os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        )
        self._done = False

    def write(self, data: str | bytes) -> None:
        self.handle.write(data)

    def commit(self) -> None:
        """Flush to disk and move into place."""
        if self._done:
            return
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp_path, self.path)
        self._done = True

    def abort(self) -> None:
        """Discard the temporary file; the destination is left as it was."""
        if self._done:
            return
        self.handle.close()
        self.tmp_path.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a whole text file atomically."""
    with AtomicFile(path) as out:
        out.write(text)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write a whole binary file atomically."""
    with AtomicFile(path, binary=True) as out:
        out.write(data)


def json_line(record: dict[str, Any]) -> str:
    """One JSONL line; values JSON cannot represent (dates from Parquet, ...) become strings."""
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"
