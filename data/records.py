"""What the data sources hand out (data/sources.py): labelled texts, the result of a load, and
the one error family for data that must not train.

No I/O here: the readers (data/formats.py) and the demos (data/demos.py) build these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LabelledText:
    """One example. `label` indexes the label names of the load (None: text only, for language
    modelling); `domain` is where it came from (a domain column, the demo's domain, or the file);
    `uid` is stable across processes ("<domain>:<id>"), so that hash splits agree everywhere."""

    text: str
    label: int | None
    label_name: str | None
    domain: str
    uid: str


class DataError(ValueError):
    """Data that must not train. `reason` is a short machine-readable code (missing_file,
    encoding, unsupported_format, missing_column, empty, unknown_label, malformed_row,
    empty_text, bad_type, invalid_row, too_many_bad_rows, unknown_demo); `path` the file (or
    demo) and `where` the line or row ("line 7", "row 3") when one row is at fault. The message
    names both and says what to do."""

    def __init__(self, reason: str, message: str, *, path: str | Path | None = None, where: str | None = None) -> None:
        self.reason = reason
        self.path = str(path) if path is not None else None
        self.where = where
        at = ", ".join(x for x in (self.path, where) if x)
        super().__init__(f"{at}: {message}" if at else message)


@dataclass(frozen=True)
class BadRow:
    """A row that was refused (or skipped, within max_bad_rows): file, line or row, why."""

    path: str
    where: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}, {self.where}: {self.message}"

    def error(self) -> DataError:
        return DataError(self.reason, self.message, path=self.path, where=self.where)


@dataclass(frozen=True)
class LoadedData:
    """The examples of one source, in source order, with the label names in index order (as
    given, or as read from the data) and the bad rows that were skipped (max_bad_rows > 0)."""

    source: str
    examples: tuple[LabelledText, ...]
    labels: tuple[str, ...] | None  # None for a text-only load
    skipped: tuple[BadRow, ...] = ()
    files: tuple[Path, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)
