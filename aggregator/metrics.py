"""Every number a user would ask the aggregator about, as Prometheus metrics.

Metrics live in a registry made per service (not the global default), so that tests and the
one-machine runner can make several. `serve(registry, port)` exposes /metrics over HTTP.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.metrics_http import BuildInfo, serve  # noqa: F401  (re-exported: each side's serve)

_ROUND_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
_FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class AggregatorMetrics:
    def info(self, fleet: str, mode: str) -> None:
        """edgetune_aggregator_build_info{version, protocol, fleet, mode} 1."""
        from broker.messages import PROTOCOL_VERSION

        self.build_info.set(PROTOCOL_VERSION, fleet=fleet, mode=mode)

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        p = "edgetune_aggregator_"
        self.build_info = BuildInfo(r, p, ("fleet", "mode"))
        self.rounds_completed = Counter(p + "rounds_completed", "Federated rounds completed (kept one release as an "
                                        "alias: rounds_total{outcome} counts every round)", registry=r)
        self.rounds = Counter(p + "rounds", "Rounds (sync) and buffer steps (async) by outcome: complete, deadline "
                              "(quorum met at the deadline), failed (quorum missed), error (the strategy refused the "
                              "updates), async steps", ["outcome"], registry=r)
        for outcome in ("complete", "deadline", "failed", "error"):
            self.rounds.labels(outcome=outcome)  # zeros on the dashboard, not "no data"
        self.round_duration = Histogram(
            p + "round_duration_seconds", "Wall time of a round, announce to publish", buckets=_ROUND_BUCKETS, registry=r
        )
        self.current_round = Gauge(p + "current_round", "Round in progress or last completed", registry=r)
        self.global_version = Gauge(p + "global_adapter_version", "Version of the published global adapter", registry=r)
        self.agents_connected = Gauge(p + "agents_connected", "Agents whose retained status is online", registry=r)
        self.agents_selected = Gauge(p + "agents_selected", "Agents selected for the current round", registry=r)
        self.agents_answered = Counter(p + "agents_answered", "Selected agents whose update was accepted", registry=r)
        self.agents_dropped = Counter(p + "agents_dropped", "Selected agents that did not answer by the deadline", registry=r)
        self.agents_refused = Counter(p + "agents_refused", "Times an agent came to refuse the task (its model or "
                                      "settings differ)", registry=r)
        self.agents_refusing = Gauge(p + "agents_refusing", "Agents whose last status refuses the task", registry=r)
        self.update_bytes_received = Counter(p + "update_bytes_received", "Bytes of agent updates received", registry=r)
        self.global_bytes_published = Counter(p + "global_bytes_published", "Bytes of global adapters published", registry=r)
        self.aggregation_seconds = Histogram(
            p + "aggregation_seconds", "Time to aggregate one round's updates", buckets=_FAST_BUCKETS, registry=r
        )
        self.global_accuracy = Gauge(p + "global_accuracy_ratio", "Held-out accuracy of the global model", registry=r)
        self.global_loss = Gauge(p + "global_loss", "Held-out loss of the global model", registry=r)
        self.global_perplexity = Gauge(p + "global_perplexity", "Held-out perplexity (split mode)", registry=r)
        # evaluation, by where it came from: "central" (EDGETUNE_EVAL_DATA) or "federated" (the agents' held-out slices)
        self.eval_accuracy = Gauge(p + "eval_accuracy_ratio", "Accuracy of the newest evaluated global", ["source"],
                                   registry=r)
        self.eval_macro_f1 = Gauge(p + "eval_macro_f1", "Macro-F1 of the newest evaluated global", ["source"], registry=r)
        self.eval_class_f1 = Gauge(p + "eval_class_f1", "Per-class F1 of the newest evaluated global",
                                   ["source", "label"], registry=r)
        self.eval_loss = Gauge(p + "eval_loss", "Held-out loss of the newest evaluated global", ["source"], registry=r)
        self.eval_perplexity = Gauge(p + "eval_perplexity", "Held-out perplexity (split mode)", ["source"], registry=r)
        self.eval_examples = Gauge(p + "eval_examples", "Examples the newest evaluation covered", ["source"], registry=r)
        self.eval_version = Gauge(p + "eval_global_version", "Global version of the newest evaluation", ["source"],
                                  registry=r)
        self.eval_agents = Gauge(p + "eval_agents", "Agents whose reports the newest federated evaluation sums",
                                 registry=r)
        self.eval_reports = Counter(p + "eval_reports", "Agents' evaluation reports accepted", registry=r)
        self.rejected = Counter(p + "rejected_messages", "Messages refused, by reason", ["reason"], registry=r)
        self.broker_dropped = Gauge(p + "broker_dropped_messages", "Messages the broker dropped since it started "
                                    "(a client's queue or inflight window was full: Mosquitto's $SYS count)", registry=r)
        self.broker_connected = Gauge(p + "broker_connected", "1 while connected to the MQTT broker", registry=r)
        self.dp_epsilon = Gauge(
            p + "dp_epsilon", "Client-level DP: epsilon spent so far at the configured delta (NaN without DP)", registry=r
        )
        self.update_staleness = Histogram(
            p + "update_staleness_versions", "Async: versions between an applied update's base and the global",
            buckets=(0, 1, 2, 3, 5, 10, 20), registry=r,
        )
        self.async_buffer_pending = Gauge(p + "async_buffer_pending", "Async: updates waiting in the buffer", registry=r)
        # split learning
        self.activation_bytes = Counter(p + "split_activation_bytes_received", "Activation bytes received", registry=r)
        self.gradient_bytes = Counter(p + "split_gradient_bytes_sent", "Gradient bytes sent back", registry=r)
        self.split_step_seconds = Histogram(
            p + "split_step_seconds", "Server forward+backward of one micro-batch", buckets=_FAST_BUCKETS, registry=r
        )
        self.split_microbatch_size = Histogram(
            p + "split_microbatch_agents", "Agent requests served in one micro-batch",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r,
        )
        self.split_queue_depth = Gauge(p + "split_queue_depth", "Split requests waiting to be served", registry=r)
        self.split_steps = Counter(p + "split_steps", "Server-side optimiser steps", registry=r)
        # not measured yet (or not in this mode): NaN, not a made-up 0
        self.global_accuracy.set(float("nan"))
        self.global_perplexity.set(float("nan"))
        self.global_loss.set(float("nan"))
        self.dp_epsilon.set(float("nan"))
        for source in ("central", "federated"):
            for g in (self.eval_accuracy, self.eval_macro_f1, self.eval_loss, self.eval_perplexity):
                g.labels(source=source).set(float("nan"))
        # pre-create the common reasons so that dashboards show zeros, not "no data"
        for reason in ("malformed_frame", "bad_checksum", "wrong_version", "bad_schema", "bad_topic",
                       "wrong_round", "duplicate", "not_selected", "bad_tensors", "non_finite", "late", "stale",
                       "wrong_task"):
            self.rejected.labels(reason=reason)

    def observe_eval(self, row: dict) -> None:
        """An evaluation's figures (a metrics row with "eval": central or federated) as gauges."""
        src = row.get("eval", "central")
        for gauge, key in ((self.eval_accuracy, "accuracy"), (self.eval_macro_f1, "macro_f1"),
                           (self.eval_loss, "loss"), (self.eval_perplexity, "perplexity")):
            if row.get(key) is not None:
                gauge.labels(source=src).set(row[key])
        n = row.get("eval_examples", row.get("eval_tokens"))
        if n is not None:
            self.eval_examples.labels(source=src).set(n)
        if row.get("version") is not None:
            self.eval_version.labels(source=src).set(row["version"])
        for label, c in (row.get("per_class") or {}).items():
            if c.get("f1") is not None:
                self.eval_class_f1.labels(source=src, label=label).set(c["f1"])
        if src == "federated":
            self.eval_agents.set(row.get("eval_agents", 0))
