"""The agent's SQLite sample store: validation, retention, replay, and surviving SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from edge_agent.store import InvalidSample, SampleStore

ROOT = Path(__file__).resolve().parents[1]


def test_add_and_read_back(tmp_path):
    with SampleStore(tmp_path / "s.db", 100) as s:
        a = s.add("great phone", "positive")
        b = s.add("meh", None, source="predict")
        c = s.add("awful", 0)
        assert (a, b, c) == (1, 2, 3)
        assert s.count() == 3
        rows = s.labelled()
        assert [(r.id, r.text, r.label, r.source) for r in rows] == [(1, "great phone", 1, "feedback"), (3, "awful", 0, "feedback")]
        assert s.count_labelled_since(0) == 2 and s.count_labelled_since(1) == 1 and s.count_labelled_since(3) == 0
        assert [r.id for r in s.labelled(since_id=1)] == [3]
        assert s.get(2).label is None and s.get(99) is None
        assert s.mark_used([1]) == 1 and s.mark_used([1]) == 0
        assert [r.id for r in s.labelled(unused_only=True)] == [3]
        assert s.last_id() == 3


def test_retention_limit_holds(tmp_path):
    with SampleStore(tmp_path / "s.db", max_samples=50) as s:
        for i in range(120):
            s.add(f"text {i}", i % 2)
            assert s.count() <= 50
        s.add_many([(f"bulk {i}", 1) for i in range(30)])
        assert s.count() == 50
        ids = [r.id for r in s.labelled()]
        assert ids == list(range(101, 151))  # the newest 50, oldest dropped first
        # ids are never reused after deletions, so since_id markers stay valid
        assert s.add("after", 1) == 151 and s.last_id() == 151
    with SampleStore(tmp_path / "s.db", max_samples=10) as s:  # a smaller limit on reopen
        s.add("x", 0)
        assert s.count() == 10


@pytest.mark.parametrize(
    "text,label,source,reason",
    [
        ("", 1, "feedback", "empty_text"),
        ("   \n", 1, "feedback", "empty_text"),
        ("x" * 2001, 1, "feedback", "text_too_long"),
        ("ok", "neutral", "feedback", "unknown_label"),
        ("ok", 2, "feedback", "unknown_label"),
        ("ok", -1, "feedback", "unknown_label"),
        ("ok", True, "feedback", "bad_type"),
        ("ok", 1.0, "feedback", "bad_type"),
        (None, 1, "feedback", "bad_type"),
        (b"bytes", 1, "feedback", "bad_type"),
        ("nul\x00byte", 1, "feedback", "bad_text"),
        ("ok", 1, "", "bad_source"),
        ("ok", 1, "DROP TABLE", "bad_source"),
    ],
)
def test_invalid_samples_raise_and_store_nothing(tmp_path, text, label, source, reason):
    with SampleStore(tmp_path / "s.db", 100, max_text_chars=2000) as s:
        s.add("kept", 1)
        with pytest.raises(InvalidSample) as e:
            s.add(text, label, source=source)
        assert e.value.reason == reason
        # add_many is all or nothing: one bad row and none of the good ones are stored
        with pytest.raises(InvalidSample):
            s.add_many([("good one", 0), (text, label, source), ("good two", 1)])
        assert s.count() == 1 and [r.text for r in s.labelled()] == ["kept"]
        assert s.last_id() == 1


def test_text_at_the_limit_is_kept(tmp_path):
    with SampleStore(tmp_path / "s.db", 10, max_text_chars=100) as s:
        i = s.add("é" * 100, "negative")  # characters, not bytes
        assert s.get(i).text == "é" * 100


def test_sample_replay_is_deterministic_and_only_older_rows(tmp_path):
    with SampleStore(tmp_path / "s.db", 1000) as s:
        s.add_many([(f"t{i}", i % 2 if i % 5 else None) for i in range(200)])
        a = s.sample_replay(20, seed=7, before_id=100)
        b = s.sample_replay(20, seed=7, before_id=100)
        c = s.sample_replay(20, seed=8, before_id=100)
        assert [r.id for r in a] == [r.id for r in b] and [r.id for r in a] != [r.id for r in c]
        assert len(a) == 20 and len({r.id for r in a}) == 20
        assert all(r.id <= 100 and r.label is not None for r in a)
        assert [r.id for r in a] == sorted(r.id for r in a)
        assert len(s.sample_replay(10_000, seed=0)) == 160  # capped at what exists
        assert s.sample_replay(0, seed=0) == []


def test_threads_share_one_store(tmp_path):
    with SampleStore(tmp_path / "s.db", 10_000) as s:
        errors = []

        def work(k):
            try:
                for i in range(50):
                    s.add(f"thread {k} item {i}", i % 2)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert not errors and s.count() == 200


def test_refuses_use_from_a_forked_child(tmp_path):
    s = SampleStore(tmp_path / "s.db", 10)
    pid = os.fork()
    if pid == 0:  # child: must refuse, and exit without touching the parent's handles
        try:
            s.add("from child", 1)
            os._exit(1)
        except RuntimeError:
            os._exit(0)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert s.count() == 0
    s.close()


WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from edge_agent.store import SampleStore
    s = SampleStore({db!r}, max_samples=1_000_000, synchronous={sync!r})
    i = 0
    while True:
        if i % 3 == 0:  # a multi-row transaction, so kills land inside transactions too
            ids = s.add_many([(f"row {{i}}-{{k}} " + "x" * 200, k % 2) for k in range(20)])
        else:
            ids = [s.add(f"row {{i}} " + "y" * 200, i % 2)]
        print(" ".join(map(str, ids)), flush=True)  # printed only once committed
        i += 1
    """
)


