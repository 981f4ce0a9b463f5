"""The chart's alerts (templates/prometheusrule.yaml): the rendered PrometheusRule's groups pass
`promtool check rules`, name only metrics the aggregator exports, and fire (or not) as meant
under `promtool test rules` on made-up series. The render helpers are tests/test_deploy_helm.py's.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_support import need_executable
from tests.test_deploy_helm import NAMESPACE, RELEASE, SCENARIOS, by_kind, chart, helm, manifests, render  # noqa: F401

PROMTOOL_HINT = "apt-get install prometheus (promtool), or the promtool of a Prometheus release tarball"

JOB = f"{RELEASE}-edgetune-aggregator"
SERIES = f'{{job="{JOB}", namespace="{NAMESPACE}", pod="{JOB}-run1-x7k2p"}}'


@pytest.fixture(scope="module")
def promtool():
    return need_executable("promtool", PROMTOOL_HINT)


@pytest.fixture(scope="module")
def rule(chart) -> dict[str, Any]:
    [rule] = by_kind(manifests(render(chart, SCENARIOS["alerts"])))["PrometheusRule"]
    return rule


def write_rules(rule: dict[str, Any], folder: Path) -> Path:
    path = folder / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def promtool_run(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def alerts(rule: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}


def test_rules_pass_promtool_check(rule, promtool, tmp_path):
    assert set(alerts(rule)) == {
        "EdgeTuneAggregatorDown", "EdgeTuneBrokerDisconnected", "EdgeTuneNoRoundProgress", "EdgeTuneRoundsFailing",
        "EdgeTuneMessagesRejected", "EdgeTuneAgentsOnlineFalling", "EdgeTuneNoAgentsOnline",
        "EdgeTuneAccuracyRegressing", "EdgeTuneDPBudgetSpent", "EdgeTuneCustom",
    }
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    result = promtool_run(promtool, "check", "rules", str(write_rules(rule, tmp_path)), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout, result.stdout
    # the check is real: a broken expression fails it
    broken = {"spec": {"groups": [{"name": "x", "rules": [{"alert": "Bad", "expr": "rate(edgetune_x[5m]"}]}]}}
    result = promtool_run(promtool, "check", "rules", str(write_rules(broken, tmp_path)), cwd=tmp_path)
    assert result.returncode != 0


def test_rules_use_the_aggregators_metrics(rule):
    """Every edgetune_* series an alert reads is one the aggregator exports (a renamed metric
    would leave its alert silently never firing)."""
    from prometheus_client import generate_latest

    from aggregator.metrics import AggregatorMetrics

    exposition = generate_latest(AggregatorMetrics().registry).decode()
    exported = set(re.findall(r"^(edgetune_\w+?)(?:\{| )", exposition, re.M))
    used = {m for a in alerts(rule).values() for m in re.findall(r"\bedgetune_\w+", str(a["expr"]))}
    assert used and used <= exported, used - exported
    for name in ("edgetune_aggregator_rounds_total", "edgetune_aggregator_rejected_messages_total",
                 "edgetune_aggregator_agents_connected", "edgetune_aggregator_eval_accuracy_ratio",
                 "edgetune_aggregator_dp_epsilon", "edgetune_aggregator_broker_connected"):
        assert name in used, name
    # every alert is scoped to this release's aggregator and has a severity and a summary
    for name, a in alerts(rule).items():
        if name != "EdgeTuneCustom":
            assert f'job="{JOB}", namespace="{NAMESPACE}"' in a["expr"], name
            assert a["labels"]["severity"] in {"warning", "critical"} and a["annotations"]["summary"], name


def test_alerts_are_optional(chart):
    assert "PrometheusRule" not in by_kind(manifests(render(chart, {})))
    # no DP budget, no DP alert (runs without DP export NaN)
    [rule] = by_kind(manifests(render(chart, {"prometheusRule": {"enabled": True, "selector": 'job="edgetune"'}})))[
        "PrometheusRule"]
    assert "EdgeTuneDPBudgetSpent" not in alerts(rule)
    expr = alerts(rule)["EdgeTuneBrokerDisconnected"]["expr"]
    assert expr == 'edgetune_aggregator_broker_connected{job="edgetune"} == 0'


# promtool unit tests: series every minute; the values notation is promtool's ("a+bxN": N more
# samples, each b more than the last).
UNIT_TESTS = [
    {   # two failed rounds after healthy ones: EdgeTuneRoundsFailing, labelled with the outcome
        "interval": "1m",
        "input_series": [
            {"series": f'edgetune_aggregator_rounds_total{SERIES[:-1]}, outcome="complete"}}', "values": "0+1x40"},
            {"series": f'edgetune_aggregator_rounds_total{SERIES[:-1]}, outcome="failed"}}', "values": "0x30 1 2x9"},
            {"series": f'edgetune_aggregator_rounds_total{SERIES[:-1]}, outcome="error"}}', "values": "0x40"},
        ],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "EdgeTuneRoundsFailing", "exp_alerts": []},
            {"eval_time": "35m", "alertname": "EdgeTuneRoundsFailing", "exp_alerts": [{
                "exp_labels": {"severity": "warning", "namespace": NAMESPACE, "job": JOB,
                               "pod": f"{JOB}-run1-x7k2p", "outcome": "failed"},
                "exp_annotations": {
                    "summary": "EdgeTune rounds are failing",
                    "description": f"{NAMESPACE}/{JOB}-run1-x7k2p: 2 round(s) ended with outcome failed in the last "
                                   "15 minutes (see the aggregator log).",
                },
            }]},
            # rounds keep ending: no stall
            {"eval_time": "40m", "alertname": "EdgeTuneNoRoundProgress", "exp_alerts": []},
        ],
    },
    {   # rounds stop at minute 10: the stall alert fires 30 + 5 minutes later, not before
        "interval": "1m",
        "input_series": [
            {"series": f'edgetune_aggregator_rounds_total{SERIES[:-1]}, outcome="complete"}}',
             "values": "0+1x10 10x60"},
            {"series": f"edgetune_aggregator_current_round{SERIES}", "values": "1+1x9 11x61"},
        ],
        "alert_rule_test": [
            {"eval_time": "42m", "alertname": "EdgeTuneNoRoundProgress", "exp_alerts": []},
            {"eval_time": "50m", "alertname": "EdgeTuneNoRoundProgress", "exp_alerts": [{
                "exp_labels": {"severity": "warning", "namespace": NAMESPACE, "job": JOB, "pod": f"{JOB}-run1-x7k2p"},
                "exp_annotations": {
                    "summary": "No EdgeTune round has ended for 30 minutes",
                    "description": f"{NAMESPACE}/{JOB}-run1-x7k2p has ended no round (complete, deadline, failed or "
                                   "error) in 30 minutes; it is at round 11.",
                },
            }]},
        ],
    },
    {   # epsilon grows past the budget of 8; agents fall from 8 to 5 (more than 25 %)
        "interval": "1m",
        "input_series": [
            {"series": f"edgetune_aggregator_dp_epsilon{SERIES}", "values": "0+1x20"},
            {"series": f"edgetune_aggregator_agents_connected{SERIES}", "values": "8x10 5x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "7m", "alertname": "EdgeTuneDPBudgetSpent", "exp_alerts": []},
            {"eval_time": "9m", "alertname": "EdgeTuneDPBudgetSpent", "exp_alerts": [{
                "exp_labels": {"severity": "critical", "job": JOB, "namespace": NAMESPACE, "pod": f"{JOB}-run1-x7k2p"},
                "exp_annotations": {
                    "summary": "The run's differential-privacy budget is spent",
                    "description": f"{NAMESPACE}/{JOB}-run1-x7k2p has spent epsilon 9.00, over the budget of 8: stop "
                                   "the run (further rounds weaken the privacy guarantee).",
                },
            }]},
            {"eval_time": "15m", "alertname": "EdgeTuneAgentsOnlineFalling", "exp_alerts": []},
            {"eval_time": "25m", "alertname": "EdgeTuneAgentsOnlineFalling", "exp_alerts": [{
                "exp_labels": {"severity": "warning", "job": JOB, "namespace": NAMESPACE, "pod": f"{JOB}-run1-x7k2p"},
                "exp_annotations": {
                    "summary": "EdgeTune agents are going offline",
                    "description": f"{NAMESPACE}/{JOB}-run1-x7k2p: only 5 agents online, more than 25% fewer than in "
                                   "the last hour.",
                },
            }]},
            {"eval_time": "25m", "alertname": "EdgeTuneNoAgentsOnline", "exp_alerts": []},
        ],
    },
]


def test_alerts_fire_under_promtool_test(rule, promtool, tmp_path):
    write_rules(rule, tmp_path)
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": UNIT_TESTS},
                                    sort_keys=False))
    result = promtool_run(promtool, "test", "rules", str(tests), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout
