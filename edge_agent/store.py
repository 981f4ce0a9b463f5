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

Labels are stored by name (schema 2), so that a stored label keeps its meaning when the fleet's
label list (the task's labels, which the aggregator's EDGETUNE_LABELS sets) changes: `Sample.label` is the class index of that name in the
list the store was opened with (`labels=`), and a labelled sample whose name is not in that list
is kept but never returned for training (`labelled`, `count_labelled`, `sample_replay` skip it);
it is counted (`unknown_labels`) and logged once when the store opens, with what to do.

Upgrading a store of the previous release (schema 1, labels as class indices): opening it
migrates it in place, in one transaction, after copying it to `<file>.v1.bak`. Each stored index
is read through the label list the store is opened with, which for the agent is its fleet's
task's labels: the list that the schema-1 agent's EDGETUNE_LABELS had to equal, and the one it
validated and stored those indices against. An index outside that list means the labels changed
since the samples were stored; the migration then refuses (`StoreMigrationError`, saying to give
the fleet the labels the store was written with) and changes nothing. The device commands
(`feedback`, `import`) run before the agent has joined a fleet leave a schema-1 store alone
(`migrate=False`): only the agent knows the fleet's labels.
"""

from __future__ import annotations

import logging
import os
import random
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

SCHEMA_VERSION = 2  # 1: labels as class indices (the previous release); 2: labels by name
BACKUP_SUFFIX = ".v1.bak"  # a schema-1 store is copied to <file>.v1.bak before it is migrated
_SOURCE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

log = logging.getLogger("edgetune.agent")

_TABLE = """
    CREATE TABLE IF NOT EXISTS samples (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so `since_id` markers stay valid
        text TEXT NOT NULL CHECK (length(text) > 0),
        label TEXT CHECK (length(label) > 0),  -- class name, NULL: not labelled
        source TEXT NOT NULL,                   -- feedback, predict, import, ...
        created REAL NOT NULL,                  -- unix time, seconds
        used_in_training INTEGER NOT NULL DEFAULT 0 CHECK (used_in_training IN (0, 1))
    )
    """
_SCHEMA = (_TABLE, "CREATE INDEX IF NOT EXISTS samples_labelled ON samples (id) WHERE label IS NOT NULL")


class StoreError(RuntimeError):
    """The store file cannot be used as it is; the message says what to do."""


class StoreMigrationError(StoreError):
    """A store of the previous release that cannot be migrated as asked; it was not changed."""


class InvalidSample(ValueError):
    """A sample the store refuses; nothing was stored. `reason` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Sample:
    id: int
    text: str
    label: int | None  # class index in the store's current labels; None: not labelled (or a name not in them)
    source: str
    created: float
    used_in_training: bool
    label_name: str | None = None  # the stored class name; None: not labelled


