"""Strategies with options, chosen by setting, in the real aggregator over a real Mosquitto.

`EDGETUNE_STRATEGY=dp_fedavg` with `EDGETUNE_STRATEGY_OPTIONS` (JSON) and 3 light agents for 3
rounds: every round's row in metrics.jsonl reports the clipped agents, the noise std
(z * C / n) and the epsilon spent so far, which equals a fresh accountant's (and opacus's) for
the run's noise multiplier, sampling rate (3 of a population of 10) and rounds; the same epsilon
is scraped from /metrics. The run is signed (EDGETUNE_SIGNING_KEY): the light agents, given the
fleet's public key, take only signed frames, and reject none. A bad option stops the aggregator at start-up with a message that
names it, before it touches the broker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from aggregator.strategies import PrivacyAccountant
from broker.signing import Signer
from edgetune.local_broker import free_port
from edge_agent.light import LightAgent
from tests.conftest import ROOT, child_env, spawn, wait_all

FLEET = "dpfleet"
C, Z, POPULATION, DELTA, ROUNDS = 0.05, 1.0, 10, 1e-5, 3


def test_dp_fedavg_over_mqtt_reports_the_accountants_epsilon(mosquitto, tmp_path):
    out, port = tmp_path / "agg", free_port()
    options = {"clip_norm": C, "noise_multiplier": Z, "num_agents": POPULATION, "delta": DELTA, "seed": 0}
    log = tmp_path / "agg.log"
    signer = Signer.generate()  # the run is signed; agents with the public key refuse anything else
    (tmp_path / "signing.key").write_bytes(signer.private_pem())
    (tmp_path / "fleet-keys.pem").write_bytes(signer.public_pem())
    agg = spawn("aggregator.cli", ["run", "--eval-limit", "20", "--output-dir", str(out), "--rounds", str(ROUNDS),
                                   "--expected-agents", "3", "--min-agents", "3", "--metrics-port", str(port)],
                log, EDGETUNE_BROKER_URL=mosquitto.url, EDGETUNE_FLEET=FLEET, EDGETUNE_STRATEGY="dp_fedavg",
                EDGETUNE_STRATEGY_OPTIONS=json.dumps(options), EDGETUNE_METRICS_LINGER_S="60",
                EDGETUNE_SIGNING_KEY=str(tmp_path / "signing.key"))
    agents = [LightAgent(f"dp-{i}", mosquitto.url, FLEET, train_seconds=0.1, fleet_keys=str(tmp_path / "fleet-keys.pem"))
              for i in range(3)]
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for th in threads:
        th.start()
    try:
        deadline = time.monotonic() + 180
        rows: list[dict] = []
        while len(rows) < ROUNDS + 1:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            assert agg.poll() is None, log.read_text()[-3000:]
            f = out / "metrics.jsonl"
            rows = [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []
            time.sleep(0.5)
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        for a in agents:
            a.stop.set()
        agg.terminate()
        wait_all([agg], timeout=60, logs=[log])

    assert [a.rejections for a in agents] == [[], [], []]
    assert all(a.verifier.accepted.keys() == {"task", "round", "global"} for a in agents)
    acct = PrivacyAccountant()
    for r in rows[1:]:
        assert r["outcome"] == "complete" and len(r["answered"]) == 3
        acct.step(noise_multiplier=Z, sample_rate=3 / POPULATION)
        assert r["dp_sample_rate"] == pytest.approx(3 / POPULATION)
        assert r["dp_noise_std"] == pytest.approx(Z * C / 3)
        assert r["dp_clipped"] == 3, "synthetic updates (norm about 0.2) are all above the bound 0.05"
        assert r["dp_rounds"] == r["round"]
        assert r["dp_epsilon"] == pytest.approx(acct.epsilon(DELTA), rel=1e-9)
        assert set(r["agents"]) == {"dp-0", "dp-1", "dp-2"}
    from opacus.accountants import RDPAccountant

    ref = RDPAccountant()
    for _ in range(ROUNDS):
        ref.step(noise_multiplier=Z, sample_rate=3 / POPULATION)
    assert rows[-1]["dp_epsilon"] == pytest.approx(ref.get_epsilon(DELTA), rel=1e-2)
    line = next(x for x in scraped.splitlines() if x.startswith("edgetune_aggregator_dp_epsilon "))
    assert float(line.split()[1]) == pytest.approx(rows[-1]["dp_epsilon"], rel=1e-6)


def test_a_bad_strategy_option_stops_the_aggregator_at_start_up(tmp_path):
    out = subprocess.run([sys.executable, "-m", "aggregator.cli", "run", "--output-dir", str(tmp_path)], cwd=ROOT,
                         env=child_env(EDGETUNE_STRATEGY="krum", EDGETUNE_STRATEGY_OPTIONS='{"f": 1, "mm": 3}',
                                       EDGETUNE_BROKER_URL="mqtt://127.0.0.1:1"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "strategy 'krum'" in out.stderr and "mm" in out.stderr, out.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
