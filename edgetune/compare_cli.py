"""`edgetune compare`: run learning modes and strategies side by side in the in-process simulator.

Register it on the main app with one line in edgetune/cli.py:

    from edgetune.compare_cli import compare; app.command("compare")(compare)

This module imports only typer at import time; torch and the simulator load when it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

DEFAULT_RUNS = "fedavg,fedprox,fedadam,sequential,independent,centralized"


def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def compare(
    modes: str = typer.Option(DEFAULT_RUNS, help="comma-separated runs: a mode (fedavg, fedprox, fedadam, sequential, "
                                                 "independent, centralized, async) or a strategy name (median, krum, "
                                                 "trimmed_mean, clip, fedyogi, dp_fedavg: mode fedavg with it)"),
    option: List[str] = typer.Option([], "--option", "-o", help="strategy option NAME.KEY=VALUE, e.g. krum.f=1, "
                                                                 "trimmed_mean.beta=0.2, dp_fedavg.noise_multiplier=1 "
                                                                 "(repeatable; VALUE is JSON or a string)"),
    agents: int = typer.Option(5, min=1),
    rounds: int = typer.Option(10, min=1),
    partition: str = typer.Option("iid", help="iid, dirichlet or by-domain"),
    alpha: float = typer.Option(0.5, help="dirichlet concentration"),
    participation: float = typer.Option(1.0, min=0.0, max=1.0, help="fraction of agents per round"),
    min_agents: int = typer.Option(1, min=1, help="at least this many agents per round"),
    local_epochs: int = typer.Option(1, min=1),
    local_steps: int = typer.Option(10, min=0, help="cap on each agent's steps per round (0: whole epochs)"),
    batch_size: int = typer.Option(32, min=1),
    lr: float = typer.Option(5e-3, help="agents' AdamW learning rate"),
    prox_mu: float = typer.Option(0.01, min=0.0, help="FedProx mu (run 'fedprox')"),
    attackers: int = typer.Option(0, min=0, help="agents that poison their updates"),
    attack: Optional[str] = typer.Option(None, help="scale (send attack_scale x delta) or flip (send -flip_scale x delta)"),
    attack_scale: float = typer.Option(10.0),
    flip_scale: float = typer.Option(1.0),
    buffer_size: int = typer.Option(3, min=1, help="async: updates per server step"),
    speeds: Optional[str] = typer.Option(None, help="async: seconds per local step for each agent, e.g. 1,1,2,5,20"),
    model: str = typer.Option("head", help="head (cached encoder features + LoRA head: fast) or full (the real "
                                           "pruned MiniLM with LoRA: slow on CPU)"),
    data: Optional[str] = typer.Option(None, help="a .csv, .jsonl or .parquet file (or a folder of them) with text, "
                                                  "label[, domain][, id], or demo:NAME (default: demo:vader)"),
    train_limit: int = typer.Option(0, min=0, help="use a seeded sample of N training examples (0: all)"),
    eval_limit: int = typer.Option(0, min=0, help="use a seeded sample of N held-out examples (0: all)"),
    eval_agents: Optional[bool] = typer.Option(None, "--eval-agents/--no-eval-agents",
                                               help="evaluate each agent's local model every round (default: with "
                                                    "--model head only)"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0, min=0, help="torch threads (0: torch's default)"),
    output: Path = typer.Option(Path("runs/compare"), help="one folder per run, accuracy.png and summary.json"),
) -> None:
    """Compare learning modes and strategies in-process (no broker) on the same data and budget.

    Per-round metrics go to OUTPUT/<run>/metrics.jsonl, one plot of all runs to OUTPUT/accuracy.png."""
    from edgetune.simulate import SimulationError, compare as run_compare

    names = _check_runs(modes, model)
    opts = _strategy_options(option)
    speed_list = _parse_speeds(speeds)
    if threads:
        from models.classifier import set_threads

        set_threads(threads)
    common = dict(agents=agents, rounds=rounds, partition=partition, alpha=alpha, participation=participation,
                  min_agents=min_agents, local_epochs=local_epochs, local_steps=local_steps, batch_size=batch_size,
                  lr=lr, attackers=attackers, attack=attack, attack_scale=attack_scale, flip_scale=flip_scale,
                  buffer_size=buffer_size, speeds=speed_list, model=model, data=data or None,
                  train_limit=train_limit, eval_limit=eval_limit, eval_agents=eval_agents, seed=seed)
    configs = _configs(names, opts, common, prox_mu)
    try:
        for c in configs.values():
            c.check()
        results = run_compare(configs, output=output, log=typer.echo)
    except (SimulationError, ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    _report(results, common, output)


def _check_runs(modes: str, model: str) -> list[str]:
    """The run names of --modes, each a mode or a strategy; --model checked too."""
    from aggregator.strategies import STRATEGIES
    from edgetune.simulate import MODELS, MODES

    names = [m.strip() for m in modes.split(",") if m.strip()]
    if not names:
        _fail("--modes is empty")
    unknown = [n for n in names if n not in MODES and n not in STRATEGIES]
    if unknown:
        _fail(f"--modes: unknown {', '.join(unknown)}; use modes ({', '.join(MODES)}) or strategies ({', '.join(STRATEGIES)})")
    if model not in MODELS:
        _fail(f"--model {model!r}: choose one of {', '.join(MODELS)}")
    return names


def _strategy_options(option: List[str]) -> dict[str, dict]:
    """--option NAME.KEY=VALUE, repeated -> {NAME: {KEY: VALUE}}."""
    opts: dict[str, dict] = {}
    for o in option:
        key, eq, value = o.partition("=")
        name, dot, k = key.partition(".")
        if not eq or not dot or not k:
            _fail(f"--option {o!r}: write NAME.KEY=VALUE, e.g. krum.f=1")
        opts.setdefault(name, {})[k] = _parse_value(value)
    return opts


def _parse_speeds(speeds: Optional[str]) -> list[float] | None:
    if not speeds:
        return None
    try:
        return [float(x) for x in speeds.split(",")]
    except ValueError:
        _fail(f"--speeds {speeds!r}: give numbers separated by commas")


def _configs(names: list[str], opts: dict[str, dict], common: dict, prox_mu: float) -> dict:
    """One SimConfig per run: a mode as it is (attackers only where there is a federation), a strategy under fedavg."""
    from edgetune.simulate import MODES, SimConfig

    configs = {}
    for n in names:
        if n in MODES:
            strategy = "fedadam" if n == "fedadam" else None
            c = SimConfig(mode=n, strategy=strategy, strategy_options=opts.get(strategy or "fedavg", {}),
                          prox_mu=prox_mu if n == "fedprox" else 0.0, **common)
            if n in ("centralized", "independent"):
                c.attackers, c.attack = 0, None
        else:
            c = SimConfig(mode="fedavg", strategy=n, strategy_options=opts.get(n, {}), **common)
        configs[n] = c
    return configs


def _report(results: dict, common: dict, output: Path) -> None:
    """OUTPUT/summary.json and a markdown table of the runs on the terminal."""
    rows = []
    for n, r in results.items():
        acc = r.accuracies
        rows.append({"run": n, "final": acc[-1], "best": max(acc[1:]), "round 0": acc[0], "seconds": r.seconds})
    summary = {"runs": {n: {"accuracy": r.accuracies, "loss": r.losses, "seconds": r.seconds,
                            "metrics": str(r.metrics_path), "attackers": r.attackers} for n, r in results.items()},
               "options": {k: v for k, v in common.items()}, "plot": str(output / "accuracy.png")}
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    typer.echo("\n| run | accuracy round 0 | final | best | seconds |\n|---|---|---|---|---|")
    for row in rows:
        typer.echo(f"| {row['run']} | {row['round 0']:.4f} | {row['final']:.4f} | {row['best']:.4f} | {row['seconds']:.1f} |")
    typer.echo(f"\nplot:    {output / 'accuracy.png'}\nsummary: {output / 'summary.json'}")
