"""The agent's local sample store: user inputs (and the labels users give) in SQLite.

One file per device, opened once per process (a `SampleStore` refuses to be used from a process
it was not opened in, e.g. after a fork). Every write is one transaction (BEGIN IMMEDIATE ...
COMMIT): a sample is stored whole or not at all, and retention (at most `max_samples` rows, the
oldest dropped first) is applied in the same transaction as the insert.

Durability: journal_mode=WAL with synchronous=NORMAL by default. In WAL mode NORMAL never
corrupts the database and loses nothing when the *process* dies (SIGKILL, OOM kill, crash):
a commit is in the WAL file, in the OS page cache, when `add` returns. What NORMAL gives up is
the fsync at each commit, so a power cut or kernel crash may lose the last commits made since
the last WAL sync (still a consistent database). The store takes a row per user input, on
flash storage where an fsync per insert costs milliseconds and wear; losing the newest few
inputs on a power cut is acceptable for incremental training. Pass synchronous="FULL" where
every acknowledged feedback must survive a power cut (one fsync per commit).
"""

from __future__ import annotations

import os
import random
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

SCHEMA_VERSION = 1
_SOURCE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS samples (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so `since_id` markers stay valid
        text TEXT NOT NULL CHECK (length(text) > 0),
        label INTEGER,                          -- class index, NULL: not labelled
        source TEXT NOT NULL,                   -- feedback, predict, import, ...
        created REAL NOT NULL,                  -- unix time, seconds
        used_in_training INTEGER NOT NULL DEFAULT 0 CHECK (used_in_training IN (0, 1))
    )
    """,
    "CREATE INDEX IF NOT EXISTS samples_labelled ON samples (id) WHERE label IS NOT NULL",
)


class InvalidSample(ValueError):
    """A sample the store refuses; nothing was stored. `reason` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Sample:
    id: int
    text: str
    label: int | None
    source: str
    created: float
    used_in_training: bool


