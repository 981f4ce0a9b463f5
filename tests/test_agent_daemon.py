"""A device agent outlives a run (EDGETUNE_AFTER_RUN=stay): two aggregator runs in a row against the
same agent process, real Mosquitto. Between them it answers predictions and takes feedback over its
loopback HTTP API, and the second run trains on that feedback (its update counts the samples)."""

from __future__ import annotations

import signal
import time

from broker import codec
from broker.messages import ModelUpdate, parse
from broker.topics import Topics
from broker.transport import MqttTransport
from edgetune.local_broker import free_port
from tests.conftest import finish_all, kill_all, spawn
from tests.test_agent_device_integration import healthy, metric, post, wait_for

FLEET = "daemon-itest"
DATA_LIMIT = 40


def _run(out, log, common: dict):
    return spawn("aggregator.cli", ["run", "--rounds", "1", "--min-agents", "1", "--expected-agents", "1",
                                    "--max-local-steps", "2", "--eval-limit", "16", "--round-timeout", "120",
                                    "--output-dir", str(out)], log, EDGETUNE_METRICS_LINGER_S="0", **common)


def _update(watcher, procs, logs) -> ModelUpdate:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        m = watcher.get(timeout=0.5)
        if m is not None and m.payload:
            return parse(codec.decode(m.payload).header, ModelUpdate)
    tails = "\n".join(f"--- {lg.name}\n{lg.read_text()[-2000:]}" for lg in logs)
    raise AssertionError(f"no update within 180 s\n{tails}")


def test_an_agent_that_stays_up_serves_between_runs_and_trains_on_the_feedback_in_the_next(mosquitto, tmp_path):
    http_port, metrics_port = free_port(), free_port()
    common = {"EDGETUNE_BROKER_URL": mosquitto.url, "EDGETUNE_FLEET": FLEET}
    watcher = MqttTransport("daemon-watcher", mosquitto.url)
    watcher.subscribe(Topics(FLEET).update("dev-0"))
    watcher.connect()
    logs = [tmp_path / "agent.log", tmp_path / "run1.log", tmp_path / "run2.log"]
    agent = spawn("edge_agent.cli", ["run"], logs[0], EDGETUNE_AGENT_ID="dev-0", EDGETUNE_DATA="demo:vader",
                  EDGETUNE_PARTITION="iid", EDGETUNE_DATA_LIMIT=str(DATA_LIMIT), EDGETUNE_STATE_DIR=str(tmp_path / "s"),
                  EDGETUNE_HTTP_PORT=str(http_port), EDGETUNE_METRICS_PORT=str(metrics_port),
                  EDGETUNE_AFTER_RUN="stay", **common)
    procs = [agent]
    try:
        run1 = _run(tmp_path / "run1", logs[1], common)
        procs.append(run1)
        first = _update(watcher, procs, logs)
        finish_all([run1], timeout=180, logs=[logs[1]])
        # the run is over; the agent is not
        wait_for(lambda: "the run is over" in logs[0].read_text(), 60, "the agent to see the run end", [agent],
                 logs[:1])
        time.sleep(1)
        assert agent.poll() is None, logs[0].read_text()[-3000:]
        assert healthy(http_port)
        status, body = post(http_port, "/predict", {"texts": ["I love it", "awful, just awful"]})
        assert status == 200 and all(x in ("negative", "positive") for x in body["labels"]), body
        feedback = [("what a wonderful, warm film", "positive"), ("dull, tedious and far too long", "negative")] * 3
        for text, label in feedback:
            status, body = post(http_port, "/feedback", {"text": text, "label": label})
            assert status == 201, body
        wait_for(lambda: metric(metrics_port, "edgetune_agent_samples_stored") == len(feedback), 30,
                 "the store to hold the feedback", [agent], logs[:1])
        # the next run (a new aggregator, a new output dir: a new run id) gets the same agent
        run2 = _run(tmp_path / "run2", logs[2], common)
        procs.append(run2)
        second = _update(watcher, procs, logs)
        finish_all([run2], timeout=180, logs=[logs[2]])
        assert (first.round, second.round) == (1, 1) and second.base_version == 0
        # its shard as in run 1, plus the feedback (ids 1-6: none is a holdout sample, every 10th)
        assert second.num_examples == first.num_examples + len(feedback), (first, second)
        assert agent.poll() is None and logs[0].read_text().count("a new run") >= 1, logs[0].read_text()[-3000:]
        agent.send_signal(signal.SIGTERM)
        finish_all([agent], timeout=60, logs=logs[:1])
    finally:
        watcher.close()
        kill_all(procs)
