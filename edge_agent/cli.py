"""edgetune-agent: run an edge agent; ask its model for predictions and give it feedback.

`run` trains on the agent's data (`--data`: a file, a folder or `demo:NAME`) plus its sample
store. `predict`, `feedback` and `import` work against the agent's state dir
(EDGETUNE_STATE_DIR or --state-dir): `predict` loads the exported int8 model with ONNX Runtime
(or, with `--model DIR`, an exported ONNX folder: `edgetune export --onnx` writes one),
`feedback` writes a labelled sample to the store and `import` a whole file of them, which the
running agent picks up. Bad data exits 2 with the file and line.

Those three never import torch, transformers or peft: they work in an install of the `serve`
extra alone (`pip install 'edgetune[serve]'`, tests/test_serve_install.py), where `run`, which
trains, exits 2 and says to install the `agent` extra. Keep module-level imports here free of
the model code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from broker.messages import wire_about
from common.cli import cli_settings, exit_codes, fail, new_app
from common.logs import setup_logging

app = new_app("EdgeTune edge agent: local training, updates, predictions.", about=wire_about)
_TEXT_COLUMN = typer.Option(None, "--text-column", help="the column (JSON field) with the text (default: text)")
_LABEL_COLUMN = typer.Option(None, "--label-column", help="the column (JSON field) with the label name (default: label)")
_MAX_BAD_ROWS = typer.Option(None, "--max-bad-rows", help="skip up to N bad rows, each logged with its line "
                             "(default 0: refuse the data at its first bad row)")


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="settings file (.json/.toml/.yaml)"),
    agent_id: Optional[str] = typer.Option(None, "--id", help="this agent's id (default: host name)"),
    broker: Optional[str] = typer.Option(None, help="broker URL, e.g. mqtt://127.0.0.1:1883"),
    fleet: Optional[str] = typer.Option(None),
    partition: Optional[str] = typer.Option(None, help="iid, dirichlet or by-domain"),
    num_partitions: Optional[int] = typer.Option(None),
    partition_index: Optional[int] = typer.Option(None),
    metrics_port: Optional[int] = typer.Option(None),
    data: Optional[str] = typer.Option(None, "--data", help="what this agent trains on (with its sample store): a "
                                       "CSV, JSONL or Parquet file (or .txt in split mode), a folder of them, or "
                                       "demo:vader / demo:brown"),
    text_column: Optional[str] = _TEXT_COLUMN,
    label_column: Optional[str] = _LABEL_COLUMN,
    max_bad_rows: Optional[int] = _MAX_BAD_ROWS,
    eval_fraction: Optional[float] = typer.Option(None, "--eval-fraction", help="share of the data held out for "
                                                  "federated evaluation, never trained on (default 0.2; 0: none)"),
) -> None:
    """Join the fleet and train in every round this agent is selected for."""
    _require_training_stack()
    from edge_agent.settings import AgentSettings

    s = cli_settings(
        AgentSettings, config, agent_id=agent_id, broker_url=broker, fleet=fleet, partition=partition,
        num_partitions=num_partitions, partition_index=partition_index, metrics_port=metrics_port,
        data=data, text_column=text_column, label_column=label_column, max_bad_rows=max_bad_rows,
        eval_fraction=eval_fraction,
    )
    setup_logging(s.log_level, s.agent_id)
    from broker.signing import KeyFileError
    from broker.transport import BrokerError
    from data.records import DataError
    from edge_agent.local_settings import DeviceSetupError
    from edge_agent.runner import AgentRunner
    from models.families import UnsupportedModel
    from models.fingerprint import ModelNotFound

    with exit_codes({BrokerError: 3, DeviceSetupError: EXIT_STATE, DataError: EXIT_INPUT, ModelNotFound: EXIT_INPUT,
                     UnsupportedModel: EXIT_INPUT, KeyFileError: EXIT_INPUT}):
        AgentRunner(s).run()


EXIT_INPUT = 2  # a bad setting or input: nothing stored
EXIT_STATE = 4  # no state dir, or no exported model in it yet


def _require_training_stack() -> None:
    """`run` in an install of the serve extra only (no torch): say what to install instead of a traceback.
    Only torch is checked: a split agent with the lean head runs without transformers and peft."""
    from importlib.util import find_spec

    if find_spec("torch") is None:
        fail("`edgetune-agent run` trains, which needs torch: this install has the serve extra only "
             "(predictions: `edgetune-agent predict`); install the agent extra, e.g. pip install "
             "'edgetune[agent]' (CPU torch first: see deploy/systemd/edgetune-agent.service)", EXIT_INPUT)


def _local_settings(config: Optional[Path], state_dir: Optional[Path]):
    from edge_agent.local_settings import LocalCommandSettings

    return cli_settings(LocalCommandSettings, config, state_dir=str(state_dir) if state_dir else None)


_STATE_DIR = typer.Option(None, "--state-dir", help="the agent's state dir (default: EDGETUNE_STATE_DIR)")
_CONFIG = typer.Option(None, "--config", "-c", help="settings file (.json/.toml/.yaml)")


@app.command()
def predict(
    texts: list[str] = typer.Argument(..., help="one or more texts to classify"),
    state_dir: Optional[Path] = _STATE_DIR,
    config: Optional[Path] = _CONFIG,
    as_json: bool = typer.Option(False, "--json", help="one JSON object per text"),
    model: Optional[Path] = typer.Option(None, "--model", help="an exported ONNX model folder (model_meta.json; "
                                         "`edgetune export --onnx` writes OUT/onnx) instead of the one the agent "
                                         "serves from its state dir"),
) -> None:
    """Classify texts with the model the agent serves (its exported int8 ONNX model), or with --model's."""
    import json

    from edge_agent.inference import ModelLoadError, OnnxPredictor
    from edge_agent.local_settings import StateDirError

    s = _local_settings(config, state_dir)
    bad = [i for i, t in enumerate(texts) if not t.strip()]
    if bad:
        typer.echo(f"error: text {bad[0] + 1} is empty: give the texts to classify as arguments", err=True)
        raise typer.Exit(EXIT_INPUT)
    try:
        model_dir = model if model is not None else s.current_model_dir()
        p = OnnxPredictor(model_dir, threads=s.onnx_threads or None)
    except (StateDirError, ModelLoadError) as e:
        # a folder given with --model is the user's input; the state dir's is the agent's
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_INPUT if model is not None else EXIT_STATE)
    ids, probs = p.predict(texts)
    for text, i, row in zip(texts, ids, probs):
        if as_json:
            typer.echo(json.dumps({"text": text, "label": p.labels[i], "label_id": i,
                                   "probabilities": [round(float(x), 6) for x in row], "model": model_dir.name}))
        else:
            typer.echo(f"{p.labels[i]}\t{float(row[i]):.3f}\t{text}")


