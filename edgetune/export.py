"""Take the model away: a federated checkpoint as a standalone model folder, and predictions.

`export_checkpoint(CHECKPOINT, OUT)` merges the checkpoint's LoRA into its base
(`merge_and_unload`) and writes

    OUT/            config.json (id2label / label2id), model.safetensors, the tokenizer
                    (model_max_length: the fleet's max_length), README.md (the model card);
                    `AutoModelForSequenceClassification.from_pretrained(OUT)` loads it, no peft
    OUT/onnx/       with onnx=True: the int8 ONNX folder an agent serves (models.onnx_export.export_int8:
                    model.int8.onnx, tokenizer.json, model_meta.json), for edge_agent.inference.OnnxPredictor

into a temporary folder beside OUT, moved into place only when complete: a failed or refused
export writes nothing. `load_classifier(SOURCE)` classifies with a checkpoint (or a run's output
folder), an exported folder or an ONNX folder. Split-mode checkpoints are refused
(`edgetune generate` is their tool).

A checkpoint of the previous release (absolute base path, no model card, a base whose config
names no labels) exports and predicts too: its base is the one beside its checkpoints
(`aggregator.checkpoint.base_model_dir`), and `labels` names its classes (else they are called
LABEL_0, LABEL_1, ... and `unnamed(labels)` says so, for the CLI to tell the user).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from aggregator.checkpoint import CheckpointError, base_model_dir, require_classifier, resolve_checkpoint

ONNX_DIR = "onnx"
DEFAULT_MAX_LENGTH = 64  # models.settings.ModelSettings.max_length's default, for checkpoints without a card


class ExportError(ValueError):
    """OUT cannot take the export; the message says what to do (nothing was written)."""


@dataclass(frozen=True)
class Exported:
    path: Path
    onnx_dir: Path | None
    checkpoint: Path
    round: int
    version: int
    labels: list[str]

    @property
    def unnamed(self) -> bool:
        return unnamed(self.labels)


def unnamed(labels: Sequence[str]) -> bool:
    """Whether these are transformers' placeholder names (LABEL_0, LABEL_1, ...): a model whose
    config names no classes, e.g. a checkpoint of the previous release exported without labels."""
    return all(str(n) == f"LABEL_{i}" for i, n in enumerate(labels))


def _inside(a: Path, b: Path) -> bool:
    """Whether `a` is `b` or a folder inside it."""
    return a == b or b in a.parents


def check_out(out: Path, force: bool, keep: Sequence[Path] = ()) -> None:
    """Refuse an OUT that is a file, holds files (unless `force`), or would hold or be inside the
    folders in `keep` (the checkpoint and its base: --force would delete them)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file: give a folder path for the export")
    real = out.resolve()
    for k in keep:
        if _inside(k.resolve(), real) or _inside(real, k.resolve()):
            raise ExportError(f"{out} holds or is inside {k}: export to a folder outside the run")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty: choose another folder, or pass --force to replace it")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished export to `out`; an `out` already there (empty, or --force) goes only after."""
    old = out.parent / f".{out.name}.export-old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _card_facts(ck: Path, labels: list[str], state: dict):
    from aggregator.model_card import CardFacts, read_card_facts

    facts = read_card_facts(ck)
    if facts is None:  # a checkpoint written before cards: what the checkpoint itself tells
        facts = CardFacts(base_model=None, labels=labels, rounds=int(state["round"]), version=int(state["version"]))
    facts.labels = labels
    return facts


def model_labels(config) -> list[str]:
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(int(config.num_labels))]


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, onnx: bool = False, force: bool = False,
                      max_length: int | None = None, labels: Sequence[str] | None = None) -> Exported:
    """Write the merged standalone model of a federated checkpoint (a round folder, or a run's
    output folder: its latest round) to `out`, and with `onnx` the agents' int8 ONNX folder in
    `out/onnx`. `labels`: class names for a checkpoint whose base names none (the previous
    release's). Raises CheckpointError / ExportError (nothing written)."""
    import json

    from aggregator.checkpoint import load_checkpoint_model
    from aggregator.model_card import render_model_card

    ck = require_classifier(resolve_checkpoint(checkpoint))
    out = Path(out)
    check_out(out, force, keep=(ck, base_model_dir(ck)))
    state = json.loads((ck / "edgetune_state.json").read_text())
    model, tok = load_checkpoint_model(ck, labels=labels)
    merged = model.merge_and_unload().eval()
    merged.config._name_or_path = ""  # the base's path on this machine would otherwise travel in config.json
    labels = model_labels(merged.config)
    facts = _card_facts(ck, labels, state)
    max_length = int(max_length or facts.model.get("max_length") or DEFAULT_MAX_LENGTH)
    tmp = out.parent / f".{out.name}.export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        merged.save_pretrained(tmp)
        tok.model_max_length = max_length
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(render_model_card(facts, merged=True))
        if onnx:
            from models.onnx_export import export_int8

            export_int8(merged, tok, tmp / ONNX_DIR, max_length=max_length, adapter_version=state["version"],
                        labels=labels)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(out, out / ONNX_DIR if onnx else None, ck, int(state["round"]), int(state["version"]), labels)


# -- predictions ---------------------------------------------------------------------------------
class TorchClassifier:
    """A transformers sequence classifier (peft or merged) with OnnxPredictor's interface:
    `labels`, `predict(texts) -> (label ids, probabilities [N, labels])`."""

    def __init__(self, model, tokenizer, max_length: int) -> None:
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, int(max_length)
        self.labels = tuple(model_labels(model.config))

    def predict(self, texts: Sequence[str]):
        import torch

        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        with torch.no_grad():
            probs = self.model(**enc).logits.double().softmax(-1).numpy()  # [N, labels]
        return [int(i) for i in probs.argmax(-1)], probs


def load_classifier(source: str | Path, labels: Sequence[str] | None = None):
    """A classifier for `edgetune predict`: an ONNX folder (model_meta.json: the agents' runtime),
    an exported or any transformers classifier folder (config.json, no adapter), else a federated
    checkpoint or a run's output folder (base + peft adapter; `labels` names the classes of one
    whose base names none). Raises CheckpointError."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    p = Path(source)
    if (p / "model_meta.json").is_file():
        from edge_agent.inference import ModelLoadError, OnnxPredictor

        try:
            return OnnxPredictor(p)
        except ModelLoadError as e:
            raise CheckpointError(str(e)) from None
    if (p / "config.json").is_file() and not (p / "adapter_config.json").exists():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(str(p))
        tok = AutoTokenizer.from_pretrained(str(p))
        limit = getattr(model.config, "max_position_embeddings", None) or 512
        return TorchClassifier(model, tok, min(int(tok.model_max_length), int(limit)))
    from aggregator.checkpoint import load_checkpoint_model
    from aggregator.model_card import read_card_facts

    ck = require_classifier(resolve_checkpoint(p))
    model, tok = load_checkpoint_model(ck, labels=labels)
    facts = read_card_facts(ck)
    return TorchClassifier(model, tok, (facts.model.get("max_length") if facts else None) or DEFAULT_MAX_LENGTH)