class SampleStore:
    """SQLite store of user inputs. Safe to share between threads of one process.

    labels: the class names, in index order; a label is given as an index or a name and stored
    by name (read back as its index in `labels`). max_text_chars: longer texts are refused
    (InvalidSample "text_too_long"). Opening a schema-1 store migrates it (module docstring).
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
        migrate: bool = True,
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
        self._index = {name: i for i, name in enumerate(self.labels)}
        self.max_text_chars = int(max_text_chars)
        self._migrate = migrate
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
        try:
            self._open_schema()
        except BaseException:
            self._db.close()
            raise
        unknown = self.unknown_labels()
        if unknown:
            log.warning("%s holds %d labelled samples whose label is not among the fleet's labels %s (%s): they "
                        "are kept but not trained on; add those names to the fleet's labels (the aggregator's "
                        "EDGETUNE_LABELS) to train on them (labels are stored by name: the order does not matter)", self.path, sum(unknown.values()), list(self.labels),
                        ", ".join(f"{k}: {n}" for k, n in sorted(unknown.items())))

    def _open_schema(self) -> None:
        """Create the schema of a new store, migrate one of schema 1, refuse a newer one."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has store schema {version}; this edgetune reads up to {SCHEMA_VERSION}: "
                             "upgrade edgetune")
        with self._write():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]  # another process may have migrated it
            if version == 1:
                if not self._migrate:
                    raise StoreMigrationError(
                        f"{self.path} is a sample store of the previous release (labels as class indices); the agent "
                        "migrates it with its fleet's labels when it builds its model: start `edgetune-agent run` "
                        "once, then try again (the store was not changed)")
                self._migrate_v1()
            for statement in _SCHEMA:  # not executescript: it would COMMIT first
                self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _migrate_v1(self) -> None:
        """Schema 1 -> 2 inside the open write transaction: each class index becomes the name it
        has in `self.labels`. Refuses (nothing changed) an index outside them; copies the file to
        <file>.v1.bak before the first change."""
        db, n = self._db, len(self.labels)
        bad = db.execute("SELECT label, count(*) FROM samples WHERE label IS NOT NULL AND (typeof(label) != 'integer' "
                         "OR label < 0 OR label >= ?) GROUP BY label ORDER BY label", (n,)).fetchall()
        if bad:
            found = ", ".join(f"{label!r} ({k} samples)" for label, k in bad)
            raise StoreMigrationError(
                f"{self.path} is a sample store of the previous release, which stored labels as class indices, and "
                f"some are not indices of the fleet's labels {list(self.labels)} (0..{n - 1}): {found}; give the "
                "fleet the labels the store was written with, in their order (the aggregator's EDGETUNE_LABELS), "
                "and start again (the store was not changed; it is migrated to labels by name when it opens with "
                "them)")
        self._backup(self.path.with_name(self.path.name + BACKUP_SUFFIX))
        db.execute("ALTER TABLE samples RENAME TO samples_v1")  # its index goes with it, and is dropped with it
        db.execute(_TABLE)
        db.execute("CREATE TEMP TABLE v1_labels (idx INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        db.executemany("INSERT INTO temp.v1_labels VALUES (?, ?)", enumerate(self.labels))
        db.execute("INSERT INTO samples (id, text, label, source, created, used_in_training) "
                   "SELECT s.id, s.text, l.name, s.source, s.created, s.used_in_training "
                   "FROM samples_v1 AS s LEFT JOIN temp.v1_labels AS l ON l.idx = s.label ORDER BY s.id")
        # ids are never reused: the new table goes on from the old one's counter, not from its largest id
        (seq,) = db.execute("SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'samples_v1'").fetchone()
        db.execute("DELETE FROM sqlite_sequence WHERE name = 'samples'")  # no unique key: one row, set here
        db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('samples', ?)", (seq,))
        db.execute("DROP TABLE samples_v1")
        db.execute("DROP TABLE temp.v1_labels")
        log.warning("%s: migrated the sample store of the previous release to labels by name (class indices read as "
                    "%s); a copy of it as it was: %s", self.path, list(self.labels), self.path.name + BACKUP_SUFFIX)

    def _backup(self, dest: Path) -> None:
        """A consistent copy of the store as committed, while this connection holds the write lock."""
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.unlink(missing_ok=True)
        src, out = sqlite3.connect(str(self.path)), sqlite3.connect(str(tmp))
        try:
            src.backup(out)  # a second connection: WAL readers are not blocked by our write lock
            out.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            out.close()
            src.close()
        os.replace(tmp, dest)

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
        ids = [db.execute("INSERT INTO samples (text, label, source, created) VALUES (?, ?, ?, ?)",
                          (t, None if y is None else self.labels[y], s, now)).lastrowid for t, y, s in rows]
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

    def _sample(self, r: tuple) -> Sample:
        return Sample(r[0], r[1], self._index.get(r[2]), r[3], r[4], bool(r[5]), r[2])

    def _known(self) -> tuple[str, list]:
        """The SQL condition (and its parameters) of a row labelled with one of `self.labels`."""
        return f"label IN ({','.join('?' * len(self.labels))})", list(self.labels)

    def get(self, sample_id: int) -> Sample | None:
        rows = self._read(f"SELECT {self._COLS} FROM samples WHERE id = ?", (int(sample_id),))
        return self._sample(rows[0]) if rows else None

    def labelled(self, since_id: int = 0, *, unused_only: bool = False, limit: int | None = None) -> list[Sample]:
        """Labelled rows with id > since_id, oldest first (those labelled with one of `labels`)."""
        known, params = self._known()
        q = f"SELECT {self._COLS} FROM samples WHERE {known} AND id > ?"
        if unused_only:
            q += " AND used_in_training = 0"
        q += " ORDER BY id"
        params.append(int(since_id))
        if limit is not None:
            q += " LIMIT ?"
            params.append(int(limit))
        return [self._sample(r) for r in self._read(q, params)]

    def count(self) -> int:
        return self._read("SELECT count(*) FROM samples")[0][0]

    def count_labelled(self, *, skip_every: int = 0) -> int:
        """Rows labelled with one of `labels`; with skip_every=k, less those whose id is a multiple
        of k (a holdout)."""
        known, params = self._known()
        if skip_every:
            q = f"SELECT count(*) FROM samples WHERE {known} AND id % ? != 0"
            return self._read(q, [*params, int(skip_every)])[0][0]
        return self._read(f"SELECT count(*) FROM samples WHERE {known}", params)[0][0]

    def count_labelled_since(self, since_id: int = 0) -> int:
        known, params = self._known()
        return self._read(f"SELECT count(*) FROM samples WHERE {known} AND id > ?", [*params, int(since_id)])[0][0]

    def unknown_labels(self) -> dict[str, int]:
        """Labelled rows whose label is not in `labels` (never trained on), counted by label name."""
        known, params = self._known()
        rows = self._read(f"SELECT label, count(*) FROM samples WHERE label IS NOT NULL AND NOT {known} GROUP BY label",
                          params)
        return {str(name): int(n) for name, n in rows}

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
        known, params = self._known()
        q = f"SELECT id FROM samples WHERE {known}"
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