def _open_store(s, path: Path, labels: list[str] | None, names: list[str]):
    """The agent's sample store, with its fleet's labels (`labels`: those of the task the agent saved
    in its state dir) or, before the agent has joined a fleet (None), the label names given (`names`:
    kept by name; the agent trains on those its task has). A store that cannot be opened as it is
    (one of the previous release, one of a newer release) exits with what to do."""
    from edge_agent.store import SampleStore, StoreError, StoreMigrationError

    with exit_codes({StoreMigrationError: EXIT_INPUT, StoreError: EXIT_STATE}):
        return SampleStore(path, s.store_max_samples, labels=labels if labels is not None else names,
                           max_text_chars=s.store_max_text_chars, migrate=labels is not None)


def _task_labels(s) -> list[str] | None:
    from edge_agent.local_settings import StateDirError

    try:
        return s.task_labels()
    except StateDirError as e:
        fail(e, EXIT_STATE)


@app.command()
def feedback(
    text: str = typer.Argument(..., help="the input the label belongs to"),
    label: str = typer.Option(..., "--label", "-l", help="the right class: a name (e.g. positive) or an index"),
    state_dir: Optional[Path] = _STATE_DIR,
    config: Optional[Path] = _CONFIG,
) -> None:
    """Store a labelled sample in the agent's store; the agent learns from it between rounds."""
    from edge_agent.local_settings import StateDirError
    from edge_agent.store import InvalidSample

    s = _local_settings(config, state_dir)
    try:
        path = s.store_path()
    except StateDirError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_STATE)
    value: str | int = int(label) if label.strip().lstrip("-").isdigit() else label
    labels = _task_labels(s)
    if labels is None and isinstance(value, int):
        fail(f"label {value} is an index, and the agent has not joined its fleet yet (no task in {s.state_path()}), "
             "so the fleet's labels are not known here: give the label by name (nothing stored)", EXIT_INPUT)
    with _open_store(s, path, labels, [str(value)]) as store:
        try:
            sample_id = store.add(text, value, source="feedback")
        except InvalidSample as e:
            typer.echo(f"error: {e} (nothing stored)", err=True)
            raise typer.Exit(EXIT_INPUT)
        name = store.labels[store.get(sample_id).label]
    typer.echo(f"stored sample {sample_id} ({name}) in {path}")


