"""Buffered asynchronous aggregation in the real aggregator (EDGETUNE_AGGREGATION=async).

A real Mosquitto (the project's config), `python -m aggregator.cli run` in async mode with a
buffer of 3, and 4 light agents (the real protocol, synthetic deltas) whose "training" takes
0.2, 0.3, 1.5 and 4 seconds. The fast agents fill most buffers; the slow ones' updates arrive
versions late. The test records every global the aggregator publishes and checks, from what the
agents say they sent and what metrics.jsonl says was applied:

- every update an agent sent was applied exactly once (the ones still in flight after the last
  step are applied by the final drain step), and nothing else was;
- each applied update's staleness is (version before the step) - (its base version), and its
  weight is num_examples * (1 + staleness) ** -0.5 (FedBuff's polynomial weight, a = 0.5);
- every published global equals the previous one plus sum_i w_i * delta_i / sum_i n_i, with
  delta_i recomputed from the agent's deterministic synthetic update of the global it started from.
"""

from __future__ import annotations

import json
import threading
from collections import Counter

import numpy as np
import pytest

from broker import codec
from broker.messages import GlobalAdapter, parse
from broker.topics import Topics
from broker.transport import MqttTransport
from edge_agent.light import LightAgent, synthetic_update
from tests.conftest import spawn, wait_all

SPEEDS = {"fast-a": 0.2, "fast-b": 0.3, "slow-c": 1.5, "slow-d": 4.0}
B, STEPS, A = 3, 6, 0.5
FLEET = "asyncfleet"


@pytest.fixture
def run(mosquitto, tmp_path):
    url = mosquitto.url
    out = tmp_path / "agg"
    globals_seen: dict[int, dict[str, np.ndarray]] = {}
    watcher = MqttTransport("test-watcher", url, protocol=5)
    watcher.subscribe(Topics(FLEET).global_adapter)
    watcher.connect()
    agg = spawn("aggregator.cli", ["run", "--eval-limit", "20", "--output-dir", str(out), "--rounds", str(STEPS),
                                   "--min-agents", "2", "--expected-agents", str(len(SPEEDS)), "--round-timeout", "60"],
                tmp_path / "agg.log", EDGETUNE_BROKER_URL=url, EDGETUNE_FLEET=FLEET, EDGETUNE_AGGREGATION="async",
                EDGETUNE_ASYNC_BUFFER_SIZE=str(B), EDGETUNE_ASYNC_STALENESS_A=str(A), EDGETUNE_METRICS_LINGER_S="0")
    agents = [LightAgent(a, url, FLEET, train_seconds=t, num_examples=100 + 10 * i)
              for i, (a, t) in enumerate(SPEEDS.items())]
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for th in threads:
        th.start()
    try:
        wait_all([agg], timeout=240, logs=[tmp_path / "agg.log"])
        assert agg.returncode == 0, (tmp_path / "agg.log").read_text()[-3000:]
        for th in threads:
            th.join(60)
        assert not any(th.is_alive() for th in threads), "light agents did not see the final announcement"
        while (m := watcher.get(timeout=1.0)) is not None:
            msg = parse(codec.decode(m.payload, as_torch=False).header, GlobalAdapter)
            globals_seen[msg.version] = codec.decode(m.payload, as_torch=False).tensors
    finally:
        for a in agents:
            a.stop.set()
        agg.kill()
        watcher.close()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return agents, rows, globals_seen


def test_async_applies_every_update_once_with_staleness_weights(run):
    agents, rows, globals_seen = run
    steps = rows[1:]
    assert [r["outcome"] for r in steps[:STEPS]] == ["complete"] * STEPS, [(r["round"], r["outcome"]) for r in steps]
    assert all(r["outcome"] == "drain" for r in steps[STEPS:])
    assert [r["version"] for r in steps] == list(range(1, len(steps) + 1))

    sent = Counter((a.id, base) for a in agents for _round, base in a.sent_updates)
    applied = Counter((u["agent_id"], u["base_version"]) for r in steps for u in r["applied"])
    assert applied == sent, f"sent {sorted(sent)} but applied {sorted(applied)}"
    assert all(len(r["applied"]) == B for r in steps[:STEPS])
    assert sum(len(a.sent_updates) for a in agents) >= B * STEPS

    stale = 0
    for r in steps:
        for u in r["applied"]:
            assert u["staleness"] == r["version"] - 1 - u["base_version"]
            assert u["weight"] == pytest.approx(u["num_examples"] * (1 + u["staleness"]) ** -A, rel=1e-9)
            stale += u["staleness"] > 0
    assert stale >= 2, "the slow agents' updates should have arrived after the buffer moved on"
    assert {u["agent_id"] for r in steps for u in r["applied"] if u["staleness"] > 0} & {"slow-c", "slow-d"}


def test_each_published_global_is_the_fedbuff_step(run):
    agents, rows, globals_seen = run
    steps = rows[1:]
    assert sorted(globals_seen) == list(range(0, len(steps) + 1))
    round_of = {(a.id, base): rnd for a in agents for rnd, base in a.sent_updates}
    for r in steps:
        v = r["version"]
        total_n = sum(u["num_examples"] for u in r["applied"])
        expect = {k: t.astype(np.float64) for k, t in globals_seen[v - 1].items()}
        for u in r["applied"]:
            base = globals_seen[u["base_version"]]
            upd = synthetic_update(base, u["agent_id"], round_of[(u["agent_id"], u["base_version"])])
            for k in expect:
                expect[k] += u["weight"] / total_n * (upd[k].astype(np.float64) - base[k].astype(np.float64))
        for k, t in expect.items():
            np.testing.assert_allclose(globals_seen[v][k], t, rtol=0, atol=1e-6, err_msg=f"v{v} {k}")
