"""Every number a user would ask an edge agent about, as Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.metrics_http import BuildInfo, serve  # noqa: F401  (re-exported: each side's serve)

_TRAIN_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
_FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class AgentMetrics:
    def info(self, fleet: str, agent: str, mode: str) -> None:
        """edgetune_agent_build_info{version, protocol, fleet, agent, mode} 1."""
        from broker.messages import PROTOCOL_VERSION

        self.build_info.set(PROTOCOL_VERSION, fleet=fleet, agent=agent, mode=mode)

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        p = "edgetune_agent_"
        self.build_info = BuildInfo(r, p, ("fleet", "agent", "mode"))
        self.rounds_participated = Counter(p + "rounds_participated", "Rounds this agent sent an update for", registry=r)
        self.update_bytes_sent = Counter(p + "update_bytes_sent", "Bytes of adapter updates published", registry=r)
        self.global_bytes_received = Counter(p + "global_bytes_received", "Bytes of global adapters received", registry=r)
        self.global_version = Gauge(p + "global_adapter_version", "Version of the global adapter loaded", registry=r)
        self.local_train_seconds = Histogram(
            p + "local_train_seconds", "Time of one local training run", buckets=_TRAIN_BUCKETS, registry=r
        )
        self.local_loss = Gauge(p + "local_train_loss", "Mean training loss of the last local run", registry=r)
        self.local_examples = Gauge(p + "local_examples", "Labelled examples available for local training", registry=r)
        self.samples_stored = Gauge(p + "samples_stored", "User inputs held in the local store", registry=r)
        self.samples_unknown_label = Gauge(p + "samples_unknown_label", "Labelled samples in the local store whose "
                                           "label is not among the fleet's labels (kept, never trained on)", registry=r)
        self.incremental_runs = Counter(p + "incremental_training_runs", "Incremental fine-tuning runs", registry=r)
        self.model_swaps = Counter(p + "model_swaps", "Exported models checked for service, by outcome "
                                   "(first_model, accepted, worse, ...)", ["outcome"], registry=r)
        self.holdout_accuracy = Gauge(p + "serving_holdout_accuracy",
                                      "Local holdout accuracy of the model in service when it was swapped in", registry=r)
        self.holdout_accuracy.set(float("nan"))  # no model swapped in yet: NaN, not a made-up 0
        self.eval_examples = Gauge(p + "eval_examples", "Held-out examples the agent evaluates each global on "
                                   "(federated evaluation; never trained on)", registry=r)
        self.eval_accuracy = Gauge(p + "eval_accuracy_ratio", "Accuracy of the last global on the agent's held-out "
                                   "slice", registry=r)
        self.eval_accuracy.set(float("nan"))
        self.eval_reports = Counter(p + "eval_reports", "Evaluations of a global reported to the aggregator", registry=r)
        for outcome in ("first_model", "accepted", "worse", "labels_differ", "load_failed", "export_failed"):
            self.model_swaps.labels(outcome=outcome)  # zeros on the dashboard, not "no data"
        self.predictions = Counter(p + "predictions", "Predictions served", ["backend"], registry=r)
        self.predict_seconds = Histogram(
            p + "predict_seconds", "Latency of one prediction request", buckets=_FAST_BUCKETS, registry=r
        )
        self.broker_connected = Gauge(p + "broker_connected", "1 while connected to the MQTT broker", registry=r)
        self.rejected = Counter(p + "rejected_messages", "Messages refused, by reason", ["reason"], registry=r)
        # split learning
        self.activation_bytes = Counter(p + "split_activation_bytes_sent", "Activation bytes sent", registry=r)
        self.gradient_bytes = Counter(p + "split_gradient_bytes_received", "Gradient bytes received", registry=r)
        self.split_round_trip = Histogram(
            p + "split_round_trip_seconds", "Activation publish to gradient arrival", buckets=_FAST_BUCKETS, registry=r
        )
        self.split_resends = Counter(p + "split_resends", "Split requests resent after a timeout", registry=r)
        for reason in ("malformed_frame", "bad_checksum", "wrong_version", "bad_schema", "wrong_task"):
            self.rejected.labels(reason=reason)
        for backend in ("onnx", "torch"):
            self.predictions.labels(backend=backend)

