"""One scenario, two drivers of the round engine: the in-process simulator and the MQTT service.

The simulator runs a fleet whose "training" is deterministic (the state plus seeded noise) from
the service's own initial global, with faults: a malformed update, an agent lost mid-round and
a late update (sync), and in async mode a stale update and redelivered copies. Every message its
agents delivered (trace "deliveries", in order) is then replayed over a real Mosquitto, from one
client so that the order holds, to the real aggregator service. Both drivers must produce the
same round records (selected, answered, dropped, refused with reasons, lost, applied, version)
and the same final global to 1e-6.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
import torch

from broker import codec
from broker.messages import AgentState, AgentStatus, GlobalAdapter, RoundAnnouncement, TaskDefinition, parse
from broker.topics import Topics
from broker.transport import MqttTransport
from edgetune.simulate import SimConfig, Simulator
from models.train import EvalResult, TrainResult
from tests.conftest import finish_all, spawn


class SyntheticBackend:
    """The simulator's model, replaced by arithmetic: training adds seeded noise to the state."""

    kind = "synthetic"
    model = None
    log = None

    def __init__(self, initial: dict[str, torch.Tensor]) -> None:
        self.initial_state = {k: v.clone() for k, v in initial.items()}
        self._state = self.state_of(initial)

    @staticmethod
    def state_of(s):
        return {k: v.clone() for k, v in s.items()}

    def data(self, examples):
        return list(examples)

    def state(self):
        return self.state_of(self._state)

    def load(self, state):
        self._state = self.state_of(state)

    def train(self, data, *, epochs, max_steps, batch_size, lr, seed, proximal=None):
        g = torch.Generator().manual_seed(seed)
        self._state = {k: v + 1e-2 * torch.randn(v.shape, generator=g, dtype=v.dtype)
                       for k, v in sorted(self._state.items())}
        return TrainResult(steps=1, examples_seen=40 + (seed % 7) * 10, mean_loss=0.5 + (seed % 5) / 10, seconds=0.0)

    def evaluate(self, data):
        return EvalResult(0.0, 0.0, len(data))


class Harness:
    """Plays a simulated fleet's deliveries to the service, from one MQTT client (order preserved)."""

    def __init__(self, url: str, fleet: str) -> None:
        self.topics = Topics(fleet)
        self.t = MqttTransport(f"harness-{fleet}", url)
        self.t.subscribe(self.topics.task)
        self.t.subscribe(self.topics.round)
        self.t.subscribe(self.topics.global_adapter)
        self.t.connect()
        self.task: TaskDefinition | None = None
        self.globals: dict[int, dict] = {}
        self.announcements: list[RoundAnnouncement] = []

    def pump(self, until, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "the service did not get there in time"
            m = self.t.get(timeout=0.2)
            if m is None or not m.payload:
                continue
            f = codec.decode(m.payload)
            if m.topic == self.topics.global_adapter:
                self.globals[parse(f.header, GlobalAdapter).version] = f.tensors
            elif m.topic == self.topics.task:
                self.task = parse(f.header, TaskDefinition)
            else:
                self.announcements.append(parse(f.header, RoundAnnouncement))

    def announced(self, number: int) -> RoundAnnouncement:
        self.pump(lambda: any(a.round == number and not a.final for a in self.announcements))
        return next(a for a in self.announcements if a.round == number and not a.final)

    def status(self, agent: str, state: AgentState) -> None:
        # with examples to train on: the service selects only agents that report some
        self.t.publish(self.topics.status(agent), codec.encode(AgentStatus(agent_id=agent, state=state, num_examples=100)),
                       retain=True, wait=True)

    def play(self, deliveries) -> None:
        for d in deliveries:
            if d["kind"] == "offline":
                self.status(d["agent_id"], AgentState.offline)
            else:
                self.t.publish(self.topics.update(d["agent_id"]), codec.encode(d["meta"], d["tensors"]), wait=True)

    def close(self) -> None:
        self.t.close()


def start_service(mosquitto, tmp_path, fleet: str, *args: str, **env: str):
    out = tmp_path / fleet
    log = tmp_path / f"{fleet}.log"
    proc = spawn("aggregator.cli", ["run", "--fleet", fleet, "--output-dir", str(out), "--eval-limit", "16", *args],
                 log, EDGETUNE_BROKER_URL=mosquitto.url, **env)
    return proc, out, log


def service_rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]


def same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


KEYS = ("round", "outcome", "answered", "rejected", "version")


