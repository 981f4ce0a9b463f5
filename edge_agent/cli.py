"""edgetune-agent: run an edge agent; ask its model for predictions and give it feedback.

`predict` and `feedback` work against the agent's state dir (EDGETUNE_STATE_DIR or --state-dir):
`predict` loads the exported int8 model with ONNX Runtime (no torch import on that path),
`feedback` writes a labelled sample to the store, which the running agent picks up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from common.cli import cli_settings, exit_codes, new_app
from common.logs import setup_logging

app = new_app("EdgeTune edge agent: local training, updates, predictions.")


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
) -> None:
    """Join the fleet and train in every round this agent is selected for."""
    from edge_agent.settings import AgentSettings

    s = cli_settings(
        AgentSettings, config, agent_id=agent_id, broker_url=broker, fleet=fleet, partition=partition,
        num_partitions=num_partitions, partition_index=partition_index, metrics_port=metrics_port,
    )
    setup_logging(s.log_level, s.agent_id)
    from broker.transport import BrokerError
    from edge_agent.local_settings import DeviceSetupError
    from edge_agent.runner import AgentRunner

    from models.fingerprint import ModelNotFound

    with exit_codes({BrokerError: 3, DeviceSetupError: EXIT_STATE, ModelNotFound: 2}):
        AgentRunner(s).run()


EXIT_INPUT = 2  # a bad setting or input: nothing stored
EXIT_STATE = 4  # no state dir, or no exported model in it yet


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
) -> None:
    """Classify texts with the model the agent serves (its exported int8 ONNX model)."""
    import json

    from edge_agent.inference import ModelLoadError, OnnxPredictor
    from edge_agent.local_settings import StateDirError

    s = _local_settings(config, state_dir)
    bad = [i for i, t in enumerate(texts) if not t.strip()]
    if bad:
        typer.echo(f"error: text {bad[0] + 1} is empty: give the texts to classify as arguments", err=True)
        raise typer.Exit(EXIT_INPUT)
    try:
        model_dir = s.current_model_dir()
        p = OnnxPredictor(model_dir, threads=s.onnx_threads or None)
    except (StateDirError, ModelLoadError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_STATE)
    ids, probs = p.predict(texts)
    for text, i, row in zip(texts, ids, probs):
        if as_json:
            typer.echo(json.dumps({"text": text, "label": p.labels[i], "label_id": i,
                                   "probabilities": [round(float(x), 6) for x in row], "model": model_dir.name}))
        else:
            typer.echo(f"{p.labels[i]}\t{float(row[i]):.3f}\t{text}")


@app.command()
def feedback(
    text: str = typer.Argument(..., help="the input the label belongs to"),
    label: str = typer.Option(..., "--label", "-l", help="the right class: a name (e.g. positive) or an index"),
    state_dir: Optional[Path] = _STATE_DIR,
    config: Optional[Path] = _CONFIG,
) -> None:
    """Store a labelled sample in the agent's store; the agent learns from it between rounds."""
    from edge_agent.local_settings import StateDirError
    from edge_agent.store import InvalidSample, SampleStore

    s = _local_settings(config, state_dir)
    try:
        path = s.store_path()
    except StateDirError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_STATE)
    value: str | int = int(label) if label.strip().lstrip("-").isdigit() else label
    with SampleStore(path, s.store_max_samples, labels=s.labels, max_text_chars=s.store_max_text_chars) as store:
        try:
            sample_id = store.add(text, value, source="feedback")
        except InvalidSample as e:
            typer.echo(f"error: {e} (nothing stored)", err=True)
            raise typer.Exit(EXIT_INPUT)
        name = s.labels[store.get(sample_id).label]
    typer.echo(f"stored sample {sample_id} ({name}) in {path}")


if __name__ == "__main__":
    app()
