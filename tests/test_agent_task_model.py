"""An agent holds no model settings: it builds its model from the fleet's task. The task's model is
found by name on the device (EDGETUNE_MODEL_DIR, or the models that ship offline) and checked
against the task's hash; the settings the previous release took fail at start-up naming their
replacement; the device commands take their labels from the task the agent saved."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from aggregator.settings import AggregatorSettings
from broker.messages import TaskDefinition
from common.settings import SettingsError, load_settings
from edge_agent.local_settings import REMOVED_SETTINGS
from edge_agent.settings import AgentSettings
from edge_agent.task_model import ModelMismatch, model_dirs, task_spec
from models.classifier import default_model_path, resolve_model, resolved_targets, spec_family
from models.fingerprint import ModelNotFound
from models.settings import task_fields


def _task(**settings) -> tuple[TaskDefinition, AggregatorSettings]:
    agg = AggregatorSettings(**settings)
    return TaskDefinition(**task_fields(agg)), agg


def link_model(src: str | Path, dest: Path, changed: dict | None = None) -> Path:
    """A model folder at `dest` whose files link to `src`'s; `changed`: config.json keys to alter (another model)."""
    dest.mkdir(parents=True)
    for f in Path(src).iterdir():
        if f.is_file():
            (dest / f.name).symlink_to(f)
    if changed:
        (dest / "config.json").unlink()
        (dest / "config.json").write_text(json.dumps({**json.loads((Path(src) / "config.json").read_text()), **changed}))
    return dest


@pytest.mark.parametrize("name", sorted(REMOVED_SETTINGS))
def test_each_removed_agent_setting_fails_at_start_up_naming_its_replacement(name, monkeypatch, tmp_path):
    value = "a,b" if name == "labels" else ("x" if "model" == name or name == "split_model" else "3")
    monkeypatch.setenv(f"EDGETUNE_{name.upper()}", value)
    with pytest.raises(SettingsError) as e:
        load_settings(AgentSettings, agent_id="a1")
    said = str(e.value)
    assert f"EDGETUNE_{name.upper()}" in said and "no longer an agent setting" in said and "aggregator" in said
    if name == "model":
        assert "EDGETUNE_MODEL_DIR" in said
    monkeypatch.delenv(f"EDGETUNE_{name.upper()}")
    f = tmp_path / "agent.json"  # in a settings file, too
    f.write_text(json.dumps({name: value}))
    with pytest.raises(SettingsError, match="no longer an agent setting"):
        load_settings(AgentSettings, f, agent_id="a1")
    load_settings(AgentSettings, agent_id="a1")  # without it the agent starts
    load_settings(AggregatorSettings)  # and the aggregator keeps them


def test_the_agent_builds_exactly_the_aggregators_classifier_from_the_task():
    for settings in ({}, {"labels": ["neg", "neutral", "pos"], "num_labels": 3, "num_layers": 2, "lora_r": 4,
                          "lora_alpha": 8, "max_length": 32, "model_seed": 5}):
        task, agg = _task(**settings)
        spec = task_spec(task, [])  # the shipped MiniLM: no model dir needed
        want = agg.classifier_spec()
        want = dataclasses.replace(want, model=resolve_model(want.model),
                                   target_modules=resolved_targets(want, spec_family(want)))
        assert spec == want, settings
        assert task.model == "sentence-transformers/all-MiniLM-L6-v2"  # a name, never this machine's path


def test_the_agent_builds_the_aggregators_split_decoder_from_the_task():
    task, agg = _task(mode="split", split_n_layer=4, split_n_embd=64, split_n_head=4, split_cut=2, seq_len=32,
                      split_seed=3, lora_r=4)
    assert task.config == {"n_layer": 4, "n_embd": 64, "n_head": 4}
    assert task_spec(task, []) == agg.decoder_spec()
    tampered = task.model_copy(update={"config": {"n_layer": 5, "n_embd": 64, "n_head": 4}})
    with pytest.raises(ModelMismatch, match="gpt2-config"):
        task_spec(tampered, [])


def test_a_model_folder_is_found_by_name_in_the_model_dirs_and_checked_against_the_task(tmp_path):
    mine = link_model(default_model_path(), tmp_path / "fleet" / "my-minilm")
    task, _ = _task(model=str(mine), labels=["a", "b", "c"], num_labels=3)
    assert task.model == "my-minilm"
    empty, there = tmp_path / "empty", tmp_path / "models"
    empty.mkdir()
    link_model(default_model_path(), there / "my-minilm")
    setting = os.pathsep.join([str(empty), str(there)])
    assert model_dirs(setting) == [empty, there]
    spec = task_spec(task, model_dirs(setting))  # the first folder that holds it
    assert spec.model == str(there / "my-minilm") and spec.num_labels == 3
    # missing: every place it looked, and what to do
    with pytest.raises(ModelNotFound) as e:
        task_spec(task, [empty])
    assert str(empty / "my-minilm") in str(e.value) and "EDGETUNE_MODEL_DIR" in str(e.value)
    with pytest.raises(ModelNotFound, match="EDGETUNE_MODEL_DIR is unset"):
        task_spec(task, [])
    # another model under the task's name (one config value differs): refused with both hashes' heads
    other = tmp_path / "other"
    link_model(default_model_path(), other / "my-minilm", changed={"hidden_dropout_prob": 0.2})
    with pytest.raises(ModelMismatch) as e:
        task_spec(task, [other])
    assert task.model_hash[:12] in str(e.value) and "copy the aggregator's model folder" in str(e.value)