def test_sync_rounds_with_faults_give_the_same_records_in_both_drivers(mosquitto, tmp_path):
    fleet = "engine-sync"
    proc, out, log = start_service(mosquitto, tmp_path, fleet, "--rounds", "2", "--min-agents", "2",
                                   "--expected-agents", "5", "--round-timeout", "3")
    h = Harness(mosquitto.url, fleet)
    try:
        h.pump(lambda: 0 in h.globals and h.task is not None)
        faults = {1: {"agent-3": "malformed", "agent-4": "lost", "agent-5": "late"}}
        cfg = SimConfig(agents=5, rounds=2, min_agents=2, faults=faults, keep_trace=True, train_limit=600,
                        eval_limit=20, round_timeout_s=3.0, task_hash=h.task.hash)
        sim = Simulator(cfg, backend=SyntheticBackend(h.globals[0])).run()
        for a in sim.agent_ids:
            h.status(a, AgentState.online)
        for r, trace in enumerate(sim.trace, 1):
            assert sorted(h.announced(r).selected) == sorted(sim.rows[r]["selected"])
            h.play(trace["deliveries"])
        finish_all([proc], timeout=60, logs=[log])
        h.pump(lambda: 2 in h.globals)
    finally:
        h.close()
        proc.kill()
    mqtt = service_rows(out)
    simulated = sim.rows[1:]
    assert len(mqtt) == len(simulated) == 2
    for a, b in zip(mqtt, simulated):
        for k in (*KEYS, "selected", "dropped", "lost"):
            assert a.get(k) == b.get(k), (k, a.get(k), b.get(k))
    # the scenario did what it says: each fault shows where it should
    assert mqtt[0]["outcome"] == "deadline" and mqtt[0]["answered"] == ["agent-1", "agent-2"]
    assert mqtt[0]["rejected"] == [{"agent_id": "agent-3", "reason": "non_finite"}]
    assert mqtt[0]["lost"] == ["agent-4"] and sorted(mqtt[0]["dropped"]) == ["agent-3", "agent-4", "agent-5"]
    assert mqtt[1]["outcome"] == "complete" and mqtt[1]["selected"] == ["agent-1", "agent-2", "agent-3", "agent-5"]
    assert mqtt[1]["rejected"] == [{"agent_id": "agent-5", "reason": "late"}]
    same_state(h.globals[2], sim.final_state)


def test_async_buffer_with_stale_and_redelivered_updates_gives_the_same_records_in_both_drivers(mosquitto, tmp_path):
    fleet = "engine-async"
    cfg = SimConfig(mode="async", agents=3, rounds=3, buffer_size=2, speeds=[1, 1, 5], max_staleness=1,
                    redeliver=0.5, keep_trace=True, train_limit=600, eval_limit=20, seed=1)
    # two buffer steps, then the drain (the scenario's timing makes it so; asserted below)
    proc, out, log = start_service(mosquitto, tmp_path, fleet, "--rounds", "2", "--min-agents", "1",
                                   "--expected-agents", "3", "--round-timeout", "60", EDGETUNE_AGGREGATION="async",
                                   EDGETUNE_ASYNC_BUFFER_SIZE="2", EDGETUNE_ASYNC_MAX_STALENESS="1")
    h = Harness(mosquitto.url, fleet)
    try:
        h.pump(lambda: 0 in h.globals and h.task is not None)
        sim = Simulator(replace(cfg, task_hash=h.task.hash), backend=SyntheticBackend(h.globals[0])).run()
        assert [r["outcome"] for r in sim.rows[1:]] == ["complete", "complete", "drain"]
        for a in sim.agent_ids:
            h.status(a, AgentState.online)
        h.status("agent-1", AgentState.training)  # holds the drain open until everything is played
        h.announced(1)
        deliveries = sim.trace[0]["deliveries"]
        assert {d["reason"] for d in deliveries} >= {None, "stale", "duplicate"}, "the scenario lacks a fault"
        h.play(deliveries)
        h.status("agent-1", AgentState.idle)
        finish_all([proc], timeout=60, logs=[log])
        last = sim.rows[-1]["version"]
        h.pump(lambda: last in h.globals)
    finally:
        h.close()
        proc.kill()
    mqtt, simulated = service_rows(out), sim.rows[1:]
    assert [r["outcome"] for r in mqtt] == [r["outcome"] for r in simulated] == ["complete", "complete", "drain"]
    applied = lambda r: [(a["agent_id"], a["base_version"], a["staleness"], a["num_examples"], a["weight"])  # noqa: E731
                         for a in r["applied"]]
    for a, b in zip(mqtt, simulated):
        for k in KEYS:
            assert a[k] == b[k], (k, a[k], b[k])
        assert applied(a) == applied(b)
    assert any(x["reason"] == "stale" for r in mqtt for x in r["rejected"])
    same_state(h.globals[last], sim.final_state)
