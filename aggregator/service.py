"""The aggregator service: the thin I/O shell around `rounds.Round` and a strategy.

It owns the transport, the model used for evaluation, the checkpoints and the metrics file.
Everything that decides (accept or reject, when a round is over, how to combine) lives in pure
code: rounds.py and strategies.py.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path

import torch

from aggregator.metrics import AggregatorMetrics, serve
from aggregator.rounds import Outcome, Rejection, Round, select_agents
from aggregator.settings import AggregatorSettings
from aggregator.split_server import SplitRequest
from aggregator.async_buffer import AsyncBuffer
from aggregator.strategies import ClientUpdate, InvalidUpdate, make_strategy, report
from aggregator.tasks import make_task
from broker import activations, codec
from broker.errors import WireError
from broker.messages import (AgentState, AgentStatus, GlobalAdapter, ModelUpdate, RoundAnnouncement, SplitForward,
                             SplitGradient, parse)
from broker.settings import dump_settings
from broker.metrics_http import linger
from broker.topics import Topics
from broker.transport import Incoming, MqttTransport
from models.adapters import AdapterMismatch, check_adapter_state
from models.classifier import set_threads

log = logging.getLogger("edgetune.aggregator")


class Stop(Exception):
    pass


class AggregatorService:
    def __init__(self, settings: AggregatorSettings, metrics: AggregatorMetrics | None = None) -> None:
        self.s = settings
        self.topics = Topics(settings.fleet)
        self.metrics = metrics or AggregatorMetrics()
        self.out = Path(settings.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.online: dict[str, AgentStatus] = {}
        self.round: Round | None = None
        self.version = 0
        self.round_number = 0
        self.seen_nonces: set[tuple[str, int, str]] = set()
        self.early: dict[str, tuple[ModelUpdate, dict]] = {}  # next round's updates that came first
        self._stop = False
        self._async_closed = False
        self.transport: MqttTransport | None = None

    # -- setup ------------------------------------------------------------------------------
    def _build(self) -> None:
        set_threads(self.s.threads)
        self.task = make_task(self.s, self.out)
        self.strategy = make_strategy(self.s.strategy, **self.s.strategy_options)
        self.split_queue: list[SplitRequest] = []
        ck = self.task.resume()
        if ck is not None:
            self.round_number, self.version = ck.round, ck.version
            log.info("resuming from %s: round %d, global v%d", ck.path, ck.round, ck.version)
            if hasattr(self.strategy, "load_state_dict") and ck.extra.get("strategy_state"):
                self.strategy.load_state_dict(ck.extra["strategy_state"])
        self.global_state = self.task.global_state()
        self.buffer: AsyncBuffer | None = None
        if self.s.aggregation == "async":
            self.buffer = AsyncBuffer(
                self.s.buffer_size(), self.s.async_staleness_weight, self.s.async_staleness_a,
                global_state=self.global_state, server_lr=self.s.async_server_lr,
                max_staleness=self.s.async_max_staleness, version=self.version,
            )
        self.async_selected: tuple[str, ...] = ()
        self.async_updates: dict[str, ModelUpdate] = {}  # "agent:nonce" -> the updates in the buffer now

    def _connect(self) -> None:
        t = MqttTransport(
            f"edgetune-aggregator-{self.s.fleet}",
            self.s.broker_url,
            username=self.s.mqtt_username,
            password=self.s.password(),
            ca_file=self.s.ca_file,
            protocol=self.s.mqtt_protocol,
            persistent_session=True,
            on_state=lambda up: self.metrics.broker_connected.set(1 if up else 0),
        )
        t.subscribe(self.topics.all_status)
        t.subscribe(self.topics.all_updates)
        if self.s.mode == "split":
            if self.s.mqtt_protocol != 5:
                raise ValueError("split mode needs an MQTT 5 broker (request/response): set EDGETUNE_MQTT_PROTOCOL=5")
            t.subscribe(self.topics.all_split_forward)
        t.connect()
        self.transport = t

    # -- incoming ---------------------------------------------------------------------------
    def _reject(self, reason: str, msg: str) -> None:
        self.metrics.rejected.labels(reason=reason).inc()
        log.warning("rejected (%s): %s", reason, msg)

    def _handle(self, m: Incoming) -> None:
        try:
            agent, rest = self.topics.parse_agent_topic(m.topic)
        except WireError as e:
            return self._reject(e.reason, str(e))
        if rest == "status":
            if not m.payload:  # a cleared retained status
                self.online.pop(agent, None)
            else:
                try:
                    st = parse(codec.decode(m.payload, max_size=64 * 1024).header, AgentStatus)
                except WireError as e:
                    return self._reject(e.reason, f"status on {m.topic}: {e}")
                if st.agent_id != agent:
                    return self._reject("bad_topic", f"status for {st.agent_id} on {agent}'s topic")
                if st.state == AgentState.offline:
                    self.online.pop(agent, None)
                else:
                    self.online[agent] = st
            self.metrics.agents_connected.set(len(self.online))
        elif rest == "update":
            self.metrics.update_bytes_received.inc(len(m.payload))
            self._handle_update(agent, m)
        elif rest == "split/fwd" and self.s.mode == "split":
            self.metrics.activation_bytes.inc(len(m.payload))
            self._handle_split(agent, m)
        else:
            self._reject("bad_topic", f"nothing is expected on {m.topic}")

    def _handle_split(self, agent: str, m: Incoming) -> None:
        try:
            frame = codec.decode(m.payload, max_size=self.s.max_activation_bytes)
            msg = parse(frame.header, SplitForward)
            if msg.agent_id != agent:
                return self._reject("bad_topic", f"activations claim {msg.agent_id} but came on {agent}'s topic")
            act = activations.decode(frame.tensors, msg.encoding, "act")
            mask = frame.tensors.get("attention_mask")
            labels = frame.tensors.get("labels")
            hidden = self.task.head.config.hidden_size if hasattr(self.task.head.config, "hidden_size") else None
            if (act.dim() != 3 or mask is None or labels is None or tuple(mask.shape) != tuple(act.shape[:2])
                    or tuple(labels.shape) != tuple(act.shape[:2]) or labels.dtype != torch.int64
                    or (hidden and act.shape[-1] != hidden) or act.shape[0] * act.shape[1] > self.s.split_max_tokens):
                return self._reject("bad_tensors", f"split request from {agent}: shapes {tuple(act.shape)} do not fit")
        except (WireError, activations.EncodingError) as e:
            return self._reject(e.reason, f"split request on {m.topic}: {e}")
        self.split_queue.append(SplitRequest(agent, msg.step, act, mask, labels, m.correlation,
                                             m.response_topic or self.topics.split_gradient(agent), msg.encoding))
        self.metrics.split_queue_depth.set(len(self.split_queue))

    def _serve_split(self) -> None:
        """Gather the other agents' activations for a moment, then serve them as micro-batches."""
        waiting_for = len(self.round.selected) - len(self.round.accepted) if self.round else 1
        window_end = time.monotonic() + self.s.split_batch_window_ms / 1000
        while len({r.agent_id for r in self.split_queue}) < waiting_for and time.monotonic() < window_end:
            m = self.transport.get(timeout=max(0.0, window_end - time.monotonic()))
            if m is not None:
                self._handle(m)
        batch, self.split_queue = self.split_queue, []
        self.metrics.split_queue_depth.set(0)
        if not batch:
            return
        t0 = time.perf_counter()
        steps_before = self.task.server.server_step
        replies = self.task.server.serve(batch)
        self.metrics.split_step_seconds.observe(time.perf_counter() - t0)
        self.metrics.split_microbatch_size.observe(len(batch))
        self.metrics.split_steps.inc(self.task.server.server_step - steps_before)
        for rep in replies:
            req = rep.request
            msg = SplitGradient(agent_id=req.agent_id, step=req.step, encoding=req.encoding, loss=rep.loss,
                                tokens=rep.tokens, server_step=rep.server_step, cached=rep.cached)
            payload = codec.encode(msg, activations.encode(rep.grad, req.encoding, "grad"))
            self.transport.publish(req.response_topic, payload, correlation=req.correlation)
            self.metrics.gradient_bytes.inc(len(payload))

    def _handle_update(self, agent: str, m: Incoming) -> None:
        try:
            frame = codec.decode(m.payload, max_size=self.s.max_update_bytes)
            meta = parse(frame.header, ModelUpdate)
        except WireError as e:
            return self._reject(e.reason, f"update on {m.topic}: {e}")
        if meta.agent_id != agent:
            return self._reject("bad_topic", f"update claims {meta.agent_id} but came on {agent}'s topic")
        key = (meta.agent_id, meta.round, meta.nonce)
        if key in self.seen_nonces:
            return self._reject("duplicate", f"replayed update {key}")
        if self.buffer is not None:
            return self._offer_async(meta, frame.tensors)
        if self.round is None:
            if meta.round == self.round_number + 1 and meta.base_version == self.version:
                # the next round's update, queued by the broker while we were down (or raced ahead of
                # our announcement): keep it until the round opens, checked then like any other
                self.early[agent] = (meta, frame.tensors)
                return
            return self._reject("wrong_round", f"update from {agent} for round {meta.round} while no round is open")
        self._offer(meta, frame.tensors)

    def _offer(self, meta: ModelUpdate, tensors: dict) -> None:
        key = (meta.agent_id, meta.round, meta.nonce)
        try:
            self.round.offer(meta, tensors, time.time())
        except Rejection as e:
            return self._reject(e.reason, str(e))
        self.seen_nonces.add(key)
        agent = meta.agent_id
        self.metrics.agents_answered.inc()
        log.info("round %d: update from %s (%d examples, loss %.4f)", meta.round, agent, meta.num_examples,
                 meta.train_loss if meta.train_loss is not None else math.nan)

    def _offer_async(self, meta: ModelUpdate, tensors: dict) -> None:
        """Async: any update from the fleet's agents goes into the buffer if it is fresh enough;
        a full buffer becomes the next global at once (see _run_async_step)."""
        agent = meta.agent_id
        if self._async_closed:
            return self._reject("wrong_round", f"update from {agent} after the run's last step")
        if agent not in self.online and agent not in self.async_selected:
            return self._reject("not_selected", f"update from {agent}, which is neither online nor selected")
        try:
            check_adapter_state(dict(self.global_state), tensors)
            self.buffer.add(ClientUpdate(agent, tensors, meta.num_examples, base_version=meta.base_version,
                                         nonce=meta.nonce))
        except AdapterMismatch as e:
            return self._reject(e.reason, f"update from {agent}: {e}")
        except InvalidUpdate as e:
            return self._reject(e.reason, f"update from {agent}: {e}")
        self.seen_nonces.add((agent, meta.round, meta.nonce))
        self.async_updates[f"{agent}:{meta.nonce}"] = meta
        self.metrics.agents_answered.inc()
        self.metrics.async_buffer_pending.set(self.buffer.pending)
        log.info("async: update from %s (base v%d, global v%d, %d examples), buffer %d", agent, meta.base_version,
                 self.buffer.version, meta.num_examples, self.buffer.pending)

    def _pump(self, until: float) -> None:
        """Handle incoming messages until `until` (monotonic) or until one arrives and is handled."""
        assert self.transport is not None
        while not self._stop:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            m = self.transport.get(timeout=min(remaining, 0.5))
            if m is not None:
                self._handle(m)
                if self.split_queue:
                    self._serve_split()
                return
        raise Stop

    # -- publishing -------------------------------------------------------------------------
    def _publish_global(self, accuracy: float | None, loss: float | None) -> None:
        msg = GlobalAdapter(version=self.version, round=self.round_number, accuracy=accuracy, loss=loss)
        payload = codec.encode(msg, self.global_state)
        self.transport.publish(self.topics.global_adapter, payload, retain=True, wait=True)
        self.metrics.global_bytes_published.inc(len(payload))
        self.metrics.global_version.set(self.version)

    def _announce(self, rnd: Round, final: bool = False) -> None:
        ann = RoundAnnouncement(
            round=max(rnd.number, 1) if rnd else 1,
            selected=list(rnd.selected) if rnd else [],
            deadline=rnd.deadline if rnd else time.time(),
            global_version=self.version,
            local_epochs=self.s.local_epochs,
            max_local_steps=self.s.max_local_steps,
            final=final,
        )
        self.transport.publish(self.topics.round, codec.encode(ann), retain=True, wait=True)

    def _evaluate(self) -> dict:
        t0 = time.perf_counter()
        r = self.task.evaluate()
        if "accuracy" in r:
            self.metrics.global_accuracy.set(r["accuracy"])
        if "perplexity" in r:
            self.metrics.global_perplexity.set(r["perplexity"])
        self.metrics.global_loss.set(r["loss"])
        return {**r, "eval_seconds": time.perf_counter() - t0}

    def _record(self, row: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def _checkpoint(self, row: dict) -> None:
        extra = {k: row[k] for k in ("accuracy", "loss", "perplexity") if k in row}
        if hasattr(self.strategy, "state_dict"):
            extra["strategy_state"] = self.strategy.state_dict()
        self.task.checkpoint(self.round_number, self.version, extra)

    # -- the loop ---------------------------------------------------------------------------
    def _wait_for_agents(self) -> None:
        need = self.s.expected_agents or self.s.min_agents
        deadline = time.monotonic() + self.s.wait_for_agents_s
        last_log = 0.0
        while len(self.online) < need:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(self.online)} of {need} agents came online within {self.s.wait_for_agents_s:.0f}s: "
                    "check that agents use the same broker and fleet (EDGETUNE_BROKER_URL, EDGETUNE_FLEET)"
                )
            if time.monotonic() - last_log > 10:
                log.info("waiting for agents: %d of %d online", len(self.online), need)
                last_log = time.monotonic()
            self._pump(time.monotonic() + 0.5)

    def _run_round(self) -> dict:
        number = self.round_number + 1
        selected = select_agents(list(self.online), self.s.selection_size(len(self.online)), number, self.s.seed)
        if len(selected) < self.s.min_agents:
            self._wait_for_agents()
            selected = select_agents(list(self.online), self.s.selection_size(len(self.online)), number, self.s.seed)
        t0 = time.time()
        rnd = Round(number, selected, t0 + self.s.round_timeout_s, self.version, self.s.min_agents, self.global_state)
        self.round = rnd
        self.metrics.current_round.set(number)
        self.metrics.agents_selected.set(len(selected))
        self._announce(rnd)
        log.info("round %d: announced to %d agents (%s), deadline in %.0fs", number, len(selected),
                 ", ".join(selected), self.s.round_timeout_s)
        early, self.early = self.early, {}
        for meta, tensors in early.values():
            if meta.round == number:
                self._offer(meta, tensors)
        while rnd.status(time.time()) is Outcome.collecting:
            self._pump(time.monotonic() + 0.5)
        outcome = rnd.status(time.time())
        self.round = None
        self.metrics.agents_dropped.inc(len(rnd.dropped))
        row = {"round": number, "outcome": outcome.value, "selected": list(selected),
               "answered": sorted(rnd.accepted), "dropped": rnd.dropped}
        if outcome is Outcome.failed:
            log.error("round %d failed: %d of %d answered, quorum %d; the global adapter stays v%d",
                      number, len(rnd.accepted), len(selected), self.s.min_agents, self.version)
            row.update(version=self.version, duration_s=time.time() - t0)
            self.round_number = number
            return row
        updates = [
            ClientUpdate(a.meta.agent_id, a.tensors, a.meta.num_examples)
            for a in sorted(rnd.accepted.values(), key=lambda a: a.meta.agent_id)
        ]
        ta = time.perf_counter()
        try:
            new_state = self.strategy.aggregate(self.global_state, updates)
        except (ValueError, InvalidUpdate) as e:  # e.g. krum with fewer updates than it needs
            log.error("round %d: %s could not aggregate %d updates: %s; the global adapter stays v%d", number,
                      self.s.strategy, len(updates), e, self.version)
            row.update(outcome=Outcome.failed.value, error=str(e), version=self.version, duration_s=time.time() - t0)
            self.round_number = number
            return row
        row["agents"] = {a.meta.agent_id: _agent_row(a.meta) for a in rnd.accepted.values()}
        row.update(report(self.strategy))
        if row.get("dp_epsilon") is not None:
            self.metrics.dp_epsilon.set(row["dp_epsilon"])
        return self._publish_step(row, new_state, number, time.perf_counter() - ta, t0)

    def _publish_step(self, row: dict, new_state: dict, number: int, aggregation_s: float, t0: float) -> dict:
        """A new global: load it, evaluate it, publish it, checkpoint it; the row for metrics.jsonl."""
        self.metrics.aggregation_seconds.observe(aggregation_s)
        self.task.load_global(new_state)
        self.global_state = self.task.global_state()
        self.version += 1
        self.round_number = number
        row.update(self._evaluate())
        agents = row.get("agents", {})
        row.update(version=self.version, num_examples=sum(a["num_examples"] for a in agents.values()),
                   train_loss=_mean([a["train_loss"] for a in agents.values()]), aggregation_s=aggregation_s)
        self._publish_global(row.get("accuracy"), row["loss"])
        row["duration_s"] = time.time() - t0
        self._checkpoint(row)
        self.metrics.rounds_completed.inc()
        self.metrics.round_duration.observe(row["duration_s"])
        log.info("round %d: %s, global v%d, %s (%.1fs)", number, row["outcome"], self.version, _fmt(row),
                 row["duration_s"])
        return row

    # -- buffered asynchronous aggregation (aggregation=async) ------------------------------
    def _run_async_step(self) -> dict:
        """Announce the current global to the online agents and wait until the buffer has taken
        async_buffer_size updates (from this version or older ones, weighted down by staleness),
        or until round_timeout_s, when a partly filled buffer of at least min_agents is applied."""
        number = self.round_number + 1
        selected = select_agents(list(self.online), self.s.selection_size(len(self.online)), number, self.s.seed)
        if len(selected) < self.s.min_agents:
            self._wait_for_agents()
            selected = select_agents(list(self.online), self.s.selection_size(len(self.online)), number, self.s.seed)
        self.async_selected = tuple(sorted(set(self.async_selected) | set(selected)))
        t0 = time.time()
        self.metrics.current_round.set(number)
        self.metrics.agents_selected.set(len(selected))
        self._announce(Round(number, tuple(selected), t0 + self.s.round_timeout_s, self.version, self.s.min_agents, {}))
        log.info("async step %d: v%d announced to %d agents, buffer %d of %d", number, self.version, len(selected),
                 self.buffer.pending, self.buffer.options.buffer_size)
        deadline = time.monotonic() + self.s.round_timeout_s
        while self.buffer.version == self.version and time.monotonic() < deadline:
            self._pump(min(deadline, time.monotonic() + 0.5))
        row = {"round": number, "selected": list(selected)}
        if self.buffer.version == self.version:
            if self.buffer.pending < self.s.min_agents:
                log.error("async step %d: %d updates by the deadline, fewer than min_agents %d; the global stays v%d",
                          number, self.buffer.pending, self.s.min_agents, self.version)
                row.update(outcome=Outcome.failed.value, version=self.version, pending=self.buffer.pending,
                           duration_s=time.time() - t0)
                self.round_number = number
                return row
            self.buffer.flush()
            row["outcome"] = Outcome.deadline.value
        else:
            row["outcome"] = Outcome.complete.value
        return self._async_applied(row, number, t0)

    def _async_applied(self, row: dict, number: int, t0: float) -> dict:
        assert self.buffer.version == self.version + 1, "one buffer step at a time"
        applied = self.buffer.last_applied
        metas = [self.async_updates.pop(k) for k in list(self.async_updates)]
        by_agent = {m.agent_id: m for m in metas}
        row["applied"] = [dict(agent_id=a.agent_id, base_version=a.base_version, staleness=a.staleness,
                               num_examples=a.num_examples, weight=a.weight) for a in applied]
        row["answered"] = sorted({a.agent_id for a in applied})
        row["agents"] = {a: _agent_row(m) for a, m in by_agent.items()}
        for a in applied:
            self.metrics.update_staleness.observe(a.staleness)
        self.metrics.async_buffer_pending.set(self.buffer.pending)
        return self._publish_step(row, self.buffer.global_state, number, 0.0, t0)

    def _drain_async(self) -> list[dict]:
        """After the last step: let agents still training send their updates, and apply them as
        one last (partial) step, so that no update an agent made is lost."""
        rows = []
        grace_end = time.monotonic() + 1.0
        deadline = time.monotonic() + self.s.round_timeout_s
        t0 = time.time()
        while time.monotonic() < deadline and not self._stop:
            if self.buffer.version > self.version:  # a full buffer while draining
                rows.append(self._async_applied({"round": self.round_number + 1, "selected": [], "outcome": "drain"},
                                                self.round_number + 1, t0))
            busy = [a for a, st in self.online.items() if st.state == AgentState.training]
            if not busy and time.monotonic() > grace_end:
                break
            self._pump(min(deadline, time.monotonic() + 0.5))
        self._async_closed = True
        if self.buffer.pending:
            log.info("async: applying %d updates that arrived after the last step", self.buffer.pending)
            self.buffer.flush()
            rows.append(self._async_applied({"round": self.round_number + 1, "selected": [], "outcome": "drain"},
                                            self.round_number + 1, t0))
        return rows

    def run(self) -> None:
        def _on_signal(signum, frame):
            self._stop = True

        old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._build()
            dump_settings(self.s, self.out / "settings.json")
            if self.s.metrics_port is not None:
                self.metrics_server, _ = serve(self.metrics.registry, self.s.metrics_port, self.s.metrics_addr)
            self._connect()
            if self.round_number == 0:
                row = {"round": 0, "version": 0, **self._evaluate()}
                self._record(row)
                self._checkpoint(row)
                log.info("round 0 (initial global): %s", _fmt(row))
            self.metrics.current_round.set(self.round_number)
            self._publish_global(None, None)
            self._wait_for_agents()
            while self.round_number < self.s.rounds:
                row = self._run_round() if self.buffer is None else self._run_async_step()
                self._record(row)
            self._announce(Round(self.round_number, (), time.time(), self.version, 0, {}), final=True)
            if self.buffer is not None:
                rows = self._drain_async()
                for row in rows:
                    self._record(row)
                if rows:
                    self._announce(Round(self.round_number, (), time.time(), self.version, 0, {}), final=True)
            log.info("done: %d rounds, global v%d in %s", self.round_number, self.version, self.out)
        except Stop:
            log.info("stopping: the last checkpoint is round %d (v%d)", self.round_number, self.version)
        finally:
            if self.transport is not None:
                self.transport.close()
            if getattr(self, "metrics_server", None) is not None:
                linger(self.s.metrics_linger_s, lambda: self._stop)
                self.metrics_server.shutdown()
            for s, h in old.items():
                signal.signal(s, h)


def _fmt(row: dict) -> str:
    return ", ".join(f"{k} {row[k]:.4f}" for k in ("accuracy", "perplexity", "loss") if row.get(k) is not None)


def _agent_row(meta: ModelUpdate) -> dict:
    """Per-agent figures of an applied update, for metrics.jsonl."""
    return {"num_examples": meta.num_examples, "train_loss": meta.train_loss, "train_seconds": meta.train_seconds,
            "base_version": meta.base_version}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None
