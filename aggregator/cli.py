"""edgetune-aggregator: run the aggregator service."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from broker.messages import wire_about
from common.cli import cli_settings, exit_codes, new_app
from common.logs import setup_logging

app = new_app("EdgeTune aggregator: rounds, FedAvg, checkpoints, metrics.", about=wire_about)


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="settings file (.json/.toml/.yaml)"),
    broker: Optional[str] = typer.Option(None, help="broker URL, e.g. mqtt://127.0.0.1:1883"),
    fleet: Optional[str] = typer.Option(None),
    rounds: Optional[int] = typer.Option(None),
    min_agents: Optional[int] = typer.Option(None, help="quorum of updates per round"),
    expected_agents: Optional[int] = typer.Option(None, help="agents to wait for before round 1"),
    round_timeout: Optional[float] = typer.Option(None, help="seconds from announcement to deadline"),
    local_epochs: Optional[int] = typer.Option(None),
    max_local_steps: Optional[int] = typer.Option(None),
    strategy: Optional[str] = typer.Option(None),
    output_dir: Optional[Path] = typer.Option(None),
    eval_limit: Optional[int] = typer.Option(None),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="central evaluation data: a CSV, JSONL or "
                                            "Parquet file (or folder) in the task's labels, or demo:NAME (unset: "
                                            "the agents' federated evaluation only)"),
    metrics_port: Optional[int] = typer.Option(None),
) -> None:
    """Run federated rounds until --rounds are done (Ctrl-C stops cleanly after a checkpoint)."""
    from aggregator.settings import AggregatorSettings

    s = cli_settings(
        AggregatorSettings, config, broker_url=broker, fleet=fleet, rounds=rounds, min_agents=min_agents,
        expected_agents=expected_agents, round_timeout_s=round_timeout, local_epochs=local_epochs,
        max_local_steps=max_local_steps, strategy=strategy, output_dir=output_dir, eval_limit=eval_limit,
        eval_data=eval_data, metrics_port=metrics_port,
    )
    setup_logging(s.log_level, "aggregator")
    from aggregator.service import AggregatorService
    from broker.signing import KeyFileError
    from broker.transport import BrokerError
    from data.records import DataError
    from models.families import UnsupportedModel
    from models.fingerprint import ModelNotFound
    from models.split import QuantizationUnavailable

    with exit_codes({BrokerError: 3, QuantizationUnavailable: 2, ModelNotFound: 2, UnsupportedModel: 2, DataError: 2,
                     KeyFileError: 2}):
        AggregatorService(s).run()


if __name__ == "__main__":
    app()
