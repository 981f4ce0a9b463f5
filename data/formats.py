"""File formats the data sources read, one reader per format, registered by file suffix.

A reader turns one file into a `RawFile`: its columns (a CSV header, a Parquet schema; None
when every record names its own fields, as in JSONL) and its rows, each with where it is in
the file and its fields, or why it could not be read. Deciding what is a good example (text,
label, types) is data/sources.py's job; a reader only reports what the file holds.

Where a row is: "line N" (JSONL, plain text: the physical line, 1-based), "row N" (CSV: 1-based
with the header as row 1, so the line of an ordinary CSV; Parquet: the record, 1-based).
Blank lines are not rows. A file that is not UTF-8 is refused whole (a BOM is allowed).

Adding a format is one reader function and one `register` call below.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from data.records import DataError


@dataclass(frozen=True)
class RawRow:
    where: str  # "line 7", "row 3"
    fields: Mapping[str, Any] | None  # None: the row could not be read (reason, problem say why)
    reason: str = ""
    problem: str = ""


@dataclass(frozen=True)
class RawFile:
    columns: tuple[str, ...] | None
    rows: list[RawRow]


# a reader: (path, the columns the load wants: text first) -> RawFile; raises DataError for the whole file
Reader = Callable[[Path, Sequence[str]], RawFile]


@dataclass(frozen=True)
class Format:
    name: str
    suffixes: tuple[str, ...]
    read: Reader
    labelled: bool  # can hold a label column (plain text cannot)


FORMATS: dict[str, Format] = {}  # suffix -> format


def register(fmt: Format) -> Format:
    for s in fmt.suffixes:
        FORMATS[s] = fmt
    return fmt


def format_of(path: Path) -> Format | None:
    return FORMATS.get(path.suffix.lower())


def suffixes(labelled: bool | None = None) -> list[str]:
    return sorted(s for s, f in FORMATS.items() if labelled is None or f.labelled == labelled)


def read_utf8(path: Path) -> str:
    """The file's text; DataError("encoding") naming the line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError("encoding", f"byte 0x{data[e.start]:02x} is not UTF-8: save the file as UTF-8 "
                        "(e.g. `iconv -f latin1 -t utf-8`)", path=path, where=f"line {line}") from None


def _lines(text: str):
    """(1-based line number, line) of the non-blank lines. Split on \\n only: JSON strings may
    hold other line separators (U+2028) raw."""
    for i, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if line.strip():
            yield i, line


def read_jsonl(path: Path, columns: Sequence[str]) -> RawFile:
    rows = []
    for i, line in _lines(read_utf8(path)):
        where = f"line {i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append(RawRow(where, None, "malformed_row", f"is not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            rows.append(RawRow(where, None, "malformed_row", f"is a JSON {type(obj).__name__}, not an object "
                               "like {\"text\": ..., \"label\": ...}"))
            continue
        rows.append(RawRow(where, obj))
    return RawFile(None, rows)


def read_csv(path: Path, columns: Sequence[str]) -> RawFile:
    reader = csv.reader(io.StringIO(read_utf8(path), newline=""))
    header: list[str] | None = None
    rows: list[RawRow] = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            rows.append(RawRow(f"row {start}", None, "malformed_row", f"is not valid CSV ({e})"))
            continue
        if not fields:
            continue  # a blank line
        if header is None:
            header = [h.strip() for h in fields]
            continue
        if len(fields) != len(header):
            rows.append(RawRow(f"row {start}", None, "malformed_row",
                               f"has {len(fields)} fields where the header has {len(header)} "
                               "(a text with commas needs double quotes)"))
            continue
        rows.append(RawRow(f"row {start}", dict(zip(header, fields))))
    return RawFile(tuple(header) if header is not None else (), rows)


def read_text(path: Path, columns: Sequence[str]) -> RawFile:
    """Plain text, one document per line (for language modelling): the line is the text column."""
    return RawFile(None, [RawRow(f"line {i}", {columns[0]: line}) for i, line in _lines(read_utf8(path))])


def read_parquet(path: Path, columns: Sequence[str]) -> RawFile:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("missing_dependency", "reading Parquet needs pyarrow: pip install pyarrow "
                        "(or give the data as CSV or JSONL)", path=path) from None
    try:
        names = tuple(pq.read_schema(path).names)
        table = pq.read_table(path, columns=[c for c in dict.fromkeys(columns) if c in names])
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError derive from these
        raise DataError("malformed_file", f"is not a readable Parquet file ({e})", path=path) from None
    return RawFile(names, [RawRow(f"row {i}", r) for i, r in enumerate(table.to_pylist(), 1)])


register(Format("csv", (".csv",), read_csv, labelled=True))
register(Format("jsonl", (".jsonl", ".ndjson"), read_jsonl, labelled=True))
register(Format("parquet", (".parquet", ".pq"), read_parquet, labelled=True))
register(Format("text", (".txt",), read_text, labelled=False))
