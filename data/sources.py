"""Where data comes from: one registry of sources for agent, aggregator and simulator alike.

    load_source("mine.csv", labels=["negative", "positive"])      # a file
    load_source("data/shards/")                                    # a folder: its files, sorted
    load_source("demo:vader", split="train")                       # a shipped demo, by name
    load_source("notes.txt", text_only=True)                       # text for language modelling

A source is a CSV, JSONL or Parquet file or a folder of them (data/formats.py has the readers,
one per format), or `demo:NAME` (data/demos.py). Labelled rows need a text and a label column
(`text_column`, `label_column`: default `text` / `label`); optional `domain` and `id` columns
give each example its domain and uid. A text-only load (split mode) reads the text column, and
also plain-text files (.txt, one document per line).

Labels are names. `labels` (the ordered list a fleet agreed on) maps each row's label to its
index; a row whose label is not in it is bad. An integer label 0..K-1 that is not itself a name
is taken as an index. `labels=None` reads them from the data: integer labels (every one a
non-negative integer) name the classes "0".."max"; otherwise the distinct names, sorted. The
result says which (`LoadedData.labels`).

Bad data never trains. A file that is missing, not UTF-8, of an unknown format, without a
needed column or without any row is refused whole. A bad row (not JSON, wrong field count,
empty text, a text or label of the wrong type, a label not in the list) refuses the file at the
first one with the default `max_bad_rows=0`; with N > 0 up to N bad rows of the source are
skipped, each logged with its file and line and counted in `LoadedData.skipped`, and the
(N+1)-th refuses it. Every refusal is a `DataError` with a `reason`, the file and the line.

Held-out split: `split="train"` / `"test"` keep the examples whose uid hashes below / at or
above the source's test fraction (a demo's own, HOLDOUT_FRACTION for files), the same on
every process and independent of order and seed.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

from data.demos import DEMOS
from data.formats import FORMATS, RawRow, format_of, suffixes
from data.records import BadRow, DataError, LabelledText, LoadedData

log = logging.getLogger("edgetune.data")

DEMO_PREFIX = "demo:"
HOLDOUT_FRACTION = 0.2  # a file's fixed held-out fraction (the simulator's evaluation split)
DOMAIN_COLUMN = "domain"
ID_COLUMN = "id"
_INT = re.compile(r"[0-9]+")

Split = Literal["train", "test"]


# -- the held-out split -----------------------------------------------------------------------


def in_test(uid: str, test_fraction: float) -> bool:
    """Whether an example belongs to the fixed held-out split (a hash of its uid)."""
    h = int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big")
    return h / 2**64 < test_fraction


def split_examples(examples: Iterable[LabelledText], test_fraction: float) -> tuple[list[LabelledText], list[LabelledText]]:
    """(train, test) in source order."""
    train, test = [], []
    for e in examples:
        (test if in_test(e.uid, test_fraction) else train).append(e)
    return train, test


def holdout_split(examples: Iterable[LabelledText], fraction: float) -> tuple[list[LabelledText], list[LabelledText]]:
    """(train, held out) of an agent's own examples, in their order: its held-out slice for federated
    evaluation, which it never trains on. A hash of each uid with its own salt, so the slice is
    the same on every run and process, and independent of a source's test split (a demo's
    training split still gives its agents a held-out slice)."""
    train, held = [], []
    for e in examples:
        (held if fraction > 0 and in_test("holdout:" + e.uid, fraction) else train).append(e)
    return train, held


def test_fraction_of(spec: str | Path) -> float:
    return DEMOS[_demo_name(spec)].test_fraction if is_demo(spec) else HOLDOUT_FRACTION


# -- what a spec names ------------------------------------------------------------------------


def is_demo(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.startswith(DEMO_PREFIX)


def _demo_name(spec: str) -> str:
    name = spec[len(DEMO_PREFIX):]
    if name not in DEMOS:
        raise DataError("unknown_demo", f"no demo data set {name!r}: choose one of "
                        f"{', '.join(DEMO_PREFIX + n for n in DEMOS)}, or give a file or folder", path=spec)
    return name


def files_of(spec: str | Path, *, text_only: bool = False) -> list[Path]:
    """The file, or the data files of a folder (not recursive, hidden files skipped; plain-text files
    only for a text-only load), sorted by name."""
    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                       and (fmt := format_of(f)) is not None and (text_only or fmt.labelled))
        if not files:
            raise DataError("empty", f"folder holds no data files ({', '.join(suffixes(None if text_only else True))}): "
                            "put the data files in it, or give a file", path=p)
        return files
    if not p.exists():
        raise DataError("missing_file", "does not exist: check the path, or name a demo "
                        f"({', '.join(DEMO_PREFIX + n for n in DEMOS)})", path=p)
    if format_of(p) is None:
        raise DataError("unsupported_format", f"is not a data file this loader reads: use {', '.join(suffixes(True))}"
                        f" (or {', '.join(suffixes(False))} for text only)", path=p)
    return [p]


# -- loading ----------------------------------------------------------------------------------


def load_source(
    spec: str | Path,
    *,
    labels: Sequence[str] | None = None,
    text_column: str = "text",
    label_column: str = "label",
    max_bad_rows: int = 0,
    text_only: bool = False,
    split: Split | None = None,
    domain: str | None = None,
    domain_column: str = DOMAIN_COLUMN,
    check: Callable[[LabelledText], Any] | None = None,
) -> LoadedData:
    """The examples of a file, folder or `demo:NAME` (see the module's docstring).

    labels: the label names in index order (None: read them from the data). text_only: read
    texts only (label None). split: only the training or held-out part. domain: the domain of
    rows without a domain column (None: the file's name without suffix). domain_column: the column
    that gives a row's domain (what the by-domain partition splits by). check: called on
    each example; a ValueError it raises makes the row bad (with its `reason` if it has one).
    """
    if max_bad_rows < 0:
        raise ValueError("max_bad_rows must be >= 0")
    if labels is not None:
        labels = tuple(str(x) for x in labels)
        if len(labels) < 1 or len(set(labels)) != len(labels):
            raise ValueError(f"labels {list(labels)} must name each class once")
    if is_demo(spec):
        loaded = _load_demo(str(spec), labels, text_only)
    else:
        loaded = _load_files(spec, labels, text_column, label_column, max_bad_rows, text_only, domain, check,
                             domain_column)
    examples = loaded.examples
    if check is not None and is_demo(spec):
        examples = _checked_demo(str(spec), examples, check, max_bad_rows)
    if split is not None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        train, test = split_examples(examples, test_fraction_of(spec))
        examples = train if split == "train" else test
    if len(examples) != len(loaded.examples):
        loaded = LoadedData(loaded.source, tuple(examples), loaded.labels, loaded.skipped, loaded.files)
    return loaded


def _load_demo(spec: str, labels: tuple[str, ...] | None, text_only: bool) -> LoadedData:
    examples, names = DEMOS[_demo_name(spec)].load()
    if text_only:
        return LoadedData(spec, tuple(LabelledText(e.text, None, None, e.domain, e.uid) for e in examples), None)
    if labels is None or labels == names:
        return LoadedData(spec, examples, names)
    missing = [n for n in names if n not in labels]
    if missing:
        raise DataError("unknown_label", f"has the labels {', '.join(names)}; {', '.join(missing)} "
                        f"not among the labels given ({', '.join(labels)}): use the demo's labels "
                        "(EDGETUNE_LABELS) or another data set", path=spec)
    index = {n: labels.index(n) for n in names}
    return LoadedData(spec, tuple(LabelledText(e.text, index[e.label_name], e.label_name, e.domain, e.uid)
                                  for e in examples), labels)


def _checked_demo(spec: str, examples, check, max_bad_rows: int) -> list[LabelledText]:
    budget = _Budget(max_bad_rows)
    out = []
    for e in examples:
        bad = _run_check(check, e, spec, e.uid)
        if bad is None:
            out.append(e)
        else:
            budget.add(bad)
    return out


class _Budget:
    """Bad rows: refuse at the first (max_bad_rows=0) or skip up to N, logged and counted."""

    def __init__(self, max_bad_rows: int) -> None:
        self.max = max_bad_rows
        self.skipped: list[BadRow] = []

    def add(self, bad: BadRow) -> None:
        if self.max == 0:
            raise bad.error()
        if len(self.skipped) >= self.max:
            raise DataError("too_many_bad_rows", f"a bad row beyond the {self.max} that max_bad_rows lets this load "
                            f"skip: {bad.message}. Fix the file (the skipped rows were logged), or raise "
                            "max_bad_rows (--max-bad-rows / EDGETUNE_MAX_BAD_ROWS)", path=bad.path, where=bad.where)
        self.skipped.append(bad)
        log.warning("skipped bad row %d of at most %d: %s", len(self.skipped), self.max, bad)


def _run_check(check, example: LabelledText, path: str, where: str) -> BadRow | None:
    try:
        check(example)
    except ValueError as e:
        return BadRow(path, where, getattr(e, "reason", "invalid_row"), str(e))
    return None


def _is_int(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (isinstance(v, str) and bool(_INT.fullmatch(v.strip())))


def _cell(fields, column: str, path: Path, where: str, what: str, optional_int: bool) -> tuple[Any, BadRow | None]:
    """A text or label value of a row, or why the row is bad."""
    if column not in fields:
        return None, BadRow(str(path), where, "missing_column", f"has no {column!r} field: every row needs its {what} "
                            f"there (or name the {what} column with --{what}-column)")
    v = fields[column]
    if v is None or (isinstance(v, str) and not v.strip()):
        return None, BadRow(str(path), where, "empty_text" if what == "text" else "no_label", f"has an empty {what}")
    ok = isinstance(v, str) or (optional_int and isinstance(v, int) and not isinstance(v, bool))
    if not ok:
        kind = "a string" if what == "text" else "a label name (string) or a class index (integer)"
        return None, BadRow(str(path), where, "bad_type", f"{what} {v!r} is {type(v).__name__}, not {kind}")
    return v.strip() if isinstance(v, str) else v, None


def _load_files(spec, labels, text_column, label_column, max_bad_rows, text_only, domain, check,
                domain_column=DOMAIN_COLUMN) -> LoadedData:
    files = files_of(spec, text_only=text_only)
    wanted = (text_column,) if text_only else (text_column, label_column)
    # pass 1: every row of every file, in order: (path, where, text, raw label, domain, id) or a bad row
    rows: list[tuple | BadRow] = []
    for path in files:
        fmt = FORMATS[path.suffix.lower()]
        if not text_only and not fmt.labelled:
            raise DataError("missing_column", f"is {fmt.name} (texts only, no labels): labelled data needs "
                            f"{', '.join(suffixes(True))} with a {label_column!r} column", path=path)
        raw = fmt.read(path, (*wanted, domain_column, ID_COLUMN))
        if raw.columns is not None:
            missing = [c for c in wanted if c not in raw.columns]
            if missing and raw.rows:
                col = missing[0]
                flag = "--text-column" if col == text_column else "--label-column"
                raise DataError("missing_column", f"has no {col!r} column (its columns: "
                                f"{', '.join(raw.columns) or 'none'}): name the right one with {flag} "
                                f"(EDGETUNE_{flag[2:].upper().replace('-', '_')})", path=path)
        if not raw.rows:
            raise DataError("empty", "holds no rows: give a file with at least one example "
                            f"({'a header line and ' if raw.columns is not None else ''}one row per example)", path=path)
        default_domain = domain if domain is not None else path.stem
        for r in raw.rows:
            rows.append(_pass1(path, r, text_column, label_column, text_only, default_domain, domain_column))
    # the label names: given, or read from the data
    if text_only:
        names = None
    elif labels is not None:
        names = labels
    else:
        values = [r[3] for r in rows if not isinstance(r, BadRow)]
        if values and all(_is_int(v) for v in values):
            names = tuple(str(i) for i in range(max(int(v) for v in values) + 1))
        else:
            names = tuple(sorted({str(v) for v in values}))
    index = {n: i for i, n in enumerate(names or ())}
    # pass 2: labels, checks and the bad-row budget, in file order
    budget = _Budget(max_bad_rows)
    out: list[LabelledText] = []
    for position, r in enumerate(rows):
        if isinstance(r, BadRow):
            budget.add(r)
            continue
        path, where, text, value, dom, uid = r
        uid = f"{dom}:{uid if uid is not None else position}"
        if names is None:
            ex = LabelledText(text, None, None, dom, uid)
        else:
            y = index.get(str(value))
            if y is None and _is_int(value) and int(value) < len(names):
                y = int(value)
            if y is None:
                budget.add(BadRow(str(path), where, "unknown_label", f"label {value!r} is not one of "
                                  f"{', '.join(names)}: fix the row, or add the label to the labels (EDGETUNE_LABELS)"))
                continue
            ex = LabelledText(text, y, names[y], dom, uid)
        if check is not None and (bad := _run_check(check, ex, str(path), where)) is not None:
            budget.add(bad)
            continue
        out.append(ex)
    if not out:
        raise DataError("empty", f"no usable rows ({len(budget.skipped)} bad rows skipped): fix the data",
                        path=spec)
    return LoadedData(str(spec), tuple(out), names, tuple(budget.skipped), tuple(files))


def _pass1(path: Path, r: RawRow, text_column: str, label_column: str, text_only: bool, default_domain: str,
           domain_column: str = DOMAIN_COLUMN):
    if r.fields is None:
        return BadRow(str(path), r.where, r.reason, r.problem)
    text, bad = _cell(r.fields, text_column, path, r.where, "text", optional_int=False)
    if bad is not None:
        return bad
    value = None
    if not text_only:
        value, bad = _cell(r.fields, label_column, path, r.where, "label", optional_int=True)
        if bad is not None:
            return bad
    dom = r.fields.get(domain_column)
    dom = str(dom) if dom not in (None, "") else default_domain
    uid = r.fields.get(ID_COLUMN)
    return path, r.where, text, value, dom, (str(uid) if uid not in (None, "") else None)
