"""Checkpoints of the global adapter in peft's own format, written atomically.

    <output_dir>/base_model/                 the (pruned) base, saved once per run; its config
                                             names the labels (id2label / label2id)
    <output_dir>/checkpoints/round-NNNN/     adapter_config.json + adapter_model.safetensors
                                             + edgetune_state.json (round, version, metrics)
                                             [+ README.md, model_card.json: aggregator.model_card]
    <output_dir>/checkpoints/LATEST          name of the newest complete checkpoint

No file holds a path of the machine that wrote it: adapter_config.json's
`base_model_name_or_path` is `../../base_model`, relative to the checkpoint folder (`BASE_REF`),
so a run folder can be moved or copied to another machine. peft itself does not read that field
when given the base model, so

    base = AutoModelForSequenceClassification.from_pretrained(ckpt / "../../base_model")
    model = PeftModel.from_pretrained(base, ckpt)

loads one in any transformers program (`load_checkpoint_model(ckpt)` does exactly that; peft's
`AutoPeftModel*` classes would read the relative path against the working directory instead).

Output folders of the previous release: their adapter_config.json names the base by the absolute
path of the machine that wrote it, peft's template README.md repeats it, there is no model card
and the base's config may name no labels. They are read as they are: the base is the
`base_model` folder beside `checkpoints` whatever the config says (`base_model_dir`), label names
come from the command when the base has none (`load_checkpoint_model(labels=...)`).
`upgrade_output_dir`, run when the aggregator resumes such a folder, writes `BASE_REF` in place
of the absolute path; the base gets its label names from the aggregator's settings (`save_base`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file


BASE_DIR = "base_model"
BASE_REF = "../../base_model"  # adapter_config.json's base_model_name_or_path: relative to the checkpoint folder
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "edgetune_state.json")


class CheckpointError(ValueError):
    """A folder that is not a complete checkpoint of the kind asked for; the message says what to do."""


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


def label_maps(labels: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    """(id2label, label2id) as transformers' configs hold them."""
    names = [str(x) for x in labels]
    return dict(enumerate(names)), {n: i for i, n in enumerate(names)}


def _name_labels(config_path: Path, labels: Sequence[str]) -> None:
    """Put the label names into a saved config.json (a base saved before they were recorded)."""
    cfg = json.loads(config_path.read_text())
    id2label, label2id = label_maps(labels)
    if cfg.get("id2label") == {str(i): n for i, n in id2label.items()} and cfg.get("label2id") == label2id:
        return
    cfg.update(id2label={str(i): n for i, n in id2label.items()}, label2id=label2id)
    tmp = config_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_path)


def save_base(model, tokenizer, output_dir: Path, labels: Sequence[str] | None = None) -> Path:
    """Save the pruned base model (without LoRA) once, so checkpoints are self-contained.

    `labels` (one name per class) go into its config as id2label / label2id, so the base, the
    checkpoints on it and their exports name the classes; a base saved earlier gets them added.
    """
    dest = output_dir / BASE_DIR
    if labels is not None and len(labels) != int(model.config.num_labels):
        raise ValueError(f"{len(labels)} label names for a model with {model.config.num_labels} labels")
    if (dest / "config.json").exists():
        if labels is not None:
            _name_labels(dest / "config.json", labels)
        return dest
    tmp = output_dir / f".{BASE_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # peft wraps targeted modules; save an unwrapped copy's weights under the original names
    with torch.no_grad():
        state = {k: v for k, v in base.state_dict().items() if "lora_" not in k and "modules_to_save" not in k}
        state = {k.replace(".base_layer", "").replace(".original_module", ""): v for k, v in state.items()}
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(base.config)  # the live model's config stays as it is
    if labels is not None:
        config.id2label, config.label2id = label_maps(labels)
    clean = AutoModelForSequenceClassification.from_config(config)
    clean.load_state_dict(state, strict=True)
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, dest)
    return dest


def save_checkpoint(model, output_dir: Path, *, round_number: int, version: int, extra: dict | None = None,
                    base_path: Path | None = None) -> Path:
    """Save the model's current adapter as the checkpoint of `round_number`; returns its path.

    With `base_path`, adapter_config.json names the base by its path relative to the checkpoint
    folder (`BASE_REF` for `<output_dir>/base_model`). peft's own README.md (a template naming
    the base by its absolute path) is left out: `aggregator.model_card` writes the card.
    """
    ckdir = output_dir / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"round-{round_number:04d}"
    tmp = ckdir / f".{name}.tmp"
    final = ckdir / name
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "README.md").unlink(missing_ok=True)
    cfg_path = tmp / "adapter_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = (Path(os.path.relpath(base_path.resolve(), final.resolve())).as_posix()
                                          if base_path is not None else None)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (tmp / "edgetune_state.json").write_text(
        json.dumps({"round": round_number, "version": version, **(extra or {})}, indent=2, sort_keys=True)
    )
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


# -- finding a checkpoint and its base ---------------------------------------------------------
def _complete(folder: Path) -> Path:
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete (no {', '.join(missing)}): give another round's "
                              "folder, or the run's output folder for its latest complete round")
    return folder


