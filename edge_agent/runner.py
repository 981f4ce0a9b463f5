"""The agent's service loop: status, rounds, global adapters, local training, updates.

paho's network thread only enqueues (broker.transport); this loop, on the main thread, reads
the queue, trains and publishes.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from pathlib import Path

from concurrent.futures import TimeoutError as FutureTimeout

from broker import codec
from broker.errors import WireError
from broker.messages import (AgentState, AgentStatus, GlobalAdapter, ModelUpdate, RoundAnnouncement, SplitForward,
                             SplitGradient, parse)
from broker.metrics_http import linger
from broker.topics import Topics
from broker.transport import MqttTransport, Will
from data.partition import partition
from data.sentiment import train_test_split
from edge_agent.metrics import AgentMetrics, serve
from edge_agent.settings import AgentSettings
from edge_agent.trainer import Trainer
from models.classifier import AdapterMismatch, set_threads

log = logging.getLogger("edgetune.agent")


def local_examples(s: AgentSettings) -> list:
    """The demo agent's shard of the shipped training split (never the held-out split)."""
    if s.mode == "split":
        from data.corpus import lm_split

        train, _ = lm_split()
        labels = [0] * len(train)
        domains = [e.genre for e in train]
    else:
        train, _ = train_test_split()
        labels = [e.label for e in train]
        domains = [e.domain for e in train]
    parts = partition(
        s.partition, labels=labels, domains=domains,
        k=s.num_partitions, seed=s.partition_seed, alpha=s.dirichlet_alpha,
    )
    mine = [train[i] for i in parts[s.partition_index]]
    if s.data_limit:
        import random

        random.Random(s.partition_seed).shuffle(mine)
        mine = mine[: s.data_limit]
    return mine


