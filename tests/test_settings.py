import json

import pytest

from aggregator.settings import AggregatorSettings
from common.settings import SettingsError, dump_settings, load_settings
from edge_agent.settings import AgentSettings


def test_priority_cli_over_env_over_file(tmp_path, monkeypatch):
    f = tmp_path / "agg.json"
    f.write_text(json.dumps({"rounds": 7, "min_agents": 2, "fleet": "from-file"}))
    monkeypatch.setenv("EDGETUNE_ROUNDS", "9")
    s = load_settings(AggregatorSettings, f)
    assert (s.rounds, s.min_agents, s.fleet) == (9, 2, "from-file")
    s = load_settings(AggregatorSettings, f, rounds=3)
    assert s.rounds == 3


def test_toml_and_yaml_files(tmp_path):
    (tmp_path / "a.toml").write_text('rounds = 4\nstrategy = "fedavg"\n')
    (tmp_path / "a.yaml").write_text("rounds: 6\n")
    assert load_settings(AggregatorSettings, tmp_path / "a.toml").rounds == 4
    assert load_settings(AggregatorSettings, tmp_path / "a.yaml").rounds == 6


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (AggregatorSettings, {"rounds": 0}, "rounds"),
        (AggregatorSettings, {"broker_url": "http://x"}, "broker_url"),
        (AggregatorSettings, {"fleet": "a/b"}, "fleet"),
        (AggregatorSettings, {"min_agents": 3, "expected_agents": 2}, "expected_agents"),
        (AgentSettings, {"partition": "nope"}, "partition"),
        (AgentSettings, {"agent_id": "bad id!"}, "agent_id"),
        (AgentSettings, {"num_partitions": 2, "partition_index": 2}, "partition_index"),
        (AgentSettings, {"max_packet_bytes": 1000}, "max_packet_bytes"),
    ],
)
def test_errors_name_the_bad_field(cls, kwargs, field):
    with pytest.raises(SettingsError, match=field):
        load_settings(cls, **kwargs)


def test_env_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv("EDGETUNE_ROUNDS", "many")
    with pytest.raises(SettingsError, match="EDGETUNE_ROUNDS"):
        load_settings(AggregatorSettings)


def test_lora_settings_reach_both_modes(monkeypatch):
    cls = AggregatorSettings  # the agents take them from the task (tests/test_agent_task_model.py)
    default = load_settings(cls, mode="split")
    assert (default.decoder_spec().lora_r, default.decoder_spec().lora_alpha) == (8, 16)
    monkeypatch.setenv("EDGETUNE_LORA_R", "4")
    monkeypatch.setenv("EDGETUNE_LORA_ALPHA", "32")
    s = load_settings(cls, mode="split")
    assert (s.decoder_spec().lora_r, s.decoder_spec().lora_alpha) == (4, 32)
    assert (s.classifier_spec().lora_r, s.classifier_spec().lora_alpha) == (4, 32)


def test_unknown_file_key_and_missing_file(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"roundz": 3}))
    with pytest.raises(SettingsError, match="roundz"):
        load_settings(AggregatorSettings, f)
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(AggregatorSettings, tmp_path / "missing.json")


def test_effective_settings_are_written_with_secrets_masked(tmp_path):
    s = load_settings(AgentSettings, agent_id="kiosk-17", mqtt_password="hunter2")
    dump_settings(s, tmp_path / "settings.json")
    data = json.loads((tmp_path / "settings.json").read_text())
    assert data["agent_id"] == "kiosk-17"
    assert "hunter2" not in (tmp_path / "settings.json").read_text()


def test_the_packet_limit_is_one_setting_of_both_sides(monkeypatch):
    from broker.transport import DEFAULT_MAX_PACKET_BYTES

    assert load_settings(AggregatorSettings).max_packet_bytes == DEFAULT_MAX_PACKET_BYTES == 4 * 1024 * 1024
    monkeypatch.setenv("EDGETUNE_MAX_PACKET_BYTES", "2097152")
    assert load_settings(AggregatorSettings).max_packet_bytes == 2097152
    assert load_settings(AgentSettings, agent_id="a1").max_packet_bytes == 2097152
