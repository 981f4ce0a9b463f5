"""The simulator's configuration, result and data: SimConfig (every knob of a run, checked),
SimResult, the labelled-text loader and the agents' shards, and small pure helpers.

Part of the in-process simulator (edgetune/simulate.py has the overview).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from aggregator.strategies import StateDict, apply_delta, delta_of
from data.records import DataError, LabelledText
from data.sources import load_source, split_examples, test_fraction_of
from models.classifier import ClassifierSpec

MODES = ("fedavg", "fedprox", "fedadam", "sequential", "independent", "centralized", "async")
ATTACKS = ("scale", "flip")
FAULTS = ("lost", "late", "malformed")
MODELS = ("head", "full")
DEFAULT_DP_DELTA = 1e-5


class SimulationError(ValueError):
    """A configuration the simulator cannot run; the message says what to change."""


# -- configuration --------------------------------------------------------------------------------


@dataclass
class SimConfig:
    mode: str = "fedavg"
    strategy: str | None = None  # None: fedavg (fedadam in mode "fedadam")
    strategy_options: dict = field(default_factory=dict)
    agents: int = 5
    rounds: int = 10
    partition: str = "iid"  # iid, dirichlet, by-domain
    alpha: float = 0.5  # dirichlet concentration
    participation: float = 1.0  # fraction of agents per round (sync modes)
    min_agents: int = 1
    local_epochs: int = 1
    local_steps: int = 10  # cap on each agent's steps per round (0: whole epochs)
    batch_size: int = 32
    lr: float = 5e-3  # the agents' AdamW learning rate (the service's agents use 5e-3)
    prox_mu: float = 0.0  # FedProx mu (mode "fedprox" needs > 0)
    attackers: int = 0  # how many agents poison their updates
    attack: str | None = None  # "scale" or "flip"
    attack_scale: float = 10.0  # attack="scale": send attack_scale * delta
    flip_scale: float = 1.0  # attack="flip": send -flip_scale * delta
    # async (mode "async")
    buffer_size: int = 3
    speeds: Sequence[float] | None = None  # seconds per local step, per agent (default 1.0 each)
    staleness_weight: str = "polynomial"
    staleness_a: float = 0.5
    server_lr: float = 1.0
    max_staleness: int = 10
    redeliver: float = 0.0  # chance an update is delivered twice (MQTT QoS 1); the buffer refuses the copy
    # model and data
    model: str = "head"
    spec: ClassifierSpec = field(default_factory=ClassifierSpec)
    data: str | None = None  # None: the VADER demo; else a file or folder (data/sources.py) with text, label[, domain]
    train_limit: int = 0  # use a seeded sample of this many training examples (0: all)
    eval_limit: int = 0  # and of this many held-out examples (0: all)
    data_seed: int = 0  # seeds those two samples (apart from `seed`, so runs of other seeds share data)
    eval_agents: bool | None = None  # also evaluate each agent's local model on the held-out split
    # (before any poisoning); None: yes for "head" (cheap), no for "full". Always in "independent".
    seed: int = 0
    output: Path | None = None  # metrics.jsonl and accuracy.png go here (None: nowhere)
    plot: bool = True
    keep_trace: bool = False  # keep every update and global in SimResult.trace (tests)
    # faults (sync modes fedavg/fedprox/fedadam): {round: {agent_id: "lost" | "late" | "malformed"}}. A lost agent
    # goes offline before it sends (and is not selected again); a late one sends after the round's deadline; a
    # malformed one sends NaN in its first tensor. SimResult.trace records every delivery (keep_trace).
    faults: Mapping[int, Mapping[str, str]] = field(default_factory=dict)
    round_timeout_s: float = 1.0  # the rounds' deadline on the simulator's virtual clock
    task_hash: str = ""  # stamped on every update; the coordinators refuse others ("": no task check)
    cache_dir: Path | None = None  # feature cache ("head"); None: $EDGETUNE_CACHE_DIR or ~/.cache/edgetune
    device: str = "cpu"  # where features are computed ("head")

    def resolved_strategy(self) -> str:
        if self.mode == "fedadam":
            if self.strategy not in (None, "fedadam"):
                raise SimulationError(f"mode 'fedadam' runs strategy fedadam; got strategy {self.strategy!r} (use mode 'fedavg' for other strategies)")
            return "fedadam"
        return self.strategy or "fedavg"

    def check(self) -> None:
        if self.mode not in MODES:
            raise SimulationError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.model not in MODELS:
            raise SimulationError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.agents < 1 or self.rounds < 1:
            raise SimulationError("agents and rounds must be at least 1")
        if not 0 < self.participation <= 1:
            raise SimulationError(f"participation must be in (0, 1], got {self.participation}")
        if not 1 <= self.min_agents <= self.agents:
            raise SimulationError(f"min_agents must be in [1, agents={self.agents}], got {self.min_agents}")
        if self.local_steps < 0 or self.local_epochs < 1:
            raise SimulationError("local_steps must be >= 0 and local_epochs >= 1")
        if self.mode == "fedprox" and self.prox_mu <= 0:
            raise SimulationError("mode 'fedprox' needs prox_mu > 0 (e.g. 0.01)")
        if self.prox_mu < 0:
            raise SimulationError(f"prox_mu must be >= 0, got {self.prox_mu}")
        if self.attackers:
            if self.attack not in ATTACKS:
                raise SimulationError(f"attackers={self.attackers} needs attack in {ATTACKS}, got {self.attack!r}")
            if not 0 < self.attackers <= self.agents:
                raise SimulationError(f"attackers must be in [0, agents={self.agents}], got {self.attackers}")
            if self.mode in ("centralized", "independent"):
                raise SimulationError(f"mode {self.mode!r} aggregates nothing: attackers do not apply")
        elif self.attack is not None and self.attack not in ATTACKS:
            raise SimulationError(f"unknown attack {self.attack!r}; choose one of {ATTACKS}")
        bad = {f for per_round in self.faults.values() for f in per_round.values()} - set(FAULTS)
        if bad:
            raise SimulationError(f"unknown faults {sorted(bad)}; choose from {', '.join(FAULTS)}")
        if self.faults and self.mode not in ("fedavg", "fedprox", "fedadam"):
            raise SimulationError(f"faults apply to the synchronous aggregating modes, not {self.mode!r}")
        if self.mode == "async":
            if self.strategy not in (None, "fedavg"):
                raise SimulationError("mode 'async' aggregates with the FedBuff buffer: leave strategy unset")
            if self.speeds is not None and len(self.speeds) != self.agents:
                raise SimulationError(f"speeds has {len(self.speeds)} entries for {self.agents} agents")
            if self.speeds is not None and min(self.speeds) <= 0:
                raise SimulationError("speeds (seconds per local step) must be positive")
            if not 0 <= self.redeliver < 1:
                raise SimulationError("redeliver must be in [0, 1)")
        if self.mode in ("sequential", "independent", "centralized") and self.strategy not in (None, "fedavg"):
            raise SimulationError(f"mode {self.mode!r} does not aggregate with a strategy; leave strategy unset")
        self.resolved_strategy()


@dataclass
class SimResult:
    config: SimConfig
    rows: list[dict]  # the metrics rows, round 0 first
    final_state: StateDict  # the global adapter at the end (the initial one in "independent")
    agent_ids: list[str]
    attackers: list[str]
    agent_states: dict[str, StateDict] = field(default_factory=dict)  # "independent": each agent's own adapter
    trace: list[dict] = field(default_factory=list)  # keep_trace: per round / per update records
    seconds: float = 0.0
    metrics_path: Path | None = None
    plot_path: Path | None = None

    @property
    def accuracies(self) -> list[float]:
        """Held-out accuracy after each round, round 0 (initial) first."""
        return [r["accuracy"] for r in self.rows if "accuracy" in r]

    @property
    def accuracy(self) -> float:
        return self.accuracies[-1]

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.rows if "loss" in r]


# -- data -----------------------------------------------------------------------------------------


def load_examples(path: str | Path) -> tuple[LabelledText, ...]:
    """A user's labelled texts through the one data loader (data/sources.py): a .jsonl, .csv or
    .parquet file or a folder of them, with text, label[, domain][, id]; label names are read from
    the data (integer labels are class indices; names are sorted). Rows without a domain get "data"."""
    try:
        return load_source(path, domain="data").examples
    except DataError as e:
        raise SimulationError(f"data: {e}") from e


def load_splits(cfg: SimConfig) -> tuple[list[LabelledText], list[LabelledText]]:
    """The training and held-out examples of cfg.data (None: the VADER demo) by the source's fixed
    hash split (data/sources.py), each optionally cut to a seeded sample of train_limit /
    eval_limit (file order kept)."""
    spec = cfg.data or "demo:vader"
    examples = load_examples(spec)
    train, test = split_examples(examples, test_fraction_of(spec))
    if cfg.train_limit and cfg.train_limit < len(train):
        keep = sorted(random.Random(f"{cfg.data_seed}:train").sample(range(len(train)), cfg.train_limit))
        train = [train[i] for i in keep]
    if cfg.eval_limit and cfg.eval_limit < len(test):
        keep = sorted(random.Random(f"{cfg.data_seed}:eval").sample(range(len(test)), cfg.eval_limit))
        test = [test[i] for i in keep]
    if not train or not test:
        raise SimulationError(f"need training and held-out examples, got {len(train)} and {len(test)}")
    return train, test


def make_shards(cfg: SimConfig, train: Sequence[LabelledText]) -> list[list[LabelledText]]:
    from data.partition import partition

    parts = partition(cfg.partition, labels=[e.label for e in train], domains=[e.domain for e in train],
                      k=cfg.agents, seed=cfg.seed, alpha=cfg.alpha)
    shards = [[train[i] for i in p] for p in parts]
    empty = [i for i, s in enumerate(shards) if not s]
    if empty:
        raise SimulationError(
            f"partition {cfg.partition!r} left agents {[f'agent-{i + 1}' for i in empty]} without examples: "
            "use fewer agents, more data or another partition"
        )
    return shards


# -- pure helpers -----------------------------------------------------------------------------------


def poison(current: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], attack: str,
           factor: float) -> StateDict:
    """What an attacker sends: current + m * (tensors - current), with m = factor ("scale") or
    -factor ("flip")."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}")
    m = factor if attack == "scale" else -factor
    return apply_delta(current, delta_of(current, tensors), m)


def agents_per_round(cfg: SimConfig) -> int:
    return min(cfg.agents, max(cfg.min_agents, int(round(cfg.participation * cfg.agents))))


def planned_steps(n: int, *, epochs: int, max_steps: int, batch_size: int) -> tuple[int, int]:
    """(steps, examples seen) of train_local on n examples."""
    per_epoch = math.ceil(n / batch_size)
    steps = epochs * per_epoch if not max_steps else min(max_steps, epochs * per_epoch)
    full, rest = divmod(steps, per_epoch)
    return steps, full * n + rest * batch_size  # a partial epoch has only full batches


# -- plot -----------------------------------------------------------------------------------------


def plot_runs(runs: Mapping[str, Sequence[dict]], png: Path, title: str = "") -> Path:
    """Held-out accuracy per round, one line per run (the style of edgetune.runner.plot_accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, rows in runs.items():
        rows = [r for r in rows if "accuracy" in r]
        ax.plot([r["round"] for r in rows], [r["accuracy"] for r in rows], marker="o", markersize=3, label=name)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("global held-out accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title or "EdgeTune simulation: accuracy per round", fontsize=9)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
