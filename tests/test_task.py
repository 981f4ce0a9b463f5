"""The fleet's task: one definition the aggregator publishes, a model identity that is the same on
every machine, and an agent whose local model does not fit it refused on both sides without
blocking the round."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request

import pytest

from broker import codec
from broker.messages import AgentState, AgentStatus, TaskDefinition, parse
from broker.topics import Topics
from broker.transport import MqttTransport
from edgetune.local_broker import free_port
from models.fingerprint import MODEL_FILES, ModelNotFound, config_hash, model_hash
from models.settings import DecoderSettings, ModelSettings
from tests.conftest import finish_all, kill_all, spawn


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_model_hash_is_sorted_relative_paths_and_file_hashes_of_the_model_files(tmp_path):
    a = tmp_path / "here" / "model"
    a.mkdir(parents=True)
    files = {"config.json": b'{"model_type": "bert"}', "model.safetensors": b"weights", "vocab.txt": b"[PAD]\n",
             "tokenizer_config.json": b"{}"}
    for name, body in files.items():
        (a / name).write_bytes(body)
    (a / "README.md").write_text("not part of the model")  # neither is anything else in the folder
    (a / "onnx").mkdir()
    (a / "onnx" / "model.onnx").write_bytes(b"an export")
    want = _sha(json.dumps(sorted((n, _sha(b)) for n, b in files.items()), separators=(",", ":")).encode())
    assert model_hash(a) == want
    # the same files elsewhere (another machine's path) have the same identity; one changed byte does not
    b = tmp_path / "elsewhere" / "copy"
    b.mkdir(parents=True)
    for name, body in files.items():
        (b / name).write_bytes(body)
    assert model_hash(b) == want
    (b / "model.safetensors").write_bytes(b"weightz")
    assert model_hash(b) != want
    assert "*.safetensors" in MODEL_FILES and "*.gguf" in MODEL_FILES
    with pytest.raises(ModelNotFound, match="no model at"):
        model_hash(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="config.json"):
        model_hash(tmp_path / "empty")
    assert config_hash({"n_layer": 2}, 0) == config_hash({"n_layer": 2}, 0) != config_hash({"n_layer": 2}, 1)


def test_the_task_hash_covers_every_field_and_differences_name_them():
    base = TaskDefinition(**ModelSettings().classifier_task_fields())
    # the shipped MiniLM by its hub name: never a path of this machine
    assert base.labels == ["negative", "positive"] and base.mode == "federated"
    assert base.model == "sentence-transformers/all-MiniLM-L6-v2"
    for change in ({"num_layers": 3}, {"labels": ["neg", "pos"]}, {"lora_r": 4}, {"max_length": 32}, {"seed": 1},
                   {"model_hash": "0" * 64}):
        other = base.model_copy(update=change)
        assert other.hash != base.hash, change
        assert [d.split(":")[0] for d in base.differences(other)] == list(change)
    assert TaskDefinition(**ModelSettings().classifier_task_fields()).hash == base.hash  # deterministic
    split = TaskDefinition(**DecoderSettings(split_n_layer=4, split_n_embd=64, split_n_head=4,
                                             split_cut=2).decoder_task_fields())
    assert split.mode == "split" and split.cut == 2 and split.hash != base.hash
    with pytest.raises(ValueError, match="EDGETUNE_NUM_LABELS"):
        ModelSettings(labels=("a", "b", "c"))
    assert ModelSettings(num_labels=3).label_names() == ["label_0", "label_1", "label_2"]


def _scrape(port: int, sample: str, want: float, timeout: float = 30.0) -> float:
    """The value of one sample on a /metrics endpoint once it equals `want` (or the last seen at the timeout)."""
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            text = ""
        got = next((float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(sample + " ")), None)
        if got == want:
            break
        time.sleep(0.2)
    return got


def test_agents_whose_model_differs_from_the_task_or_is_missing_are_refused_on_both_sides_and_the_round_goes_on(
        mosquitto, tmp_path):
    """The aggregator's task names a model folder ("minilm"); one agent holds another model under that
    name (one config value differs), another holds none. Both refuse, say why in their status
    (counted on both sides), and a third agent makes the round."""
    from models.classifier import default_model_path
    from tests.test_agent_task_model import link_model

    fleet = "task-itest"
    topics = Topics(fleet)
    watcher = MqttTransport("task-watcher", mosquitto.url)
    watcher.subscribe(topics.task)
    watcher.subscribe(topics.status("edge-other"))
    watcher.subscribe(topics.status("edge-none"))
    watcher.connect()
    model = link_model(default_model_path(), tmp_path / "fleet-models" / "minilm")
    other = tmp_path / "other-models"
    link_model(default_model_path(), other / "minilm", changed={"hidden_dropout_prob": 0.2})
    agg_port, agent_port = free_port(), free_port()
    out = tmp_path / "aggregator"
    logs = [tmp_path / "aggregator.log", tmp_path / "other.log", tmp_path / "none.log", tmp_path / "light.log"]
    common = dict(EDGETUNE_BROKER_URL=mosquitto.url, EDGETUNE_FLEET=fleet)
    procs = [spawn("aggregator.cli", ["run", "--rounds", "1", "--min-agents", "1", "--expected-agents", "1",
                                      "--round-timeout", "60", "--eval-limit", "16", "--output-dir", str(out),
                                      "--metrics-port", str(agg_port)], logs[0], EDGETUNE_METRICS_LINGER_S="0",
                   EDGETUNE_MODEL=str(model), **common)]
    try:
        procs.append(spawn("edge_agent.cli", ["run", "--id", "edge-other", "--metrics-port", str(agent_port)], logs[1],
                           EDGETUNE_MODEL_DIR=str(other), EDGETUNE_DATA="demo:vader", EDGETUNE_DATA_LIMIT="50",
                           EDGETUNE_METRICS_LINGER_S="0", **common))
        procs.append(spawn("edge_agent.cli", ["run", "--id", "edge-none"], logs[2], EDGETUNE_DATA="demo:vader",
                           EDGETUNE_MODEL_DIR=str(tmp_path / "no-models"), EDGETUNE_DATA_LIMIT="50", **common))
        task, status = None, {}
        deadline = time.monotonic() + 120
        while (len(status) < 2 or any(x.state != AgentState.refused for x in status.values())) and \
                time.monotonic() < deadline:
            m = watcher.get(timeout=0.5)
            if m is None or not m.payload:
                continue
            f = codec.decode(m.payload)
            if m.topic == topics.task:
                task = parse(f.header, TaskDefinition)
            else:
                st = parse(f.header, AgentStatus)
                status[st.agent_id] = st
        assert task is not None and task.model == "minilm"
        for aid, log in (("edge-other", logs[1]), ("edge-none", logs[2])):
            assert aid in status and status[aid].state == AgentState.refused, log.read_text()[-2000:]
        assert "is not the task's" in status["edge-other"].reason and task.model_hash[:12] in status["edge-other"].reason
        assert "is not on this device: looked in" in status["edge-none"].reason
        assert str(tmp_path / "no-models" / "minilm") in status["edge-none"].reason
        # counted on both sides, once per agent
        assert _scrape(agent_port, 'edgetune_agent_rejected_messages_total{reason="wrong_task"}', 1) == 1
        assert _scrape(agg_port, "edgetune_aggregator_agents_refused_total", 2) == 2
        assert _scrape(agg_port, "edgetune_aggregator_agents_refusing", 2) == 2
        # a light agent (the real protocol, synthetic adapters) makes the round
        procs.append(spawn("edge_agent.light", ["--id", "light-1", "--broker", mosquitto.url, "--fleet", fleet],
                           logs[3]))
        finish_all([procs[0], procs[3]], timeout=120, logs=[logs[0], logs[3]])
    finally:
        kill_all(procs)
        watcher.close()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 1 and rows[-1]["selected"] == ["light-1"] and rows[-1]["answered"] == ["light-1"]
    assert "edge-other" in logs[0].read_text() and "refuses the task" in logs[0].read_text()
