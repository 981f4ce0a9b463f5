"""Both sides' /metrics, as Prometheus sees them: promtool's lint passes on what the aggregator
and an agent expose, deploy/prometheus/prometheus.yml is a valid config, and every expression of
the Grafana dashboard returns data from a real Prometheus that scraped both sides.

promtool and prometheus come from the Debian package `prometheus`.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.deploy_support import DASHBOARD, DEPLOY, need_executable, run_prometheus

PROMETHEUS_HINT = "apt-get install prometheus (Debian's package ships /usr/bin/promtool and /usr/bin/prometheus)"

# prometheus_client suffixes: what the exposition adds to a metric's name
_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def _serve_both():
    from aggregator.metrics import AggregatorMetrics
    from aggregator.metrics import serve as serve_aggregator
    from edge_agent.metrics import AgentMetrics
    from edge_agent.metrics import serve as serve_agent

    agg, agent = AggregatorMetrics(), AgentMetrics()
    agg_server, _ = serve_aggregator(agg.registry, 0, addr="127.0.0.1")
    agent_server, _ = serve_agent(agent.registry, 0, addr="127.0.0.1")
    return agg, agent, agg_server, agent_server


def _exercise(agg, agent) -> None:
    """A few values on every metric, as a short run would leave them."""
    agg.rounds_completed.inc()
    agg.rounds.labels(outcome="complete").inc()
    agg.round_duration.observe(12.5)
    agg.current_round.set(2)
    agg.global_version.set(2)
    agg.agents_connected.set(3)
    agg.agents_selected.set(3)
    agg.agents_answered.inc(3)
    agg.agents_dropped.inc(0)
    agg.update_bytes_received.inc(3 * 150_000)
    agg.global_bytes_published.inc(150_000)
    agg.aggregation_seconds.observe(0.02)
    agg.global_accuracy.set(0.81)
    agg.global_loss.set(0.45)
    agg.global_perplexity.set(31.2)
    agg.rejected.labels(reason="bad_checksum").inc()
    agg.broker_connected.set(1)
    agg.activation_bytes.inc(786_432)
    agg.gradient_bytes.inc(786_432)
    agg.split_step_seconds.observe(0.03)
    agg.split_microbatch_size.observe(3)
    agg.split_queue_depth.set(1)
    agg.split_steps.inc()
    agg.observe_eval({"eval": "federated", "version": 2, "accuracy": 0.8, "macro_f1": 0.78, "loss": 0.5,
                      "eval_examples": 160, "eval_agents": 3,
                      "per_class": {"negative": {"f1": 0.75}, "positive": {"f1": 0.81}}})
    agg.eval_reports.inc(3)

    agent.rounds_participated.inc()
    agent.update_bytes_sent.inc(150_000)
    agent.global_bytes_received.inc(150_000)
    agent.global_version.set(2)
    agent.local_train_seconds.observe(4.2)
    agent.local_loss.set(0.5)
    agent.local_examples.set(500)
    agent.samples_stored.set(12)
    agent.incremental_runs.inc()
    agent.eval_examples.set(40)
    agent.eval_accuracy.set(0.8)
    agent.eval_reports.inc()
    agent.predictions.labels(backend="onnx").inc(5)
    agent.predict_seconds.observe(0.004)
    agent.broker_connected.set(1)
    agent.rejected.labels(reason="malformed_frame").inc(0)
    agent.activation_bytes.inc(786_432)
    agent.gradient_bytes.inc(786_432)
    agent.split_round_trip.observe(0.05)
    agent.split_resends.inc(0)


@pytest.fixture(scope="module")
def metrics_servers():
    agg, agent, agg_server, agent_server = _serve_both()
    _exercise(agg, agent)
    yield agg, agent, agg_server, agent_server
    for s in (agg_server, agent_server):
        s.shutdown()
        s.server_close()


def _scrape(server) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5) as r:
        assert r.status == 200
        return r.read()


@pytest.mark.parametrize("side", ["aggregator", "agent"])
def test_promtool_lint_passes(metrics_servers, side):
    promtool = need_executable("promtool", PROMETHEUS_HINT)
    _, _, agg_server, agent_server = metrics_servers
    body = _scrape(agg_server if side == "aggregator" else agent_server)
    prefix = f"edgetune_{side}_".encode()
    assert prefix + b"broker_connected 1.0" in body
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    problems = (r.stdout + r.stderr).decode().strip()
    assert r.returncode == 0 and not problems, f"promtool check metrics ({side}):\n{problems}"
    # every metric of this side carries its prefix and a HELP text
    names = set(re.findall(rb"^# TYPE (\S+) ", body, re.M))
    assert names and all(n.startswith(prefix) for n in names), names
    helps = dict(re.findall(rb"^# HELP (\S+) (.*)$", body, re.M))
    assert all(helps.get(n, b"").strip() for n in names), "a metric without HELP text"


def test_prometheus_config_is_valid():
    promtool = need_executable("promtool", PROMETHEUS_HINT)
    r = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"promtool check config:\n{r.stdout}{r.stderr}"


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    return out


def _base_name(series: str) -> str:
    for s in _SUFFIXES:
        if series.endswith(s):
            return series[: -len(s)]
    return series


def test_dashboard_uses_only_exposed_metrics(metrics_servers):
    """Every series name the dashboard queries is exposed by one side (catches typos and
    renamed metrics without a Prometheus)."""
    _, _, agg_server, agent_server = metrics_servers
    exposed = set()
    for server in (agg_server, agent_server):
        exposed |= set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", _scrape(server).decode(), re.M))
    exprs = _dashboard_exprs()
    assert len(exprs) >= 30
    unknown = []
    used = set()
    for title, expr in exprs:
        for name in re.findall(r"\bedgetune_[a-z0-9_]+", expr):
            used.add(_base_name(name))
            if name not in exposed:
                unknown.append(f"{title}: {name}")
    assert not unknown, "the dashboard queries series that no side exposes: " + ", ".join(unknown)
    # and every metric of both metrics.py files has a panel
    defined = {_base_name(n) for n in exposed if n.startswith("edgetune_")}
    assert not defined - used, f"metrics without a dashboard panel: {sorted(defined - used)}"


def test_dashboard_expressions_return_data(metrics_servers, tmp_path):
    """A real Prometheus scrapes both sides every second; each dashboard expression must then
    return at least one series."""
    prometheus = need_executable("prometheus", PROMETHEUS_HINT)
    _, _, agg_server, agent_server = metrics_servers
    jobs = {"edgetune-aggregator": [agg_server.server_port], "edgetune-agent": [agent_server.server_port]}
    with run_prometheus(prometheus, jobs, tmp_path) as prom:
        pending = dict.fromkeys(_dashboard_exprs())
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            for key in list(pending):
                if prom.query(key[1]):
                    del pending[key]
            if pending:
                time.sleep(0.5)
        assert not pending, "dashboard expressions that return no data:\n" + "\n".join(
            f"  {title}: {expr}" for title, expr in pending
        )
