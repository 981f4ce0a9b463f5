"""The wired agent on a real Mosquitto: feedback through its loopback HTTP API and the CLI lands in
its store (samples_stored, scraped over HTTP, moves), triggers an incremental run, and counts in
its next round's update (num_examples); afterwards `edgetune-agent predict` answers from the
int8 ONNX model the agent exported into its state dir.

One real agent (100 examples of the shipped data, 20 of them its local holdout) and one light
agent, which the test starts only after the feedback is stored, so that round 1 (quorum 2)
cannot begin before it.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from broker import codec
from edgetune.local_broker import free_port
from broker.messages import ModelUpdate, parse
from broker.topics import Topics
from broker.transport import MqttTransport
from tests.conftest import ROOT, child_env, spawn, wait_all

FLEET = "devtest"
DATA_LIMIT = 100
HOLDOUT_EVERY = 10


def post(port: int, path: str, body) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out = json.loads(r.read())
    conn.close()
    return r.status, out


def metric(port: int, name: str) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def healthy(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200
    except OSError:
        return False


def wait_for(cond, timeout: float, what: str, procs, logs):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        for p, lg in zip(procs, logs):
            if p.poll() is not None:
                pytest.fail(f"{lg.name} exited {p.returncode} while waiting for {what}:\n{lg.read_text()[-3000:]}")
        time.sleep(0.3)
    tails = "\n".join(f"--- {lg.name}\n{lg.read_text()[-2000:]}" for lg in logs)
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def test_feedback_is_stored_learned_from_and_sent_in_a_round(mosquitto, tmp_path):
    state = tmp_path / "state"
    http_port, metrics_port = free_port(), free_port()
    common = {"EDGETUNE_BROKER_URL": mosquitto.url, "EDGETUNE_FLEET": FLEET}
    watcher = MqttTransport("devtest-watcher", mosquitto.url)
    watcher.subscribe(Topics(FLEET).update("dev-0"))
    watcher.connect()
    logs = [tmp_path / "aggregator.log", tmp_path / "agent.log", tmp_path / "light.log"]
    procs = [
        spawn("aggregator.cli", ["run", "--rounds", "1", "--min-agents", "2", "--expected-agents", "2",
                                 "--max-local-steps", "3", "--eval-limit", "40", "--round-timeout", "300",
                                 "--output-dir", str(tmp_path / "out")], logs[0],
              EDGETUNE_METRICS_LINGER_S="0", **common),
        spawn("edge_agent.cli", ["run"], logs[1], EDGETUNE_AGENT_ID="dev-0", EDGETUNE_DATA="demo:vader", EDGETUNE_PARTITION="iid",
              EDGETUNE_DATA_LIMIT=DATA_LIMIT, EDGETUNE_STATE_DIR=state, EDGETUNE_HTTP_PORT=http_port,
              EDGETUNE_METRICS_PORT=metrics_port, EDGETUNE_METRICS_LINGER_S="0", EDGETUNE_INCREMENTAL_MIN_NEW=5,
              EDGETUNE_HOLDOUT_EVERY=HOLDOUT_EVERY, **common),
    ]
    try:
        # the loopback API comes up once the agent has built its model for the fleet's task
        wait_for(lambda: healthy(http_port), 240, "the agent's HTTP API", procs, logs[:2])
        assert metric(metrics_port, "edgetune_agent_samples_stored") == 0
        # a malformed feedback gets a 4xx with a reason and stores nothing
        status, body = post(http_port, "/feedback", {"text": "fine", "label": "meh"})
        assert status == 422 and body["error"] == "unknown_label", body
        texts = [("what a wonderful, warm film", "positive"), ("dull, tedious and far too long", "negative"),
                 ("I love this phone", "positive"), ("the worst service I have had", "negative")] * 3
        for text, label in texts:  # ids 1..12
            status, body = post(http_port, "/feedback", {"text": text, "label": label})
            assert status == 201, body
        wait_for(lambda: metric(metrics_port, "edgetune_agent_samples_stored") == 12, 30,
                 "samples_stored to reach 12", procs, logs[:2])
        # the CLI writes to the same store; the running agent sees it
        r = subprocess.run([sys.executable, "-m", "edge_agent.cli", "feedback", "a gem of a book", "--label", "1",
                            "--state-dir", str(state)], cwd=ROOT, env=child_env(), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: metric(metrics_port, "edgetune_agent_samples_stored") == 13, 30,
                 "samples_stored to reach 13", procs, logs[:2])
        # 12 of the 13 are trainable (id 10 is a holdout sample): more than incremental_min_new
        wait_for(lambda: (metric(metrics_port, "edgetune_agent_incremental_training_runs_total") or 0) >= 1, 240,
                 "an incremental run", procs, logs[:2])
        # now the second agent: round 1 can start
        procs.append(subprocess.Popen([sys.executable, "-m", "edge_agent.light", "--id", "light-1", "--broker",
                                       mosquitto.url, "--fleet", FLEET], cwd=ROOT, env=child_env(),
                                      stdout=open(logs[2], "w"), stderr=subprocess.STDOUT))
        update = None
        deadline = time.monotonic() + 300
        while update is None and time.monotonic() < deadline:
            m = watcher.get(timeout=0.5)
            if m is not None and m.payload:
                update = parse(codec.decode(m.payload).header, ModelUpdate)
        assert update is not None, logs[1].read_text()[-3000:]
        trainable = 13 - 13 // HOLDOUT_EVERY
        # 3 steps x batch 32 = 96 examples seen >= the 80 + 12 in the mix
        # the shard less its held-out slice (federated evaluation's, which the device also checks models on)
        assert update.num_examples == DATA_LIMIT - _held_out() + trainable, update
        wait_all(procs, timeout=300, logs=logs)
        for p, lg in zip(procs, logs):
            assert p.returncode == 0, f"{lg.name} exited {p.returncode}:\n{lg.read_text()[-3000:]}"
        log = logs[1].read_text()
        assert "incremental run: " in log, log[-3000:]
        # the final global (v1) was exported and checked on the holdout (served, or refused as worse)
        assert re.search(r"serving g00001-|kept the model in service after global adapter v1", log), log[-3000:]
        # ... after learning the stored samples again on top of it
        assert re.search(r"incremental run: 12 stored samples \+ 12 replay", log), log[-3000:]
    finally:
        watcher.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
    # predict from the state dir the agent left: ONNX Runtime, int8
    r = subprocess.run([sys.executable, "-m", "edge_agent.cli", "predict", "I love it", "awful, just awful",
                        "--json", "--state-dir", str(state)], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["text"] for x in rows] == ["I love it", "awful, just awful"]
    assert all(x["label"] in ("negative", "positive") and abs(sum(x["probabilities"]) - 1) < 1e-4 for x in rows)
    assert len({x["model"] for x in rows}) == 1 and rows[0]["model"].startswith("g0000")


def _held_out() -> int:
    """How many of the agent's DATA_LIMIT examples it keeps out of training (data.sources.holdout_split)."""
    from edge_agent.runner import local_examples
    from edge_agent.settings import AgentSettings

    s = AgentSettings(agent_id="dev-0", data="demo:vader", partition="iid", data_limit=DATA_LIMIT)
    return len(local_examples(s)[1])