def resolve_checkpoint(path: str | Path) -> Path:
    """The round folder: `path` itself, or the latest round of an aggregator output folder (`path`,
    `path/checkpoints` or, for `edgetune run`'s output, `path/aggregator`): the round LATEST names,
    else the newest complete round. Raises CheckpointError (no checkpoint here, or incomplete)."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no checkpoint here (no such folder): give a checkpoint folder "
                              "(…/checkpoints/round-0005) or a run's output folder")
    if any((p / f).exists() for f in ADAPTER_FILES[:2]):
        return _complete(p)
    for ckdir in (p, p / "checkpoints", p / "aggregator" / "checkpoints"):
        latest = ckdir / "LATEST"
        if latest.is_file():
            return _complete(ckdir / latest.read_text().strip())
        rounds = sorted(d for d in ckdir.glob("round-*") if d.is_dir()) if ckdir.is_dir() else []
        complete = [d for d in rounds if all((d / f).is_file() for f in ADAPTER_FILES)]
        if complete:
            return complete[-1]
        if rounds:
            return _complete(rounds[-1])
    raise CheckpointError(f"{p}: no checkpoint here (expected adapter_config.json, or checkpoints/LATEST of an "
                          "aggregator output folder)")


def _read_config(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{checkpoint}: adapter_config.json does not read ({e}): give another round's folder, "
                              "or the run's output folder for its latest round") from None


def base_model_dir(checkpoint: Path) -> Path:
    """The base model of a checkpoint: adapter_config.json's base_model_name_or_path read against
    the checkpoint folder, else `../../base_model`. An absolute path (the previous release wrote
    the path of its machine) is not followed: the base is the one beside the checkpoints."""
    named = _read_config(checkpoint).get("base_model_name_or_path")
    candidates = ([checkpoint / named] if named and not os.path.isabs(named) else []) + [checkpoint / BASE_REF]
    for c in candidates:
        if (c / "config.json").is_file():
            return Path(os.path.normpath(c))
    raise CheckpointError(f"{checkpoint}: its base model is not there (looked in "
                          f"{', '.join(os.path.normpath(c) for c in candidates)}): copy the run's base_model folder "
                          "beside its checkpoints folder")


def base_labels(base_dir: Path) -> list[str] | None:
    """The label names a saved base's config.json holds, or None where it names none (transformers'
    LABEL_0, LABEL_1, ... placeholders: a base saved by the previous release)."""
    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    id2label = {int(k): str(v) for k, v in (cfg.get("id2label") or {}).items()}
    names = [id2label.get(i, f"LABEL_{i}") for i in range(len(id2label))]
    return None if all(n == f"LABEL_{i}" for i, n in enumerate(names)) else names


def upgrade_output_dir(output_dir: Path) -> list[Path]:
    """Make an output folder of the previous release hold no path of its machine: every round's
    adapter_config.json names the base as `BASE_REF` (relative), and peft's template README.md
    beside it (a round without a model card) names it so too. Returns the rounds it changed."""
    changed = []
    base = Path(output_dir) / BASE_DIR
    for ck in sorted((Path(output_dir) / "checkpoints").glob("round-*")):
        cfg_path = ck / "adapter_config.json"
        if not cfg_path.is_file():
            continue
        cfg = json.loads(cfg_path.read_text())
        named = cfg.get("base_model_name_or_path")
        if not named or not os.path.isabs(named):
            continue
        cfg["base_model_name_or_path"] = Path(os.path.relpath(base.resolve(), ck.resolve())).as_posix()
        tmp = cfg_path.with_name(".adapter_config.json.tmp")
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        os.replace(tmp, cfg_path)
        readme = ck / "README.md"
        if readme.is_file() and not (ck / "model_card.json").exists():
            readme.write_text(readme.read_text().replace(named, cfg["base_model_name_or_path"]))
        changed.append(ck)
    return changed


def checkpoint_mode(checkpoint: Path) -> str:
    """"federated" (a classifier's LoRA) or "split" (a decoder's LoRA, with the split halves beside it)."""
    cfg = _read_config(checkpoint)
    if (checkpoint / "split_head.safetensors").exists() or cfg.get("task_type") != "SEQ_CLS":
        return "split"
    return "federated"


def require_classifier(checkpoint: Path) -> Path:
    if checkpoint_mode(checkpoint) != "federated":
        raise CheckpointError(f"{checkpoint} is a split-mode checkpoint (a decoder's LoRA): this command takes "
                              "federated-mode classifier checkpoints; use `edgetune generate` for split mode")
    return checkpoint


def _name_classes(model, base_dir: Path, labels: Sequence[str] | None) -> None:
    """Give a loaded base whose config names no labels (the previous release's) the names asked for."""
    if labels is None:
        return
    labels = [str(x) for x in labels]
    named = base_labels(base_dir)
    if named is not None and named != labels:
        raise CheckpointError(f"the base of this checkpoint names its labels {named}, not {labels}: leave the "
                              "labels out (they are read from the checkpoint)")
    if len(labels) != int(model.config.num_labels) or len(set(labels)) != len(labels):
        raise CheckpointError(f"{len(labels)} label names {labels} for a model of {model.config.num_labels} classes: "
                              "give one distinct name per class, in index order")
    model.config.id2label, model.config.label2id = label_maps(labels)


def load_checkpoint_model(checkpoint: str | Path, labels: Sequence[str] | None = None):
    """(peft model in eval mode, tokenizer) of a federated checkpoint: the classifier base found
    next to it (`base_model_dir`) with the checkpoint's adapter, through peft. `checkpoint` may
    be a round folder or a run's output folder (its latest round). `labels`: the class names for
    a base that names none (the previous release's); refused if the base names others."""
    import warnings

    import transformers
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    ck = require_classifier(resolve_checkpoint(checkpoint))
    base_dir = base_model_dir(ck)
    base = AutoModelForSequenceClassification.from_pretrained(str(base_dir))
    _name_classes(base, base_dir, labels)
    with warnings.catch_warnings():  # peft calls a transformers method that warns it is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(base, str(ck)).eval()
    return model, AutoTokenizer.from_pretrained(str(base_dir))
