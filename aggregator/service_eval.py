"""The aggregator service's side of evaluation: the central evaluation of each global (when it
has evaluation data), the agents' reports (federated evaluation, summed by the pure
aggregator/evaluation.py), the rows they make in metrics.jsonl, the gauges, and the model card
of the newest checkpoint kept current. A mixin of AggregatorService (aggregator/service.py),
which owns the transport, the task, the metrics and the loop."""

from __future__ import annotations

import json
import logging
import time

from broker import codec
from broker.errors import WireError
from broker.messages import EvalReport, parse
from broker.transport import Incoming

log = logging.getLogger("edgetune.aggregator")


class EvaluationMixin:
    """Needs from its class: s, out, task, task_def, fed_eval, coord, metrics, online, rows, _stop,
    _reject(reason, msg) and _pump(until)."""

    def _rows_so_far(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []

    def _record(self, row: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)

    def _evaluate(self) -> dict:
        t0 = time.perf_counter()
        r = self.task.evaluate()
        if not r:  # no central evaluation data: the agents evaluate (federated evaluation)
            return {}
        if "accuracy" in r:
            self.metrics.global_accuracy.set(r["accuracy"])
        if "perplexity" in r:
            self.metrics.global_perplexity.set(r["perplexity"])
        self.metrics.global_loss.set(r["loss"])
        self.metrics.observe_eval({**r, "version": self.coord.version})
        return {**r, "eval_seconds": time.perf_counter() - t0}

    def _handle_eval(self, agent: str, m: Incoming) -> None:
        """An agent's evaluation of a global on its held-out slice (federated evaluation)."""
        try:
            r = parse(codec.decode(m.payload, max_size=1024 * 1024).header, EvalReport)
        except WireError as e:
            return self._reject(e.reason, f"evaluation on {m.topic}: {e}")
        if r.agent_id != agent:
            return self._reject("bad_topic", f"evaluation claims {r.agent_id} but came on {agent}'s topic")
        if r.task_hash not in ("", self.task_def.hash):
            return self._reject("wrong_task", f"evaluation from {agent} is for task {r.task_hash[:12]}, not the "
                                f"fleet's {self.task_def.hash[:12]}")
        refused = self.fed_eval.add(r)
        if refused is not None:
            return self._reject(*refused)
        self.metrics.eval_reports.inc()
        self._record_eval(self.fed_eval.take_complete())

    def _record_eval(self, rows: list[dict]) -> None:
        """Federated evaluation rows: into metrics.jsonl and Prometheus (source "federated")."""
        for row in rows:
            self._record(row)
            self.metrics.observe_eval(row)
            if "accuracy" in row or "perplexity" in row:
                log.info("federated evaluation of global v%d (round %d) by %d agents on %d held-out %s: %s",
                         row["version"], row["round"], row["eval_agents"],
                         row.get("eval_examples", row.get("eval_tokens", 0)),
                         "examples" if "accuracy" in row else "tokens", fmt_row(row))
            else:
                log.warning("federated evaluation of global v%d (round %d): no agent reported (missing: %s)",
                            row["version"], row["round"], ", ".join(row.get("eval_missing", [])) or "none expected")
        if rows:
            self._refresh_card()

    def _finish_eval(self) -> None:
        """After the final global: wait (eval_wait_s at most) for the agents' evaluations of it."""
        deadline = time.monotonic() + self.s.eval_wait_s
        while self.fed_eval.open and not self._stop and time.monotonic() < deadline:
            if not self.fed_eval.waiting_for(self.online):
                break
            self._pump(min(deadline, time.monotonic() + 0.5))
        self._record_eval(self.fed_eval.close_all())

    def _refresh_card(self) -> None:
        """The newest checkpoint's model card, with every figure so far (federated evaluations come in
        after their checkpoint was written) and the examples each agent trained on."""
        from aggregator.checkpoint import latest_checkpoint
        from aggregator.model_card import refresh_model_card

        ck = latest_checkpoint(self.out) if self.s.mode == "federated" else None
        if ck is None:
            return
        examples = {a: st["num_examples"] for r in self.rows for a, st in (r.get("agents") or {}).items()
                    if st.get("num_examples") is not None}
        try:
            refresh_model_card(ck.path, self.rows, examples)
        except FileNotFoundError:  # a checkpoint from before model cards: left as it is
            pass


def fmt_row(row: dict) -> str:
    return ", ".join(f"{k} {row[k]:.4f}" for k in ("accuracy", "macro_f1", "perplexity", "loss") if row.get(k) is not None)
