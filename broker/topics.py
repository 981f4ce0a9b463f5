"""The versioned topic scheme. Nothing else in the project builds a topic string.

    edgetune/v1/<fleet>/task                     retained task definition (aggregator)
    edgetune/v1/<fleet>/round                    retained round announcement (aggregator)
    edgetune/v1/<fleet>/global                   retained global adapter (aggregator)
    edgetune/v1/<fleet>/keys                     retained: the fleet's public signing keys, signed (aggregator)
    edgetune/v1/<fleet>/model                    the global as a signed int8 ONNX model, for devices that only
                                                 serve (aggregator; QoS 1 to persistent sessions, not retained)
    edgetune/v1/<fleet>/agents/<agent>/status    retained agent status, last will "offline"
    edgetune/v1/<fleet>/agents/<agent>/update    an agent's update for a round
    edgetune/v1/<fleet>/agents/<agent>/eval      an agent's evaluation of a global on its held-out slice
    edgetune/v1/<fleet>/agents/<agent>/split/fwd split-learning activations (request)
    edgetune/v1/<fleet>/agents/<agent>/split/grad split-learning gradients (response)

and one of the broker's own: BROKER_DROPPED, Mosquitto's count of messages it dropped on a full
client queue or inflight window (the aggregator reads it into a metric; other brokers send nothing).

`Topics.parse(topic)` reads one back: a `ParsedTopic` of a `TopicKind` and the agent id, or a
TopicError for anything else. The ACL (broker.mosquitto_conf.render_acl) relies on every
per-agent topic living under `agents/<agent>/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from broker.errors import TopicError

TOPIC_ROOT = "edgetune"
TOPIC_VERSION = "v1"
BROKER_DROPPED = "$SYS/broker/publish/messages/dropped"
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _check_segment(value: str, what: str) -> str:
    if not _SEGMENT.match(value):
        raise ValueError(
            f"{what} {value!r} is not a valid topic segment: use letters, digits, '_', '.', '-' "
            "(at most 64, starting with a letter or digit)"
        )
    return value


class TopicKind(str, Enum):
    task = "task"
    round = "round"
    global_adapter = "global_adapter"
    model = "model"
    keys = "keys"
    broker_dropped = "broker_dropped"
    status = "status"
    update = "update"
    eval = "eval"
    split_forward = "split_forward"
    split_gradient = "split_gradient"


# the topic below the fleet's base, or below agents/<agent>/, of each kind
_FLEET_SUFFIX = {"task": TopicKind.task, "round": TopicKind.round, "global": TopicKind.global_adapter,
                 "model": TopicKind.model, "keys": TopicKind.keys}
_AGENT_SUFFIX = {"status": TopicKind.status, "update": TopicKind.update, "eval": TopicKind.eval,
                 "split/fwd": TopicKind.split_forward, "split/grad": TopicKind.split_gradient}


@dataclass(frozen=True)
class ParsedTopic:
    kind: TopicKind
    agent_id: str | None = None  # None for the fleet's round and global topics


@dataclass(frozen=True)
class Topics:
    fleet: str = "default"

    def __post_init__(self) -> None:
        _check_segment(self.fleet, "fleet name")

    @property
    def base(self) -> str:
        return f"{TOPIC_ROOT}/{TOPIC_VERSION}/{self.fleet}"

    @property
    def task(self) -> str:
        return f"{self.base}/task"

    @property
    def round(self) -> str:
        return f"{self.base}/round"

    @property
    def global_adapter(self) -> str:
        return f"{self.base}/global"

    @property
    def keys(self) -> str:
        return f"{self.base}/keys"

    @property
    def model(self) -> str:
        return f"{self.base}/model"

    def agent(self, agent_id: str) -> str:
        return f"{self.base}/agents/{_check_segment(agent_id, 'agent id')}"

    def status(self, agent_id: str) -> str:
        return f"{self.agent(agent_id)}/status"

    def update(self, agent_id: str) -> str:
        return f"{self.agent(agent_id)}/update"

    def eval(self, agent_id: str) -> str:
        return f"{self.agent(agent_id)}/eval"

    def split_forward(self, agent_id: str) -> str:
        return f"{self.agent(agent_id)}/split/fwd"

    def split_gradient(self, agent_id: str) -> str:
        return f"{self.agent(agent_id)}/split/grad"

    # wildcard filters the aggregator subscribes to
    @property
    def all_status(self) -> str:
        return f"{self.base}/agents/+/status"

    @property
    def all_updates(self) -> str:
        return f"{self.base}/agents/+/update"

    @property
    def all_eval(self) -> str:
        return f"{self.base}/agents/+/eval"

    @property
    def all_split_forward(self) -> str:
        return f"{self.base}/agents/+/split/fwd"

    def parse(self, topic: str) -> ParsedTopic:
        """What a topic of this fleet is, and whose. Raises TopicError for another fleet's topic,
        an invalid agent segment, or a topic that is none of the kinds."""
        prefix = f"{self.base}/"
        if topic == BROKER_DROPPED:
            return ParsedTopic(TopicKind.broker_dropped)
        if not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is not in fleet {self.fleet!r} ({prefix}...)")
        rest = topic[len(prefix) :]
        if rest in _FLEET_SUFFIX:
            return ParsedTopic(_FLEET_SUFFIX[rest])
        group, _, rest = rest.partition("/")
        if group == "agents":
            agent, _, suffix = rest.partition("/")
            if not _SEGMENT.match(agent):
                raise TopicError(f"topic {topic!r} has no valid agent segment")
            if suffix in _AGENT_SUFFIX:
                return ParsedTopic(_AGENT_SUFFIX[suffix], agent)
        raise TopicError(f"nothing is expected on topic {topic!r}: expected {self.base}/task, /round, /global, /model, /keys or "
                         f"/agents/<agent>/{{{','.join(_AGENT_SUFFIX)}}}")
