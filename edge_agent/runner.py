"""The agent's service loop: status, rounds, global adapters, local training, updates.

paho's network thread only enqueues (broker.transport); this loop, on the main thread, reads the
queue into the protocol machine (edge_agent.protocol, through edge_agent.driver) and does what it
answers: load a global, train a round, publish the update. The agent's other rooms:
edge_agent.outbox (updates on disk until the broker has them), edge_agent.split_rpc (split
learning's request/response) and edge_agent.device (the sample store, on-device serving and
incremental learning).
"""

from __future__ import annotations

import logging
import signal
import time
import uuid

from broker import codec
from broker.messages import AgentState, EvalReport, ModelUpdate, SplitGradient, TaskDefinition
from broker.transport import MqttTransport, Will
from common.metrics_http import linger
from data.partition import partition
from data.records import DataError
from data.sources import holdout_split, in_test, is_demo, load_source
from edge_agent.device import Device
from edge_agent.local_settings import save_task
from edge_agent.driver import ProtocolDriver, fleet_verifier
from edge_agent.metrics import AgentMetrics, serve
from edge_agent.outbox import Outbox
from edge_agent.protocol import Finish, LoadGlobal, SendUpdate, Train
from edge_agent.settings import AgentSettings
from edge_agent.split_rpc import SplitClient
from edge_agent.trainer import Trainer
from models.classifier import AdapterMismatch, set_threads

log = logging.getLogger("edgetune.agent")


def local_examples(s: AgentSettings, labels: list[str] | None = None) -> tuple[list, list]:
    """(train, held out): the agent's own data (EDGETUNE_DATA: a file, a folder or a demo by name),
    or ([], []) without it. `labels`: the fleet's task's label names, in order (None: as the data
    gives them, for checking the data before the task is known).

    Through data/sources.py: a bad file raises DataError (naming the file and line) before the
    agent connects, so nothing is published. A demo gives its training split only (its held-out
    split is what an aggregator evaluates on). With num_partitions > 1 the agent keeps its shard
    (partition, partition_index, partition_seed); data_limit caps the count. Split mode reads
    texts only (labels ignored); federated mode maps the labels to `labels`, in that order.
    Federated mode holds `eval_fraction` of the agent's examples out (data.sources.holdout_split),
    at most `eval_max_examples` of them: it evaluates every global on them (federated evaluation)
    and never trains on them."""
    if not s.data:
        return [], []
    split = s.mode == "split"
    loaded = load_source(s.data, labels=None if split else labels, text_only=split,
                         split="train" if is_demo(s.data) else None, **s.load_options())
    if loaded.skipped:
        log.warning("%s: %d bad rows skipped (max_bad_rows %d), each logged above", s.data, loaded.num_skipped,
                    s.max_bad_rows)
    train = list(loaded.examples)
    mine = train
    if s.num_partitions > 1:
        parts = partition(
            s.partition, labels=[0] * len(train) if split else [e.label for e in train],
            domains=[e.domain for e in train], k=s.num_partitions, seed=s.partition_seed, alpha=s.dirichlet_alpha,
        )
        mine = [train[i] for i in parts[s.partition_index]]
    if s.data_limit:
        import random

        random.Random(s.partition_seed).shuffle(mine)
        mine = mine[: s.data_limit]
    if split:
        return mine, []
    train, held = holdout_split(mine, s.eval_fraction)
    if s.eval_max_examples and len(held) > s.eval_max_examples:
        train, held = train + held[s.eval_max_examples:], held[: s.eval_max_examples]
    return train, held


def held_out_blocks(n: int, fraction: float, cap: int) -> tuple[list[int], list[int]]:
    """Split mode: (train, held out) indices of an agent's n token blocks. A block is held out when a
    salted hash of its index falls below `fraction` (the same blocks on every run of the same data),
    at most `cap` of them; the rest train."""
    held = [i for i in range(n) if fraction > 0 and in_test(f"holdout-block:{i}", fraction)][:cap]
    if len(held) == n:  # too little text to hold any out
        held = []
    taken = set(held)
    return [i for i in range(n) if i not in taken], held


