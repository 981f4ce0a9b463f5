"""A light agent: the real protocol with a synthetic adapter and no model (numpy only).

It takes the retained global adapter, perturbs it (seeded by agent and round) after an
optional delay that stands in for training, and publishes the update. The protocol is the real
agent's own state machine (edge_agent.protocol) and loop (edge_agent.driver). Used for load tests,
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
import uuid

import numpy as np

from broker import codec
from broker.messages import AgentState, ModelUpdate
from broker.transport import MqttTransport, Will
from edge_agent.driver import ProtocolDriver, fleet_verifier
from edge_agent.protocol import LoadGlobal, SendUpdate, Train


def synthetic_update(global_tensors: dict[str, np.ndarray], agent_id: str, round_number: int,
                     scale: float = 1e-3) -> dict[str, np.ndarray]:
    seed = int.from_bytes(hashlib.sha256(f"{agent_id}:{round_number}".encode()).digest()[:8], "big")
    rng = np.random.default_rng(seed)
    # sorted: a decoded frame's dict order is not stable across processes (safetensors)
    return {k: (global_tensors[k] + rng.standard_normal(global_tensors[k].shape).astype(global_tensors[k].dtype)
                * scale).astype(global_tensors[k].dtype) for k in sorted(global_tensors)}


def light_update(agent_id: str, a: Train, global_tensors: dict[str, np.ndarray], num_examples: int) -> bytes:
    """The update frame a light agent sends for the round `a` announces: the synthetic adapter."""
    upd = ModelUpdate(agent_id=agent_id, round=a.round, base_version=a.base_version, num_examples=num_examples,
                      nonce=uuid.uuid4().hex, task_hash=a.announcement.task_hash)
    return codec.encode(upd, synthetic_update(global_tensors, agent_id, a.round))


class LightAgent(ProtocolDriver):
    """The protocol machine (edge_agent.protocol) driven like the real agent; training is a wait."""

    as_torch = False
    log = logging.getLogger("edgetune.light")

    def __init__(self, agent_id: str, broker_url: str, fleet: str = "default", *, train_seconds: float = 0.0,
                 num_examples: int = 100, protocol: int = 5, username: str | None = None,
                 password: str | None = None, persistent: bool = True, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None, fleet_keys: str | None = None,
                 state_dir: str | None = None) -> None:
        self.id = agent_id
        self._init_protocol(agent_id, fleet, fleet_verifier(fleet_keys, state_dir))
        self.rejections: list[tuple[str, str]] = []  # (reason, message) of every frame refused
        self.train_seconds = train_seconds
        self.example_count = num_examples
        self.global_tensors: dict[str, np.ndarray] = {}
        self.sent = 0
        self.sent_updates: list[tuple[int, int]] = []  # (round, base version) of each update sent
        self.finished = threading.Event()
        self.stop = threading.Event()
        self.transport = self.t = MqttTransport(
            f"edgetune-agent-{agent_id}", broker_url, protocol=protocol, username=username, password=password,
            ca_file=ca_file, cert_file=cert_file, key_file=key_file,
            persistent_session=persistent, on_state=self._on_state,
            will=Will(self.topics.status(agent_id), self.status_frame(AgentState.offline)))
        self.subscribe_fleet(self.transport)

    @property
    def global_version(self) -> int:
        return self.proto.global_version

    # -- the driver's hooks (edge_agent.driver.ProtocolDriver) ----------------------------------
    def num_examples(self) -> int:
        return self.example_count

    def stopping(self) -> bool:
        return self.stop.is_set()

    def load_global(self, a: LoadGlobal) -> bool:
        self.global_tensors = a.tensors
        return True

    def train(self, a: Train) -> None:
        if self.train_seconds:
            self.stop.wait(self.train_seconds)  # stands in for training
        if self.trained(a.round, light_update(self.id, a, self.global_tensors, self.example_count)):
            self.sent += 1
            self.sent_updates.append((a.round, a.base_version))

    def rejected(self, reason: str, msg: str) -> None:
        self.rejections.append((reason, msg))
        super().rejected(reason, msg)

    def send_update(self, a: SendUpdate) -> None:
        self.transport.publish(self.topics.update(self.id), a.update, wait=True)

    def run(self) -> None:
        self.transport.connect()
        while not self.stop.is_set() and not self.proto.finished:
            self.step(timeout=0.2)
        self.finished.set()
        self.transport.close(final=(self.topics.status(self.id), self.status_frame(AgentState.offline)))


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