class AgentRunner:
    def __init__(self, settings: AgentSettings, metrics: AgentMetrics | None = None, examples: list | None = None) -> None:
        self.s = settings
        self.topics = Topics(settings.fleet)
        self.metrics = metrics or AgentMetrics()
        self.examples = examples
        self.pending: RoundAnnouncement | None = None
        self.done_rounds: set[int] = set()
        self._stop = False
        self.finished = False
        self.transport: MqttTransport | None = None
        self._announce_needed = False
        self.final_version: int | None = None  # set by the final announcement

    def _status(self, state: AgentState) -> bytes:
        return codec.encode(AgentStatus(
            agent_id=self.s.agent_id, state=state,
            global_version=self.trainer.global_version if hasattr(self, "trainer") else -1,
            num_examples=len(self.examples) if self.examples is not None else 0,
        ))

    def _publish_status(self, state: AgentState) -> None:
        self.transport.publish(self.topics.status(self.s.agent_id), self._status(state), retain=True)

    def _connect(self) -> None:
        t = MqttTransport(
            f"edgetune-agent-{self.s.agent_id}",
            self.s.broker_url,
            username=self.s.mqtt_username,
            password=self.s.password(),
            ca_file=self.s.ca_file,
            protocol=self.s.mqtt_protocol,
            will=Will(self.topics.status(self.s.agent_id), self._status(AgentState.offline)),
            on_state=self._on_state,
            persistent_session=True,
        )
        t.subscribe(self.topics.round)
        t.subscribe(self.topics.global_adapter)
        if self.s.mode == "split":
            if self.s.mqtt_protocol != 5:
                raise ValueError("split mode needs an MQTT 5 broker (request/response): set EDGETUNE_MQTT_PROTOCOL=5")
            t.subscribe(self.topics.split_gradient(self.s.agent_id))
        self.transport = t
        t.connect()

    def _on_state(self, up: bool) -> None:
        # called from paho's thread: only record; the loop re-announces us after a reconnect
        self.metrics.broker_connected.set(1 if up else 0)
        if up:
            self._announce_needed = True

    def _reject(self, reason: str, msg: str) -> None:
        self.metrics.rejected.labels(reason=reason).inc()
        log.warning("rejected (%s): %s", reason, msg)

    def _handle(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        try:
            frame = codec.decode(payload)
            if topic == self.topics.global_adapter:
                msg = parse(frame.header, GlobalAdapter)
                self.metrics.global_bytes_received.inc(len(payload))
                if msg.version > self.trainer.global_version:
                    self.trainer.load_global(frame.tensors, msg.version)
                    self.metrics.global_version.set(msg.version)
                    log.info("loaded global adapter v%d (round %d)", msg.version, msg.round)
            elif topic == self.topics.round:
                ann = parse(frame.header, RoundAnnouncement)
                if ann.final:
                    self.final_version = ann.global_version
                elif self.s.agent_id in ann.selected and ann.round not in self.done_rounds:
                    self.pending = ann
        except WireError as e:
            self._reject(e.reason, f"{topic}: {e}")
        except AdapterMismatch as e:
            self._reject(e.reason, f"global adapter refused: {e}")

    # -- the durable outbox: an update is on disk until the broker acknowledged it --------------
    def _outbox_dir(self) -> Path | None:
        if not self.s.state_dir:
            return None
        d = Path(self.s.state_dir) / "outbox"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _outbox_put(self, round_number: int, payload: bytes) -> Path | None:
        d = self._outbox_dir()
        if d is None:
            return None
        path = d / f"round-{round_number:06d}.frame"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def _resend_outbox(self) -> None:
        """After a restart: publish what was never acknowledged, and don't train those rounds again."""
        d = self._outbox_dir()
        if d is None:
            return
        for path in sorted(d.glob("round-*.frame")):
            payload = path.read_bytes()
            try:
                meta = parse(codec.decode(payload).header, ModelUpdate)
            except WireError as e:
                log.warning("outbox file %s is unreadable (%s): moved aside", path, e)
                path.rename(path.with_suffix(".bad"))
                continue
            log.info("resending the unacknowledged update of round %d from the outbox", meta.round)
            self.transport.publish(self.topics.update(self.s.agent_id), payload, wait=True, timeout=600)
            self.done_rounds.add(meta.round)
            path.unlink(missing_ok=True)

    def split_request(self, step: int, encoding: str, tensors: dict) -> tuple[SplitGradient, dict]:
        """Publish one step's activations and wait (on a Future) for its gradient; resend on timeout."""
        msg = SplitForward(agent_id=self.s.agent_id, step=step, encoding=encoding,
                           head_version=max(self.trainer.global_version, 0))
        payload = codec.encode(msg, tensors)
        corr = f"{self.s.agent_id}:{step}".encode()
        topic = self.topics.split_forward(self.s.agent_id)
        reply_topic = self.topics.split_gradient(self.s.agent_id)
        for attempt in range(self.s.split_retries + 1):
            fut = self.transport.expect_reply(corr)
            t0 = time.perf_counter()
            self.transport.publish(topic, payload, correlation=corr, response_topic=reply_topic)
            self.metrics.activation_bytes.inc(len(payload))
            try:
                m = fut.result(timeout=self.s.split_timeout_s)
            except FutureTimeout:
                self.transport.forget_reply(corr)
                self.metrics.split_resends.inc()
                log.warning("step %d: no gradient within %.0fs, resending (%d)", step, self.s.split_timeout_s, attempt + 1)
                if self._stop:
                    break
                continue
            self.metrics.split_round_trip.observe(time.perf_counter() - t0)
            self.metrics.gradient_bytes.inc(len(m.payload))
            frame = codec.decode(m.payload)
            reply = parse(frame.header, SplitGradient)
            if reply.step != step or reply.agent_id != self.s.agent_id:
                raise WireError(f"gradient for step {reply.step} of {reply.agent_id} answered step {step}")
            return reply, frame.tensors
        raise TimeoutError(f"no gradient for split step {step} after {self.s.split_retries + 1} tries: "
                           "is the aggregator running in split mode?")

    def _train_and_publish(self, ann: RoundAnnouncement) -> None:
        log.info("round %d: training on %d examples (from global v%d)", ann.round, len(self.examples), ann.global_version)
        self._publish_status(AgentState.training)
        with self.metrics.local_train_seconds.time():
            upd = self.trainer.train(
                self.examples, epochs=ann.local_epochs, max_steps=ann.max_local_steps, round_number=ann.round,
                should_stop=lambda: self._stop,
            )
        if self._stop:
            return
        msg = ModelUpdate(
            agent_id=self.s.agent_id, round=ann.round, base_version=ann.global_version,
            num_examples=max(upd.num_examples, 1), nonce=uuid.uuid4().hex,
            train_loss=upd.result.mean_loss, train_seconds=upd.result.seconds,
        )
        payload = codec.encode(msg, upd.tensors)
        box = self._outbox_put(ann.round, payload)
        self.transport.publish(self.topics.update(self.s.agent_id), payload, wait=True, timeout=600)
        if box is not None:
            box.unlink(missing_ok=True)  # the broker has it (PUBACK): nothing left to resend
        self.metrics.update_bytes_sent.inc(len(payload))
        self.metrics.rounds_participated.inc()
        self.metrics.local_loss.set(upd.result.mean_loss)
        self.done_rounds.add(ann.round)
        self._publish_status(AgentState.idle)
        log.info("round %d: sent update (%d steps, loss %.4f, %.1fs, %d bytes)", ann.round, upd.result.steps,
                 upd.result.mean_loss, upd.result.seconds, len(payload))

    def run(self) -> None:
        def _on_signal(signum, frame):
            self._stop = True

        old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            set_threads(self.s.threads)
            if self.examples is None:
                self.examples = local_examples(self.s)
            if self.s.mode == "split":
                from data.corpus import token_blocks
                from edge_agent.split_trainer import SplitTrainer

                self.trainer = SplitTrainer(self.s.decoder_spec(), self.split_request, lr=self.s.split_lr,
                                            batch_size=self.s.split_batch_size, encoding=self.s.split_encoding,
                                            seed=self.s.train_seed, head=self.s.split_head,
                                            head_path=self.s.split_head_path)
                self.examples = token_blocks(self.trainer.tokenizer, self.examples, self.s.seq_len)
                if len(self.examples) == 0:
                    raise ValueError("no local text to train on: this agent's shard is smaller than one sequence")
            else:
                self.trainer = Trainer(self.s.classifier_spec(), lr=self.s.lr, batch_size=self.s.batch_size,
                                       prox_mu=self.s.prox_mu, seed=self.s.train_seed)
            self.metrics.local_examples.set(len(self.examples))
            if self.s.metrics_port is not None:
                self.metrics_server, _ = serve(self.metrics.registry, self.s.metrics_port, self.s.metrics_addr)
            self._connect()
            self._resend_outbox()
            log.info("agent %s online with %d local examples", self.s.agent_id, len(self.examples))
            final_wait_until = None
            while not self._stop and not self.finished:
                if self.final_version is not None:
                    # the run is over once we hold the final global (or gave it 30 s to arrive)
                    final_wait_until = final_wait_until or time.monotonic() + 30
                    if self.trainer.global_version >= self.final_version or time.monotonic() > final_wait_until:
                        self.finished = True
                        break
                if self._announce_needed:
                    self._announce_needed = False
                    self._publish_status(AgentState.online)
                m = self.transport.get(timeout=0.5)
                if m is not None:
                    self._handle(m.topic, m.payload)
                ann = self.pending
                if ann is not None and self.trainer.global_version >= ann.global_version:
                    self.pending = None
                    if self.trainer.global_version > ann.global_version:
                        log.info("round %d is older than global v%d: skipped", ann.round, self.trainer.global_version)
                        continue
                    self._train_and_publish(ann)
            if self.finished:
                log.info("the run is over (global v%d)", self.trainer.global_version)
        finally:
            if self.transport is not None:
                self.transport.close(final=(self.topics.status(self.s.agent_id), self._status(AgentState.offline)))
            if getattr(self, "metrics_server", None) is not None:
                linger(self.s.metrics_linger_s, lambda: self._stop)
                self.metrics_server.shutdown()
            for s, h in old.items():
                signal.signal(s, h)