class SampleStore:
    """SQLite store of user inputs. Safe to share between threads of one process.

    labels: the class names, in index order; a label is given as an index or a name and stored
    as the index. max_text_chars: longer texts are refused (InvalidSample "text_too_long").
    """

    def __init__(
        self,
        path: str | os.PathLike,
        max_samples: int = 10_000,
        *,
        labels: Sequence[str] = ("negative", "positive"),
        max_text_chars: int = 2000,
        synchronous: str = "NORMAL",
        busy_timeout_s: float = 5.0,
    ) -> None:
        if max_samples < 1:
            raise ValueError("max_samples must be at least 1")
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError("synchronous must be NORMAL, FULL or EXTRA (OFF can corrupt the store on a power cut)")
        self.path = Path(path)
        self.max_samples = int(max_samples)
        self.labels = tuple(str(x) for x in labels)
        if not self.labels:
            raise ValueError("labels must name at least one class")
        self.max_text_chars = int(max_text_chars)
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; every write opens its own below.
        self._db = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            self._db.close()
            raise RuntimeError(f"SQLite refused WAL mode for {self.path} (got {mode}): put the store on a local filesystem")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self._db.close()
            raise RuntimeError(f"{self.path} has store schema {version}; this edgetune reads up to {SCHEMA_VERSION}: upgrade edgetune")
        with self._write():
            for statement in _SCHEMA:  # not executescript: it would COMMIT first
                self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # -- plumbing ---------------------------------------------------------------------------

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError("this SampleStore was opened in another process: open a SampleStore in each process")

    class _Tx:
        def __init__(self, store: "SampleStore") -> None:
            self.store = store

        def __enter__(self):
            self.store._check_process()
            self.store._lock.acquire()
            try:
                self.store._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._lock.release()
                raise
            return self.store._db

        def __exit__(self, exc_type, exc, tb):
            try:
                self.store._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.store._lock.release()
            return False

    def _write(self) -> "_Tx":
        return SampleStore._Tx(self)

    def _read(self, sql: str, params: Sequence = ()) -> list[tuple]:
        self._check_process()
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "SampleStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- validation -------------------------------------------------------------------------

    def label_index(self, label: int | str | None) -> int | None:
        if label is None:
            return None
        if isinstance(label, str):
            if label in self.labels:
                return self.labels.index(label)
            raise InvalidSample("unknown_label", f"unknown label {label!r}: use one of {list(self.labels)} or 0..{len(self.labels) - 1}")
        if isinstance(label, bool) or not isinstance(label, int):
            raise InvalidSample("bad_type", f"label must be a class name or index, not {type(label).__name__}")
        if not 0 <= label < len(self.labels):
            raise InvalidSample("unknown_label", f"label {label} is out of range: use 0..{len(self.labels) - 1} or one of {list(self.labels)}")
        return label

    def validate(self, text: object, label: object = None, source: object = "feedback") -> tuple[str, int | None, str]:
        """The row that `add` would store, or InvalidSample."""
        if not isinstance(text, str):
            raise InvalidSample("bad_type", f"text must be a string, not {type(text).__name__}")
        if not text.strip():
            raise InvalidSample("empty_text", "text is empty")
        if len(text) > self.max_text_chars:
            raise InvalidSample("text_too_long", f"text has {len(text)} characters; the limit is {self.max_text_chars}")
        if "\x00" in text:
            raise InvalidSample("bad_text", "text contains a NUL character")
        if not isinstance(source, str) or not _SOURCE_RE.match(source):
            raise InvalidSample("bad_source", f"source must be a short lowercase name like 'feedback', not {source!r}")
        return text, self.label_index(label), source  # type: ignore[arg-type]

    # -- writes -----------------------------------------------------------------------------

    def _insert(self, db: sqlite3.Connection, rows: list[tuple[str, int | None, str]]) -> list[int]:
        now = time.time()
        ids = [db.execute("INSERT INTO samples (text, label, source, created) VALUES (?, ?, ?, ?)", (t, y, s, now)).lastrowid for t, y, s in rows]
        # retention: keep the newest max_samples rows
        db.execute(
            "DELETE FROM samples WHERE id <= (SELECT id FROM samples ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (self.max_samples,),
        )
        return ids

    def add(self, text: str, label: int | str | None = None, source: str = "feedback") -> int:
        """Store one input (label: class index, class name or None); returns its id."""
        row = self.validate(text, label, source)
        with self._write() as db:
            return self._insert(db, [row])[0]

    def add_many(self, items: Iterable[tuple[str, int | str | None] | tuple[str, int | str | None, str]], source: str = "import") -> list[int]:
        """Store several inputs in one transaction: all of them, or (on any invalid one) none."""
        rows = [self.validate(it[0], it[1], it[2] if len(it) > 2 else source) for it in items]
        if not rows:
            return []
        with self._write() as db:
            return self._insert(db, rows)

    def mark_used(self, ids: Iterable[int]) -> int:
        """Mark rows as used in training; returns how many rows changed."""
        ids = [int(i) for i in ids]
        with self._write() as db:
            n = 0
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                q = f"UPDATE samples SET used_in_training = 1 WHERE used_in_training = 0 AND id IN ({','.join('?' * len(chunk))})"
                n += db.execute(q, chunk).rowcount
            return n

    # -- reads ------------------------------------------------------------------------------

    _COLS = "id, text, label, source, created, used_in_training"

    @staticmethod
    def _sample(r: tuple) -> Sample:
        return Sample(r[0], r[1], r[2], r[3], r[4], bool(r[5]))

    def get(self, sample_id: int) -> Sample | None:
        rows = self._read(f"SELECT {self._COLS} FROM samples WHERE id = ?", (int(sample_id),))
        return self._sample(rows[0]) if rows else None

    def labelled(self, since_id: int = 0, *, unused_only: bool = False, limit: int | None = None) -> list[Sample]:
        """Labelled rows with id > since_id, oldest first."""
        q = f"SELECT {self._COLS} FROM samples WHERE label IS NOT NULL AND id > ?"
        if unused_only:
            q += " AND used_in_training = 0"
        q += " ORDER BY id"
        params: list = [int(since_id)]
        if limit is not None:
            q += " LIMIT ?"
            params.append(int(limit))
        return [self._sample(r) for r in self._read(q, params)]

    def count(self) -> int:
        return self._read("SELECT count(*) FROM samples")[0][0]

    def count_labelled(self, *, skip_every: int = 0) -> int:
        """Labelled rows; with skip_every=k, less those whose id is a multiple of k (a holdout)."""
        if skip_every:
            return self._read("SELECT count(*) FROM samples WHERE label IS NOT NULL AND id % ? != 0", (int(skip_every),))[0][0]
        return self._read("SELECT count(*) FROM samples WHERE label IS NOT NULL")[0][0]

    def count_labelled_since(self, since_id: int = 0) -> int:
        return self._read("SELECT count(*) FROM samples WHERE label IS NOT NULL AND id > ?", (int(since_id),))[0][0]

    def last_id(self) -> int:
        """The newest id handed out (0 for a new store); a marker for `labelled(since_id=...)`."""
        rows = self._read("SELECT seq FROM sqlite_sequence WHERE name = 'samples'")
        return int(rows[0][0]) if rows else 0

    def sample_replay(self, n: int, seed: int, *, before_id: int | None = None) -> list[Sample]:
        """Up to `n` labelled rows drawn at random (same seed and rows: same draw), oldest first.

        Only rows with id <= before_id when given (the older rows, e.g. those the last training
        run saw), else all labelled rows: a replay buffer to mix into an incremental run.
        """
        if n <= 0:
            return []
        q, params = "SELECT id FROM samples WHERE label IS NOT NULL", []
        if before_id is not None:
            q += " AND id <= ?"
            params.append(int(before_id))
        ids = [r[0] for r in self._read(q + " ORDER BY id", params)]
        pick = sorted(random.Random(seed).sample(ids, min(n, len(ids))))
        out: list[Sample] = []
        for i in range(0, len(pick), 500):
            chunk = pick[i : i + 500]
            rows = self._read(f"SELECT {self._COLS} FROM samples WHERE id IN ({','.join('?' * len(chunk))}) ORDER BY id", chunk)
            out += [self._sample(r) for r in rows]
        return out

    def integrity_check(self) -> str:
        return self._read("PRAGMA integrity_check")[0][0]
