"""Evaluation figures, and federated evaluation: the fleet evaluates each global on the devices.

Pure (no torch, no paho): the service (aggregator/service.py) feeds it EvalReports and writes
the rows it returns; the central evaluation (aggregator/tasks.py) uses the same figures.

Cross-device evaluation as Flower's `configure_evaluate` / `aggregate_evaluate` do it, with
sums instead of averages of averages: after each new global, every agent with a held-out slice
(rows it never trains on) evaluates it and reports a confusion matrix [true][predicted] over the
task's labels and its mean loss (split mode: its mean next-token loss and token count). A
version's reports are summed: the fleet's accuracy and macro-F1 are exactly what one evaluation
on the union of the agents' held-out rows would give; the loss is weighted by examples (tokens).

When is a version's figure final? When every agent that was online with a held-out slice when
the global was published has reported (`expected`), when the next global is published (the
agents evaluate a global when they load it, before they train on it, so its reports are in by
then), or at the end of the run after a grace period (`close_all`). Reports for a version
already closed, from an agent that already reported it, or of the wrong shape are refused with
a reason the service counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from broker.messages import EvalReport


def classification_figures(confusion: list[list[int]], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision, recall, F1 and support from a confusion matrix
    [true][predicted]. A class with no example and no prediction is left out of the macro mean
    (scikit-learn's `labels=present` convention); one predicted but absent scores F1 0."""
    k = len(confusion)
    n = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(k))
    per_class, f1s = {}, []
    for i in range(k):
        tp = confusion[i][i]
        support = sum(confusion[i])
        predicted = sum(confusion[j][i] for j in range(k))
        if support == 0 and predicted == 0:
            per_class[labels[i]] = {"precision": None, "recall": None, "f1": None, "support": 0}
            continue
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[labels[i]] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        f1s.append(f1)
    return {"accuracy": correct / n if n else math.nan, "macro_f1": sum(f1s) / len(f1s) if f1s else math.nan,
            "per_class": per_class, "eval_examples": n}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


@dataclass
class _Version:
    version: int
    round: int
    expected: frozenset[str]
    reports: dict[str, EvalReport] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.expected) and self.expected <= set(self.reports)


class FederatedEval:
    """The tally of agents' EvalReports, per global version.

        fe.published(version, round, expected=agents_with_holdout)   # a global went out
        fe.add(report) -> None | (reason, message)                   # a report came in
        fe.take_complete() / fe.close_before(version) / fe.close_all()  # rows to record
    """

    def __init__(self, labels: list[str], mode: str = "federated") -> None:
        self.labels = list(labels)
        self.mode = mode
        self.open: dict[int, _Version] = {}
        self.closed: set[int] = set()

    def published(self, version: int, round_number: int, expected) -> list[dict]:
        """A new global is out: older versions are final (their rows returned); this one opens."""
        rows = self.close_before(version)
        if version not in self.open and version not in self.closed:
            self.open[version] = _Version(version, round_number, frozenset(expected))
        return rows

    def add(self, r: EvalReport) -> tuple[str, str] | None:
        """Take a report; (reason, message) if it is refused."""
        v = self.open.get(r.version)
        if v is None:
            what = "already final" if r.version in self.closed else "not published"
            return "stale", f"evaluation of global v{r.version} from {r.agent_id}: that version is {what}"
        if r.agent_id in v.reports:
            return "duplicate", f"a second evaluation of global v{r.version} from {r.agent_id}"
        if self.mode == "federated" and len(r.confusion) != len(self.labels):
            return "bad_schema", (f"evaluation from {r.agent_id} has a {len(r.confusion)}-class confusion matrix; "
                                  f"the task has {len(self.labels)} labels")
        if self.mode == "split" and r.tokens < 1:
            return "bad_schema", f"split evaluation from {r.agent_id} scores no tokens"
        v.reports[r.agent_id] = r
        return None

    def take_complete(self) -> list[dict]:
        """Rows of the open versions every expected agent has reported."""
        return self._close([n for n in sorted(self.open) if self.open[n].complete])

    def close_before(self, version: int) -> list[dict]:
        return self._close([n for n in sorted(self.open) if n < version])

    def close_all(self) -> list[dict]:
        return self._close(sorted(self.open))

    def waiting_for(self, online) -> set[str]:
        """Expected agents, still online, that have not reported an open version."""
        online = set(online)
        return {a for v in self.open.values() for a in v.expected - set(v.reports) if a in online}

    def _close(self, versions: list[int]) -> list[dict]:
        """The rows of these versions, now final (none for a version nobody was expected to report)."""
        rows = []
        for n in versions:
            v = self.open.pop(n)
            self.closed.add(n)
            if v.reports or v.expected:
                rows.append(self.row(v.version, v.round, list(v.reports.values()),
                                     missing=sorted(v.expected - set(v.reports))))
        return rows

    def row(self, version: int, round_number: int, reports: list[EvalReport], missing=()) -> dict:
        """The metrics.jsonl row of one version's reports ({} figures when none came)."""
        row: dict = {"round": round_number, "version": version, "eval": "federated", "eval_agents": len(reports)}
        if missing:
            row["eval_missing"] = list(missing)
        if not reports:
            return row
        per_agent = {}
        if self.mode == "split":
            tokens = sum(r.tokens for r in reports)
            loss = sum(r.loss * r.tokens for r in reports) / tokens
            row.update(loss=loss, perplexity=perplexity(loss), eval_tokens=tokens)
            for r in reports:
                per_agent[r.agent_id] = {"tokens": r.tokens, "loss": r.loss, "perplexity": perplexity(r.loss)}
        else:
            k = len(self.labels)
            total = [[sum(r.confusion[i][j] for r in reports) for j in range(k)] for i in range(k)]
            row.update(classification_figures(total, self.labels))
            row["loss"] = sum(r.loss * r.num_examples for r in reports) / sum(r.num_examples for r in reports)
            for r in reports:
                per_agent[r.agent_id] = {"examples": r.num_examples, "loss": r.loss,
                                         "accuracy": sum(r.confusion[i][i] for i in range(k)) / r.num_examples}
        row["eval_per_agent"] = per_agent
        return row