def _write_then_kill(db: Path, sync: str, rows_before_kill: int) -> list[int]:
    """Run the writer until it has reported `rows_before_kill` ids, SIGKILL it, return the ids."""
    code = WRITER.format(root=str(ROOT), db=str(db), sync=sync)
    err_path = db.with_name("writer.err")
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err, text=True)
    committed: list[int] = []
    deadline = time.monotonic() + 30
    try:
        while len(committed) < rows_before_kill and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line.endswith("\n"):  # EOF: the writer died on its own
                break
            committed += [int(x) for x in line.split()]
        assert proc.poll() is None, err_path.read_text()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        rest = proc.stdout.read()  # what the writer printed before it died (buffered here or in the pipe)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    for line in rest.split("\n")[:-1]:  # the part after the last newline may be cut by the kill
        committed += [int(x) for x in line.split()]
    assert len(committed) >= rows_before_kill
    return committed


@pytest.mark.parametrize("sync", ["NORMAL", "FULL"])
def test_sigkill_mid_writes_loses_no_committed_row(tmp_path, sync):
    db = tmp_path / "s.db"
    committed: list[int] = []
    for kill_round in range(3):  # killed, reopened by a new writer, killed again...
        committed += _write_then_kill(db, sync, rows_before_kill=200 + 150 * kill_round)

        # the -wal file is left behind by the killed writer; plain sqlite3 first, then the store
        raw = sqlite3.connect(db)
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        raw.close()
        with SampleStore(db, max_samples=1_000_000) as s:
            assert s.integrity_check() == "ok"
            present = {r.id: r.text for r in s.labelled()}
            missing = [i for i in committed if i not in present]
            assert not missing, f"round {kill_round}: {len(missing)} committed rows lost, e.g. {missing[:5]}"
            assert all(present[i].startswith("row ") for i in committed)
            # ids are dense up to the last row on disk: each transaction is there whole or not at all
            assert sorted(present) == list(range(1, max(present) + 1))
            # at most one transaction per kill committed but not yet reported
            assert len(present) - len(set(committed)) <= 20 * (kill_round + 1)
            assert len(committed) == len(set(committed))
    with SampleStore(db, max_samples=1_000_000) as s:
        last = s.last_id()
        assert s.add("after the crashes", 1) == last + 1
