"""Split learning against a real Mosquitto: 2 agents, int8 activations, a small GPT-2."""

from __future__ import annotations

import json
import time

import pytest
import torch

from aggregator.strategies import ClientUpdate, fedavg
from broker import codec
from broker.messages import GlobalAdapter, ModelUpdate, parse
from broker.topics import Topics
from broker.transport import MqttTransport
from tests.conftest import finish_all, spawn

FLEET = "split-itest"
ROUNDS = 2
SPLIT = {"EDGETUNE_MODE": "split", "EDGETUNE_SPLIT_LR": "1e-2", "EDGETUNE_FLEET": FLEET}
# the fleet's decoder: the aggregator's settings, which its task carries to the agents
TASK = {"EDGETUNE_SPLIT_N_LAYER": "4", "EDGETUNE_SPLIT_N_EMBD": "256", "EDGETUNE_SPLIT_N_HEAD": "4",
        "EDGETUNE_SPLIT_CUT": "2", "EDGETUNE_SEQ_LEN": "32"}


def test_two_agents_int8_perplexity_falls_and_head_adapters_are_averaged(mosquitto, tmp_path):
    topics = Topics(FLEET)
    watcher = MqttTransport("split-watcher", mosquitto.url)
    watcher.subscribe(topics.all_updates)
    watcher.subscribe(topics.global_adapter)
    watcher.connect()
    out = tmp_path / "aggregator"
    logs = [tmp_path / "aggregator.log", tmp_path / "a1.log", tmp_path / "a2.log"]
    env = dict(SPLIT, EDGETUNE_BROKER_URL=mosquitto.url)
    procs = [spawn("aggregator.cli", ["run", "--rounds", str(ROUNDS), "--min-agents", "2", "--expected-agents", "2",
                                      "--max-local-steps", "8", "--output-dir", str(out)], logs[0],
                   EDGETUNE_EVAL_SEQUENCES="32", **TASK, **env)]
    for i in (1, 2):
        procs.append(spawn("edge_agent.cli", ["run"], logs[i], EDGETUNE_AGENT_ID=f"edge-{i}", EDGETUNE_DATA="demo:brown",
                           EDGETUNE_PARTITION="iid", EDGETUNE_NUM_PARTITIONS="2", EDGETUNE_PARTITION_INDEX=str(i - 1),
                           EDGETUNE_SPLIT_ENCODING="int8", EDGETUNE_SPLIT_BATCH_SIZE="4", EDGETUNE_DATA_LIMIT="400",
                           **env))
    finish_all(procs, timeout=600, logs=logs)

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in lines if r.get("eval") != "federated"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    first, last = rows[0]["perplexity"], rows[-1]["perplexity"]
    # 2 rounds x 8 steps x 2 agents: held-out perplexity must fall by at least 25%
    assert last < 0.75 * first, f"perplexity {first:.1f} -> {last:.1f}"
    # federated perplexity: each agent's held-out blocks (8 by default) through its head and the server's tail
    fed = [r for r in lines if r.get("eval") == "federated"]
    assert [r["version"] for r in fed] == [0, 1, 2] and all(r["eval_agents"] == 2 for r in fed), fed
    assert all(r["eval_tokens"] == 2 * 8 * 31 for r in fed)  # 2 agents x 8 blocks x (32 - 1) predicted tokens
    assert fed[-1]["perplexity"] < 0.75 * fed[0]["perplexity"], [r["perplexity"] for r in fed]
    assert all(sorted(r["answered"]) == ["edge-1", "edge-2"] for r in rows[1:])
    # ROUGE of greedy continuations of 8 held-out prompts (16 tokens each, 16 generated) is in every row
    for r in rows:
        assert r["rouge_samples"] == 8 and isinstance(r["sample_generation"], str)
        assert 0.0 <= r["rouge2"] <= r["rouge1"] <= 1.0 and 0.0 <= r["rougeL"] <= r["rouge1"]
    assert set(rows[-1]["agents"]) == {"edge-1", "edge-2"}
    assert all(a["num_examples"] > 0 and a["train_loss"] > 0 for a in rows[-1]["agents"].values())

    # the global head adapter of round 1 is the example-weighted mean of the two agents' heads
    updates: dict[int, list] = {}
    globals_: dict[int, dict] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (len(updates.get(1, [])) < 2 or 1 not in globals_):
        m = watcher.get(timeout=0.5)
        if m is None:
            continue
        f = codec.decode(m.payload)
        if m.topic == topics.global_adapter:
            globals_[parse(f.header, GlobalAdapter).version] = f.tensors
        else:
            u = parse(f.header, ModelUpdate)
            updates.setdefault(u.round, []).append(ClientUpdate(u.agent_id, f.tensors, u.num_examples))
    watcher.close()
    assert len(updates.get(1, [])) == 2 and 1 in globals_, "did not see both round-1 updates and global v1"
    expected = fedavg(updates[1])
    for k, v in expected.items():
        assert torch.allclose(globals_[1][k], v, atol=1e-6), k
    # and the agents did learn something different from each other (so averaging mattered)
    a, b = updates[1]
    assert any(not torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)

    # the checkpoint is one ordinary peft adapter for the unsplit model
    ckpt = out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip()
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = ckpt / cfg["base_model_name_or_path"]  # ../../base_model: relative to the checkpoint
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(ckpt))
    n_lora = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    assert n_lora == 4 * 2  # 4 blocks x (A, B) on c_attn: head and tail adapters together
