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

# the build_info labels of the processes the tests serve: the dashboard's variables choose them
FLEET, AGENT = "fleet-a", "agent-1"
# Grafana's own variables, as it would fill them in
_BUILTINS = {"__range": "1h", "__rate_interval": "1m", "__interval": "1m"}
# functions that show a counter (or a histogram's cumulative series) as what it counted
_RATES = ("rate", "irate", "increase")


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
    agg.info(FLEET, "federated")

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
    agent.info(FLEET, AGENT, "federated")


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


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _substitute(expr: str, fleet: str = ".*", agent: str = ".*") -> str:
    """`expr` with the dashboard's variables filled in as Grafana does (".*": "All", the default)."""
    values = {**_BUILTINS, "fleet": fleet, "agent": agent}
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)


def _raw_targets() -> list[tuple[str, str]]:
    """(panel title, expression as written, with its $variables) of every panel target."""
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))
            walk(p.get("panels", []))

    walk(_dashboard()["panels"])
    return out


def _dashboard_exprs(fleet: str = ".*", agent: str = ".*") -> list[tuple[str, str]]:
    """(panel title, expression) of every panel target, the variables filled in (default: every
    fleet and agent)."""
    return [(title, _substitute(expr, fleet, agent)) for title, expr in _raw_targets()]


def _raw_annotations() -> list[dict[str, Any]]:
    """The dashboard's Prometheus annotations (Grafana's built-in one has no expression)."""
    return [a for a in _dashboard()["annotations"]["list"] if "expr" in a]


def _annotation_exprs(fleet: str = ".*") -> list[tuple[str, str]]:
    return [(f"annotation {a['name']}", _substitute(a["expr"], fleet)) for a in _raw_annotations()]


def _variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in _dashboard()["templating"]["list"]}


def _label_values(query: str) -> tuple[str, str]:
    """Grafana's label_values(selector, label) as (selector, label)."""
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
    assert m, f"not a label_values() query: {query}"
    return m.group(1), m.group(2)


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


def test_dashboard_variables_and_annotation():
    """The variables fleet (from the aggregator's build_info) and agent (the agent's build_info,
    within the chosen fleets), every panel filtered by fleet and every agent panel by agent too,
    and ended rounds as annotations. (That the filters work: test_dashboard_expressions_return_data.)"""
    variables = _variables()
    assert _label_values(variables["fleet"]["definition"]) == ("edgetune_aggregator_build_info", "fleet")
    assert _label_values(variables["agent"]["definition"]) == ('edgetune_agent_build_info{fleet=~"$fleet"}', "agent")
    for name in ("fleet", "agent"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["uid"] == "${datasource}"
        assert v["query"]["query"] == v["definition"]
        assert v["multi"] and v["includeAll"] and v["allValue"] == ".*", "All must match every fleet and agent"
    assert list(variables).index("fleet") < list(variables).index("agent"), "agent's query needs fleet first"
    [rounds] = [a for a in _raw_annotations() if "edgetune_aggregator_rounds_total" in a["expr"]]
    assert rounds["enable"] and rounds["datasource"]["uid"] == "${datasource}"
    assert "{{outcome}}" in rounds["titleFormat"] and rounds["step"]
    for title, expr in _raw_targets() + [(a["name"], a["expr"]) for a in _raw_annotations()]:
        used = set(re.findall(r"\$\{?(\w+)\}?", expr))
        assert used <= set(variables) | set(_BUILTINS), f"{title}: unknown variables {used}: {expr}"
        assert 'edgetune_aggregator_build_info{fleet=~"$fleet"}' in expr or 'edgetune_agent_build_info{fleet=~"$fleet"' in expr, (
            f"{title}: not joined with a build_info of the chosen fleets: {expr}")
        assert ("edgetune_agent_" in expr) == ('agent=~"$agent"' in expr), f"{title}: the agent filter: {expr}"


def test_dashboard_expressions_parse(tmp_path):
    """promtool parses every expression of the dashboard (the panels', the annotation's and the
    variables' selectors, with the variables filled in), as recording rules."""
    promtool = need_executable("promtool", PROMETHEUS_HINT)
    exprs = _dashboard_exprs() + _annotation_exprs() + [
        (f"variable {name}", _substitute(_label_values(v["definition"])[0]))
        for name, v in _variables().items() if v["type"] == "query"]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]}]}
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and f"SUCCESS: {len(exprs)} rules found" in r.stdout, r.stdout + r.stderr