def test_device_commands_take_the_labels_of_the_task_the_agent_saved(tmp_path):
    from typer.testing import CliRunner

    from edge_agent.cli import EXIT_INPUT, app
    from edge_agent.local_settings import save_task

    run = CliRunner().invoke
    state = tmp_path / "state"
    state.mkdir()
    args = ["--state-dir", str(state)]
    # before the agent has joined a fleet: labels by name are kept; an index means nothing yet
    r = run(app, ["feedback", "a gem of a book", "--label", "1", *args])
    assert r.exit_code == EXIT_INPUT and "give the label by name" in r.output, r.output
    r = run(app, ["feedback", "a gem of a book", "--label", "great", *args])
    assert r.exit_code == 0 and "(great)" in r.output, r.output
    # once it has: the task's labels, by name or index
    task, _ = _task(labels=["bad", "great"])
    save_task(state, task)
    r = run(app, ["feedback", "dull", "--label", "0", *args])
    assert r.exit_code == 0 and "(bad)" in r.output, r.output
    r = run(app, ["feedback", "dull", "--label", "meh", *args])
    assert r.exit_code == EXIT_INPUT and "unknown label 'meh'" in r.output, r.output


def test_the_agent_builds_for_the_task_that_comes_and_maps_its_data_to_the_tasks_labels(tmp_path):
    from data.records import DataError
    from edge_agent.runner import AgentRunner

    data = tmp_path / "mine.csv"
    data.write_text("text,label\n" + "".join(f"text {i},{'great' if i % 2 else 'awful'}\n" for i in range(20)))
    a = AgentRunner(AgentSettings(agent_id="a1", data=str(data), state_dir=str(tmp_path / "state"),
                                  http_port=None, onnx_export=False))
    a._setup()  # the data is read (and checked) before the task is known
    assert not a.ready() and a._unbuilt > 0 and a.num_examples() == 0 and a.local_task is None  # not selectable yet
    # a task of the other mode, or whose labels do not cover the data: nothing built
    split, _ = _task(mode="split", split_n_layer=2, split_n_embd=32, split_n_head=2, split_cut=1)
    assert "EDGETUNE_MODE=split" in a._adopt(split) and not a.ready()
    narrow, _ = _task(labels=["great", "meh"])
    with pytest.raises(DataError, match=r"mine.csv, row 2: label 'awful'"):
        a._adopt(narrow)
    assert not a.ready() and not (tmp_path / "state" / "task.json").exists()
    # the task that fits: its labels, in its order; its model; saved for the device commands
    task, _ = _task(labels=["meh", "great", "awful"], num_labels=3, num_layers=1)
    try:
        assert a._adopt(task) is None and a.ready() and a.local_task == task
        assert {e.label for e in a.examples} | {e.label for e in a.held_out} == {1, 2}
        assert a.trainer.spec.num_labels == 3 and a.trainer.spec.num_layers == 1
        assert json.loads((tmp_path / "state" / "task.json").read_text())["labels"] == ["meh", "great", "awful"]
        assert a.task_refusal(task.hash) is None and "not the one this agent built" in a.task_refusal("f" * 64)
    finally:
        a._teardown()


def test_the_one_machine_runner_gives_its_agents_no_model_settings_only_where_the_model_is(tmp_path):
    from edgetune.runner import RunOptions, _agent_env

    model = tmp_path / "fleet" / "my-minilm"
    model.mkdir(parents=True)
    env = {"EDGETUNE_MODEL": str(model), "EDGETUNE_LABELS": '["a", "b", "c"]', "EDGETUNE_NUM_LABELS": "3",
           "EDGETUNE_NUM_LAYERS": "2", "EDGETUNE_BROKER_URL": "mqtt://127.0.0.1:1883", "PATH": "/bin"}
    from edgetune.runner import _env

    shared = _env(RunOptions(agents=2, num_layers=2), "mqtt://127.0.0.1:1883", 5)  # `edgetune run --num-layers 2`
    assert shared["EDGETUNE_NUM_LAYERS"] == "2"  # the aggregator's task setting ...
    assert "EDGETUNE_NUM_LAYERS" not in _agent_env(RunOptions(agents=2), shared, "agent-1", 0)  # ... never the agents'
    got = _agent_env(RunOptions(agents=2), env, "agent-1", 0)
    assert not {f"EDGETUNE_{n.upper()}" for n in REMOVED_SETTINGS} & set(got)
    assert got["EDGETUNE_MODEL_DIR"] == str(tmp_path / "fleet") and got["EDGETUNE_BROKER_URL"] == env["EDGETUNE_BROKER_URL"]
    os.environ.update({k: v for k, v in got.items() if k.startswith("EDGETUNE_")})  # what the agent process reads
    try:
        assert load_settings(AgentSettings).model_dir == str(tmp_path / "fleet")
    finally:
        for k in [k for k in got if k.startswith("EDGETUNE_")]:
            os.environ.pop(k, None)
