"""The loop both agents share around the protocol machine (edge_agent.protocol.AgentProtocol).

paho's network thread only enqueues (broker.transport) and flags a (re)connect; the driver, on
its own thread, reads the whole queue into the machine, then asks it what to do and does it.
Subclasses (edge_agent.runner.AgentRunner, edge_agent.light.LightAgent) supply the work: install
a global, train a round, publish an update; the rules stay in the machine. numpy only: the
light agent uses this too.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from broker import codec
from broker.errors import WireError
from broker.messages import (AgentState, AgentStatus, FleetKeys, GlobalAdapter, RoundAnnouncement, TaskDefinition,
                             parse)
from broker.signing import Keyring, Verifier
from broker.topics import TopicKind, Topics
from edge_agent.protocol import (Action, AgentProtocol, Finish, Idle, LoadGlobal, PublishStatus, SendUpdate, Skip,
                                 Train)


TRUST_FILE = "trust.json"  # in the agent's state dir: the newest signed frames it accepted (broker.signing)


def fleet_verifier(fleet_keys: str | None, state_dir: str | None) -> Verifier | None:
    """The Verifier of an agent given the fleet's public keys (None: it takes unsigned frames)."""
    if not fleet_keys:
        return None
    return Verifier(Keyring.from_file(fleet_keys), Path(state_dir).expanduser() / TRUST_FILE if state_dir else None)


