"""The edge agent's settings (EDGETUNE_ prefix; see common.settings for the loader)."""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import Field, model_validator

from broker.messages import AGENT_ID_PATTERN
from broker.settings import ConnectionSettings
from common.settings import EdgeTuneSettings, ProcessSettings
from data.partition import PARTITIONERS
from data.settings import DataSettings
from edge_agent.local_settings import OnDeviceSettings


class AgentSettings(EdgeTuneSettings, ConnectionSettings, ProcessSettings, OnDeviceSettings, DataSettings):
    """An agent needs its broker, id, credentials and data. Its model (base, labels, pruning, LoRA,
    lengths, the split cut) comes with the fleet's task, which the aggregator publishes
    (edge_agent.task_model finds the task's model on the device and checks its hash)."""

    mode: Literal["federated", "split"] = Field("federated", description="federated classifier or split decoder "
                                                "(reads the data as labelled texts or as plain text)")
    agent_id: str = Field(default_factory=lambda: socket.gethostname().split(".")[0][:64], pattern=AGENT_ID_PATTERN)
    after_run: Literal["exit", "stay"] = Field(
        "exit", description="when a run ends: exit, or stay up (serving predictions, collecting feedback, learning "
        "locally) and take part in the next run the aggregator starts: a device's daemon")
    fleet_keys: str | None = Field(
        None, description="the fleet's public signing keys (PEM; fleet-keys.pem in the device's bundle): with them "
        "the agent takes only a task, announcements and globals signed by the fleet, and refuses replays "
        "(its state dir's trust.json remembers the newest)")
    model_dir: str | None = Field(None, description="where the task's model folders are, by their names (folders "
                                  "separated by ':'); the shipped MiniLM and SmolLM2 need none")
    # the agent's data (DataSettings: EDGETUNE_DATA, a file, folder or demo:NAME) plus its sample store; with
    # num_partitions > 1 it takes one shard of that data (the one-machine demo splits a demo set this way)
    partition: str = Field("by-domain", description=f"one of {', '.join(PARTITIONERS)}")
    num_partitions: int = Field(1, ge=1)
    partition_index: int = Field(0, ge=0)
    partition_seed: int = 0
    dirichlet_alpha: float = Field(0.5, gt=0)
    data_limit: int = Field(0, ge=0, description="use at most N local examples (0: all)")
    # training
    lr: float = Field(5e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    prox_mu: float = Field(0.0, ge=0, description="FedProx proximal weight (0: plain FedAvg)")
    train_seed: int = 0
    # split mode
    split_encoding: Literal["fp32", "fp16", "int8"] = Field("fp32", description="activation/gradient encoding")
    split_batch_size: int = Field(8, ge=1, description="sequences per split step")
    split_lr: float = Field(1e-3, gt=0, description="the head's LoRA learning rate")
    split_timeout_s: float = Field(60, gt=0, description="wait this long for a gradient, then resend")
    split_retries: int = Field(5, ge=0, description="resends before the step fails")
    split_head: Literal["transformers", "lean"] = Field(
        "transformers", description="the agent's GPT-2 head: transformers + peft, or lean (plain torch + loralib: "
        "the agent imports neither transformers nor peft)")
    split_head_path: str | None = Field(
        None, description="lean head: a GPT-2 checkpoint folder with the head's weights; needed for gpt2-config "
        "(made by `python -m models.lean_gpt2 export DIR` with the fleet's split settings); unset: the model's folder")
    split_eval_sequences: int = Field(8, ge=0, description="split mode: held-out sequences (of the agent's own text, "
                                      "never trained on) on which it evaluates each global through the server "
                                      "(federated perplexity; each costs the server a tail forward); 0: none")

    @model_validator(mode="after")
    def _index(self):
        if self.partition_index >= self.num_partitions:
            raise ValueError(f"partition_index {self.partition_index} must be below num_partitions {self.num_partitions}")
        if self.partition not in PARTITIONERS:
            raise ValueError(f"partition {self.partition!r}: choose one of {', '.join(PARTITIONERS)}")
        return self
