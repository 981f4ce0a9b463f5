"""edgetune: the one-machine job and tools around a run."""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Optional

import typer

from aggregator.strategy_names import STRATEGY_NAMES
from broker.messages import wire_about
from common.cli import new_app
from edgetune.runner import RunOptions as RUN_DEFAULTS  # the defaults the options below show

Mode = enum.Enum("Mode", {m: m for m in ("federated", "split")}, type=str)
Aggregation = enum.Enum("Aggregation", {m: m for m in ("sync", "async")}, type=str)
Encoding = enum.Enum("Encoding", {m: m for m in ("fp32", "fp16", "int8")}, type=str)
Strategy = enum.Enum("Strategy", {m: m for m in STRATEGY_NAMES}, type=str)
Progress = enum.Enum("Progress", {m: m for m in ("auto", "tty", "plain", "off")}, type=str)

app = new_app("EdgeTune: federated LoRA fine-tuning across edge devices over MQTT.", about=wire_about)


@app.command()
def run(
    agents: int = typer.Option(4, min=1, help="edge agents (separate processes)"),
    rounds: int = typer.Option(5, min=1),
    local_epochs: int = typer.Option(1, min=1),
    max_local_steps: Optional[int] = typer.Option(None, min=0, help="cap on each agent's steps per round (0: whole "
                                                  "epochs; default 40, split mode 10)"),
    partition: str = typer.Option("by-domain", help="iid, dirichlet, by-domain (one domain per agent) or by:COLUMN "
                                                    "(one value of a data column per agent)"),
    strategy: Strategy = typer.Option("fedavg", help="the aggregation strategy"),
    strategy_options: str = typer.Option("", help='the strategy\'s options as JSON, e.g. \'{"f": 1, "m": 3}\' for krum'),
    aggregation: Aggregation = typer.Option("sync", help="sync rounds, or async (buffered, FedBuff: a new global every "
                                                 "--buffer-size updates, stale ones weighted down)"),
    buffer_size: int = typer.Option(0, min=0, help="async: updates per new global (0: half the agents)"),
    prox_mu: float = typer.Option(0.0, min=0.0, help="FedProx: the agents' proximal weight mu (0: off)"),
    lr: float = typer.Option(RUN_DEFAULTS.lr, min=0.0, help="the agents' AdamW learning rate (federated mode)"),
    batch_size: int = typer.Option(RUN_DEFAULTS.batch_size, min=1, help="examples per agent step (federated mode)"),
    num_layers: Optional[int] = typer.Option(None, min=0, help="federated mode: encoder layers the fleet's classifier "
                                             "keeps (the task's pruning; 0: all; default 4)"),
    broker: Optional[str] = typer.Option(None, help="use this broker (mqtt://host:port) instead of an embedded one"),
    output: Path = typer.Option(Path("runs/latest"), help="metrics, checkpoints, logs and the plot go here"),
    eval_limit: int = typer.Option(0, min=0, help="evaluate on the first N held-out examples (0: all)"),
    seed: int = typer.Option(0),
    mode: Mode = typer.Option("federated", help="federated (edge classifier) or split (decoder cut between agent and server)"),
    encoding: Encoding = typer.Option("fp32", help="split mode: activation/gradient encoding fp32, fp16 or int8"),
    split_model: str = typer.Option("smollm2", help="split mode: smollm2 (pretrained SmolLM2-135M, ships offline), "
                                                    "gpt2-config (GPT-2 architecture, random init: throughput runs), "
                                                    "or a model folder"),
    split_layers: int = typer.Option(6, help="split mode, gpt2-config: blocks"),
    split_embd: int = typer.Option(256, help="split mode, gpt2-config: hidden size"),
    cut: int = typer.Option(2, help="split mode: blocks on the agent"),
    seq_len: int = typer.Option(64, help="split mode: tokens per sequence"),
    data: str = typer.Option("", help="your data: a CSV, JSONL or Parquet file (or a folder of them), split across "
                                      "the agents by --partition; unset: the demo (VADER sentiment; Brown in split mode)"),
    agent_data: str = typer.Option("", help="or a glob of files, one per agent (agent i gets the i-th in sorted "
                                            "order; sets --agents)"),
    eval_data: str = typer.Option("", help="central evaluation data for the aggregator (optional: the agents "
                                           "evaluate each global on their own held-out rows)"),
    labels: str = typer.Option("", help="the label names, in order, comma-separated (unset: read from the data)"),
    text_column: str = typer.Option("text", help="the column (or JSON field) that holds the text"),
    label_column: str = typer.Option("label", help="the column (or JSON field) that holds the label name"),
    progress: Progress = typer.Option("auto", help="live progress between the round lines: tty (a view redrawn in "
                                      "place), plain (a line per change), off; auto: tty on a terminal, else plain"),
) -> None:
    """A local run: embedded broker, the aggregator and N agents on this machine."""
    from common.cli import EXIT_INPUT, fail

    mode, aggregation, encoding, strategy = mode.value, aggregation.value, encoding.value, strategy.value
    _check_strategy(strategy, strategy_options, aggregation, mode)
    _check_model(split_model if mode == "split" else os.environ.get("EDGETUNE_MODEL", ""))
    if broker:
        _check_broker(broker)
    from edgetune import run_data
    from edgetune.local_broker import BrokerUnavailable
    from edgetune.runner import SPLIT_LOCAL_STEPS, RunOptions, run_local

    if max_local_steps is None:
        max_local_steps = SPLIT_LOCAL_STEPS if mode == "split" else RunOptions.max_local_steps
    opts = RunOptions(agents=agents, rounds=rounds, local_epochs=local_epochs, max_local_steps=max_local_steps,
                      partition=partition, strategy=strategy, strategy_options=strategy_options,
                      aggregation=aggregation, async_buffer_size=buffer_size, prox_mu=prox_mu, lr=lr,
                      batch_size=batch_size, num_layers=num_layers,
                      broker_url=broker, output=output,
                      eval_limit=eval_limit, seed=seed, mode=mode, split_encoding=encoding, split_model=split_model,
                      split_n_layer=split_layers, split_n_embd=split_embd, split_n_head=max(1, split_embd // 64),
                      split_cut=cut, seq_len=seq_len, data=data, eval_data=eval_data, progress=progress.value)
    columns = {"text_column": text_column, "label_column": label_column}
    try:
        run_data.resolve(opts, agent_data=agent_data, labels=labels, partition=partition, columns=columns)
    except (run_data.DataError, run_data.RunDataError) as e:
        fail(f"{e} (nothing started)", EXIT_INPUT)
    opts.extra_env.update({"EDGETUNE_TEXT_COLUMN": text_column, "EDGETUNE_LABEL_COLUMN": label_column})
    try:
        summary = run_local(opts, echo=typer.echo)
    except (BrokerUnavailable, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    _print_summary(summary, "perplexity" if mode == "split" else "accuracy")


def _check_strategy(strategy: str, options: str, aggregation: str, mode: str) -> None:
    """Bad --strategy-options fail here, before anything starts: not a JSON object (without importing
    torch), then whatever the aggregator's own settings would refuse at its start (they build the
    strategy, which imports torch)."""
    import json

    from common.cli import EXIT_INPUT, fail

    if not options:
        return
    try:
        parsed = json.loads(options)
    except json.JSONDecodeError as e:
        fail(f"--strategy-options is not JSON ({e.msg} at character {e.pos}): give an object, e.g. "
             '\'{"f": 1, "m": 3}\' for krum (nothing started)', EXIT_INPUT)
    if not isinstance(parsed, dict):
        fail(f"--strategy-options must be a JSON object of option names to values, not {options!r} (nothing started)",
             EXIT_INPUT)
    from aggregator.settings import AggregatorSettings  # imports torch (the strategies)
    from common.settings import SettingsError, load_settings

    try:
        load_settings(AggregatorSettings, strategy=strategy, strategy_options=parsed, aggregation=aggregation, mode=mode)
    except SettingsError as e:
        fail(f"{e}\n(nothing started)", EXIT_INPUT)


def _check_model(name_or_path: str) -> None:
    """A model given as a folder (EDGETUNE_MODEL, --split-model PATH) must be one, before anything
    starts (torch-free: models.fingerprint). Names (the shipped ones, hub names) are left to the
    aggregator."""
    from common.cli import EXIT_INPUT, fail
    from models.fingerprint import ModelNotFound, is_local, model_files

    if not name_or_path or not is_local(name_or_path):
        return
    try:
        model_files(os.path.expanduser(name_or_path))
    except ModelNotFound as e:
        fail(f"{e} (nothing started)", EXIT_INPUT)


def _check_broker(url: str, timeout_s: float = 2.0) -> None:
    """--broker must be reachable over TCP within `timeout_s`: say so at once rather than after starting
    the aggregator and the agents."""
    import socket

    from broker.transport import BrokerAddress
    from common.cli import EXIT_INPUT, fail

    try:
        addr = BrokerAddress.parse(url)
    except ValueError as e:
        fail(f"--broker: {e} (nothing started)", EXIT_INPUT)
    try:
        socket.create_connection((addr.host, addr.port), timeout=timeout_s).close()
    except OSError as e:
        fail(f"no broker at {addr.host}:{addr.port} ({e.strerror or e}): is it running and reachable? (nothing "
             "started)", 3)


def _print_summary(summary: dict, key: str) -> None:
    """The run's figure from first to last round, per source (central, on the devices), where its
    files are, and in split mode the last round's sample."""
    rows = summary["rounds"]
    for source in ("central", "federated"):
        scored = [r for r in rows if key in r and r.get("eval") == source]
        if scored:
            where = "on the aggregator's evaluation data" if source == "central" else "on the devices' held-out rows"
            typer.echo(f"\n{key} {scored[0][key]:.4f} -> {scored[-1][key]:.4f} {where} (rounds {scored[0]['round']}-"
                       f"{scored[-1]['round']}) in {summary['seconds']:.0f}s")
    if not rows:
        return
    typer.echo(f"metrics: {Path(summary['output']) / 'aggregator' / 'metrics.jsonl'}")
    typer.echo(f"plot:    {summary.get('plot')}")
    typer.echo(f"adapter: {Path(summary['output']) / 'aggregator' / 'checkpoints'} (peft format)")
    sampled = [r for r in rows if "sample_generation" in r]
    if sampled:  # split mode: a held-out prompt and the last round's greedy continuation
        last = sampled[-1]
        typer.echo(f"sample:  round {last['round']}: {last.get('sample_prompt', '')!r} -> {last['sample_generation']!r}")


from edgetune.compare_cli import compare  # noqa: E402  (in-process strategy and mode comparison)

app.command("compare")(compare)

from edgetune.generate import generate_cmd  # noqa: E402  (text from a split-mode checkpoint)

app.command("generate")(generate_cmd)

from edgetune.export_cli import export_cmd, predict_cmd  # noqa: E402  (take the model away)

app.command("export")(export_cmd)
app.command("predict")(predict_cmd)

from edgetune.provision_cli import provision_app  # noqa: E402  (a fleet's CA, keys and device bundles)

app.add_typer(provision_app, name="provision")


if __name__ == "__main__":
    app()