def _enclosing_call(expr: str, pos: int) -> str:
    """The name of the function call whose parentheses enclose expr[pos] ("" for none)."""
    depth = 0
    for i in range(pos - 1, -1, -1):
        if expr[i] == ")":
            depth += 1
        elif expr[i] == "(":
            if depth == 0:
                m = re.search(r"(\w+)\s*$", expr[:i])
                return m.group(1) if m else ""
            depth -= 1
    return ""


def test_dashboard_shows_counters_as_rates(metrics_servers):
    """No counter on the dashboard as its raw total (which only says how long a process has
    run): every counter, and every histogram's cumulative series, goes through rate(), irate()
    or increase()."""
    _, _, agg_server, agent_server = metrics_servers
    cumulative = set()
    for server in (agg_server, agent_server):
        for name, kind in re.findall(r"^# TYPE (\S+) (counter|histogram)$", _scrape(server).decode(), re.M):
            if kind == "counter":  # TYPE names a counter with or without _total, by exposition format
                cumulative.add(name if name.endswith("_total") else f"{name}_total")
            else:
                cumulative |= {f"{name}_{s}" for s in ("bucket", "count", "sum")}
    assert "edgetune_aggregator_rounds_total" in cumulative and "edgetune_agent_predict_seconds_bucket" in cumulative
    raw = []
    for title, expr in _raw_targets() + [(a["name"], a["expr"]) for a in _raw_annotations()]:
        for m in re.finditer(r"\bedgetune_\w+", expr):
            if m.group() in cumulative and _enclosing_call(expr, m.start()) not in _RATES:
                raw.append(f"{title}: {m.group()} in {expr}")
    assert not raw, "counters shown raw:\n" + "\n".join(raw)
    # the check is real
    assert _enclosing_call("sum by (reason) (edgetune_x_total)", 17) not in _RATES
    assert _enclosing_call("sum(rate(y[1m])) * edgetune_x_total", 19) not in _RATES
    assert _enclosing_call('rate(edgetune_x_total{a=~"$b"}[5m]) * on(instance) y', 5) == "rate"


def test_dashboard_expressions_return_data(metrics_servers, tmp_path):
    """A real Prometheus scrapes both sides every second; each dashboard expression (and the
    rounds annotation, once a round ends) must then return at least one series for the served
    fleet and agent, and none for another fleet or agent; the variables list the served ones."""
    prometheus = need_executable("prometheus", PROMETHEUS_HINT)
    agg, _, agg_server, agent_server = metrics_servers
    jobs = {"edgetune-aggregator": [agg_server.server_port], "edgetune-agent": [agent_server.server_port]}
    with run_prometheus(prometheus, jobs, tmp_path) as prom:
        # a round ends between two scrapes: the annotation marks it
        deadline = time.monotonic() + 30
        while len(prom.query("up == 1") or []) < 2:
            assert time.monotonic() < deadline, f"no scrape of both sides within 30s:\n{prom.log_tail()}"
            time.sleep(0.2)
        agg.rounds.labels(outcome="complete").inc()
        pending = dict.fromkeys(_dashboard_exprs(FLEET, AGENT) + _annotation_exprs(FLEET))
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
        for name, served in (("fleet", FLEET), ("agent", AGENT)):
            selector, label = _label_values(_variables()[name]["definition"])
            assert {r["metric"][label] for r in prom.query(_substitute(selector, FLEET))} == {served}
        other_fleet = _dashboard_exprs("no-such-fleet", AGENT) + _annotation_exprs("no-such-fleet")
        other_agent = [(t, e) for t, e in _dashboard_exprs(FLEET, "no-such-agent") if "edgetune_agent_" in e]
        leaks = [f"  {title}: {expr}" for title, expr in other_fleet + other_agent if prom.query(expr)]
        assert not leaks, "expressions that ignore the fleet or agent chosen:\n" + "\n".join(leaks)
