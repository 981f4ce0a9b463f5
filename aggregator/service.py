"""The aggregator service: the MQTT driver of the round engine.

It owns the transport, the model used for evaluation (aggregator/tasks.py), the checkpoints and
the metrics. Everything that decides (accept or refuse, when a round or a buffer step is over,
how to combine, when to serve a split micro-batch) lives in pure code that the in-process
simulator drives too: coordinator.py (over rounds.py, async_buffer.py and the strategies) and
split_server.py's SplitBatcher.
"""

from __future__ import annotations

import logging
import math
import signal
import time
import uuid
from pathlib import Path

from aggregator.async_buffer import AsyncBuffer
from aggregator.coordinator import AsyncCoordinator, RoundRecord, SyncCoordinator, Verdict
from aggregator.evaluation import FederatedEval
from aggregator.metrics import AggregatorMetrics, serve
from aggregator.service_eval import EvaluationMixin, fmt_row
from aggregator.settings import AggregatorSettings
from aggregator.split_server import SplitBatcher, decode_split_request
from aggregator.strategies import make_strategy
from aggregator.tasks import make_task
from broker import activations, artifacts, codec
from broker.errors import WireError
from broker.messages import (AgentState, AgentStatus, FleetKeys, GlobalAdapter, ModelArtifact, ModelUpdate,
                             RoundAnnouncement, SplitGradient, TaskDefinition, parse)
from broker.signing import Keyring, KeyFileError, Signer
from broker.topics import BROKER_DROPPED, Topics, TopicKind
from broker.transport import Incoming, MqttTransport
from common.metrics_http import linger
from common.settings import dump_settings
from models.classifier import set_threads
from models.settings import task_fields

RUN_ID_FILE = "run_id"  # in the output dir: this run's id (see AggregatorService._run_id)

log = logging.getLogger("edgetune.aggregator")


class Stop(Exception):
    pass


