"""edgetune-agent: run an edge agent."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, help="EdgeTune edge agent: local training, updates, predictions.")


@app.callback()
def main() -> None:
    pass


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
    from broker.settings import SettingsError, load_settings
    from edgetune.logs import setup_logging

    from edge_agent.settings import AgentSettings

    try:
        s = load_settings(
            AgentSettings, config, agent_id=agent_id, broker_url=broker, fleet=fleet, partition=partition,
            num_partitions=num_partitions, partition_index=partition_index, metrics_port=metrics_port,
        )
    except SettingsError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    setup_logging(s.log_level, s.agent_id)
    from broker.transport import BrokerError
    from edge_agent.runner import AgentRunner

    try:
        AgentRunner(s).run()
    except BrokerError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(3)


if __name__ == "__main__":
    app()
