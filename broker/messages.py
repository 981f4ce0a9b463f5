"""Every message type that crosses the wire, as pydantic models with a protocol version.

A message travels as the JSON header of a frame (broker.codec); its tensors, if any, travel in
the same frame's safetensors payload. `parse(frame_header, Model)` is the one way in.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import time
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker.errors import SchemaError, UnsupportedVersion

PROTOCOL_VERSION = 2  # 2: the task definition, and its hash on announcements, globals and updates


def wire_about() -> str:
    """What `--version` adds to the package's version: the wire protocol this release speaks."""
    return f"wire protocol {PROTOCOL_VERSION}"

AGENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: int = PROTOCOL_VERSION
    kind: str


class AgentState(str, enum.Enum):
    online = "online"
    training = "training"
    idle = "idle"
    offline = "offline"
    refused = "refused"  # the agent's local model does not fit the fleet's task: it stays out (see reason)
    serving = "serving"  # a device that only serves predictions (edgetune-agent serve): never selected


class AgentStatus(Message):
    """Retained per-agent status; the broker publishes `offline` as the agent's last will."""

    kind: Literal["status"] = "status"
    agent_id: str = Field(pattern=AGENT_ID_PATTERN)
    state: AgentState
    ts: float = Field(default_factory=time.time)
    global_version: int = -1
    num_examples: int = 0
    reason: str | None = Field(None, max_length=2000)  # with state "refused": why, and what to do
    task_hash: str = ""  # the task this agent's model fits ("": any; the light agent's)
    eval_examples: int = Field(0, ge=0)  # its held-out slice, on which it evaluates every global (EvalReport)
    step: int | None = Field(None, ge=0)  # while training: the steps done in this round, of `steps` planned
    steps: int | None = Field(None, ge=0)


class TaskDefinition(Message):
    """Retained on the task topic: what every member of a fleet must agree on. The aggregator
    publishes it; its `hash` is stamped on every announcement, global and update, and an agent
    whose own model gives another hash refuses to train (AgentState.refused, with the reason)."""

    kind: Literal["task"] = "task"
    mode: Literal["federated", "split"]
    model: str  # the base model's name (a folder's name, never a machine's path)
    model_hash: str = Field(pattern=r"^[0-9a-f]{64}$")  # models.fingerprint.model_hash
    labels: list[str] = []  # federated: the class names, in order
    max_length: int = Field(ge=1)  # tokens per example (federated) or per sequence (split)
    num_layers: int = 0  # federated: encoder layers kept (0: all)
    lora_r: int = Field(ge=1)
    lora_alpha: int = Field(ge=1)
    lora_dropout: float = 0.0
    target_modules: list[str] = []
    cut: int = 0  # split: decoder blocks on the edge
    config: dict[str, int] = {}  # a model built from a config (split gpt2-config): its architecture
    seed: int = 0

    @property
    def hash(self) -> str:
        """sha256 of the definition's canonical JSON (every field but the protocol version)."""
        body = self.model_dump(mode="json", exclude={"protocol"})
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def differences(self, other: "TaskDefinition") -> list[str]:
        """'field: ours != theirs' for every field in which the two differ (hashes shortened)."""
        a, b = self.model_dump(mode="json"), other.model_dump(mode="json")
        short = lambda v: v[:12] + "..." if isinstance(v, str) and len(v) == 64 else v  # noqa: E731
        return [f"{k}: {short(a[k])!r} != {short(b[k])!r}" for k in a if a[k] != b[k]]


class RoundAnnouncement(Message):
    """Retained on the round topic: who trains in this round, until when, from which global."""

    kind: Literal["round"] = "round"
    round: int = Field(ge=1)
    selected: list[str]
    deadline: float  # unix time after which updates for this round are refused
    global_version: int = Field(ge=0)
    local_epochs: int = Field(default=1, ge=1)
    max_local_steps: int = Field(default=0, ge=0)  # 0: no cap
    final: bool = False  # the run is over: agents may disconnect
    task_hash: str = ""  # TaskDefinition.hash of the fleet's task ("": none published)
    run_id: str = Field(default="", max_length=64)  # the aggregator's run: a new one starts the rounds afresh


class ModelUpdate(Message):
    """An agent's trained adapter for one round. Tensors: the peft adapter state dict."""

    kind: Literal["update"] = "update"
    agent_id: str = Field(pattern=AGENT_ID_PATTERN)
    round: int = Field(ge=1)
    base_version: int = Field(ge=0)
    num_examples: int = Field(ge=1)
    nonce: str = Field(min_length=8, max_length=64)
    train_loss: float | None = None
    train_seconds: float | None = None
    task_hash: str = ""  # the task the agent trained for (its announcement's)