def _label_names(file: Path, s) -> list[str]:
    """The label names a file holds (the fleet's labels are not known yet); class indices need them."""
    from data.records import DataError
    from data.sources import load_source

    loaded = load_source(str(file), labels=None, **s.load_options())
    names = list(loaded.labels or [])
    if not names or all(n.isdigit() for n in names):
        raise DataError("unknown_label", "gives its labels as class indices, and the agent has not joined its fleet "
                        "yet, so the fleet's labels are not known here: give the labels by name, or start "
                        "`edgetune-agent run` once first", path=str(file))
    return names


@app.command("import")
def import_(
    file: Path = typer.Argument(..., help="a CSV, JSONL or Parquet file (or a folder of them) of labelled texts"),
    text_column: Optional[str] = _TEXT_COLUMN,
    label_column: Optional[str] = _LABEL_COLUMN,
    max_bad_rows: Optional[int] = _MAX_BAD_ROWS,
    state_dir: Optional[Path] = _STATE_DIR,
    config: Optional[Path] = _CONFIG,
) -> None:
    """Load a file of labelled texts into the agent's sample store, all rows in one transaction:
    a bad file stores nothing. Labels are names of the fleet's task (or class indices in its label
    list), as the agent saved it in its state dir; before the agent has joined a fleet, names only."""
    from data.records import DataError
    from data.sources import load_source
    from edge_agent.local_settings import LocalCommandSettings, StateDirError

    s = cli_settings(LocalCommandSettings, config, state_dir=str(state_dir) if state_dir else None,
                     text_column=text_column, label_column=label_column, max_bad_rows=max_bad_rows)
    setup_logging("WARNING")  # skipped rows are logged, one line each
    try:
        path = s.store_path()
    except StateDirError as e:
        fail(e, EXIT_STATE)
    labels = _task_labels(s)
    try:
        names = labels if labels is not None else _label_names(file, s)
    except DataError as e:
        fail(f"{e} (nothing stored)", EXIT_INPUT)
    with _open_store(s, path, labels, names) as store:
        try:
            # the store's own checks (length, NUL) count as bad rows of the file, with their line
            loaded = load_source(str(file), labels=names, check=lambda e: store.validate(e.text, e.label, "import"),
                                 **s.load_options())
        except DataError as e:
            fail(f"{e} (nothing stored)", EXIT_INPUT)
        if len(loaded) > s.store_max_samples:
            fail(f"{file} has {len(loaded)} examples; the store keeps the newest {s.store_max_samples} "
                 "(EDGETUNE_STORE_MAX_SAMPLES): raise it or import fewer rows (nothing stored)", EXIT_INPUT)
        store.add_many([(e.text, e.label) for e in loaded.examples], source="import")
    skipped = f", {loaded.num_skipped} bad rows skipped" if loaded.skipped else ""
    typer.echo(f"imported {len(loaded)} labelled samples from {file} into {path}{skipped}")


from edge_agent.serving import serve_cmd  # noqa: E402  (a device that only serves: no torch)

app.command("serve")(serve_cmd)


if __name__ == "__main__":
    app()
