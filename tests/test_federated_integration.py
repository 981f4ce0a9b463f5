"""The aggregator and 3 agents as separate processes against a real Mosquitto, 2 rounds."""

from __future__ import annotations

import json
import time

import pytest

from broker import codec
from broker.messages import AgentStatus, parse
from broker.topics import Topics
from broker.transport import MqttTransport
from tests.conftest import finish_all, spawn

AGENTS = 3
ROUNDS = 2
EVAL_LIMIT = 400
FLEET = "itest"


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory):
    from edgetune.local_broker import start_mosquitto

    tmp = tmp_path_factory.mktemp("fed")
    broker = start_mosquitto(workdir=tmp / "mosquitto")
    common = {"EDGETUNE_BROKER_URL": broker.url, "EDGETUNE_FLEET": FLEET}
    out = tmp / "aggregator"
    logs = [tmp / "aggregator.log"] + [tmp / f"agent-{i}.log" for i in range(AGENTS)]
    procs = [spawn("aggregator.cli", ["run", "--rounds", str(ROUNDS), "--min-agents", str(AGENTS),
                                      "--expected-agents", str(AGENTS), "--max-local-steps", "12",
                                      "--eval-limit", str(EVAL_LIMIT), "--round-timeout", "600",
                                      "--output-dir", str(out)], logs[0], EDGETUNE_EVAL_DATA="demo:vader", **common)]
    for i in range(AGENTS):
        procs.append(spawn("edge_agent.cli", ["run"], logs[i + 1], EDGETUNE_AGENT_ID=f"agent-{i}",
                           EDGETUNE_DATA="demo:vader", EDGETUNE_PARTITION="iid", EDGETUNE_NUM_PARTITIONS=AGENTS,
                           EDGETUNE_PARTITION_INDEX=i, EDGETUNE_DATA_LIMIT=600, **common))
    try:
        finish_all(procs, timeout=600, logs=logs)
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in lines if r.get("eval") != "federated"]  # the rounds, evaluated centrally
        federated = [r for r in lines if r.get("eval") == "federated"]  # the agents' evaluations
        # every agent's retained status, as the broker holds it after the run
        watcher = MqttTransport("itest-watcher", broker.url)
        watcher.subscribe(Topics(FLEET).all_status)
        watcher.connect()
        statuses = {}
        deadline = time.monotonic() + 10
        while len(statuses) < AGENTS and time.monotonic() < deadline:
            m = watcher.get(timeout=0.5)
            if m is not None:
                st = parse(codec.decode(m.payload).header, AgentStatus)
                statuses[st.agent_id] = st
        watcher.close()
        yield {"rows": rows, "federated": federated, "out": out, "statuses": statuses}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        broker.close()


def test_global_accuracy_improved(fed_run):
    rows = fed_run["rows"]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert all(r.get("outcome", "complete") == "complete" for r in rows[1:])
    first, last = rows[0]["accuracy"], rows[-1]["accuracy"]
    # an untrained head sits near chance; 2 rounds of 3 x 12 steps must move it by 10+ points
    assert last >= first + 0.10, f"accuracy {first:.3f} -> {last:.3f}"


def test_the_agents_evaluated_every_global_on_their_held_out_rows(fed_run):
    """Federated evaluation beside the central one: each global (0..ROUNDS) evaluated by every agent
    on its held-out slice (20% of its 600 examples, by hash), and the figures learn like the central ones."""
    from edge_agent.runner import local_examples
    from edge_agent.settings import AgentSettings

    fed = fed_run["federated"]
    assert [r["version"] for r in fed] == list(range(ROUNDS + 1))
    assert all(r["eval_agents"] == AGENTS and "eval_missing" not in r for r in fed), fed
    held = sum(len(local_examples(AgentSettings(agent_id=f"agent-{i}", data="demo:vader", partition="iid",
                                                num_partitions=AGENTS, partition_index=i, data_limit=600))[1])
               for i in range(AGENTS))  # each agent's held-out slice, chosen the agent's way
    assert all(r["eval_examples"] == held for r in fed) and 3 * 80 <= held <= 3 * 160, (held, fed)
    assert fed[-1]["accuracy"] >= fed[0]["accuracy"] + 0.10, [r["accuracy"] for r in fed]
    assert all(r["eval"] == "central" for r in fed_run["rows"])


def test_every_agent_ended_on_the_same_global_version(fed_run):
    final = fed_run["rows"][-1]["version"]
    assert final == ROUNDS
    st = fed_run["statuses"]
    assert sorted(st) == [f"agent-{i}" for i in range(AGENTS)]
    assert {s.global_version for s in st.values()} == {final}, {k: v.global_version for k, v in st.items()}
    assert all(s.state.value == "offline" for s in st.values())


def test_saved_adapter_loads_in_plain_transformers_with_the_reported_accuracy(fed_run):
    """Plain transformers + peft code, no EdgeTune model code: the checkpoint is self-contained."""
    import random

    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from data.sentiment import train_test_split

    out = fed_run["out"]
    ckpt = out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip()
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    base_dir = ckpt / cfg["base_model_name_or_path"]  # ../../base_model: relative to the checkpoint
    base = AutoModelForSequenceClassification.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, str(ckpt)).eval()
    _, test = train_test_split()
    test = random.Random(0).sample(test, EVAL_LIMIT)  # the aggregator's eval subset (seed 0)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 64):
            batch = test[i : i + 64]
            enc = tok([e.text for e in batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor([e.label for e in batch])).sum())
    reported = fed_run["rows"][-1]["accuracy"]
    assert abs(correct / len(test) - reported) < 1e-9, (correct / len(test), reported)