class GlobalAdapter(Message):
    """Retained global adapter. Tensors: the peft adapter state dict."""

    kind: Literal["global"] = "global"
    version: int = Field(ge=0)
    round: int = Field(ge=0)
    accuracy: float | None = None
    loss: float | None = None
    task_hash: str = ""
    run_id: str = Field(default="", max_length=64)  # as RoundAnnouncement.run_id


class ModelArtifact(Message):
    """The global as a model a device serves without torch: an exported ONNX folder (int8 graph,
    tokenizer, model_meta.json), signed by the aggregator (broker.signing). Tensors: each file's
    bytes as a uint8 tensor named by its file name; `files` holds each file's sha256."""

    kind: Literal["model"] = "model"
    version: int = Field(ge=0)  # the global it was made from
    round: int = Field(ge=0)
    files: dict[str, str]  # file name -> sha256 hex
    task_hash: str = ""
    run_id: str = Field(default="", max_length=64)

    @model_validator(mode="after")
    def _names(self):
        for name, digest in self.files.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name):
                raise ValueError(f"file name {name!r}: a plain file name (letters, digits, '_', '.', '-')")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"file {name}: sha256 must be 64 hex digits")
        if not self.files:
            raise ValueError("a model artifact holds at least one file")
        return self


class FleetKeys(Message):
    """Retained on the keys topic: the public keys agents are to trust from now on (PEM), signed
    with a key they trust now. How a signing key rotates without touching the devices
    (broker.signing, edgetune.provision `rotate-key`)."""

    kind: Literal["keys"] = "keys"
    keys: list[str] = Field(min_length=1, max_length=8)


MAX_EVAL_LABELS = 256  # a confusion matrix of at most 256 x 256 counts


class EvalReport(Message):
    """Federated evaluation: an agent's figures for one global adapter on its own held-out slice,
    which it never trains on. Sent once per global it loads; the aggregator sums the reports of
    a version (aggregator/evaluation.py) into the fleet's figures.

    Federated mode: `confusion[true][predicted]` counts over the task's labels, in its order, and
    `loss` the mean cross-entropy. Split mode: `loss` the mean next-token loss over `tokens`."""

    kind: Literal["eval"] = "eval"
    agent_id: str = Field(pattern=AGENT_ID_PATTERN)
    version: int = Field(ge=0)  # the global evaluated
    round: int = Field(ge=0)  # the round that made it (0: the initial global)
    num_examples: int = Field(ge=1)
    loss: float = Field(allow_inf_nan=False)
    confusion: list[list[int]] = Field([], max_length=MAX_EVAL_LABELS)
    tokens: int = Field(0, ge=0)
    seconds: float = Field(0.0, ge=0)
    task_hash: str = ""

    @model_validator(mode="after")
    def _counts(self):
        k = len(self.confusion)
        if any(len(row) != k for row in self.confusion):
            raise ValueError(f"confusion must be square: {k} rows of {k} counts")
        if any(c < 0 for row in self.confusion for c in row):
            raise ValueError("confusion counts must be non-negative")
        if self.confusion and sum(map(sum, self.confusion)) != self.num_examples:
            raise ValueError(f"confusion counts sum to {sum(map(sum, self.confusion))}, not num_examples "
                             f"({self.num_examples})")
        return self


class SplitForward(Message):
    """Split learning request: activations at the cut for one step of one agent.

    Tensors: "act" (B, T, C) in `encoding` (+ "act_scale" for int8), "attention_mask" (B, T)
    int8 and "labels" (B, T) int64 (-100 where no loss). Travels with MQTT 5 ResponseTopic
    and CorrelationData; `step` is also the correlation key, so 3.1.1 brokers work too.
    """

    kind: Literal["split_fwd"] = "split_fwd"
    agent_id: str = Field(pattern=AGENT_ID_PATTERN)
    step: int = Field(ge=0)
    encoding: Literal["fp32", "fp16", "int8"] = "fp32"
    head_version: int = Field(default=0, ge=0)
    evaluate: bool = False  # federated evaluation: loss only (no backward, no step, no gradient back)


class SplitGradient(Message):
    """Split learning reply: the gradient at the cut ("grad", same encoding) and the loss; for an
    `evaluate` request the loss and tokens only, with no tensors."""

    kind: Literal["split_grad"] = "split_grad"
    agent_id: str = Field(pattern=AGENT_ID_PATTERN)
    step: int = Field(ge=0)
    encoding: Literal["fp32", "fp16", "int8"] = "fp32"
    loss: float
    tokens: int = Field(ge=0)
    server_step: int = Field(ge=0)
    cached: bool = False


M = TypeVar("M", bound=Message)


def parse(header: dict, model: type[M]) -> M:
    """Validate a frame header as `model`; a wrong protocol version or schema is a typed error."""
    proto = header.get("protocol")
    if proto != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {proto!r}; this build speaks {PROTOCOL_VERSION}: upgrade the older side"
        )
    try:
        return model.model_validate(header)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(message)"
        raise SchemaError(f"{model.__name__}: field {loc}: {first['msg']}") from None
