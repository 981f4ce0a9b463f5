"""`edgetune export` and `edgetune predict`: what a user takes away from a federated run.

    edgetune export CHECKPOINT OUT [--onnx] [--force]   a merged standalone model folder (+ the int8 ONNX one)
    edgetune predict SOURCE TEXT... [--json]            label names and probabilities per text

Registered on the main app in edgetune/cli.py. Bad input (no or an incomplete checkpoint, a
split-mode checkpoint, an OUT that holds files) exits 2 with one line and writes nothing.
A checkpoint of the previous release names no labels: `--labels a,b,...` names them, else the
classes are LABEL_0, LABEL_1, ... and a note on stderr says how to name them.
This module imports only typer at import time (edgetune.export loads the model code when it runs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from common.cli import EXIT_INPUT, exit_codes, fail


_LABELS = typer.Option(None, "--labels", help="class names in index order, comma-separated, for a checkpoint "
                       "whose base names none (one written by the previous release); others name their own")


def _label_list(labels: str | None) -> list[str] | None:
    return [x.strip() for x in labels.split(",") if x.strip()] if labels is not None else None


def _note_unnamed(labels, source: Path, todo: str) -> None:
    from edgetune.export import unnamed

    if unnamed(labels):
        typer.echo(f"note: {source} names no labels (a checkpoint of the previous release, or its export): the "
                   f"classes are called {', '.join(labels)}; to name them, {todo}", err=True)


def _input_errors() -> dict:
    from aggregator.checkpoint import CheckpointError
    from edgetune.export import ExportError

    return {CheckpointError: EXIT_INPUT, ExportError: EXIT_INPUT}


def export_cmd(
    checkpoint: Path = typer.Argument(..., help="a checkpoint folder (…/checkpoints/round-0005), or a run's "
                                                "output folder (its latest round)"),
    out: Path = typer.Argument(..., help="the folder to write (new, or empty; see --force)"),
    onnx: bool = typer.Option(False, "--onnx", help="also write OUT/onnx: the int8 ONNX model the agents serve"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it holds files"),
    max_length: Optional[int] = typer.Option(None, min=8, max=512, help="tokens per text (default: the "
                                             "fleet's max_length from the checkpoint's card, else 64)"),
    labels: Optional[str] = _LABELS,
) -> None:
    """Merge a federated checkpoint's LoRA into its base: a model folder that plain transformers loads."""
    import transformers

    from edgetune.export import export_checkpoint

    transformers.logging.disable_progress_bar()
    with exit_codes(_input_errors()):
        res = export_checkpoint(checkpoint, out, onnx=onnx, force=force, max_length=max_length,
                                labels=_label_list(labels))
    _note_unnamed(res.labels, res.checkpoint, "export again with --labels NAME,NAME,... (the fleet's "
                  "EDGETUNE_LABELS) and --force")
    typer.echo(f"exported round {res.round} (global v{res.version}) of {res.checkpoint} to {res.path}")
    typer.echo(f"labels: {', '.join(res.labels)}")
    typer.echo(f'load it: AutoModelForSequenceClassification.from_pretrained("{res.path}")')
    if res.onnx_dir is not None:
        typer.echo(f"int8 ONNX (what the agents serve): {res.onnx_dir}")
    typer.echo(f'try it:  edgetune predict {res.path} "some text"')


def predict_cmd(
    source: Path = typer.Argument(..., help="a checkpoint folder, a run's output folder, or a folder written by "
                                            "`edgetune export` (or its onnx/ folder)"),
    texts: list[str] = typer.Argument(..., help="one or more texts to classify"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per text"),
    labels: Optional[str] = _LABELS,
) -> None:
    """Classify texts with a federated checkpoint or an exported model: label and probabilities."""
    from edgetune.export import load_classifier

    bad = [i for i, t in enumerate(texts) if not t.strip()]
    if bad:
        fail(f"text {bad[0] + 1} is empty: give the texts to classify as arguments", EXIT_INPUT)
    with exit_codes(_input_errors()):
        clf = load_classifier(source, labels=_label_list(labels))
    _note_unnamed(clf.labels, source, "give the checkpoint with --labels NAME,NAME,... (the fleet's EDGETUNE_LABELS)")
    ids, probs = clf.predict(texts)
    for text, i, row in zip(texts, ids, probs):
        named = {name: round(float(p), 6) for name, p in zip(clf.labels, row)}
        if as_json:
            typer.echo(json.dumps({"text": text, "label": clf.labels[i], "label_id": i, "probabilities": named}))
        else:
            others = " ".join(f"{n}={p:.3f}" for n, p in named.items())
            typer.echo(f"{clf.labels[i]}\t{float(row[i]):.3f}\t{others}\t{text}")
