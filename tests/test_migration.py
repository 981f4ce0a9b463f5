"""What the previous release (521335f) left on devices and disks, read by this one.

Each artifact is made here as that release wrote it, not by today's code:

- the sample store: `V1_SCHEMA` is the DDL of `git show 521335f:edge_agent/store.py` (labels as
  class indices, `PRAGMA user_version` 1), written by `write_v1_store`;
- the outbox: an update frame of protocol 1 (the release before the task definition) with that
  release's ModelUpdate fields, through broker.codec;
- the output folder: checkpoints made by today's ClassifierTask, then put back into the layout of
  521335f's save_checkpoint/save_base (`to_521335f_layout`): an absolute base path in
  adapter_config.json, peft's template README.md, no model_card.json, a base config without
  label names.

No broker; one small classifier (1 layer) for the whole file.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import join_demo_task

LABELS = ("negative", "positive")

# -- the sample store ------------------------------------------------------------------------------

# 521335f:edge_agent/store.py, _SCHEMA and SCHEMA_VERSION, as they were
V1_SCHEMA = (
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
V1_ROWS = [  # (text, class index or None, source, used_in_training)
    ("great phone", 1, "feedback", 1),
    ("awful battery", 0, "feedback", 1),
    ("what is this", None, "predict", 0),
    ("love the screen", 1, "import", 0),
    ("broke in a week", 0, "import", 0),
    ("fine, I guess", 1, "feedback", 0),
]


def write_v1_store(path: Path, rows=V1_ROWS, *, dropped: int = 2) -> Path:
    """A store as 521335f's SampleStore left it: WAL, schema 1, class indices; the `dropped` oldest
    rows gone (retention) and the newest deleted, so its id counter runs ahead of its rows."""
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("BEGIN IMMEDIATE")
    for statement in V1_SCHEMA:
        db.execute(statement)
    db.execute("PRAGMA user_version=1")
    now = time.time()
    for i in range(dropped):
        db.execute("INSERT INTO samples (text, label, source, created) VALUES (?, ?, ?, ?)",
                   (f"old {i}", 0, "feedback", now))
    for text, label, source, used in rows:
        db.execute("INSERT INTO samples (text, label, source, created, used_in_training) VALUES (?, ?, ?, ?, ?)",
                   (text, label, source, now, used))
    db.execute("DELETE FROM samples WHERE id <= ?", (dropped,))
    db.execute("INSERT INTO samples (text, label, source, created) VALUES (?, ?, ?, ?)", ("newest", 1, "feedback", now))
    db.execute("DELETE FROM samples WHERE id = (SELECT max(id) FROM samples)")  # the counter runs ahead of the rows
    db.execute("COMMIT")
    db.close()  # the WAL is checkpointed on close; the file is what the release left
    return path


def raw(path: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(str(path))
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def as_before(rows=V1_ROWS, dropped: int = 2) -> list[tuple]:
    """(id, text, label index, source, used) of the labelled rows, as the v1 store returned them."""
    return [(dropped + i + 1, t, y, s, bool(u)) for i, (t, y, s, u) in enumerate(rows) if y is not None]


def test_a_v1_store_is_migrated_to_labels_by_name_with_a_backup(tmp_path):
    from edge_agent.store import SCHEMA_VERSION, SampleStore

    path = write_v1_store(tmp_path / "samples.sqlite")
    with SampleStore(path, labels=LABELS) as s:
        assert [(r.id, r.text, r.label, r.source, r.used_in_training) for r in s.labelled()] == as_before()
        assert [r.label_name for r in s.labelled()] == ["positive", "negative", "positive", "negative", "positive"]
        assert s.get(5).label is None and s.get(5).label_name is None  # "what is this": not labelled
        assert s.last_id() == 9 and s.count() == 6 and s.integrity_check() == "ok"
        assert s.add("new one", "negative") == 10  # ids are never reused
        assert s.get(10).label == 0
    assert raw(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)] and SCHEMA_VERSION == 2
    assert raw(path, "SELECT id, label, typeof(label) FROM samples WHERE id IN (3, 4, 5)") == [
        (3, "positive", "text"), (4, "negative", "text"), (5, None, "null")]
    assert raw(path, "SELECT name FROM sqlite_master WHERE type = 'index'") == [("samples_labelled",)]
    bak = tmp_path / "samples.sqlite.v1.bak"  # the store as the release left it
    assert raw(bak, "PRAGMA user_version") == [(1,)]
    assert raw(bak, "SELECT id, label, typeof(label) FROM samples WHERE id IN (3, 4)") == [
        (3, 1, "integer"), (4, 0, "integer")]
    # opened again: nothing to migrate, the backup stays as it was
    stamp = bak.stat().st_mtime_ns
    with SampleStore(path, labels=LABELS) as s:
        assert s.count() == 7
    assert bak.stat().st_mtime_ns == stamp


def test_a_v1_store_with_indices_outside_the_labels_is_refused_unchanged(tmp_path):
    from edge_agent.store import SampleStore, StoreError, StoreMigrationError

    path = write_v1_store(tmp_path / "samples.sqlite", rows=[*V1_ROWS, ("so-so", 2, "feedback", 0)])
    before = raw(path, "SELECT * FROM samples ORDER BY id")
    with pytest.raises(StoreMigrationError) as e:
        SampleStore(path, labels=LABELS)
    assert isinstance(e.value, StoreError)
    said = str(e.value)
    assert "give the fleet the labels the store was written with" in said and "2 (1 samples)" in said and "not changed" in said
    assert raw(path, "PRAGMA user_version") == [(1,)] and raw(path, "SELECT * FROM samples ORDER BY id") == before
    assert not (tmp_path / "samples.sqlite.v1.bak").exists()
    # with the labels it was written with, it migrates
    with SampleStore(path, labels=(*LABELS, "neutral")) as s:
        assert s.labelled()[-1].label_name == "neutral" and s.count_labelled() == 6


def test_labels_keep_their_meaning_when_the_list_changes(tmp_path, caplog):
    from edge_agent.store import SampleStore

    path = write_v1_store(tmp_path / "samples.sqlite")
    SampleStore(path, labels=LABELS).close()
    with SampleStore(path, labels=("positive", "negative")) as s:  # reordered: indices follow the names
        assert [(r.text, r.label) for r in s.labelled()][:2] == [("great phone", 0), ("awful battery", 1)]
    with caplog.at_level(logging.WARNING, logger="edgetune.agent"):
        s = SampleStore(path, labels=("negative", "neutral"))  # "positive" left the list
    with s:
        assert [r.text for r in s.labelled()] == ["awful battery", "broke in a week"]
        assert s.count_labelled() == 2 and s.count_labelled_since(0) == 2
        assert {r.text for r in s.sample_replay(10, seed=1)} == {"awful battery", "broke in a week"}
        assert s.unknown_labels() == {"positive": 3}
        assert s.get(3).label is None and s.get(3).label_name == "positive"  # kept, never trained on
    said = caplog.text
    assert "3 labelled samples" in said and "positive: 3" in said and "add those names to the fleet's labels" in said


def test_the_store_readers_get_the_indices_they_got_before(tmp_path):
    """edge_agent.incremental (rounds, incremental runs, the holdout) reads a migrated store as it
    read the v1 store: same ids, texts and class indices."""
    from edge_agent import incremental
    from edge_agent.store import SampleStore

    cfg = incremental.IncrementalConfig(holdout_every=4)
    path = write_v1_store(tmp_path / "samples.sqlite")
    before = {r[0]: r for r in as_before()}
    with SampleStore(path, labels=LABELS) as s:
        got = lambda rows: [(r.id, r.text, r.label) for r in rows]  # noqa: E731
        assert got(incremental.trainable(s, cfg)) == [before[i][:3] for i in (3, 6, 7)]
        assert got(incremental.pending(s, cfg)) == [before[i][:3] for i in (6, 7)]
        assert got(incremental.holdout(s, cfg)) == [before[i][:3] for i in (4, 8)]  # ids % 4 == 0
        assert incremental.trainable_count(s, cfg) == 3


def test_the_agent_commands_migrate_or_say_what_to_do(tmp_path):
    from edge_agent.cli import app
    from edge_agent.local_settings import STORE_FILE

    runner = CliRunner()
    env: dict = {}
    write_v1_store(tmp_path / STORE_FILE, rows=[*V1_ROWS, ("so-so", 2, "feedback", 0)])
    # before the agent has joined its fleet, the commands do not know its labels: they leave the store alone
    r = runner.invoke(app, ["feedback", "a fine film", "--label", "positive", "--state-dir", str(tmp_path)], env=env)
    assert r.exit_code == 2 and "start `edgetune-agent run` once" in r.output and "Traceback" not in r.output, r.output
    assert raw(tmp_path / STORE_FILE, "PRAGMA user_version") == [(1,)]
    join_demo_task(tmp_path)  # the fleet's labels leave index 2 without a name: refused, with what to do
    r = runner.invoke(app, ["feedback", "a fine film", "--label", "positive", "--state-dir", str(tmp_path)], env=env)
    assert r.exit_code == 2, r.output
    assert "give the fleet the labels the store was written with" in r.output and "Traceback" not in r.output
    join_demo_task(tmp_path, labels=["negative", "positive", "neutral"], num_labels=3)
    r = runner.invoke(app, ["feedback", "a fine film", "--label", "positive", "--state-dir", str(tmp_path)], env=env)
    assert r.exit_code == 0 and "(positive)" in r.output, r.output
    data = tmp_path / "more.csv"
    data.write_text("text,label\nquite good,positive\nmeh,neutral\n")
    r = runner.invoke(app, ["import", str(data), "--state-dir", str(tmp_path)], env=env)
    assert r.exit_code == 0, r.output
    assert raw(tmp_path / STORE_FILE, "SELECT label FROM samples ORDER BY id DESC LIMIT 3") == [
        ("neutral",), ("positive",), ("positive",)]


def test_the_device_counts_samples_whose_label_left_the_list(tmp_path):
    from edge_agent.device import Device
    from edge_agent.local_settings import STORE_FILE, DeviceSetupError
    from edge_agent.metrics import AgentMetrics
    from edge_agent.settings import AgentSettings

    write_v1_store(tmp_path / STORE_FILE, rows=[*V1_ROWS, ("so-so", 2, "feedback", 0)])

    def device(labels):
        s = AgentSettings(state_dir=str(tmp_path))
        return Device(s, AgentMetrics(), None, [], lambda: False, labels=list(labels), max_length=64)

    with pytest.raises(DeviceSetupError, match="give the fleet the labels the store was written with"):
        device(LABELS).open()  # index 2 has no name in this list: refused, nothing changed
    assert raw(tmp_path / STORE_FILE, "PRAGMA user_version") == [(1,)]
    d = device((*LABELS, "neutral"))
    d.open()  # migrated
    d.close()
    d = device(["negative", "neutral"])
    d.open()
    try:
        assert d.metrics.samples_unknown_label._value.get() == 3
        assert d.trainable_count == 3  # only the samples whose label is in the list (ids 4, 7, 9)
    finally:
        d.close()


# -- the outbox ------------------------------------------------------------------------------------


def v1_update(round_number: int) -> bytes:
    """An update frame as the protocol-1 agent wrote it into its outbox (no task hash)."""
    import torch

    from broker import codec

    header = {"protocol": 1, "kind": "update", "agent_id": "kiosk-1", "round": round_number, "base_version": 0,
              "num_examples": 12, "nonce": "0123456789abcdef", "train_loss": 0.5, "train_seconds": 1.0}
    return codec.encode(header, {"lora_A": torch.zeros(2, 4)})


def test_an_old_protocol_frame_in_the_outbox_is_moved_aside_as_stale(tmp_path, caplog):
    import torch

    from broker import codec
    from broker.messages import ModelUpdate
    from edge_agent.outbox import Outbox

    box = Outbox(tmp_path)
    box.put(3, v1_update(3))
    current = codec.encode(ModelUpdate(agent_id="kiosk-1", round=4, base_version=1, num_examples=12,
                                       nonce="fedcba9876543210", task_hash="ab" * 32), {"lora_A": torch.zeros(2, 4)})
    box.put(4, current)
    box.put(5, current[:-7])  # cut short: corrupt, not old
    with caplog.at_level(logging.WARNING, logger="edgetune.agent"):
        unsent = list(Outbox(tmp_path).unsent())
    assert unsent == [(4, current)]  # only this release's update is resent
    names = sorted(p.name for p in (tmp_path / "outbox").iterdir())
    assert names == ["round-000003.stale", "round-000004.frame", "round-000005.bad"]
    stale = next(r.getMessage() for r in caplog.records if "round-000003" in r.getMessage())
    assert "another release" in stale and "cannot be sent" in stale and "protocol version 1" in stale
    bad = next(r.getMessage() for r in caplog.records if "round-000005" in r.getMessage())
    assert "unreadable" in bad and "another release" not in bad


# -- a mixed fleet: protocol 1 on one side, 2 on the other -----------------------------------------


def test_an_old_agents_frames_are_refused_and_counted_at_the_aggregator(tmp_path):
    from aggregator.service import AggregatorService
    from aggregator.settings import AggregatorSettings
    from broker import codec
    from broker.transport import Incoming

    svc = AggregatorService(AggregatorSettings(output_dir=str(tmp_path)))
    status = codec.encode({"protocol": 1, "kind": "status", "agent_id": "kiosk-1", "state": "online",
                           "ts": time.time(), "global_version": -1, "num_examples": 12})
    svc._handle(Incoming(svc.topics.status("kiosk-1"), status, retain=True))
    svc._handle(Incoming(svc.topics.update("kiosk-1"), v1_update(1), retain=False))
    assert svc.metrics.rejected.labels(reason="wrong_version")._value.get() == 2
    assert "kiosk-1" not in svc.online  # never selected


def test_an_old_aggregators_frames_are_refused_and_counted_at_the_agent(tmp_path):
    from broker import codec
    from edge_agent.metrics import AgentMetrics
    from edge_agent.runner import AgentRunner

    agent = AgentRunner.__new__(AgentRunner)  # the real agent's hooks, without a model or a broker
    agent._init_protocol("kiosk-1", "default")
    agent.metrics = AgentMetrics()
    announcement = codec.encode({"protocol": 1, "kind": "round", "round": 1, "selected": ["kiosk-1"],
                                 "deadline": time.time() + 60, "global_version": 0})
    global_v1 = codec.encode({"protocol": 1, "kind": "global", "version": 0, "round": 0})
    agent.take(agent.topics.round, announcement)
    agent.take(agent.topics.global_adapter, global_v1)
    assert agent.metrics.rejected.labels(reason="wrong_version")._value.get() == 2
    assert agent.proto.global_version == -1  # nothing loaded, nothing to train


# -- the aggregator's output folder ----------------------------------------------------------------
ELSEWHERE = "/srv/edgetune/old-machine/aggregator/base_model"  # the machine that wrote it


def to_521335f_layout(out: Path, absolute: str) -> None:
    """Checkpoints as 521335f's save_checkpoint wrote them: adapter_config.json names the base by
    an absolute path, peft's template README.md names it too, no model card; its save_base gave
    the base config transformers' placeholder labels."""
    for ck in sorted((out / "checkpoints").glob("round-*")):
        cfg = json.loads((ck / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = absolute
        (ck / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (ck / "model_card.json").unlink(missing_ok=True)
        (ck / "README.md").write_text(f"---\nbase_model: {absolute}\nlibrary_name: peft\n---\n\n"
                                      "# Model Card for Model ID\n")
    config = out / "base_model" / "config.json"
    doc = json.loads(config.read_text())
    doc.update(id2label={"0": "LABEL_0", "1": "LABEL_1"}, label2id={"LABEL_0": 0, "LABEL_1": 1})
    config.write_text(json.dumps(doc, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> Path:
    """An aggregator output folder of 521335f: base_model/, checkpoints round-0001 and round-0002
    (LATEST), the base path of another machine in them."""
    from aggregator.settings import AggregatorSettings
    from aggregator.tasks import ClassifierTask
    from data.sentiment import Example
    from models.train import train_local

    out = tmp_path_factory.mktemp("old") / "aggregator"
    s = AggregatorSettings(output_dir=out, num_layers=1, labels=list(LABELS), rounds=3, max_length=32)
    task = ClassifierTask(s, out)
    examples = [Example(t, i % 2, "demo", f"demo:{i}") for i, t in enumerate(["awful", "lovely"] * 4)]
    for rnd in (1, 2):
        train_local(task.model, task.tokenizer, examples, max_steps=2, batch_size=4, lr=1e-2, seed=rnd)
        task.checkpoint(rnd, rnd, {})
    to_521335f_layout(out, ELSEWHERE)
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "aggregator"
    shutil.copytree(run, dest)
    return dest


def files_naming(folder: Path, text: str) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
            and p.suffix in (".json", ".md", ".txt", "") and text in p.read_text(errors="ignore")]


def test_an_old_checkpoint_finds_its_base_beside_it(old_run, tmp_path):
    from aggregator.checkpoint import base_model_dir, base_labels, resolve_checkpoint

    ck = resolve_checkpoint(old_run)
    assert ck.name == "round-0002" and base_model_dir(ck) == old_run / "base_model"
    assert base_labels(old_run / "base_model") is None  # the release named no labels
    # an absolute path that exists is not followed either: the base is the one beside the checkpoints
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "config.json").write_text("{}")
    run = copy_of(old_run, tmp_path)
    to_521335f_layout(run, str(decoy))
    assert base_model_dir(resolve_checkpoint(run)) == run / "base_model"


def edgetune(*args):
    from edgetune.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_predict_and_export_work_on_an_old_output_folder(old_run, tmp_path):
    r = edgetune("predict", old_run, "lovely", "--json")
    assert r.exit_code == 0, r.output + r.stderr
    assert json.loads(r.stdout)["label"] in ("LABEL_0", "LABEL_1")
    assert "names no labels" in r.stderr and "--labels" in r.stderr  # says so, and what to do
    r = edgetune("predict", old_run, "lovely", "--json", "--labels", ",".join(LABELS))
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    assert set(json.loads(r.stdout)["probabilities"]) == set(LABELS)
    r = edgetune("predict", old_run, "lovely", "--labels", "a,b,c")
    assert r.exit_code == 2 and "3 label names" in r.stderr and "Traceback" not in r.stderr

    out = tmp_path / "model"
    r = edgetune("export", old_run, out, "--labels", ",".join(LABELS))
    assert r.exit_code == 0, r.output + r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert files_naming(out, ELSEWHERE) == [] and files_naming(out, str(old_run)) == []
    assert files_naming(old_run, ELSEWHERE) != []  # read as it is: export and predict change nothing


def test_the_aggregator_resumes_an_old_output_folder_and_upgrades_it(old_run, tmp_path):
    from aggregator.checkpoint import BASE_REF, base_labels, load_checkpoint_state
    from aggregator.settings import AggregatorSettings
    from aggregator.tasks import ClassifierTask

    run = copy_of(old_run, tmp_path)
    s = AggregatorSettings(output_dir=run, num_layers=1, labels=list(LABELS), rounds=3, max_length=32)
    task = ClassifierTask(s, run)
    ck = task.resume()
    assert (ck.round, ck.version) == (2, 2)
    saved = load_checkpoint_state(ck.path)
    state = task.global_state()
    assert all(state[k].equal(saved[k]) for k in saved)  # the global of round 2, loaded
    for rnd in ("round-0001", "round-0002"):
        cfg = json.loads((run / "checkpoints" / rnd / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == BASE_REF
    assert base_labels(run / "base_model") == list(LABELS)  # from the aggregator's settings
    task.checkpoint(3, 3, {})  # the next round: a card, though the earlier rounds have none
    assert (run / "checkpoints" / "round-0003" / "model_card.json").is_file()
    assert files_naming(run, ELSEWHERE) == [] and files_naming(run, str(tmp_path)) == []