class ProtocolDriver:
    """Feeds an AgentProtocol from a transport and carries out its actions (see `act`)."""

    log = logging.getLogger("edgetune.agent")
    as_torch = True  # decode tensors as torch (the real agent) or numpy (the light agent)
    transport: Any  # a broker.transport.MqttTransport, set by the subclass
    refusal: str | None = None  # why this agent does not train for the fleet's task (None: it does)
    progress: tuple[int, int] | None = None  # while training: (steps done, steps planned), on its status
    _refused_task: str | None = None  # the task hash that refusal is about

    def _init_protocol(self, agent_id: str, fleet: str, verifier: Verifier | None = None) -> None:
        self.proto = AgentProtocol(agent_id)
        self.topics = Topics(fleet)
        self._reconnected = threading.Event()
        # with the fleet's keys: the task, announcements and globals must be signed (broker.signing)
        self.verifier = verifier

    # -- what a subclass supplies ---------------------------------------------------------------
    def num_examples(self) -> int:
        raise NotImplementedError

    def stopping(self) -> bool:
        raise NotImplementedError

    def eval_examples(self) -> int:
        """The held-out examples this agent evaluates each global on (0: it reports no evaluation)."""
        return 0

    def load_global(self, a: LoadGlobal) -> bool:
        """Install the global; False if it was refused (it is then not held)."""
        raise NotImplementedError

    def train(self, a: Train) -> None:
        """Train the round, then hand the update to `self.trained(round, update)`."""
        raise NotImplementedError

    def send_update(self, a: SendUpdate) -> None:
        """Publish the update and wait until the broker has it."""
        raise NotImplementedError

    def finish(self, a: Finish) -> None:
        pass

    def idle(self) -> None:
        pass

    def rejected(self, reason: str, msg: str) -> None:
        self.log.warning("%s: rejected (%s): %s", self.proto.agent_id, reason, msg)

    def received_global(self, header: GlobalAdapter, nbytes: int) -> None:
        pass

    def task_fit(self) -> str:
        """The hash of the task this agent's model fits, for its status ("": any task)."""
        return ""

    def task_refusal(self, task_hash: str, task: TaskDefinition | None = None) -> str | None:
        """Why this agent cannot train for the task with this hash (None: it can). The real agent
        builds its model for a new task definition (and says why when it cannot); the light agent
        takes any task."""
        return None

    def ready(self) -> bool:
        """Whether the agent holds a model to train (the real agent: once it has built one for the
        fleet's task). Until then rounds and globals pass it by; a final announcement still ends its run."""
        return True

    # -- the fleet's task -------------------------------------------------------------------------
    def check_task(self, task_hash: str, task: TaskDefinition | None = None) -> bool:
        """True if the agent trains for this task; otherwise it refuses: counted and logged once per
        task, and its status says "refused" with the reason until a task it fits comes."""
        why = self.task_refusal(task_hash, task) if task_hash else None
        if why is not None and task_hash != self._refused_task:
            self.rejected("wrong_task", why)
        self._refused_task = task_hash if why is not None else None
        if why != self.refusal:
            self.refusal = why
            self.publish_status(AgentState.online)
        return why is None

    # -- the loop -------------------------------------------------------------------------------
    def status_frame(self, state: AgentState) -> bytes:
        if self.refusal is not None and state is not AgentState.offline:
            state = AgentState.refused
        return codec.encode(AgentStatus(agent_id=self.proto.agent_id, state=state, reason=self.refusal,
                                        global_version=self.proto.global_version, num_examples=self.num_examples(),
                                        task_hash=self.task_fit(), eval_examples=self.eval_examples(),
                                        **({"step": self.progress[0], "steps": self.progress[1]}
                                           if self.progress and state is AgentState.training else {})))

    def publish_status(self, state: AgentState) -> None:
        self.transport.publish(self.topics.status(self.proto.agent_id), self.status_frame(state), retain=True)

    def _on_state(self, up: bool) -> None:
        if up:  # paho's thread: only flag it; the loop re-announces us after every (re)connect
            self._reconnected.set()

    def step(self, timeout: float) -> None:
        """One turn: re-announce after a (re)connect, read the whole queue, then act on it.

        Reading everything queued before acting lets a slow agent start from the newest
        announcement and global, not from each stale one it missed while it was busy."""
        if self._reconnected.is_set():
            self._reconnected.clear()
            self.act(self.proto.connected())
        m = self.transport.get(timeout=timeout)
        while m is not None:
            self.take(m.topic, m.payload)
            m = self.transport.get(timeout=0)
        if self.stopping():
            self.proto.stop()
        self.act(self.proto.poll(time.monotonic()))

    def take(self, topic: str, payload: bytes) -> None:
        """One message from the queue into the machine."""
        if not payload:
            return  # a cleared retained message
        try:
            kind = self.topics.parse(topic).kind
            if kind not in (TopicKind.global_adapter, TopicKind.round, TopicKind.task, TopicKind.keys):
                return  # split gradients are answered through their Futures (edge_agent.split_rpc)
            frame = codec.decode(payload, as_torch=self.as_torch)
            if kind is TopicKind.keys:
                if self.verifier is not None:  # an agent that checks no signatures has no keys to rotate
                    keys = parse(frame.header, FleetKeys)
                    self._verify(topic, "keys", frame, keys)
                    self.verifier.adopt(keys.keys)
                    self.log.info("%s: the fleet's signing keys are now %s", self.proto.agent_id,
                                  ", ".join(self.verifier.keyring.ids()))
            elif kind is TopicKind.task:
                task = parse(frame.header, TaskDefinition)
                self._verify(topic, "task", frame, task)
                self.check_task(task.hash, task)
            elif kind is TopicKind.global_adapter:
                header = parse(frame.header, GlobalAdapter)
                self._verify(topic, "global", frame, header)
                self.received_global(header, len(payload))
                if self.ready() and self.check_task(header.task_hash):
                    self.act(self.proto.on_global(header, frame.tensors))
            else:
                ann = parse(frame.header, RoundAnnouncement)
                self._verify(topic, "round", frame, ann)
                if ann.final or (self.ready() and self.check_task(ann.task_hash)):
                    self.act(self.proto.on_announcement(ann))
        except WireError as e:
            self.rejected(e.reason, f"{topic}: {e}")

    def subscribe_fleet(self, transport) -> None:
        """The fleet's topics every agent reads: the task, round announcements, globals, signing keys."""
        for topic in (self.topics.task, self.topics.round, self.topics.global_adapter, self.topics.keys):
            transport.subscribe(topic)

    def _verify(self, topic: str, kind: str, frame: codec.Frame, header: Any) -> None:
        if self.verifier is not None:
            self.verifier.check(topic, kind, frame, header)

    def trained(self, round_number: int, update: Any) -> bool:
        """Hand a trained round's update to the machine (it sends it unless the agent is stopping);
        True once the broker has it."""
        if self.stopping():
            self.proto.stop()
        self.act(self.proto.trained(round_number, update))
        return round_number in self.proto.done

    def act(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, PublishStatus):
                self.publish_status(a.state)
            elif isinstance(a, LoadGlobal):
                if self.load_global(a):
                    self.act(self.proto.global_loaded(a.version))
            elif isinstance(a, Train):
                self.train(a)
            elif isinstance(a, SendUpdate):
                self.send_update(a)
                self.act(self.proto.sent(a.round))
            elif isinstance(a, Skip):
                self.log.info("%s: round %d skipped (%s; holding global v%d)", self.proto.agent_id, a.round,
                         "the run is over" if a.reason == "final" else "older than the global held", a.held_version)
            elif isinstance(a, Finish):
                self.finish(a)
            elif isinstance(a, Idle):
                self.idle()