class AggregatorService(EvaluationMixin):
    """The MQTT driver of the round engine (aggregator/coordinator.py)."""

    def __init__(self, settings: AggregatorSettings, metrics: AggregatorMetrics | None = None) -> None:
        self.s = settings
        self.topics = Topics(settings.fleet)
        self.metrics = metrics or AggregatorMetrics()
        self.metrics.info(fleet=settings.fleet, mode=settings.mode)
        self.out = Path(settings.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.run_id = self._run_id()
        self.online: dict[str, AgentStatus] = {}
        self.rows: list[dict] = self._rows_so_far()  # metrics.jsonl, this run's (a resumed run's too)
        self.refused: dict[str, str] = {}  # agents whose model does not fit the task -> their reason
        self.task_def: TaskDefinition | None = None  # built with the task (_build)
        # the fleet's signing key: the task, announcements and globals go out signed (broker.signing)
        self.signer = Signer.from_file(settings.signing_key) if settings.signing_key else None
        self._stop = False
        self.transport: MqttTransport | None = None

    def _build(self) -> None:
        s = self.s
        set_threads(s.threads)
        self.task = make_task(s, self.out)
        self.task_def = TaskDefinition(**task_fields(s))
        self.fed_eval = FederatedEval(self.task_def.labels, s.mode)
        self.strategy = make_strategy(s.strategy, **s.strategy_options)
        self.split_batcher = SplitBatcher(s.split_batch_window_ms / 1000)
        round_number = version = 0
        ck = self.task.resume()
        if ck is not None:
            round_number, version = ck.round, ck.version
            log.info("resuming from %s: round %d, global v%d", ck.path, ck.round, ck.version)
            if hasattr(self.strategy, "load_state_dict") and ck.extra.get("strategy_state"):
                self.strategy.load_state_dict(ck.extra["strategy_state"])
        common = dict(quorum=s.min_agents, timeout_s=s.round_timeout_s, seed=s.seed, selection_size=s.selection_size,
                      round_number=round_number, task_hash=self.task_def.hash)
        if s.aggregation == "async":
            buffer = AsyncBuffer(s.buffer_size(), s.async_staleness_weight, s.async_staleness_a,
                                 global_state=self.task.global_state(), server_lr=s.async_server_lr,
                                 max_staleness=s.async_max_staleness, version=version)
            self.coord: SyncCoordinator | AsyncCoordinator = AsyncCoordinator(buffer, **common)
        else:
            self.coord = SyncCoordinator(self.strategy, self.task.global_state(), version=version,
                                         over_selection=s.over_selection, **common)

    def _connect(self) -> None:
        t = self.s.transport(f"edgetune-aggregator-{self.s.fleet}",
                             on_state=lambda up: self.metrics.broker_connected.set(1 if up else 0))
        t.subscribe(self.topics.all_status)
        t.subscribe(self.topics.all_updates)
        t.subscribe(self.topics.all_eval)
        t.subscribe(BROKER_DROPPED, qos=0)
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
            t = self.topics.parse(m.topic)
        except WireError as e:
            return self._reject(e.reason, str(e))
        if t.kind is TopicKind.broker_dropped:
            try:
                self.metrics.broker_dropped.set(int(m.payload.decode().strip() or 0))
            except (UnicodeDecodeError, ValueError):
                self._reject("bad_schema", f"{m.topic}: not a count: {m.payload[:40]!r}")
        elif t.kind is TopicKind.status:
            self._handle_status(t.agent_id, m)
        elif t.kind is TopicKind.update:
            self.metrics.update_bytes_received.inc(len(m.payload))
            self._handle_update(t.agent_id, m)
        elif t.kind is TopicKind.eval:
            self._handle_eval(t.agent_id, m)
        elif t.kind is TopicKind.split_forward and self.s.mode == "split":
            self.metrics.activation_bytes.inc(len(m.payload))
            self._handle_split(t.agent_id, m)
        else:
            self._reject("bad_topic", f"nothing is expected on {m.topic}")

    def _handle_status(self, agent: str, m: Incoming) -> None:
        if not m.payload:  # a cleared retained status
            st = None
        else:
            try:
                st = parse(codec.decode(m.payload, max_size=64 * 1024).header, AgentStatus)
            except WireError as e:
                return self._reject(e.reason, f"status on {m.topic}: {e}")
            if st.agent_id != agent:
                return self._reject("bad_topic", f"status for {st.agent_id} on {agent}'s topic")
        if st is not None and st.state == AgentState.refused:
            if agent not in self.refused:
                self.metrics.agents_refused.inc()
            if self.refused.get(agent) != st.reason:
                log.warning("agent %s refuses the task: %s", agent, st.reason)
            self.refused[agent] = st.reason or ""
        else:
            self.refused.pop(agent, None)
        self.metrics.agents_refusing.set(len(self.refused))
        fleet_task = self.task_def.hash if self.task_def is not None else ""
        wrong_task = st is not None and st.task_hash not in ("", fleet_task)  # its model does not fit
        if st is None or st.state in (AgentState.offline, AgentState.refused, AgentState.serving) or wrong_task:
            if self.online.pop(agent, None) is not None:
                self.coord.agent_offline(agent, time.time())
        else:
            self.online[agent] = st
            if isinstance(self.coord, AsyncCoordinator):
                self.coord.agent_online(agent)
        self.metrics.agents_connected.set(len(self.online))

    def _handle_split(self, agent: str, m: Incoming) -> None:
        hidden = getattr(self.task.head.config, "hidden_size", None)
        try:
            req = decode_split_request(agent, m.payload, max_bytes=self.s.max_activation_bytes, hidden=hidden,
                                       max_tokens=self.s.split_max_tokens, correlation=m.correlation,
                                       response_topic=m.response_topic or self.topics.split_gradient(agent))
        except (WireError, activations.EncodingError) as e:
            return self._reject(e.reason, f"split request on {m.topic}: {e}")
        self.split_batcher.add(req)
        self.metrics.split_queue_depth.set(len(self.split_batcher))

    def _serve_split(self) -> None:
        """Gather the other agents' activations for a moment, then serve them as micro-batches."""
        rnd = self.coord.round if isinstance(self.coord, SyncCoordinator) else None
        waiting_for = len(rnd.selected) - len(rnd.accepted) if rnd else 1
        while not self.split_batcher.ready(waiting_for, time.monotonic()):
            m = self.transport.get(timeout=self.split_batcher.wait_s(time.monotonic()))
            if m is not None:
                self._handle(m)
        batch = self.split_batcher.take()
        self.metrics.split_queue_depth.set(0)
        if not batch:
            return
        train = [r for r in batch if not r.evaluate]
        replies = self.task.server.evaluate([r for r in batch if r.evaluate])  # federated evaluation: loss only
        if train:
            t0 = time.perf_counter()
            steps_before = self.task.server.server_step
            replies += self.task.server.serve(train)
            self.metrics.split_step_seconds.observe(time.perf_counter() - t0)
            self.metrics.split_microbatch_size.observe(len(train))
            self.metrics.split_steps.inc(self.task.server.server_step - steps_before)
        for rep in replies:
            req = rep.request
            msg = SplitGradient(agent_id=req.agent_id, step=req.step, encoding=req.encoding, loss=rep.loss,
                                tokens=rep.tokens, server_step=rep.server_step, cached=rep.cached)
            tensors = {} if rep.grad is None else activations.encode(rep.grad, req.encoding, "grad")
            payload = codec.encode(msg, tensors)
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
        self._verdict(self.coord.offer(meta, frame.tensors, time.time()), meta)

    def _verdict(self, v: Verdict, meta: ModelUpdate) -> None:
        if v.reason is not None:
            return self._reject(v.reason, v.message)
        if v.queued:
            return
        self.metrics.agents_answered.inc()
        if isinstance(self.coord, AsyncCoordinator):
            self.metrics.async_buffer_pending.set(self.coord.buffer.pending)
            log.info("async: update from %s (base v%d, global v%d, %d examples), buffer %d", meta.agent_id,
                     meta.base_version, self.coord.version, meta.num_examples, self.coord.buffer.pending)
        else:
            log.info("round %d: update from %s (%d examples, loss %.4f)", meta.round, meta.agent_id, meta.num_examples,
                     meta.train_loss if meta.train_loss is not None else math.nan)

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
                if len(self.split_batcher):
                    self._serve_split()
                return
        raise Stop

    def _run_id(self) -> str:
        """This run's id, stamped on every announcement and global so that agents that outlive a run
        know the next one (and start its rounds afresh): made at the first start in an output dir,
        kept when the run resumes there."""
        path = self.out / RUN_ID_FILE
        if path.exists():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex[:16]
        path.write_text(run_id + "\n")
        return run_id

    # -- publishing -------------------------------------------------------------------------
    def _frame(self, topic: str, msg, tensors=None) -> bytes:
        """A frame for the fleet's retained topics: signed for `topic` when there is a signing key."""
        return codec.encode(msg, tensors, signer=self.signer, context=topic)

    def _publish_global(self, accuracy: float | None, loss: float | None) -> None:
        msg = GlobalAdapter(version=self.coord.version, round=self.coord.round_number, accuracy=accuracy, loss=loss,
                            task_hash=self.task_def.hash, run_id=self.run_id)
        payload = self._frame(self.topics.global_adapter, msg, self.task.global_state())
        self.transport.publish(self.topics.global_adapter, payload, retain=True, wait=True)
        self.metrics.global_bytes_published.inc(len(payload))
        self.metrics.global_version.set(self.coord.version)
        # every agent online with a held-out slice evaluates this global when it loads it
        expected = [a for a, st in self.online.items() if st.eval_examples > 0]
        self._record_eval(self.fed_eval.published(self.coord.version, self.coord.round_number, expected))
        if self.s.publish_model == "every":
            self._publish_model()

    def _publish_keys(self) -> None:
        """The keys agents are to trust, signed with ours (a key rotation, broker.signing)."""
        if self.signer is None or not self.s.fleet_keys:
            return
        keyring = Keyring.from_file(self.s.fleet_keys)
        if self.signer.key_id not in keyring.keys:
            raise KeyFileError(f"fleet keys {self.s.fleet_keys} do not hold this aggregator's signing key "
                               f"({self.signer.key_id.hex()}): agents that adopt them would refuse everything it "
                               "signs; use the fleet-keys.pem of the same fleet folder as EDGETUNE_SIGNING_KEY")
        msg = FleetKeys(keys=keyring.pems())
        self.transport.publish(self.topics.keys, self._frame(self.topics.keys, msg), retain=True, wait=True)
        log.info("published the fleet's signing keys: %s", ", ".join(keyring.ids()))

    def _publish_model(self) -> None:
        """The global as a signed int8 ONNX folder on the model topic, for devices that only serve
        (edge_agent.serving). QoS 1, not retained (it is larger than a packet: chunks cannot be
        retained): agents with a persistent session get it when they come back."""
        import tempfile

        from models.onnx_export import export_int8

        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="edgetune-model-") as tmp:
            folder = export_int8(self.task.model, self.task.tokenizer, Path(tmp) / "model",
                                 max_length=self.task_def.max_length, adapter_version=self.coord.version,
                                 labels=self.task_def.labels)
            files, tensors = artifacts.pack(folder, sorted(p.name for p in folder.iterdir()))
        msg = ModelArtifact(version=self.coord.version, round=self.coord.round_number, files=files,
                            task_hash=self.task_def.hash, run_id=self.run_id)
        payload = self._frame(self.topics.model, msg, tensors)
        self.transport.publish(self.topics.model, payload, wait=True)
        log.info("model v%d published for serving devices: %.1f MB int8 ONNX in %.1fs", self.coord.version,
                 len(payload) / 1e6, time.time() - t0)

    def _announce(self, number: int, selected, deadline: float, final: bool = False) -> None:
        ann = RoundAnnouncement(round=max(number, 1), selected=list(selected), deadline=deadline,
                                global_version=self.coord.version, local_epochs=self.s.local_epochs,
                                max_local_steps=self.s.max_local_steps, final=final, task_hash=self.task_def.hash,
                                run_id=self.run_id)
        self.transport.publish(self.topics.round, self._frame(self.topics.round, ann), retain=True, wait=True)

    def _announce_final(self) -> None:
        self._announce(self.coord.round_number, (), time.time(), final=True)

    def _checkpoint(self, row: dict) -> None:
        extra = {k: row[k] for k in ("accuracy", "macro_f1", "loss", "perplexity", "eval") if k in row}
        if hasattr(self.strategy, "state_dict"):
            extra["strategy_state"] = self.strategy.state_dict()
        self.task.checkpoint(self.coord.round_number, self.coord.version, extra)

    # -- the loop ---------------------------------------------------------------------------
    def selectable(self) -> list[str]:
        """The online agents a round may select: those whose status reports examples to train on
        (an agent without data yet stays online with 0 and is left out until it has some)."""
        return [a for a, st in self.online.items() if st.num_examples > 0]

    def _wait_for_agents(self) -> None:
        """Until `expected_agents` (or min_agents) are online and a round would select at least
        min_agents of those with data."""
        need = self.s.expected_agents or self.s.min_agents
        deadline = time.monotonic() + self.s.wait_for_agents_s
        last_log = 0.0
        while len(self.online) < need or len(self.coord.select(self.selectable())) < self.s.min_agents:
            ready = len(self.selectable())
            if time.monotonic() > deadline:
                no_data = sorted(set(self.online) - set(self.selectable()))
                raise RuntimeError(
                    f"after {self.s.wait_for_agents_s:.0f}s {len(self.online)} of {need} agents are online and {ready} "
                    f"of them have data to train on (a round needs {self.s.min_agents}): check that agents use the "
                    "same broker and fleet (EDGETUNE_BROKER_URL, EDGETUNE_FLEET)"
                    + (f"; {', '.join(no_data)} report 0 examples: give them data (EDGETUNE_DATA)" if no_data else "")
                )
            if time.monotonic() - last_log > 10:
                log.info("waiting for agents: %d of %d online, %d with data", len(self.online), need, ready)
                last_log = time.monotonic()
            self._pump(time.monotonic() + 0.5)

    def _enough_agents(self) -> None:
        if len(self.coord.select(self.selectable())) < self.s.min_agents:
            self._wait_for_agents()

    def _run_round(self) -> dict:
        self._enough_agents()
        t0 = time.time()
        rnd, early = self.coord.open_round(self.selectable(), t0)
        self.metrics.current_round.set(rnd.number)
        self.metrics.agents_selected.set(len(rnd.selected))
        self._announce(rnd.number, rnd.selected, rnd.deadline)
        log.info("round %d: announced to %d agents (%s), deadline in %.0fs", rnd.number, len(rnd.selected),
                 ", ".join(rnd.selected), self.s.round_timeout_s)
        for v in early:
            if v.reason is not None:
                self._reject(v.reason, v.message)
            else:
                self.metrics.agents_answered.inc()
        while (rec := self.coord.poll(time.time())) is None:
            self._pump(time.monotonic() + 0.5)
        self.metrics.agents_dropped.inc(len(rec.dropped))
        if rec.new_state is None:
            self.metrics.rounds.labels(outcome="error" if rec.error else "failed").inc()
            if rec.error:
                log.error("round %d: %s could not aggregate %d updates: %s; the global adapter stays v%d", rec.round,
                          self.s.strategy, len(rec.answered), rec.error, rec.version)
            else:
                log.error("round %d failed: %d of %d answered, quorum %d; the global adapter stays v%d", rec.round,
                          len(rec.answered), len(rec.selected), self.s.min_agents, rec.version)
            return rec.row(duration_s=time.time() - t0)
        if rec.strategy.get("dp_epsilon") is not None:
            self.metrics.dp_epsilon.set(rec.strategy["dp_epsilon"])
        return self._publish_step(rec, t0)

    def _publish_step(self, rec: RoundRecord, t0: float) -> dict:
        """A new global: load it, evaluate it, publish it, checkpoint it; the row for metrics.jsonl."""
        self.metrics.aggregation_seconds.observe(rec.aggregation_s or 0.0)
        self.task.load_global(rec.new_state)
        if isinstance(self.coord, SyncCoordinator):
            self.coord.set_global(self.task.global_state())
        ev = self._evaluate()
        self._publish_global(ev.get("accuracy"), ev.get("loss"))
        row = rec.row(**ev)
        row["duration_s"] = time.time() - t0
        self._checkpoint(row)
        self.metrics.rounds_completed.inc()
        self.metrics.rounds.labels(outcome=rec.outcome).inc()
        self.metrics.round_duration.observe(row["duration_s"])
        log.info("round %d: %s, global v%d, %s (%.1fs)", rec.round, rec.outcome, rec.version, fmt_row(row),
                 row["duration_s"])
        return row

    # -- buffered asynchronous aggregation (aggregation=async) ------------------------------
    def _run_async_step(self) -> dict:
        """Announce the current global to the online agents and wait until the buffer has taken
        async_buffer_size updates (from this version or older ones, weighted down by staleness),
        or until round_timeout_s, when a partly filled buffer of at least min_agents is applied."""
        self._enough_agents()
        t0 = time.time()
        selected = self.coord.open_step(self.selectable(), t0)
        number = self.coord.round_number + 1
        self.metrics.current_round.set(number)
        self.metrics.agents_selected.set(len(selected))
        self._announce(number, selected, t0 + self.s.round_timeout_s)
        log.info("async step %d: v%d announced to %d agents, buffer %d of %d", number, self.coord.version,
                 len(selected), self.coord.buffer.pending, self.coord.buffer.options.buffer_size)
        while (rec := self.coord.poll(time.time())) is None:
            self._pump(time.monotonic() + 0.5)
        if rec.new_state is None:
            log.error("async step %d: %d updates by the deadline, fewer than min_agents %d; the global stays v%d",
                      rec.round, rec.pending, self.s.min_agents, rec.version)
            return rec.row(duration_s=time.time() - t0)
        return self._async_applied(rec, t0)

    def _async_applied(self, rec: RoundRecord, t0: float) -> dict:
        for a in rec.applied:
            self.metrics.update_staleness.observe(a["staleness"])
        self.metrics.async_buffer_pending.set(self.coord.buffer.pending)
        return self._publish_step(rec, t0)

    def _drain_async(self) -> list[dict]:
        """After the last step: let agents still training send their updates, and apply them as
        one last (partial) step, so that no update an agent made is lost."""
        rows = []
        grace_end = time.monotonic() + 1.0
        deadline = time.monotonic() + self.s.round_timeout_s
        t0 = time.time()
        while time.monotonic() < deadline and not self._stop:
            while (rec := self.coord.poll(time.time())) is not None:  # a full buffer while draining
                rec.outcome, rec.selected = "drain", []
                rows.append(self._async_applied(rec, t0))
            busy = [a for a, st in self.online.items() if st.state == AgentState.training]
            if not busy and time.monotonic() > grace_end:
                break
            self._pump(min(deadline, time.monotonic() + 0.5))
        rec = self.coord.close()
        if rec is not None:
            log.info("async: applying %d updates that arrived after the last step", len(rec.applied))
            rows.append(self._async_applied(rec, t0))
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
            self._publish_keys()
            self.transport.publish(self.topics.task, self._frame(self.topics.task, self.task_def), retain=True,
                                   wait=True)
            log.info("task %s: %s %s (model %s), labels %s", self.task_def.hash[:12], self.task_def.mode,
                     self.task_def.model, self.task_def.model_hash[:12], ",".join(self.task_def.labels) or "-")
            if self.coord.round_number == 0:
                row = {"round": 0, "version": 0, **self._evaluate()}
                self._record(row)
                self._checkpoint(row)
                log.info("round 0 (initial global): %s", fmt_row(row))
            self.metrics.current_round.set(self.coord.round_number)
            self._publish_global(None, None)
            self._wait_for_agents()
            is_async = isinstance(self.coord, AsyncCoordinator)
            while self.coord.round_number < self.s.rounds:
                self._record(self._run_async_step() if is_async else self._run_round())
            if self.s.publish_model == "final":
                self._publish_model()
            self._announce_final()
            if is_async:
                rows = self._drain_async()
                for row in rows:
                    self._record(row)
                if rows:
                    self._announce_final()
            self._finish_eval()
            log.info("done: %d rounds, global v%d in %s", self.coord.round_number, self.coord.version, self.out)
        except Stop:
            log.info("stopping: the last checkpoint is round %d (v%d)", self.coord.round_number, self.coord.version)
        finally:
            if self.transport is not None:
                self.transport.close()
            if getattr(self, "metrics_server", None) is not None:
                linger(self.s.metrics_linger_s, lambda: self._stop)
                self.metrics_server.shutdown()
            for s, h in old.items():
                signal.signal(s, h)
