"""Checkpoints of the global adapter in peft's own format, written atomically.

    <output_dir>/base_model/                 the (pruned) base, saved once per run
    <output_dir>/checkpoints/round-NNNN/     adapter_config.json + adapter_model.safetensors
                                             + edgetune_state.json (round, version, metrics)
    <output_dir>/checkpoints/LATEST          name of the newest complete checkpoint

`PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_model), ckpt)`
loads one in any transformers program.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file


@dataclass
class CheckpointInfo:
    path: Path
    round: int
    version: int
    extra: dict


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_base(model, tokenizer, output_dir: Path) -> Path:
    """Save the pruned base model (without LoRA) once, so checkpoints are self-contained."""
    dest = output_dir / "base_model"
    if (dest / "config.json").exists():
        return dest
    tmp = output_dir / ".base_model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # peft wraps targeted modules; save an unwrapped copy's weights under the original names
    with torch.no_grad():
        state = {k: v for k, v in base.state_dict().items() if "lora_" not in k and "modules_to_save" not in k}
        state = {k.replace(".base_layer", "").replace(".original_module", ""): v for k, v in state.items()}
    from transformers import AutoModelForSequenceClassification

    clean = AutoModelForSequenceClassification.from_config(base.config)
    clean.load_state_dict(state, strict=True)
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, dest)
    return dest


def save_checkpoint(model, output_dir: Path, *, round_number: int, version: int, extra: dict | None = None,
                    base_path: Path | None = None) -> Path:
    """Save the model's current adapter as the checkpoint of `round_number`; returns its path."""
    ckdir = output_dir / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"round-{round_number:04d}"
    tmp = ckdir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    cfg_path = tmp / "adapter_config.json"
    if base_path is not None and cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(base_path.resolve())
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (tmp / "edgetune_state.json").write_text(
        json.dumps({"round": round_number, "version": version, **(extra or {})}, indent=2, sort_keys=True)
    )
    final = ckdir / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = ckdir / ".LATEST.tmp"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, ckdir / "LATEST")
    _fsync_dir(ckdir)
    return final


def latest_checkpoint(output_dir: Path) -> CheckpointInfo | None:
    ckdir = output_dir / "checkpoints"
    latest = ckdir / "LATEST"
    if not latest.exists():
        return None
    path = ckdir / latest.read_text().strip()
    state_file = path / "edgetune_state.json"
    if not state_file.exists():
        raise FileNotFoundError(f"checkpoint {path} is incomplete (no edgetune_state.json): remove LATEST to start over")
    state = json.loads(state_file.read_text())
    return CheckpointInfo(path, int(state["round"]), int(state["version"]), state)


def load_checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a checkpoint, in get_peft_model_state_dict's naming."""
    raw = load_file(str(path / "adapter_model.safetensors"))
    # save_pretrained drops the adapter name ("default") from keys; put it back as peft expects
    return raw
