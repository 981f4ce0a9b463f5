"""The agent's service loop: status, rounds, global adapters, local training, updates.

paho's network thread only enqueues (broker.transport); this loop, on the main thread, reads
the queue, trains and publishes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import time
import uuid
from pathlib import Path

from concurrent.futures import TimeoutError as FutureTimeout

from broker import codec
from broker.errors import WireError
from broker.messages import (AgentState, AgentStatus, GlobalAdapter, ModelUpdate, RoundAnnouncement, SplitForward,
                             SplitGradient, parse)
from broker.topics import Topics
from broker.transport import MqttTransport, Will
from common.metrics_http import linger
from data.partition import partition
from data.sentiment import train_test_split
from edge_agent import incremental
from edge_agent.local_settings import CURRENT_FILE, MODELS_DIR, STORE_FILE, DeviceSetupError
from edge_agent.metrics import AgentMetrics, serve
from edge_agent.settings import AgentSettings
from edge_agent.trainer import Trainer
from models.classifier import AdapterMismatch, set_threads

log = logging.getLogger("edgetune.agent")


class _quiet_root_logger:
    """Drop records below ERROR logged on the root logger itself (not those of named loggers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    def __enter__(self):
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeFilter(self)


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
        # on-device learning and serving (federated mode with a state dir): see _open_device
        self.store = None
        self.slot = None
        self.http = None
        self.holdout_examples: list = []
        self._model_dirty: str | None = None  # why the served model should be re-exported
        self._relearn = False  # a new global arrived: learn the stored samples on top of it
        self._incremental_run = 0
        self._next_store_check = 0.0

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
                    self._model_dirty = f"global adapter v{msg.version}"
                    self._relearn = True
                    log.info("loaded global adapter v%d (round %d)", msg.version, msg.round)
            elif topic == self.topics.round:
                ann = parse(frame.header, RoundAnnouncement)
                if ann.final:
                    self.final_version = ann.global_version
                else:
                    self.final_version = None  # a run (re)started after an earlier final announcement
                    if self.s.agent_id in ann.selected and ann.round not in self.done_rounds:
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

    # -- on-device learning: the sample store, the HTTP API, incremental runs, ONNX serving -------
    def _open_device(self) -> None:
        """With a state dir (federated mode): open the store, keep a local holdout, serve the last model."""
        from edge_agent.http_api import make_server
        from edge_agent.inference import ModelLoadError, ModelSlot, OnnxPredictor
        from edge_agent.local_settings import StateDirError
        from edge_agent.store import SampleStore

        state = Path(self.s.state_dir).expanduser()
        try:
            state.mkdir(parents=True, exist_ok=True)
            self.store = SampleStore(state / STORE_FILE, self.s.store_max_samples, labels=self.s.labels,
                                     max_text_chars=self.s.store_max_text_chars)
        except (OSError, RuntimeError, sqlite3.Error) as e:
            raise DeviceSetupError(f"cannot open the sample store in {state} ({e}): check EDGETUNE_STATE_DIR "
                                   "(a writable local folder)") from None
        self.inc = incremental.IncrementalConfig.from_settings(self.s)
        # a fixed slice of the shard, never trained on: with the store's holdout samples it checks
        # each new model before it serves
        k = min(self.s.local_holdout, len(self.examples) // 5)
        if k:
            held = set(random.Random(self.s.partition_seed + 7).sample(range(len(self.examples)), k))
            self.holdout_examples = [e for i, e in enumerate(self.examples) if i in held]
            self.examples = [e for i, e in enumerate(self.examples) if i not in held]
        self.metrics.samples_stored.set(self.store.count())
        threads = self.s.onnx_threads or None
        self.slot = ModelSlot(tolerance=self.s.swap_tolerance, loader=lambda d: OnnxPredictor(d, threads=threads))
        try:
            self.slot.install(self.s.current_model_dir())
            log.info("serving the exported model %s", self.slot.current_dir.name)
        except StateDirError:
            pass  # nothing exported yet: the first global adapter brings one
        except ModelLoadError as e:
            log.warning("the last exported model does not load (%s): the next global adapter replaces it", e)
        if self.s.http_port is not None:
            try:
                self.http = make_server(self.slot, self.store, port=self.s.http_port, metrics=self.metrics,
                                        max_text_chars=self.s.store_max_text_chars,
                                        record_inputs=self.s.http_record_inputs).start()
            except OSError as e:
                raise DeviceSetupError(f"the HTTP API cannot listen on 127.0.0.1:{self.s.http_port} ({e.strerror}): "
                                       "set EDGETUNE_HTTP_PORT to a free port (0: any), or unset it") from None
            log.info("HTTP API (predict, feedback) on %s", self.http.url)

    def _device_tick(self) -> None:
        """Between rounds, on the main loop thread: count samples, learn from new ones, re-export."""
        if self.store is None:
            return
        # learning starts from the fleet's model: not before the first global adapter
        learning = bool(self.inc.min_new) and self.trainer.global_version >= 0
        now = time.monotonic()
        if now >= self._next_store_check:
            self._next_store_check = now + 1.0
            self.metrics.samples_stored.set(self.store.count())
            if learning and not self._relearn and len(incremental.pending(self.store, self.inc)) >= self.inc.min_new:
                self._learn_incrementally()
        if self._relearn:
            # a new global replaced the adapter: learn the stored samples again on top of it, so
            # that the model served is the global plus what this device's users taught it
            self._relearn = False
            stored = incremental.trainable(self.store, self.inc) if learning else []
            if stored:
                self._learn_incrementally(stored)
        if self._model_dirty and self.s.onnx_export:
            self._refresh_model()

    def _learn_incrementally(self, samples: list | None = None) -> None:
        # no "training" status: that tells the aggregator an update is coming, and none is
        with self.metrics.local_train_seconds.time():
            r = incremental.fine_tune(self.trainer, self.store, self.examples, self.inc, run=self._incremental_run,
                                      should_stop=lambda: self._stop, new=samples)
        if r is None:
            return
        self._incremental_run += 1
        self.metrics.incremental_runs.inc()
        self.metrics.local_loss.set(r.mean_loss)
        log.info("incremental run: %d %s samples + %d replay, %d steps, loss %.4f, %.1fs", r.new_examples,
                 "new" if samples is None else "stored", r.replay_examples, r.steps, r.mean_loss, r.seconds)
        if r.completed:
            self._model_dirty = ("local learning" if samples is None
                                 else f"{self._model_dirty} + local learning")

    def _holdout(self) -> tuple[list[str], list[int]]:
        rows = [*self.holdout_examples, *incremental.holdout(self.store, self.inc)]
        return [e.text for e in rows], [e.label for e in rows]

    def _refresh_model(self) -> None:
        """Export the current model (ONNX, int8) into the state dir; serve it if it holds up on the holdout."""
        from models.onnx_export import export_onnx, quantize_int8

        reason, self._model_dirty = self._model_dirty, None
        models = Path(self.s.state_dir).expanduser() / MODELS_DIR
        name = f"g{max(self.trainer.global_version, 0):05d}-l{self._incremental_run:04d}-{int(time.time() * 1000)}"
        tmp, final = models / (name + ".tmp"), models / name
        t0 = time.perf_counter()
        try:
            export_onnx(self.trainer.model, self.trainer.tokenizer, tmp, max_length=self.s.max_length,
                        adapter_version=self.trainer.global_version, labels=self.s.labels)
            with _quiet_root_logger():  # onnxruntime.quantization logs every tensor at INFO on the root logger
                quantize_int8(tmp / "model.onnx")
            (tmp / "model.onnx").unlink()  # the device serves int8; the fp32 graph is 4x its size
            meta = tmp / "model_meta.json"
            doc = json.loads(meta.read_text())
            doc["files"].pop("fp32", None)
            doc["local_runs"] = self._incremental_run
            meta.write_text(json.dumps(doc, indent=2))
            tmp.rename(final)
        except Exception as e:  # an export that fails must not stop the agent: the old model serves on
            log.error("ONNX export after %s failed (%s: %s): the model in service stays", reason, type(e).__name__, e)
            shutil.rmtree(tmp, ignore_errors=True)
            self.metrics.model_swaps.labels(outcome="export_failed").inc()
            return
        texts, labels = self._holdout()
        if texts:
            res = self.slot.swap(final, texts, labels)
            outcome, accepted = res.reason, res.accepted
            detail = (f"holdout accuracy {res.candidate_accuracy:.3f} vs {res.current_accuracy:.3f} "
                      if res.current_accuracy is not None and res.candidate_accuracy is not None else "")
            if res.candidate_accuracy is not None and accepted:
                self.metrics.holdout_accuracy.set(res.candidate_accuracy)
        else:  # no holdout at all (a tiny shard and no labelled samples): nothing to check against
            self.slot.install(final)
            outcome, accepted, detail = "unchecked", True, ""
        self.metrics.model_swaps.labels(outcome=outcome).inc()
        if accepted:
            pointer = models / CURRENT_FILE
            pointer.with_suffix(".tmp").write_text(name + "\n")
            pointer.with_suffix(".tmp").replace(pointer)
            log.info("serving %s after %s (%s%s, %.1fs)", name, reason, outcome, ", " + detail if detail else "",
                     time.perf_counter() - t0)
        else:
            log.warning("kept the model in service after %s: the new one was refused (%s) %s", reason, outcome, detail)
        keep = {p.name for p in (self.slot.current_dir, self.slot.previous_dir) if p is not None}
        for d in models.iterdir():
            if d.is_dir() and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def _round_examples(self) -> tuple[list, list[int]]:
        """The shard plus the store's labelled samples (holdout excluded); ids of the new ones."""
        if self.store is None:
            return self.examples, []  # as they are: split mode's are one (N, T) tensor of token blocks
        stored = incremental.trainable(self.store, self.inc)
        return [*self.examples, *stored], [s.id for s in stored if not s.used_in_training]

    def _train_and_publish(self, ann: RoundAnnouncement) -> None:
        examples, new_ids = self._round_examples()
        log.info("round %d: training on %d examples (%d from the store, from global v%d)", ann.round, len(examples),
                 len(examples) - len(self.examples), ann.global_version)
        self._publish_status(AgentState.training)
        with self.metrics.local_train_seconds.time():
            upd = self.trainer.train(
                examples, epochs=ann.local_epochs, max_steps=ann.max_local_steps, round_number=ann.round,
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
        if new_ids:
            self.store.mark_used(new_ids)  # in this update: no incremental run needed for them
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
            if self.s.state_dir and self.s.mode == "federated":
                self._open_device()
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
                        self._device_tick()  # serve (and leave for `predict`) the final global
                        break
                if self._announce_needed:
                    self._announce_needed = False
                    self._publish_status(AgentState.online)
                # read everything queued before acting: after a long training a slow agent then
                # starts from the newest announcement and global, not from each stale one in turn
                m = self.transport.get(timeout=0.5)
                while m is not None:
                    self._handle(m.topic, m.payload)
                    m = self.transport.get(timeout=0)
                ann = self.pending
                if ann is not None and self.final_version is not None:
                    self.pending = ann = None  # the run is over: no new work
                if ann is not None and self.trainer.global_version >= ann.global_version:
                    self.pending = None
                    if self.trainer.global_version > ann.global_version:
                        log.info("round %d is older than global v%d: skipped", ann.round, self.trainer.global_version)
                        continue
                    self._train_and_publish(ann)
                    continue
                if self.pending is None:
                    self._device_tick()
            if self.finished:
                log.info("the run is over (global v%d)", self.trainer.global_version)
        finally:
            if self.transport is not None:
                self.transport.close(final=(self.topics.status(self.s.agent_id), self._status(AgentState.offline)))
            if getattr(self, "metrics_server", None) is not None:
                linger(self.s.metrics_linger_s, lambda: self._stop)
                self.metrics_server.shutdown()
            if self.http is not None:
                self.http.stop()
            if self.store is not None:
                self.store.close()
            for s, h in old.items():
                signal.signal(s, h)
