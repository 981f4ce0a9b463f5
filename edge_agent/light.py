"""A light agent: the real protocol with a synthetic adapter and no model (numpy only).

It takes the retained global adapter, perturbs it (seeded by agent and round) after an
optional delay that stands in for training, and publishes the update. Used for load tests,
fault tests and to try a broker setup without installing torch on the device.

    python -m edge_agent.light --id light-1 --broker mqtt://127.0.0.1:1883 [--train-seconds 2]
    python -m edge_agent.light --count 200 ...     # 200 agents in one process (threads)
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import signal
import threading
import time
import uuid

import numpy as np

from broker import codec
from broker.errors import WireError
from broker.messages import AgentState, AgentStatus, GlobalAdapter, ModelUpdate, RoundAnnouncement, parse
from broker.topics import Topics
from broker.transport import MqttTransport, Will

log = logging.getLogger("edgetune.light")


def synthetic_update(global_tensors: dict[str, np.ndarray], agent_id: str, round_number: int,
                     scale: float = 1e-3) -> dict[str, np.ndarray]:
    seed = int.from_bytes(hashlib.sha256(f"{agent_id}:{round_number}".encode()).digest()[:8], "big")
    rng = np.random.default_rng(seed)
    # sorted: a decoded frame's dict order is not stable across processes (safetensors)
    return {k: (global_tensors[k] + rng.standard_normal(global_tensors[k].shape).astype(global_tensors[k].dtype)
                * scale).astype(global_tensors[k].dtype) for k in sorted(global_tensors)}


class LightAgent:
    def __init__(self, agent_id: str, broker_url: str, fleet: str = "default", *, train_seconds: float = 0.0,
                 num_examples: int = 100, protocol: int = 5, username: str | None = None,
                 password: str | None = None, persistent: bool = True) -> None:
        self.id = agent_id
        self.topics = Topics(fleet)
        self.train_seconds = train_seconds
        self.num_examples = num_examples
        self.global_version = -1
        self.global_tensors: dict[str, np.ndarray] = {}
        self.done: set[int] = set()
        self.sent = 0
        self.sent_updates: list[tuple[int, int]] = []  # (round, base version) of each update sent
        self.finished = threading.Event()
        self.stop = threading.Event()
        self._announce = threading.Event()
        self._pending: RoundAnnouncement | None = None
        self._final: int | None = None
        self.t = MqttTransport(f"edgetune-agent-{agent_id}", broker_url, protocol=protocol, username=username,
                               password=password, persistent_session=persistent, on_state=self._on_state,
                               will=Will(self.topics.status(agent_id), self._status(AgentState.offline)))
        self.t.subscribe(self.topics.round)
        self.t.subscribe(self.topics.global_adapter)

    def _status(self, state: AgentState) -> bytes:
        return codec.encode(AgentStatus(agent_id=self.id, state=state, global_version=self.global_version,
                                        num_examples=self.num_examples))

    def _on_state(self, up: bool) -> None:
        if up:  # paho's thread: only flag it; the loop re-announces us after every (re)connect
            self._announce.set()

    def _take(self, m) -> None:
        if not m.payload:
            return
        try:
            f = codec.decode(m.payload, as_torch=False)
            if m.topic == self.topics.global_adapter:
                g = parse(f.header, GlobalAdapter)
                if g.version > self.global_version:
                    self.global_version, self.global_tensors = g.version, f.tensors
            elif m.topic == self.topics.round:
                ann = parse(f.header, RoundAnnouncement)
                if ann.final:
                    self._final = ann.global_version
                else:
                    self._final = None  # a run (re)started after an earlier final announcement
                    if self.id in ann.selected and ann.round not in self.done:
                        self._pending = ann
        except WireError as e:
            log.warning("%s: refused a message on %s: %s", self.id, m.topic, e)

    def run(self) -> None:
        self.t.connect()
        while not self.stop.is_set():
            if self._announce.is_set():
                self._announce.clear()
                self.t.publish(self.topics.status(self.id), self._status(AgentState.online), retain=True)
            # read everything queued before acting, so that a slow agent trains on the newest
            # announcement and global, not on each stale one it missed while it was busy
            m = self.t.get(timeout=0.2)
            while m is not None:
                self._take(m)
                m = self.t.get(timeout=0)
            if self._final is not None and self.global_version >= self._final:
                break
            pending = self._pending
            if pending is not None and self.global_version >= pending.global_version:
                ann, self._pending = pending, None
                if self.global_version > ann.global_version:
                    continue
                self.t.publish(self.topics.status(self.id), self._status(AgentState.training), retain=True)
                if self.train_seconds:
                    self.stop.wait(self.train_seconds)
                    if self.stop.is_set():
                        break
                upd = ModelUpdate(agent_id=self.id, round=ann.round, base_version=ann.global_version,
                                  num_examples=self.num_examples, nonce=uuid.uuid4().hex)
                self.t.publish(self.topics.update(self.id),
                               codec.encode(upd, synthetic_update(self.global_tensors, self.id, ann.round)),
                               wait=True)
                self.done.add(ann.round)
                self.sent += 1
                self.sent_updates.append((ann.round, ann.global_version))
                self.t.publish(self.topics.status(self.id), self._status(AgentState.idle), retain=True)
        self.finished.set()
        self.t.close(final=(self.topics.status(self.id), self._status(AgentState.offline)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--id", default="light")
    ap.add_argument("--count", type=int, default=1, help="agents in this process: <id>-0 .. <id>-N-1")
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--fleet", default="default")
    ap.add_argument("--train-seconds", type=float, default=0.0)
    ap.add_argument("--examples", type=int, default=100)
    args = ap.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s")
    ids = [args.id] if args.count == 1 else [f"{args.id}-{i}" for i in range(args.count)]
    agents = [LightAgent(i, args.broker, args.fleet, train_seconds=args.train_seconds, num_examples=args.examples)
              for i in ids]
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]

    def _stop(*_):
        for a in agents:
            a.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    for th in threads:
        th.start()
    for th in threads:
        while th.is_alive():
            th.join(0.5)
    print(f"sent {sum(a.sent for a in agents)} updates", flush=True)


if __name__ == "__main__":
    main()
