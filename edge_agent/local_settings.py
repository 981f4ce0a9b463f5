"""On-device settings: the sample store, the loopback HTTP API, incremental learning, ONNX serving.

Kept apart from `edge_agent.settings` (which pulls in the model code, hence torch) so that the
`predict` and `feedback` commands build their settings without importing torch.
`AgentSettings` inherits these fields; `LocalCommandSettings` is what those two commands load
(the same EDGETUNE_ variables, and the agent's settings file with its other keys ignored).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import SettingsConfigDict

from common.settings import EdgeTuneSettings
from data.settings import DataSettings

STORE_FILE = "samples.db"
MODELS_DIR = "models"
CURRENT_FILE = "CURRENT"  # in MODELS_DIR: the name of the model folder in service
TASK_FILE = "task.json"  # the fleet's task the agent last built its model for (broker.messages.TaskDefinition)


def save_task(state_dir: str | Path, task) -> None:
    """Keep the fleet's task (a TaskDefinition) in the state dir: the device commands read its labels."""
    path = Path(state_dir).expanduser() / TASK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(task.model_dump_json(indent=2))
    os.replace(tmp, path)


class StateDirError(RuntimeError):
    """The state dir is unset, missing, or holds no model yet; the message says what to do."""


class DeviceSetupError(RuntimeError):
    """The agent cannot open its store or serve its HTTP API; the message says what to change."""


_FROM_TASK = "the fleet's task: the aggregator publishes it and the agent builds its model from it; set it on the aggregator"
# the settings an agent of the previous release took, which now come with the fleet's task (broker.messages.
# TaskDefinition): naming one (environment, settings file, keyword) fails at start-up with its replacement
REMOVED_SETTINGS = {
    "model": "the model comes with " + _FROM_TASK + "; put the aggregator's model folder in a folder of "
             "EDGETUNE_MODEL_DIR on the device (the shipped MiniLM and SmolLM2 need nothing)",
    "labels": "the labels come with " + _FROM_TASK + " (EDGETUNE_LABELS there); the device commands read them "
              "from the task the agent saved in its state dir",
    **{name: f"it comes with {_FROM_TASK}" for name in (
        "num_labels", "num_layers", "max_length", "model_seed", "lora_r", "lora_alpha", "split_model", "split_cut",
        "split_n_layer", "split_n_embd", "split_n_head", "seq_len", "split_seed")},
}


class NoTaskSettings(BaseModel):
    """Refuses the settings that now come with the fleet's task, naming what replaced each."""

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data):
        given = set(data) if isinstance(data, dict) else set()
        given |= {k[len("EDGETUNE_"):].lower() for k in os.environ if k.startswith("EDGETUNE_")}
        found = sorted(given & set(REMOVED_SETTINGS))
        if found:
            raise ValueError("; ".join(f"{name} (EDGETUNE_{name.upper()}) is no longer an agent setting: "
                                       f"{REMOVED_SETTINGS[name]}" for name in found)
                             + ". Remove it from the agent's environment and settings file")
        return data


class OnDeviceSettings(NoTaskSettings):
    state_dir: str | None = Field(None, description="outbox, sample store and exported models; unset: no durable state")
    # the sample store
    store_max_samples: int = Field(10_000, ge=1, description="retention: keep the newest N samples")
    store_max_text_chars: int = Field(2000, ge=1, description="longer inputs are refused")
    # the loopback HTTP API (predict, feedback)
    http_port: int | None = Field(None, ge=0, le=65535, description="loopback HTTP API port (0: any free port); "
                                  "unset: off. It binds 127.0.0.1 only")
    http_record_inputs: bool = Field(False, description="store each text sent to /predict (unlabelled)")
    # incremental fine-tuning between rounds
    incremental_min_new: int = Field(50, ge=0, description="fine-tune when this many new labelled samples "
                                     "arrived (0: never between rounds)")
    incremental_replay_ratio: float = Field(1.0, ge=0, description="replay examples of older data per new sample")
    incremental_epochs: int = Field(3, ge=1)
    incremental_max_steps: int = Field(0, ge=0, description="cap on steps of one incremental run (0: no cap)")
    incremental_lr: float = Field(1e-3, gt=0)
    incremental_batch_size: int = Field(16, ge=1)
    incremental_distill: float = Field(0.0, ge=0, description="weight of keeping the model's own answers on the "
                                       "replay examples (distillation); 0: labels only")
    holdout_every: int = Field(10, ge=2, description="every k-th labelled sample (by id) is a holdout sample: "
                               "never trained on, used to check a new model before it serves")
    local_holdout: int = Field(64, ge=0, description="examples of the local shard kept out of training for that check")
    # ONNX Runtime serving
    onnx_export: bool = Field(True, description="with a state dir: export (int8) and serve each new model")
    swap_tolerance: float = Field(0.01, ge=0, le=1, description="a new model may be this much less accurate "
                                  "on the holdout and still replace the one in service")
    onnx_threads: int = Field(1, ge=0, description="onnxruntime threads (0: one per core)")

    def state_path(self) -> Path:
        if not self.state_dir:
            raise StateDirError("no state dir: set EDGETUNE_STATE_DIR (or pass --state-dir) to the agent's state dir")
        p = Path(self.state_dir).expanduser()
        if not p.is_dir():
            raise StateDirError(f"state dir {p} does not exist: start the agent (edgetune-agent run) with "
                                f"EDGETUNE_STATE_DIR={p} first, or fix the path")
        return p

    def task_labels(self) -> list[str] | None:
        """The labels of the fleet's task the agent last built its model for (None: it has not joined
        a fleet yet)."""
        path = self.state_path() / TASK_FILE
        if not path.exists():
            return None
        try:
            labels = json.loads(path.read_text())["labels"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StateDirError(f"{path} is not a task the agent saved ({e}): delete it and start the agent again "
                                "(it saves the fleet's task when it builds its model)") from None
        return [str(x) for x in labels]

    def store_path(self) -> Path:
        return self.state_path() / STORE_FILE

    def models_path(self) -> Path:
        return self.state_path() / MODELS_DIR

    def current_model_dir(self) -> Path:
        """The exported model the agent serves now (StateDirError when there is none yet)."""
        models = self.models_path()
        pointer = models / CURRENT_FILE
        if not pointer.exists():
            raise StateDirError(f"no exported model in {models} yet: the agent exports one after it receives "
                                "its first global adapter (keep `edgetune-agent run` going with this state dir)")
        d = models / pointer.read_text().strip()
        if not d.is_dir():
            raise StateDirError(f"{pointer} names {d.name}, which is missing: restart the agent to re-export")
        return d


class LocalCommandSettings(OnDeviceSettings, DataSettings, EdgeTuneSettings):
    """What `edgetune-agent predict` / `feedback` / `import` read; other agent keys in a settings file are ignored."""

    model_config = SettingsConfigDict(env_prefix="EDGETUNE_", extra="ignore", validate_default=True)
