"""The aggregator's settings (EDGETUNE_ prefix; see common.settings for the loader)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from broker.settings import ConnectionSettings
from common.settings import EdgeTuneSettings, ProcessSettings
from data.settings import ColumnSettings
from models.settings import DecoderSettings, ModelSettings


class AggregatorSettings(EdgeTuneSettings, ConnectionSettings, ProcessSettings, ModelSettings, DecoderSettings,
                         ColumnSettings):
    mode: Literal["federated", "split"] = Field("federated", description="federated classifier or split decoder")
    rounds: int = Field(5, ge=1, description="federated rounds to run")
    min_agents: int = Field(1, ge=1, description="quorum: a round needs this many updates")
    expected_agents: int = Field(0, ge=0, description="wait for this many agents before round 1 (0: min_agents)")
    wait_for_agents_s: float = Field(600, gt=0, description="how long to wait for them")
    agents_per_round: int = Field(0, ge=0, description="agents selected per round (0: every online agent)")
    agents_fraction: float = Field(0.0, ge=0, le=1, description="or this fraction of the online agents per round, "
                                   "at least min_agents (seeded by seed and round; 0: see agents_per_round)")
    over_selection: float = Field(
        1.0, ge=1.0, le=3.0, description="sync rounds with agents_per_round or agents_fraction: ask this many times "
        "as many agents and complete the round with the first agents_per_round updates (e.g. 1.3 absorbs a few "
        "percent of dropouts without waiting for the deadline; the rest are refused as surplus)")
    round_timeout_s: float = Field(600, gt=0, description="deadline of a round, from its announcement")
    local_epochs: int = Field(1, ge=1)
    max_local_steps: int = Field(0, ge=0, description="cap on an agent's steps per round (0: none)")
    strategy: str = Field("fedavg", description="aggregation strategy (see aggregator.strategies)")
    strategy_options: dict[str, Any] = Field(
        default_factory=dict,
        description='the strategy\'s options as JSON, e.g. {"bound": 0.5} for clip, {"f": 1, "m": 3} for krum, '
                    '{"inner": "fedadam", "clip_norm": 0.2, "noise_multiplier": 1.0, "num_agents": 100, '
                    '"delta": 1e-5} for dp_fedavg')
    aggregation: Literal["sync", "async"] = Field(
        "sync", description="sync: rounds with a deadline; async: buffered (FedBuff), a new global after "
                            "every async_buffer_size updates, stale updates weighted down")
    async_buffer_size: int = Field(0, ge=0, description="async: updates per server step (0: min_agents)")
    async_staleness_weight: Literal["polynomial", "constant"] = Field(
        "polynomial", description="async: weight of an update s versions behind: (1 + s) ** -a, or 1")
    async_staleness_a: float = Field(0.5, ge=0, description="async: the exponent a")
    async_max_staleness: int = Field(10, ge=0, description="async: refuse updates more versions behind")
    async_server_lr: float = Field(1.0, gt=0, description="async: server learning rate on the weighted delta")
    output_dir: Path = Field(Path("runs/aggregator"), description="checkpoints, metrics.jsonl, settings.json")
    eval_data: str | None = Field(None, description="federated mode: central evaluation data (a file, folder or "
                                  "demo:NAME, labelled with the task's labels; a demo's held-out split); unset: "
                                  "none, the agents' federated evaluation only")
    eval_wait_s: float = Field(60, ge=0, description="after the last round, wait this long for the agents' "
                               "evaluations of the final global")
    eval_limit: int = Field(0, ge=0, description="evaluate on a fixed random N of the central evaluation data (0: all)")
    eval_batch_size: int = Field(64, ge=1)
    signing_key: str | None = Field(
        None, description="the fleet's Ed25519 signing key (PEM; `edgetune provision init` makes fleet/signing.key): "
        "the task, every announcement and every global are signed with it, for agents that check (EDGETUNE_FLEET_KEYS)")
    fleet_keys: str | None = Field(
        None, description="the public keys agents are to trust (PEM; the aggregator bundle's fleet-keys.pem): "
        "published, signed, on the fleet's keys topic at start, so that a key rotation (`edgetune provision "
        "rotate-key`) reaches every agent; it must hold the signing key's own public key")
    publish_model: Literal["off", "final", "every"] = Field(
        "off", description="federated mode: also publish the global as a signed int8 ONNX model (the model topic) "
        "for devices that only serve (edgetune-agent serve): after the last round, after every round, or never; "
        "each costs an ONNX export and quantization (seconds to a minute on CPU)")
    max_update_bytes: int = Field(16 * 1024 * 1024, gt=0, description="refuse larger update frames")
    seed: int = 0
    # split mode
    split_lr: float = Field(1e-3, gt=0, description="the server tail's LoRA learning rate")
    split_max_tokens: int = Field(65536, ge=1, description="token budget of one server micro-batch")
    split_batch_window_ms: float = Field(20, ge=0, description="wait this long for other agents' activations")
    eval_sequences: int = Field(64, ge=1, description="held-out sequences for perplexity")
    eval_rouge_prompts: int = Field(8, ge=0, description="split: held-out prompts for ROUGE of greedy continuations (0: none)")
    eval_rouge_prompt_tokens: int = Field(0, ge=0, description="split: tokens of each prompt (0: half of seq_len)")
    eval_rouge_new_tokens: int = Field(0, ge=0, description="split: tokens generated and compared with the "
                                                            "reference (0: up to 16, as many as fit in seq_len)")
    device: str = Field("", description="torch device of the split server ('' = cuda if present, else cpu)")
    split_quantize: Literal["none", "4bit"] = Field(
        "none", description="4bit: the server tail's base weights in 4-bit NF4 under its LoRA (bitsandbytes, QLoRA; "
                            "needs a CUDA device and the gpu extra)")
    max_activation_bytes: int = Field(256 * 1024 * 1024, gt=0, description="refuse larger split frames")

    @model_validator(mode="after")
    def _model_publishing(self):
        if self.publish_model != "off" and self.mode != "federated":
            raise ValueError("publish_model: only federated mode makes a model a device serves without the "
                             "aggregator; set EDGETUNE_PUBLISH_MODEL=off in split mode")
        return self

    @model_validator(mode="after")
    def _quorum(self):
        if self.expected_agents and self.expected_agents < self.min_agents:
            raise ValueError(f"expected_agents ({self.expected_agents}) is below min_agents ({self.min_agents})")
        return self

    @model_validator(mode="after")
    def _strategy(self):
        """Build the strategy once here, so that a bad name or option fails at start-up, not in round 1."""
        from aggregator.strategies import make_strategy

        if self.aggregation == "async" and self.mode != "federated":
            raise ValueError("aggregation=async is for the federated mode; split mode averages head adapters in rounds")
        if self.aggregation == "async" and (self.strategy != "fedavg" or self.strategy_options):
            raise ValueError("aggregation=async applies buffered FedAvg (FedBuff) with its async_* settings: "
                             f"leave strategy at fedavg and strategy_options empty (got {self.strategy!r})")
        try:
            make_strategy(self.strategy, **self.strategy_options)
        except (ValueError, TypeError) as e:
            raise ValueError(f"strategy {self.strategy!r} with options {self.strategy_options}: {e}") from None
        return self

    @model_validator(mode="after")
    def _rouge_fits(self):
        p, g = self.rouge_lengths()
        if self.mode == "split" and self.eval_rouge_prompts and (p < 1 or g < 1 or p + g > self.seq_len):
            raise ValueError(f"ROUGE prompts of {p} tokens and continuations of {g} must fit in seq_len "
                             f"({self.seq_len}): set eval_rouge_prompt_tokens / eval_rouge_new_tokens")
        return self

    def rouge_lengths(self) -> tuple[int, int]:
        """(prompt tokens, generated tokens) of the split mode's ROUGE evaluation."""
        p = self.eval_rouge_prompt_tokens or self.seq_len // 2
        return p, self.eval_rouge_new_tokens or min(16, self.seq_len - p)

    def selection_size(self, online: int) -> int:
        from aggregator.rounds import selection_size

        return selection_size(online, self.agents_per_round, self.agents_fraction, self.min_agents)

    def buffer_size(self) -> int:
        return self.async_buffer_size or self.min_agents
