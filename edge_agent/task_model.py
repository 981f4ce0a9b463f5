"""The model a fleet's task names, found on this device and checked against the task's hash.

An agent is told its model by the aggregator's TaskDefinition (broker.messages): the model's
name, the hash of its files (models.fingerprint), the labels, pruning, LoRA, lengths, the split
cut and seed. It holds no model settings of its own; it only says where its model folders are
(`EDGETUNE_MODEL_DIR`, one or more folders separated by the OS path separator). `task_spec`
finds the task's model there (or among the models that ship offline: the MiniLM classifier,
SmolLM2, a GPT-2 built from its config), checks its hash, and gives the spec the agent builds its
model from. A model that is missing raises ModelNotFound with every place it looked; one whose
files differ raises ModelMismatch. No torch import here: the agent refuses before loading weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from broker.messages import TaskDefinition
from models.fingerprint import ModelNotFound, config_hash, model_hash


class ModelMismatch(ValueError):
    """The device holds a model by the task's name whose files hash to something else."""


def model_dirs(setting: str | None) -> list[Path]:
    """The folders of EDGETUNE_MODEL_DIR (os.pathsep-separated), in order."""
    return [Path(p).expanduser() for p in (setting or "").split(os.pathsep) if p.strip()]


def _built_in(name: str) -> str | None:
    """The path of a model that ships offline under this name (None: none does)."""
    from models.classifier import DEFAULT_MODEL_NAME

    if name == DEFAULT_MODEL_NAME:
        from models.classifier import default_model_path

        return default_model_path()
    if name == "smollm2":
        from models.smollm2 import smollm2_gguf

        return str(smollm2_gguf())
    return None


def locate(task: TaskDefinition, dirs: list[Path]) -> str:
    """The path of the task's model on this device whose files hash to the task's model_hash
    ("gpt2-config" for a GPT-2 built from the task's config). The first folder of `dirs` that holds
    one by the task's name wins; then the models that ship offline."""
    if task.model == "gpt2-config":
        got = config_hash(task.config, task.seed)
        if got != task.model_hash:
            raise ModelMismatch(f"the task's gpt2-config {task.config} (seed {task.seed}) hashes to {got[:12]}, not "
                                f"the task's {task.model_hash[:12]}: the aggregator's release builds it differently")
        return "gpt2-config"
    looked, mismatched = [], []
    candidates = [d / task.model for d in dirs]
    try:
        shipped = _built_in(task.model)
    except ModelNotFound as e:  # a shipped model whose package is not installed: say so among the places
        shipped, looked = None, [str(e)]
    if shipped is not None:
        candidates.append(Path(shipped))
    for c in candidates:
        if not c.exists():
            looked.append(str(c))
            continue
        try:
            got = model_hash(c)
        except ModelNotFound as e:
            looked.append(f"{c} ({e})")
            continue
        if got == task.model_hash:
            return str(c)
        mismatched.append(f"{c} (its files hash to {got[:12]})")
    if mismatched:
        raise ModelMismatch(f"this device's model {task.model!r} is not the task's (model hash "
                            f"{task.model_hash[:12]}): {'; '.join(mismatched)}; copy the aggregator's model folder "
                            "there, unchanged")
    where = "; ".join(looked) if looked else "no folder (EDGETUNE_MODEL_DIR is unset)"
    raise ModelNotFound(f"the task's model {task.model!r} is not on this device: looked in {where}; put the "
                        f"aggregator's model folder {task.model!r} in a folder of EDGETUNE_MODEL_DIR")


def task_spec(task: TaskDefinition, dirs: list[Path]):
    """What the agent builds for the task: a models.classifier.ClassifierSpec (federated) or a
    models.split.DecoderSpec (split), its model found and checked by `locate`."""
    path = locate(task, dirs)
    if task.mode == "split":
        from models.split import DecoderSpec

        model = "smollm2" if task.model == "smollm2" else path
        return DecoderSpec(model=model, cut=task.cut, n_positions=max(1024, task.max_length), lora_r=task.lora_r,
                           lora_alpha=task.lora_alpha, seed=task.seed, **task.config)
    from models.classifier import ClassifierSpec, spec_family

    spec = ClassifierSpec(model=path, num_labels=len(task.labels), num_layers=task.num_layers, lora_r=task.lora_r,
                          lora_alpha=task.lora_alpha, lora_dropout=task.lora_dropout,
                          target_modules=tuple(task.target_modules) or None, max_length=task.max_length, seed=task.seed)
    spec_family(spec)  # a model of no supported family: models.families.UnsupportedModel, before any weights load
    return spec
