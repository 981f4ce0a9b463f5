"""The one data loader (data/sources.py) and the agent's data: every format, folders, demos, labels,
each kind of bad data (typed error with file and line, exit 2 through the CLIs, nothing stored or
published), max_bad_rows 0 and N, `edgetune-agent import`, and an agent without data not being
selected by the service."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from typer.testing import CliRunner

from data.records import DataError, LabelledText
from data.sources import holdout_split, load_source
from tests.conftest import join_demo_task

runner = CliRunner()
LABELS = ("negative", "positive")
ROWS = [("a fine film", "positive"), ("a dull, long film", "negative"), ("loved it", "positive")]


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        pytest.fail("Parquet support needs pyarrow, which is missing here: pip install pyarrow "
                    "(it is in the agent extra: pip install '.[agent]')")
    return pq


def write_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    return path


def write_jsonl(path, rows, **extra):
    path.write_text("".join(json.dumps({"text": t, "label": y, **extra}) + "\n" for t, y in rows))
    return path


def write_parquet(path, columns: dict):
    pq = _pyarrow()
    import pyarrow as pa

    pq.write_table(pa.table(columns), path)
    return path


def triples(loaded):
    return [(e.text, e.label, e.label_name) for e in loaded.examples]


EXPECTED = [("a fine film", 1, "positive"), ("a dull, long film", 0, "negative"), ("loved it", 1, "positive")]


# -- formats ----------------------------------------------------------------------------------


def test_csv_jsonl_and_parquet_give_the_same_examples(tmp_path):
    csv_ = load_source(write_csv(tmp_path / "a.csv", ROWS), labels=LABELS)
    jsonl = load_source(write_jsonl(tmp_path / "b.jsonl", ROWS), labels=LABELS)
    parquet = load_source(write_parquet(tmp_path / "c.parquet", {"text": [t for t, _ in ROWS],
                                                                 "label": [y for _, y in ROWS]}), labels=LABELS)
    for loaded in (csv_, jsonl, parquet):
        assert triples(loaded) == EXPECTED and loaded.labels == LABELS and loaded.num_skipped == 0
    # without a domain column the domain is the file's name; uids are <domain>:<position>
    assert [e.uid for e in csv_.examples] == ["a:0", "a:1", "a:2"]
    assert all(isinstance(e, LabelledText) for e in parquet.examples)


def test_other_columns_domain_id_and_labels_read_from_the_data(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text("\n".join(json.dumps({"body": t, "y": y, "domain": "shop", "id": f"r{i}"})
                           for i, (t, y) in enumerate(ROWS)) + "\n\n")  # a blank line is not a row
    loaded = load_source(p, text_column="body", label_column="y")
    assert loaded.labels == ("negative", "positive")  # sorted names
    assert [(e.domain, e.uid) for e in loaded.examples] == [("shop", "shop:r0"), ("shop", "shop:r1"), ("shop", "shop:r2")]
    # integer labels are class indices; given names, an in-range integer that is no name is an index too
    ints = load_source(write_csv(tmp_path / "i.csv", [("x", 2), ("y", 0)]))
    assert ints.labels == ("0", "1", "2") and [e.label for e in ints.examples] == [2, 0]
    assert [e.label for e in load_source(write_csv(tmp_path / "j.csv", [("x", 1)]), labels=LABELS).examples] == [1]


def test_a_folder_reads_its_data_files_in_name_order(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    write_jsonl(d / "b.jsonl", ROWS[1:])
    write_csv(d / "a.csv", ROWS[:1])
    (d / "notes.md").write_text("not data")
    (d / "README.txt").write_text("plain text: read by text-only loads only")
    (d / ".hidden.csv").write_text("junk")
    loaded = load_source(d, labels=LABELS)
    assert triples(loaded) == EXPECTED and [f.name for f in loaded.files] == ["a.csv", "b.jsonl"]
    assert [e.domain for e in loaded.examples] == ["a", "b", "b"]
    assert len({e.uid for e in loaded.examples}) == 3
    assert len(load_source(d, text_only=True)) == 4


def test_text_only_loads_plain_text_and_jsonl_for_language_modelling(tmp_path):
    (tmp_path / "notes.txt").write_text("first document\n\nsecond one\r\n")
    loaded = load_source(tmp_path / "notes.txt", text_only=True)
    assert [(e.text, e.label) for e in loaded.examples] == [("first document", None), ("second one", None)]
    assert loaded.labels is None
    assert [e.text for e in load_source(write_jsonl(tmp_path / "t.jsonl", ROWS), text_only=True).examples] == \
        [t for t, _ in ROWS]


def test_demos_by_name_with_their_fixed_held_out_split():
    from data.corpus import lm_split
    from data.sentiment import train_test_split

    train, test = train_test_split()
    vader = load_source("demo:vader", labels=LABELS, split="train")
    assert [(e.text, e.label, e.domain, e.uid) for e in vader.examples] == \
        [(e.text, e.label, e.domain, e.uid) for e in train]
    assert len(load_source("demo:vader", split="test")) == len(test)
    flipped = load_source("demo:vader", labels=("positive", "negative"), split="test")
    assert [e.label for e in flipped.examples] == [1 - e.label for e in test]
    brown = load_source("demo:brown", text_only=True, split="train")
    lm_train, _ = lm_split()
    assert len(brown) == len(lm_train) and brown.examples[7].text == lm_train[7].text
    assert len(load_source("demo:brown").labels) == 15  # Brown genres: a multi-class demo
    with pytest.raises(DataError) as e:
        load_source("demo:nope")
    assert e.value.reason == "unknown_demo" and "demo:vader" in str(e.value)
    with pytest.raises(DataError) as e:
        load_source("demo:brown", labels=LABELS)
    assert e.value.reason == "unknown_label"


# -- bad data ---------------------------------------------------------------------------------

BAD = [
    # name, file, content (str or bytes), reason, where, words in the message
    ("missing file", "gone.csv", None, "missing_file", None, "does not exist"),
    ("not utf-8", "a.csv", b"text,label\nfine,positive\ncaf\xe9,negative\n", "encoding", "line 3", "UTF-8"),
    ("missing column", "a.csv", "body,label\nfine,positive\n", "missing_column", None, "--text-column"),
    ("empty file", "a.csv", "", "empty", None, "no rows"),
    ("header only", "a.csv", "text,label\n", "empty", None, "no rows"),
    ("unknown label", "a.csv", "text,label\nfine,positive\nhm,maybe\n", "unknown_label", "row 3", "'maybe'"),
    ("bad json", "a.jsonl", '{"text": "x", "label": "positive"}\n{"text": \n', "malformed_row", "line 2", "JSON"),
    ("not an object", "a.jsonl", '["x", "positive"]\n', "malformed_row", "line 1", "object"),
    ("empty text", "a.jsonl", '{"text": "  ", "label": "positive"}\n', "empty_text", "line 1", "empty text"),
    ("text of a wrong type", "a.jsonl", '{"text": 5, "label": "positive"}\n', "bad_type", "line 1", "int"),
    ("label of a wrong type", "a.jsonl", '{"text": "x", "label": 1.0}\n', "bad_type", "line 1", "float"),
    ("no label field", "a.jsonl", '{"text": "x"}\n', "missing_column", "line 1", "'label'"),
    ("fields off", "a.csv", "text,label\nfine,positive\na, b,negative\n", "malformed_row", "row 3", "3 fields"),
    ("plain text for labels", "a.txt", "some text\n", "missing_column", None, "label"),
    ("unknown format", "a.xlsx", "x", "unsupported_format", None, ".csv"),
]


@pytest.mark.parametrize("name,fname,content,reason,where,says", BAD, ids=[b[0] for b in BAD])
def test_bad_data_is_a_typed_error_naming_file_and_line(tmp_path, name, fname, content, reason, where, says):
    p = tmp_path / fname
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    with pytest.raises(DataError) as e:
        load_source(p, labels=LABELS)
    err = e.value
    assert isinstance(err, ValueError) and err.reason == reason, str(err)
    assert err.path == str(p) and err.where == where and str(p) in str(err)
    assert says in str(err) and (where is None or where in str(err))


def test_a_parquet_column_of_the_wrong_type_or_nulls_is_a_bad_row(tmp_path):
    p = write_parquet(tmp_path / "a.parquet", {"text": ["fine", None], "label": ["positive", "negative"]})
    with pytest.raises(DataError) as e:
        load_source(p, labels=LABELS)
    assert (e.value.reason, e.value.where) == ("empty_text", "row 2")
    p = write_parquet(tmp_path / "b.parquet", {"text": ["fine"], "y": ["positive"]})
    with pytest.raises(DataError, match="has no 'label' column"):
        load_source(p, labels=LABELS)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pip install pyarrow") as e:
        load_source(tmp_path / "a.parquet")
    assert e.value.reason == "missing_dependency"


def test_max_bad_rows_refuses_at_the_first_or_skips_up_to_n_and_counts_them(tmp_path, caplog):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "good", "label": "positive"}\n{broken\n{"text": "ok", "label": "negative"}\n'
                 '{"text": "hm", "label": "maybe"}\n{"text": "fine", "label": "positive"}\n')
    with pytest.raises(DataError) as e:  # the default: refuse the file at its first bad row
        load_source(p, labels=LABELS)
    assert (e.value.reason, e.value.where) == ("malformed_row", "line 2")
    with pytest.raises(DataError) as e:  # one allowed, the second refuses
        load_source(p, labels=LABELS, max_bad_rows=1)
    assert (e.value.reason, e.value.where) == ("too_many_bad_rows", "line 4") and "max_bad_rows" in str(e.value)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgetune.data"):
        loaded = load_source(p, labels=LABELS, max_bad_rows=2)
    assert [e.text for e in loaded.examples] == ["good", "ok", "fine"]
    assert loaded.num_skipped == 2 and [(b.where, b.reason) for b in loaded.skipped] == \
        [("line 2", "malformed_row"), ("line 4", "unknown_label")]
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 and "line 2" in logged[0] and "line 4" in logged[1]
    # positions (uids) do not shift when rows are skipped
    assert [e.uid for e in loaded.examples] == ["a:0", "a:2", "a:4"]
    # a file whose every row is bad is refused, even within the budget
    bad = tmp_path / "b.jsonl"
    bad.write_text("{x\n")
    with pytest.raises(DataError) as e:
        load_source(bad, labels=LABELS, max_bad_rows=5)
    assert e.value.reason == "empty"


# -- the simulator's data goes through the same loader -------------------------------------------


def test_the_simulator_loads_through_the_registry(tmp_path):
    from edgetune.sim_config import SimConfig, SimulationError, load_examples, load_splits

    p = write_csv(tmp_path / "s.csv", ROWS)
    assert [(e.text, e.label, e.domain, e.uid) for e in load_examples(p)] == \
        [(t, y, "data", f"data:{i}") for i, (t, y, _) in enumerate(EXPECTED)]
    with pytest.raises(SimulationError, match=r"bad.csv, row 3: has 1 fields"):
        load_examples(_bad_csv(tmp_path))
    train, test = load_splits(SimConfig(train_limit=50, eval_limit=20))
    assert len(train) == 50 and len(test) == 20


def _bad_csv(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('text,label\n"x",maybe\n"y"\n')
    return p


# -- the agent --------------------------------------------------------------------------------


def agent_settings(**kw):
    from edge_agent.settings import AgentSettings

    return AgentSettings(agent_id="a1", **kw)


def test_the_agent_trains_on_its_data_and_the_vader_shard_only_by_name(tmp_path):
    from data.partition import partition
    from data.sentiment import train_test_split
    from edge_agent.runner import local_examples

    assert local_examples(agent_settings(), LABELS) == ([], [])  # no data setting: no data (the store only)
    csv = str(write_csv(tmp_path / "m.csv", ROWS))
    mine, held = local_examples(agent_settings(data=csv, eval_fraction=0), LABELS)
    assert [(e.text, e.label) for e in mine] == [(t, y) for t, y, _ in EXPECTED] and held == []
    # the held-out slice for federated evaluation: a fixed share of the agent's rows, never trained on
    train, held = local_examples(agent_settings(data=csv, eval_fraction=0.5), LABELS)
    assert (train, held) == holdout_split(mine, 0.5) and 0 < len(held) < len(mine)
    assert {e.uid for e in train}.isdisjoint({e.uid for e in held}) and len(train) + len(held) == len(mine)
    capped_train, capped = local_examples(agent_settings(data=csv, eval_fraction=0.5, eval_max_examples=1), LABELS)
    assert capped == held[:1] and sorted(e.uid for e in capped_train) == sorted(e.uid for e in train + held[1:])
    # demo:vader keeps today's shard: the training split, partitioned by the partition settings
    s = agent_settings(data="demo:vader", partition="iid", num_partitions=3, partition_index=1, data_limit=50,
                       eval_fraction=0)
    train, _ = train_test_split()
    part = partition("iid", labels=[e.label for e in train], domains=[e.domain for e in train], k=3, seed=0)[1]
    import random

    want = [train[i] for i in part]
    random.Random(0).shuffle(want)
    assert [(e.text, e.uid) for e in local_examples(s, LABELS)[0]] == [(e.text, e.uid) for e in want[:50]]
    with pytest.raises(DataError):
        local_examples(agent_settings(data=str(_bad_csv(tmp_path))))


def test_agent_run_with_bad_data_exits_2_before_connecting(tmp_path):
    from edge_agent.cli import app

    env = {"EDGETUNE_BROKER_URL": "mqtt://127.0.0.1:9", "EDGETUNE_AGENT_ID": "a1"}  # nothing listens there
    r = runner.invoke(app, ["run", "--data", str(tmp_path / "gone.csv")], env=env)
    assert r.exit_code == 2 and "gone.csv: does not exist" in r.output, r.output
    # a malformed row (its labels are checked against the task's when the task comes: test_agent_task_model)
    r = runner.invoke(app, ["run", "--data", str(_bad_csv(tmp_path))], env=env)
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1, r.output
    assert "bad.csv, row 3: has 1 fields where the header has 2" in errors[0]
    r = runner.invoke(app, ["run", "--max-bad-rows", "-1"], env=env)
    assert r.exit_code == 2 and "EDGETUNE_MAX_BAD_ROWS" in r.output


def test_labels_setting_takes_names_separated_by_commas(monkeypatch):
    from aggregator.settings import AggregatorSettings
    from common.settings import load_settings

    monkeypatch.setenv("EDGETUNE_LABELS", "neg, neutral,pos")
    monkeypatch.setenv("EDGETUNE_NUM_LABELS", "3")
    monkeypatch.setenv("EDGETUNE_EVAL_DATA", "demo:vader")
    s = load_settings(AggregatorSettings)
    assert s.labels == ("neg", "neutral", "pos") and s.eval_data == "demo:vader"
    monkeypatch.setenv("EDGETUNE_LABELS", '["a", "b"]')
    monkeypatch.setenv("EDGETUNE_NUM_LABELS", "2")
    assert load_settings(AggregatorSettings).labels == ("a", "b")


def test_an_agent_that_gets_data_publishes_its_status_again():
    from broker import codec
    from broker.messages import AgentState, AgentStatus, parse
    from edge_agent.runner import AgentRunner

    class Store:
        trainable_count = 0

        def tick(self):
            pass

    class Transport:
        def __init__(self):
            self.sent = []

        def publish(self, topic, payload, retain=False, **kw):
            self.sent.append(parse(codec.decode(payload).header, AgentStatus))

    a = AgentRunner(agent_settings(), examples=[])
    a.device, a.transport, a.trainer = Store(), Transport(), object()  # built for its task
    a.publish_status(AgentState.online)
    a.idle()
    assert [s.num_examples for s in a.transport.sent] == [0]  # nothing new: no status
    a.device.trainable_count = 3  # `edgetune-agent import` filled the store
    a.idle()
    a.idle()
    assert [(s.state, s.num_examples) for s in a.transport.sent] == [(AgentState.online, 0), (AgentState.online, 3)]


# -- edgetune-agent import ----------------------------------------------------------------------


def stored(state):
    from edge_agent.local_settings import STORE_FILE
    from edge_agent.store import SampleStore

    with SampleStore(state / STORE_FILE) as s:
        return [(x.text, x.label, x.source) for x in s.labelled()]


def agent_cli(*args, **env):
    from edge_agent.cli import app

    return runner.invoke(app, list(args), env={"EDGETUNE_STATE_DIR": "", **env})


def test_import_loads_a_file_into_the_store_in_one_go(tmp_path):
    join_demo_task(tmp_path)
    p = write_jsonl(tmp_path / "in.jsonl", ROWS)
    r = agent_cli("import", str(p), "--state-dir", str(tmp_path))
    assert r.exit_code == 0 and "imported 3 labelled samples" in r.output, r.output
    assert stored(tmp_path) == [(t, y, "import") for t, y, _ in EXPECTED]
    q = tmp_path / "other.csv"
    q.write_text("txt,cls\nnice,1\nbad,0\noops,maybe\n")
    r = agent_cli("import", str(q), "--text-column", "txt", "--label-column", "cls", "--max-bad-rows", "1",
                  "--state-dir", str(tmp_path))
    assert r.exit_code == 0 and "1 bad rows skipped" in r.output, r.output
    assert stored(tmp_path)[3:] == [("nice", 1, "import"), ("bad", 0, "import")]


@pytest.mark.parametrize("content,says", [
    ('text,label\nfine,positive\nhm,maybe\n', "row 3: label 'maybe'"),
    ('text,label\nfine,positive\n' + "x" * 2001 + ',negative\n', "row 3: text has 2001 characters"),
    ('text,lbl\nfine,positive\n', "has no 'label' column"),
])
def test_import_of_bad_data_exits_2_and_stores_nothing(tmp_path, content, says):
    join_demo_task(tmp_path)
    p = tmp_path / "in.csv"
    p.write_text(content)
    r = agent_cli("import", str(p), "--state-dir", str(tmp_path))
    assert r.exit_code == 2, r.output
    assert says in r.output and str(p) in r.output and "nothing stored" in r.output
    assert stored(tmp_path) == []


# -- the service selects only agents with data ----------------------------------------------------


def test_the_service_selects_only_agents_that_report_examples(tmp_path):
    from aggregator.coordinator import SyncCoordinator
    from aggregator.service import AggregatorService
    from aggregator.settings import AggregatorSettings
    from aggregator.strategies import make_strategy
    from broker import codec
    from broker.messages import AgentState, AgentStatus
    from broker.transport import Incoming

    s = AggregatorSettings(output_dir=str(tmp_path), min_agents=2, wait_for_agents_s=0.001)
    svc = AggregatorService(s)
    svc.coord = SyncCoordinator(make_strategy("fedavg"), {}, quorum=2, timeout_s=10, seed=0,
                                selection_size=s.selection_size)

    def status(agent, n):
        st = AgentStatus(agent_id=agent, state=AgentState.online, num_examples=n)
        svc._handle_status(agent, Incoming(svc.topics.status(agent), codec.encode(st), retain=True))

    status("a1", 120)
    status("empty", 0)
    status("a2", 7)
    assert sorted(svc.online) == ["a1", "a2", "empty"] and svc.selectable() == ["a1", "a2"]
    rnd, _ = svc.coord.open_round(svc.selectable(), 0.0)
    assert sorted(rnd.selected) == ["a1", "a2"]
    # with too few agents that have data, the wait ends with what to do about the others
    svc.online.pop("a2")
    svc._pump = lambda until: None
    with pytest.raises(RuntimeError, match="1 of them have data.*empty report 0 examples"):
        svc._wait_for_agents()
    status("empty", 5)  # it got data: selectable from now on
    assert svc.selectable() == ["a1", "empty"]


def test_the_one_machine_run_asks_for_its_demo_by_name():
    from edgetune.runner import RunOptions, _agent_env

    env = lambda **kw: _agent_env(RunOptions(**kw), {}, "agent-1", 0)  # noqa: E731
    assert env()["EDGETUNE_DATA"] == "demo:vader"
    assert env(mode="split")["EDGETUNE_DATA"] == "demo:brown"
    assert env(data="mine.csv")["EDGETUNE_DATA"] == "mine.csv"