class AgentRunner(ProtocolDriver):
    def __init__(self, settings: AgentSettings, metrics: AgentMetrics | None = None, examples: list | None = None) -> None:
        self.s = settings
        self._init_protocol(settings.agent_id, settings.fleet, fleet_verifier(settings.fleet_keys, settings.state_dir))
        self.metrics = metrics or AgentMetrics()
        self.metrics.info(fleet=settings.fleet, agent=settings.agent_id, mode=settings.mode)
        self.examples = examples
        self.held_out: list = []  # federated evaluation: the examples each global is evaluated on
        self.transport: MqttTransport | None = None
        self.trainer = None
        self.local_task: TaskDefinition | None = None  # the fleet's task this agent built its model for (_adopt)
        self.outbox = Outbox(settings.state_dir)
        self.split: SplitClient | None = None  # split mode: set at connect
        self.device: Device | None = None  # federated mode with a state dir: on-device learning and serving
        self.metrics_server = None
        self._stop = False
        self._status: tuple[AgentState, int] | None = None  # the last status published: state, examples

    @property
    def finished(self) -> bool:
        """The run is over (the final global is held)."""
        return self.proto.finished

    # -- the driver's hooks (edge_agent.driver.ProtocolDriver) ----------------------------------
    def num_examples(self) -> int:
        """What this agent can train on: its data plus the store's trainable labelled samples (0: it is
        not selected; so too before it has built its model for the fleet's task)."""
        if self.trainer is None:
            return 0
        n = len(self.examples) if self.examples is not None else 0
        return n + (self.device.trainable_count if self.device is not None else 0)

    def eval_examples(self) -> int:
        return len(self.held_out)

    def publish_status(self, state: AgentState) -> None:
        if self.trainer is None and self.refusal is None and state is not AgentState.offline:
            return  # not yet built for the fleet's task: the aggregator sees this agent once it can train (or refuses)
        n = self.num_examples()
        super().publish_status(state)
        self._status = (state, n)

    def stopping(self) -> bool:
        return self._stop

    def rejected(self, reason: str, msg: str) -> None:
        self.metrics.rejected.labels(reason=reason).inc()
        log.warning("rejected (%s): %s", reason, msg)

    def received_global(self, header, nbytes: int) -> None:
        self.metrics.global_bytes_received.inc(nbytes)

    def task_fit(self) -> str:
        return self.local_task.hash if self.local_task is not None else ""

    def ready(self) -> bool:
        return self.trainer is not None

    def task_refusal(self, task_hash: str, task: TaskDefinition | None = None) -> str | None:
        mine = self.local_task
        if task is not None and (mine is None or task.hash != mine.hash):
            return self._adopt(task)  # a task definition this agent has not built for: build for it
        if mine is None or task_hash == mine.hash:
            return None
        return (f"the fleet's task {task_hash[:12]} is not the one this agent built its model for ({mine.hash[:12]}); "
                "it builds for a task when the task's definition comes (on the task topic)")

    def load_global(self, a: LoadGlobal) -> bool:
        if self.trainer is None:
            return False
        try:
            self.trainer.load_global(a.tensors, a.version)
        except AdapterMismatch as e:
            self.rejected(e.reason, f"global adapter refused: {e}")
            return False
        self.metrics.global_version.set(a.version)
        if self.device is not None:
            self.device.global_loaded(a.version)
        log.info("loaded global adapter v%d (round %d)", a.version, a.header.round)
        self._evaluate_global(a)
        return True

    def _evaluate_global(self, a: LoadGlobal) -> None:
        """Federated evaluation: the global just loaded, on this agent's held-out slice, reported to
        the aggregator (EvalReport) before any training on top of it."""
        if not len(self.held_out):
            return
        t0 = time.perf_counter()
        if self.s.mode == "split":  # the head here, the tail on the server: perplexity through loss-only requests
            loss, tokens = self.trainer.evaluate(self.held_out)
            fields = dict(num_examples=len(self.held_out), loss=loss, tokens=tokens)
        else:
            from models.train import evaluate

            r = evaluate(self.trainer.model, self.trainer.tokenizer, self.held_out, max_length=self.local_task.max_length)
            fields = dict(num_examples=r.n, loss=r.loss, confusion=r.confusion)
        report = EvalReport(agent_id=self.s.agent_id, version=a.version, round=a.header.round,
                            seconds=time.perf_counter() - t0, task_hash=a.header.task_hash, **fields)
        self.transport.publish(self.topics.eval(self.s.agent_id), codec.encode(report), wait=True)
        self.metrics.eval_reports.inc()
        if report.confusion:
            accuracy = sum(report.confusion[i][i] for i in range(len(report.confusion))) / report.num_examples
            self.metrics.eval_accuracy.set(accuracy)
            log.info("global v%d on %d held-out examples: accuracy %.4f, loss %.4f", a.version, report.num_examples,
                     accuracy, report.loss)
        else:
            log.info("global v%d on %d held-out sequences (%d tokens): loss %.4f", a.version, report.num_examples,
                     report.tokens, report.loss)

    def train(self, a: Train) -> None:
        ann = a.announcement
        # the shard plus the store's labelled samples; split mode's shard is one (N, T) tensor of token blocks
        examples, new_ids = self.device.round_examples() if self.device is not None else (self.examples, [])
        if len(examples) == 0:  # selected while reporting 0 examples (a service that does not check): no update
            log.warning("round %d: selected, but there is nothing to train on: no update", ann.round)
            self.publish_status(AgentState.idle)
            return
        log.info("round %d: training on %d examples (%d from the store, from global v%d)", ann.round, len(examples),
                 len(examples) - len(self.examples), ann.global_version)
        with self.metrics.local_train_seconds.time():
            upd = self.trainer.train(
                examples, epochs=ann.local_epochs, max_steps=ann.max_local_steps, round_number=ann.round,
                should_stop=lambda: self._stop, on_step=self._step_reporter(),
            )
        self.progress = None
        payload = None if self._stop else codec.encode(ModelUpdate(
            agent_id=self.s.agent_id, round=ann.round, base_version=ann.global_version,
            num_examples=max(upd.num_examples, 1), nonce=uuid.uuid4().hex,
            train_loss=upd.result.mean_loss, train_seconds=upd.result.seconds, task_hash=ann.task_hash,
        ), upd.tensors)
        if not self.trained(ann.round, payload):
            return  # stopped mid-round: nothing sent
        self.metrics.update_bytes_sent.inc(len(payload))
        self.metrics.rounds_participated.inc()
        self.metrics.local_loss.set(upd.result.mean_loss)
        if self.device is not None:
            self.device.mark_used(new_ids)
        log.info("round %d: sent update (%d steps, loss %.4f, %.1fs, %d bytes)", ann.round, upd.result.steps,
                 upd.result.mean_loss, upd.result.seconds, len(payload))

    def _step_reporter(self, every_s: float = 2.0):
        """on_step for training: the status says how far the round's training is, at most every `every_s`."""
        last = [0.0]

        def on_step(done: int, planned: int) -> None:
            self.progress = (done, planned)
            now = time.monotonic()
            if now - last[0] >= every_s or done == planned:
                last[0] = now
                self.publish_status(AgentState.training)

        return on_step

    def send_update(self, a: SendUpdate) -> None:
        if a.resend:
            log.info("resending the unacknowledged update of round %d from the outbox", a.round)
        else:
            self.outbox.put(a.round, a.update)
        self.transport.publish(self.topics.update(self.s.agent_id), a.update, wait=True, timeout=600)
        self.outbox.remove(a.round)  # the broker has it (PUBACK): nothing left to resend

    def idle(self) -> None:
        if self.device is not None:
            self.device.tick()
            # an agent without data becomes selectable once its store has labelled samples (and not after
            # they are gone): say so in the status the aggregator selects by
            if self._status is not None and (self.num_examples() > 0) != (self._status[1] > 0):
                log.info("now %d examples to train on: publishing the status again", self.num_examples())
                self.publish_status(self._status[0])

    def finish(self, a: Finish) -> None:
        if self.device is not None:
            self.device.tick()  # serve (and leave for `predict`) the final global

    # -- connection, split requests -------------------------------------------------------------
    def _on_state(self, up: bool) -> None:
        # called from paho's thread: only record; the loop re-announces us after a reconnect
        self.metrics.broker_connected.set(1 if up else 0)
        super()._on_state(up)

    def _connect(self) -> None:
        t = self.s.transport(f"edgetune-agent-{self.s.agent_id}", on_state=self._on_state,
                             will=Will(self.topics.status(self.s.agent_id), self.status_frame(AgentState.offline)))
        self.subscribe_fleet(t)
        if self.s.mode == "split":
            if self.s.mqtt_protocol != 5:
                raise ValueError("split mode needs an MQTT 5 broker (request/response): set EDGETUNE_MQTT_PROTOCOL=5")
            t.subscribe(self.topics.split_gradient(self.s.agent_id))
            self.split = SplitClient(t, self.topics, self.s.agent_id, self.metrics, timeout_s=self.s.split_timeout_s,
                                     retries=self.s.split_retries, head_version=lambda: self.trainer.global_version,
                                     should_stop=lambda: self._stop)
        self.transport = t
        t.connect()

    def split_request(self, step: int, encoding: str, tensors: dict, evaluate: bool = False) -> tuple[SplitGradient, dict]:
        """Publish one step's activations and wait for its gradient (edge_agent.split_rpc.SplitClient)."""
        return self.split.request(step, encoding, tensors, evaluate=evaluate)

    # -- the run --------------------------------------------------------------------------------
    def _setup(self) -> None:
        """The local data, checked before the agent connects (its labels are mapped once the task
        comes: `_build`), and /metrics."""
        if self.examples is None:
            self._given = None
            train, held = local_examples(self.s)
            self._unbuilt = len(train)
        else:
            self._given = (self.examples, self.held_out)
            self._unbuilt = len(self.examples)
        self.metrics.local_examples.set(self._unbuilt)
        if self.s.metrics_port is not None:
            self.metrics_server, _ = serve(self.metrics.registry, self.s.metrics_port, self.s.metrics_addr)

    def _adopt(self, task: TaskDefinition) -> str | None:
        """Build this agent's model for the fleet's task; the reason when it cannot (its model is
        missing or differs, or the task is of the other mode). Bad data raises DataError."""
        from edge_agent.task_model import ModelMismatch, model_dirs, task_spec
        from models.families import UnsupportedModel
        from models.fingerprint import ModelNotFound

        if task.mode != self.s.mode:
            return (f"the fleet's task is {task.mode} mode; this agent runs {self.s.mode} mode (EDGETUNE_MODE): "
                    f"set EDGETUNE_MODE={task.mode}")
        try:
            spec = task_spec(task, model_dirs(self.s.model_dir))
        except (ModelNotFound, ModelMismatch, UnsupportedModel) as e:
            return str(e)
        if self.local_task is not None:
            log.info("the fleet's task changed (%s): building the model again", "; ".join(self.local_task.differences(task)))
            self._teardown()
            self.proto = type(self.proto)(self.s.agent_id)  # a new task: nothing of the last one's rounds carries over
        self._build(task, spec)
        if self.transport is not None:  # the aggregator selects by the status: its examples and task now
            self.publish_status(AgentState.online)
        return None

    def _build(self, task: TaskDefinition, spec) -> None:
        """The trainer, the data with the task's labels, the device's store and model."""
        log.info("building the model for the fleet's task %s: %s", task.hash[:12], task.model)
        if self._given is None:
            self.examples, self.held_out = local_examples(self.s, labels=task.labels)
        else:
            self.examples, self.held_out = self._given
        if self.s.mode == "split":
            from data.corpus import token_blocks
            from edge_agent.split_trainer import SplitTrainer

            trainer = SplitTrainer(spec, self.split_request, lr=self.s.split_lr, batch_size=self.s.split_batch_size,
                                   encoding=self.s.split_encoding, seed=self.s.train_seed, head=self.s.split_head,
                                   head_path=self.s.split_head_path)
            texts = self.examples
            self.examples = token_blocks(trainer.tokenizer, texts, task.max_length)
            if texts and len(self.examples) == 0:
                raise DataError("empty", f"this agent's share of the data ({len(texts)} texts) is shorter than one "
                                f"sequence of {task.max_length} tokens: give it more text", path=self.s.data)
            train, held = held_out_blocks(len(self.examples), self.s.eval_fraction, self.s.split_eval_sequences)
            self.examples, self.held_out = self.examples[train], self.examples[held]
        else:
            trainer = Trainer(spec, lr=self.s.lr, batch_size=self.s.batch_size, prox_mu=self.s.prox_mu,
                              seed=self.s.train_seed)
        if self.s.state_dir and self.s.mode == "federated":
            self.device = Device(self.s, self.metrics, trainer, self.examples, lambda: self._stop,
                                 held_out=self.held_out, labels=task.labels, max_length=task.max_length)
            self.device.open()
            self.examples = self.device.examples  # less the local holdout
        if self.s.state_dir:
            save_task(self.s.state_dir, task)
        self.trainer, self.local_task = trainer, task
        self.metrics.local_examples.set(len(self.examples))
        self.metrics.eval_examples.set(len(self.held_out))
        log.info("model built: %d examples to train on, %d held out", self.num_examples(), len(self.held_out))
        if not self.num_examples():
            if self.device is not None:
                hint = "set EDGETUNE_DATA (--data), or add labelled samples: `edgetune-agent import` / `feedback`"
            else:
                hint = "set EDGETUNE_DATA (--data)" + ("" if self.s.mode == "split" else
                                                       ", or EDGETUNE_STATE_DIR for a sample store")
            log.warning("no data to train on yet: this agent reports 0 examples and is not selected until it "
                        "has some (%s)", hint)

    def _teardown(self) -> None:
        if self.device is not None:
            self.device.close()
        self.device, self.trainer, self.local_task = None, None, None

    def run(self) -> None:
        def _on_signal(signum, frame):
            self._stop = True

        old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            set_threads(self.s.threads)
            self._setup()
            self._connect()
            # after a restart: publish what was never acknowledged, and don't train those rounds again
            for round_number, payload in self.outbox.unsent():
                self.act(self.proto.restore(round_number, payload))
            log.info("agent %s online with %d local examples; it builds its model when the fleet's task comes",
                     self.s.agent_id, self._unbuilt)
            between_runs = False
            while not self._stop and not (self.proto.finished and self.s.after_run == "exit"):
                self.step(timeout=0.5)
                if self.proto.finished != between_runs:  # a run ended, or the next one began (after_run=stay)
                    between_runs = self.proto.finished
                    if between_runs:
                        log.info("the run is over (global v%d)%s", self.proto.global_version,
                                 "; staying up for the next run" if self.s.after_run == "stay" else "")
                    else:
                        log.info("a new run (%s): joining it", self.proto.run_id)
                if between_runs:
                    self.idle()  # serve, collect and learn locally until the next run
        finally:
            if self.transport is not None:
                self.transport.close(final=(self.topics.status(self.s.agent_id), self.status_frame(AgentState.offline)))
            if self.metrics_server is not None:
                linger(self.s.metrics_linger_s, lambda: self._stop)
                self.metrics_server.shutdown()
            self._teardown()
            for s, h in old.items():
                signal.signal(s, h)
