"""Faults survived, against a real Mosquitto with the project's config: killed agents, a killed
and restarted aggregator, a restarted broker, and hostile frames. Agents here are light agents
(the real protocol with synthetic adapters) so that the faults, not training, take the time."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from broker import codec
from edgetune.local_broker import free_port
from broker.messages import (PROTOCOL_VERSION, AgentState, AgentStatus, GlobalAdapter, ModelUpdate, RoundAnnouncement,
                             parse)
from broker.topics import Topics
from broker.transport import MqttTransport
from edge_agent.light import synthetic_update
from tests.conftest import ROOT, child_env, kill_all, spawn


def light(agent_id: str, url: str, fleet: str, log: Path, train_seconds: float = 0.5) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge_agent.light", "--id", agent_id, "--broker", url,
                             "--fleet", fleet, "--train-seconds", str(train_seconds)], cwd=ROOT, env=child_env(),
                            stdout=open(log, "a"), stderr=subprocess.STDOUT)


def aggregator(url: str, fleet: str, out: Path, log: Path, *args: str, linger: float = 0, **env) -> subprocess.Popen:
    return spawn("aggregator.cli", ["run", "--eval-limit", "20", "--output-dir", str(out), *args], log,
                 EDGETUNE_BROKER_URL=url, EDGETUNE_FLEET=fleet, EDGETUNE_METRICS_LINGER_S=str(linger), **env)


def rows_of(out: Path) -> list[dict]:
    f = out / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


def wait_for(cond, timeout: float, what: str, procs=(), logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        for p, lg in zip(procs, logs):
            if p.poll() not in (None, 0):
                pytest.fail(f"{lg.name} exited {p.returncode}: {lg.read_text()[-2000:]}")
        time.sleep(0.2)
    tails = "\n".join(f"--- {lg}\n{lg.read_text()[-1500:]}" for lg in logs)
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def finish(procs, timeout=60):
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def final_adapter(out: Path) -> dict[str, torch.Tensor]:
    ck = out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip()
    return load_file(str(ck / "adapter_model.safetensors"))


def test_agents_killed_mid_round_do_not_stop_rounds(mosquitto, tmp_path):
    fleet, out = "kill", tmp_path / "agg"
    logs = [tmp_path / "agg.log"] + [tmp_path / f"a{i}.log" for i in range(8)]
    agg = aggregator(mosquitto.url, fleet, out, logs[0], "--rounds", "3", "--min-agents", "4",
                     "--expected-agents", "8", "--round-timeout", "12")
    agents = {f"a{i}": light(f"a{i}", mosquitto.url, fleet, logs[i + 1], train_seconds=3) for i in range(8)}
    killed: dict[int, list[str]] = {}
    try:
        for r in (1, 2, 3):
            wait_for(lambda: len(rows_of(out)) >= r, 120, f"round {r} to be announced", [agg], logs[:1])
            time.sleep(1.0)  # the round is open and the agents are "training"
            # a0, a1 in round 1, a2, a3 in round 2, a0, a1 again in round 3: each comes back after
            # its round closed, so it misses the next round's selection and is back for the one after
            victims = {1: ["a0", "a1"], 2: ["a2", "a3"], 3: ["a0", "a1"]}[r]
            for v in victims:
                agents[v].send_signal(signal.SIGKILL)
                agents[v].wait()
            killed[r] = victims
            wait_for(lambda: len(rows_of(out)) >= r + 1, 120, f"round {r} to close", [agg], logs[:1])
            for v in victims:  # the devices come back after the round
                agents[v] = light(v, mosquitto.url, fleet, logs[int(v[1:]) + 1], train_seconds=3)
        agg.wait(60)
    finally:
        kill_all([agg, *agents.values()])
    rows = rows_of(out)
    assert agg.returncode == 0, logs[0].read_text()[-2000:]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        assert row["outcome"] == "deadline", row  # closed at the deadline, with the quorum
        assert sorted(row["dropped"]) == sorted(killed[row["round"]])
        assert sorted(row["answered"]) == sorted(set(row["selected"]) - set(killed[row["round"]]))
        assert len(row["answered"]) >= 4
    assert len(rows[1]["selected"]) == 8
    assert rows[-1]["version"] == 3


def _run_light_fleet(url, fleet, out, tmp, rounds, kill_after=None):
    logs = [tmp / f"{fleet}-agg.log"] + [tmp / f"{fleet}-l{i}.log" for i in range(3)]
    args = ("--rounds", str(rounds), "--min-agents", "3", "--expected-agents", "3", "--round-timeout", "60")
    agg = aggregator(url, fleet, out, logs[0], *args)
    agents = [light(f"l{i}", url, fleet, logs[i + 1], train_seconds=0.3) for i in range(3)]
    try:
        if kill_after is not None:
            wait_for(lambda: len(rows_of(out)) >= kill_after + 1, 120, f"round {kill_after}", [agg], logs[:1])
            agg.send_signal(signal.SIGKILL)
            agg.wait()
            agg = aggregator(url, fleet, out, logs[0], *args)  # same output dir: resume
        agg.wait(180)
        finish(agents)
    finally:
        kill_all([agg, *agents])
    assert agg.returncode == 0, logs[0].read_text()[-3000:]
    return rows_of(out)


def test_aggregator_killed_after_round_2_resumes_at_round_3_with_the_same_result(mosquitto, tmp_path):
    plain = _run_light_fleet(mosquitto.url, "resume-a", tmp_path / "a", tmp_path, rounds=4)
    resumed = _run_light_fleet(mosquitto.url, "resume-b", tmp_path / "b", tmp_path, rounds=4, kill_after=2)
    assert [r["round"] for r in plain] == [0, 1, 2, 3, 4]
    assert [r["round"] for r in resumed] == [0, 1, 2, 3, 4], "the restarted aggregator went on at round 3"
    a, b = final_adapter(tmp_path / "a"), final_adapter(tmp_path / "b")
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert resumed[-1]["version"] == plain[-1]["version"] == 4


def test_broker_restart_mid_run_loses_no_update(mosquitto, tmp_path):
    fleet, out = "restart", tmp_path / "agg"
    logs = [tmp_path / "agg.log"] + [tmp_path / f"r{i}.log" for i in range(3)]
    agg = aggregator(mosquitto.url, fleet, out, logs[0], "--rounds", "3", "--min-agents", "3",
                     "--expected-agents", "3", "--round-timeout", "120")
    agents = [light(f"r{i}", mosquitto.url, fleet, logs[i + 1], train_seconds=2) for i in range(3)]
    try:
        wait_for(lambda: len(rows_of(out)) >= 2, 120, "round 2 to be announced", [agg], logs[:1])
        time.sleep(0.5)  # round 2 is open; agents are training and will publish while the broker is away
        mosquitto.stop()
        time.sleep(3)
        mosquitto.restart()
        agg.wait(180)
        finish(agents)
    finally:
        kill_all([agg, *agents])
    rows = rows_of(out)
    assert agg.returncode == 0, logs[0].read_text()[-2000:]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    summary = [(r["round"], r["outcome"], r["answered"], round(r.get("duration_s", 0), 1)) for r in rows[1:]]
    assert all(r["outcome"] == "complete" and len(r["answered"]) == 3 for r in rows[1:]), summary
    sent = sum(int(lg.read_text().rsplit("sent ", 1)[1].split()[0]) for lg in logs[1:])
    accepted = sum(len(r["answered"]) for r in rows[1:])
    assert sent == accepted == 9, (sent, accepted)
    assert all(a.returncode == 0 for a in agents)


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_hostile_frames_are_rejected_counted_and_change_nothing(mosquitto, tmp_path):
    fleet, out = "hostile", tmp_path / "agg"
    topics = Topics(fleet)
    port = free_port()
    logs = [tmp_path / "agg.log", tmp_path / "g0.log", tmp_path / "g1.log"]
    # the rogue "x0" announces itself like an agent so that it is selected and its frames reach the
    # tensor checks; the round then closes at its deadline with the two good agents (quorum 2)
    rogue = MqttTransport("rogue", mosquitto.url)
    rogue.subscribe(topics.round)
    rogue.subscribe(topics.global_adapter)
    rogue.subscribe(topics.update("g0"))
    rogue.connect()
    rogue.publish(topics.status("x0"),
                  codec.encode(AgentStatus(agent_id="x0", state=AgentState.online, num_examples=100)),
                  retain=True, wait=True)
    agg = aggregator(mosquitto.url, fleet, out, logs[0], "--rounds", "1", "--min-agents", "2",
                     "--expected-agents", "3", "--round-timeout", "15", "--metrics-port", str(port),
                     linger=120, EDGETUNE_MAX_UPDATE_BYTES="1000000")  # /metrics stays up until we scrape
    good = [light(f"g{i}", mosquitto.url, fleet, logs[i + 1], train_seconds=4) for i in range(2)]
    g0_frame = None
    try:
        global0 = ann = None
        deadline = time.monotonic() + 120
        while (global0 is None or ann is None) and time.monotonic() < deadline:
            m = rogue.get(timeout=0.5)
            if m is None or not m.payload:
                continue
            f = codec.decode(m.payload)
            if m.topic == topics.global_adapter:
                global0 = f.tensors
            elif m.topic == topics.round:
                ann = parse(f.header, RoundAnnouncement)
        assert ann is not None and "x0" in ann.selected, "the round did not open with the rogue selected"

        def update(agent="x0", tensors=None, **kw):
            meta = ModelUpdate(agent_id=agent, round=1, base_version=0, num_examples=100, nonce=uuid.uuid4().hex,
                               task_hash=ann.task_hash)
            return codec.encode(meta.model_copy(update=kw), tensors if tensors is not None else global0)

        key = sorted(global0)[0]
        nan = dict(global0, **{key: torch.full_like(global0[key], float("nan"))})
        inf = dict(global0, **{key: torch.full_like(global0[key], float("inf"))})
        shape = dict(global0, **{key: torch.zeros(3, 3)})
        dtype = dict(global0, **{key: global0[key].half()})
        missing = {k: v for k, v in global0.items() if k != key}
        bad_crc = bytearray(update())
        bad_crc[-1] ^= 0xFF
        wrong_version = update()
        wrong_version = codec.encode({**codec.decode(wrong_version).header, "protocol": 99}, global0)
        sends = [
            (topics.update("x0"), b"\x00garbage" * 20, "bad_magic"),
            (topics.update("x0"), bytes(bad_crc), "bad_checksum"),
            (topics.update("x0"), wrong_version, "wrong_version"),
            (topics.update("x0"), codec.encode({"kind": "update", "protocol": PROTOCOL_VERSION}), "bad_schema"),
            (topics.update("x0"), update(tensors=nan), "non_finite"),
            (topics.update("x0"), update(tensors=inf), "non_finite"),
            (topics.update("x0"), update(tensors=shape), "bad_tensors"),
            (topics.update("x0"), update(tensors=dtype), "bad_tensors"),
            (topics.update("x0"), update(tensors=missing), "bad_tensors"),
            (topics.update("x0"), update(tensors=dict(global0, pad=torch.zeros(300_000))), "oversized"),
            (topics.update("x0"), update(round=7), "wrong_round"),
            (topics.update("x0"), update(task_hash="0" * 64), "wrong_task"),  # made for another task
            (topics.update("x0"), update(agent="g1"), "bad_topic"),  # claims another agent's identity
            (topics.update("g1"), update(), "bad_topic"),  # on another agent's topic
        ]
        for topic, payload, _ in sends:
            rogue.publish(topic, payload, wait=True)
        # replay: g0's real update, captured off the wire and published again after it was accepted
        deadline = time.monotonic() + 60
        while g0_frame is None and time.monotonic() < deadline:
            m = rogue.get(timeout=0.5)
            if m is not None and m.topic == topics.update("g0"):
                g0_frame = m.payload
        assert g0_frame is not None
        time.sleep(1.0)
        rogue.publish(topics.update("g0"), g0_frame, wait=True)  # the same frame again: replay
        g0_again = codec.encode(parse(codec.decode(g0_frame).header, ModelUpdate).model_copy(
            update={"nonce": uuid.uuid4().hex}), codec.decode(g0_frame).tensors)
        rogue.publish(topics.update("g0"), g0_again, wait=True)  # a second update in the same round
        wait_for(lambda: len(rows_of(out)) >= 2, 120, "the round to close", [agg], logs[:1])
        metrics = _scrape(port)
        agg.send_signal(signal.SIGTERM)
        agg.wait(60)
        finish(good)
    finally:
        kill_all([agg, *good])
        rogue.close()
    expected: dict[str, int] = {}
    for _, _, reason in sends:
        expected[reason] = expected.get(reason, 0) + 1
    expected["duplicate"] = 2
    for reason, n in expected.items():
        got = metrics.get(f'edgetune_aggregator_rejected_messages_total{{reason="{reason}"}}', 0)
        assert got == n, f"{reason}: counted {got}, sent {n}"
    row = rows_of(out)[1]
    assert sorted(row["answered"]) == ["g0", "g1"] and row["dropped"] == ["x0"]
    # the new global is the mean of the two good updates alone
    g0 = {k: v.numpy() for k, v in global0.items()}
    want = {k: (synthetic_update(g0, "g0", 1)[k] + synthetic_update(g0, "g1", 1)[k]) / 2 for k in g0}
    got = final_adapter(out)
    for k in want:
        assert np.allclose(got[k].numpy(), want[k], atol=1e-6), k
