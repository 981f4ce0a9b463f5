"""In-process federated simulator: the service's strategies and learning modes without a broker.

N simulated agents, each with a shard of the training split (data/partition.py), train one
shared model instance in turn: the simulator swaps adapter states in and out
(`load_adapter_state` / `adapter_state`) instead of building N models, and hands the agents'
states to the same pure pieces the MQTT service uses (aggregator/strategies.py,
aggregator/privacy.py, aggregator/async_buffer.py, aggregator/rounds.select_agents).

Modes (`SimConfig.mode`):

    fedavg       each round the selected agents train from the global; `strategy` (any name in
                 aggregator.strategies.STRATEGIES, options in `strategy_options`) combines them
    fedprox      fedavg + the agents' proximal term mu/2 ||w - w_global||^2 (`prox_mu`)
    fedadam      fedavg with strategy "fedadam" (server Adam on the mean delta)
    sequential   the adapter passes from agent to agent within a round (selected agents in
                 agent order); the last agent's adapter is the new global
    independent  each agent trains its own adapter and never aggregates; a round's accuracy
                 is the mean over agents of their own model's held-out accuracy (per-agent
                 numbers in the row's "agents")
    centralized  one model on the pooled training data; each round it sees exactly as many
                 examples as the round's agents saw together (a seeded sample of the pool, one
                 pass in batches of batch_size, from a fresh AdamW as the agents' rounds do)
    async        FedBuff (AsyncBuffer): agents of different speeds (`speeds`, seconds per local
                 step, simulated time) train from whatever global is current when they start
                 and send when done; every `buffer_size` updates make a server step (a
                 "round" in the metrics). It runs rounds * buffer_size local updates in all,
                 then flushes what is left.

Participation (sync modes): each round k = max(min_agents, round(participation * N)) agents,
chosen with `select_agents(agents, k, round, seed)`, the service's seeded selection.

Attackers: `attackers` agents (chosen with a seeded generator, `SimResult.attackers`) replace
their honest delta d = w_trained - w_global by `attack_scale * d` (attack="scale") or by
`-flip_scale * d` (attack="flip") before sending.

Differential privacy: strategy "dp_fedavg" with strategy_options clip_norm and
noise_multiplier; the simulator fills in num_agents = N (so the accountant's sample rate is
n / N each round), seed = the run's seed and delta = 1e-5 unless given, and records the
accountant's epsilon after every round.

Models (`SimConfig.model`):

    "full"  the real edge classifier (MiniLM pruned to spec.num_layers, LoRA r=8 on
            query/value, classifier head), trained with models.train.train_local.
    "head"  the cached-feature model, for tests and quick comparisons: the frozen pruned
            encoder's mean-pooled sentence embeddings, computed once and cached on disk
            (safetensors, keyed by text), feed a trainable head = a 384x384 dense + tanh
            (initialised from the checkpoint's pooler) with a peft LoRA adapter (same r and
            alpha as the spec) on the dense, then a new linear classifier (peft
            modules_to_save), exactly as the real model's adapter. Same optimizer, batching,
            seeds and loss as train_local. It learns what a LoRA head on a frozen encoder can
            learn (about 0.80 on VADER), not what adapting the encoder adds.

Output: `output/metrics.jsonl`, one JSON row per round in the service's format (round,
outcome, selected, answered, dropped, accuracy, loss, eval_examples, eval_seconds, version,
num_examples, train_loss, aggregation_s, duration_s), plus "mode", "strategy" and per-agent
metrics under "agents" ({agent: {steps, examples, train_loss, update_norm, attacker, and
accuracy/loss where evaluated}}), DP and robust-strategy diagnostics where they apply; and
`output/accuracy.png`, held-out accuracy per round. Round 0 is the initial global.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping

import torch

from aggregator.strategies import ClientUpdate, StateDict, delta_of, global_norm, make_strategy
from broker.messages import ModelUpdate
from data.records import LabelledText
from edgetune.sim_backends import (FullBackend, HeadBackend, HeadModule, default_cache_dir, make_backend,  # noqa: F401
                                   sentence_features, text_key)
from edgetune.sim_baselines import BaselineModes
from edgetune.sim_config import (ATTACKS, DEFAULT_DP_DELTA, FAULTS, MODELS, MODES, SimConfig, SimResult,  # noqa: F401
                                 SimulationError, agents_per_round, load_examples, load_splits, make_shards,
                                 planned_steps, plot_runs, poison)
from models.train import TrainResult, anchored_proximal

__all__ = ["ATTACKS", "DEFAULT_DP_DELTA", "FAULTS", "MODELS", "MODES", "FullBackend", "HeadBackend", "HeadModule",
           "SimConfig", "SimResult", "SimulationError", "Simulator", "agents_per_round", "compare", "default_cache_dir",
           "load_examples", "load_splits", "make_backend", "make_shards", "planned_steps", "plot_runs", "poison",
           "run_simulation", "sentence_features", "text_key"]

# -- the simulator ----------------------------------------------------------------------------------


class Simulator(BaselineModes):
    """One run of one configuration. `backend` may be shared between runs (compare()): the
    simulator resets it to its initial adapter state first."""

    def __init__(self, cfg: SimConfig, *, backend=None, splits: tuple[list[LabelledText], list[LabelledText]] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        cfg.check()
        self.cfg = cfg
        self.log = log or (lambda s: None)
        self.train_examples, self.test_examples = splits if splits is not None else load_splits(cfg)
        self.shards = make_shards(cfg, self.train_examples)
        self.agent_ids = [f"agent-{i + 1}" for i in range(cfg.agents)]
        self.backend = backend or make_backend(cfg, self.train_examples + self.test_examples, self.log)
        if getattr(self.backend, "log", None) is None:
            self.backend.log = self.log
        self.shard_data = [self.backend.data(s) for s in self.shards]
        self.test_data = self.backend.data(self.test_examples)
        k = cfg.attackers if cfg.attack else 0
        self.attackers = sorted(random.Random(f"{cfg.seed}:attackers").sample(self.agent_ids, k)) if k else []
        self.rows: list[dict] = []
        self.trace: list[dict] = []

    # seeds: agent i (0-based) trains in round r with seed (seed + i) * 100_003 + r, as the
    # service's agents do with EDGETUNE_TRAIN_SEED = seed + i
    def train_seed(self, agent_index: int, round_number: int) -> int:
        return (self.cfg.seed + agent_index) * 100_003 + round_number

    def local_train(self, agent_index: int, round_number: int, data=None, *, anchor: bool = False) -> TrainResult:
        """Train the backend's current adapter as agent `agent_index` would in that round."""
        cfg = self.cfg
        seed = self.train_seed(agent_index, round_number)
        torch.manual_seed(seed)  # dropout in the full model
        proximal = None
        if anchor and cfg.prox_mu > 0:
            proximal = anchored_proximal([p for p in self.backend.model.parameters() if p.requires_grad], cfg.prox_mu)
        return self.backend.train(self.shard_data[agent_index] if data is None else data, epochs=cfg.local_epochs,
                                  max_steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                                  proximal=proximal)

    # -- output ------------------------------------------------------------------------------------
    def _evaluate(self) -> dict:
        t0 = time.perf_counter()
        r = self.backend.evaluate(self.test_data)
        return {"accuracy": r.accuracy, "loss": r.loss, "eval_examples": r.n, "eval_seconds": time.perf_counter() - t0}

    def _record(self, row: dict) -> None:
        row = {"mode": self.cfg.mode, **row} if "mode" not in row else row
        self.rows.append(row)
        if self.metrics_path is not None:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if "accuracy" in row:
            self.log(f"{self.cfg.mode:>11} round {row['round']:>3}: accuracy {row['accuracy']:.4f}  loss {row['loss']:.4f}")

    def _agent_metrics(self, aid: str, res: TrainResult, n: int, norm: float | None) -> dict:
        m = {"steps": res.steps, "examples": n, "train_loss": res.mean_loss}
        if norm is not None:
            m["update_norm"] = norm
        m["attacker"] = aid in self.attackers
        return m

    def _train_agent(self, i: int, current: StateDict, round_number: int) -> tuple[ClientUpdate, dict]:
        aid = self.agent_ids[i]
        self.backend.load(current)
        res = self.local_train(i, round_number, anchor=True)
        tensors = self.backend.state()
        n = min(res.examples_seen, len(self.shards[i]))
        metrics = self._agent_metrics(aid, res, n, None)
        if self.cfg.eval_agents or (self.cfg.eval_agents is None and self.cfg.model == "head"):
            metrics.update({k: v for k, v in self._evaluate().items() if k in ("accuracy", "loss")})
        if aid in self.attackers:
            tensors = poison(current, tensors, self.cfg.attack,
                             self.cfg.attack_scale if self.cfg.attack == "scale" else self.cfg.flip_scale)
        metrics["update_norm"] = global_norm(delta_of(current, tensors))
        return ClientUpdate(aid, tensors, n, nonce=f"r{round_number}-{aid}"), metrics

    # -- run -----------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.metrics_path = None
        if cfg.output is not None:
            out = Path(cfg.output)
            out.mkdir(parents=True, exist_ok=True)
            self.metrics_path = out / "metrics.jsonl"
            self.metrics_path.write_text("")
        self.backend.load(self.backend.initial_state)
        self.global_state = self.backend.state()
        self.version = 0
        self._record({"round": 0, "version": 0, **self._evaluate()})
        agent_states: dict[str, StateDict] = {}
        run = {"fedavg": self._run_sync, "fedprox": self._run_sync, "fedadam": self._run_sync,
               "sequential": self._run_sequential, "independent": self._run_independent,
               "centralized": self._run_centralized, "async": self._run_async}[cfg.mode]
        extra = run()
        if cfg.mode == "independent":
            agent_states = extra
        result = SimResult(cfg, self.rows, self.global_state, self.agent_ids, self.attackers, agent_states,
                           self.trace, time.perf_counter() - t0, self.metrics_path)
        if self.metrics_path is not None and cfg.plot:
            title = f"{cfg.mode} ({cfg.resolved_strategy() if cfg.mode in ('fedavg', 'fedprox', 'fedadam') else cfg.mode}), " \
                    f"{cfg.agents} agents, {cfg.partition}, model {cfg.model}"
            result.plot_path = plot_runs({cfg.mode: self.rows}, self.metrics_path.parent / "accuracy.png", title)
        return result

    def _selected(self, round_number: int) -> list[int]:
        from aggregator.rounds import select_agents

        chosen = set(select_agents(self.agent_ids, agents_per_round(self.cfg), round_number, self.cfg.seed))
        return [i for i, a in enumerate(self.agent_ids) if a in chosen]

    def _strategy(self):
        cfg = self.cfg
        name = cfg.resolved_strategy()
        opts = dict(cfg.strategy_options)
        if name == "dp_fedavg":
            if "sampling_rate" not in opts:
                opts.setdefault("num_agents", cfg.agents)
            opts.setdefault("seed", cfg.seed)
            opts.setdefault("delta", DEFAULT_DP_DELTA)
        return make_strategy(name, **opts)

    def _round_row(self, number: int, selected: list[int], agents: dict, t0: float, **extra) -> dict:
        ids = [self.agent_ids[i] for i in selected]
        row = {"round": number, "outcome": "complete", "selected": ids, "answered": list(agents), "dropped": [],
               **self._evaluate(), "version": self.version,
               "num_examples": sum(a["examples"] for a in agents.values()),
               "train_loss": sum(a["train_loss"] for a in agents.values()) / max(len(agents), 1)}
        row.update(extra)
        row["duration_s"] = time.perf_counter() - t0
        row["agents"] = agents
        return row

    def _coordinator_options(self) -> dict:
        cfg = self.cfg
        return dict(quorum=cfg.min_agents, timeout_s=cfg.round_timeout_s, seed=cfg.seed,
                    selection_size=lambda online: agents_per_round(cfg), task_hash=cfg.task_hash)

    def _run_sync(self) -> None:
        """Rounds through the service's coordinator (selection, validation, strategy, record) on a
        virtual clock; cfg.faults makes agents lost, late or malformed."""
        from aggregator.coordinator import SyncCoordinator

        cfg = self.cfg
        strategy = self._strategy()
        coord = SyncCoordinator(strategy, self.global_state, **self._coordinator_options())
        online = list(self.agent_ids)
        late: list[tuple] = []  # updates that reach the coordinator after their round's deadline
        clock = 0.0
        for r in range(1, cfg.rounds + 1):
            t0 = time.perf_counter()
            deliveries = [self._deliver(coord, meta, tensors, clock) for meta, tensors in late]
            late = []
            rnd, _ = coord.open_round(online, clock)
            updates, agents = [], {}
            for i in [i for i, a in enumerate(self.agent_ids) if a in rnd.selected]:
                aid = self.agent_ids[i]
                fault = cfg.faults.get(r, {}).get(aid)
                if fault == "lost":
                    online.remove(aid)
                    coord.agent_offline(aid, clock)
                    deliveries.append({"kind": "offline", "agent_id": aid})
                    continue
                u, m = self._train_agent(i, self.global_state, r)
                meta = ModelUpdate(agent_id=aid, round=r, base_version=coord.version, num_examples=u.num_examples,
                                   nonce=u.nonce, train_loss=m["train_loss"], task_hash=cfg.task_hash)
                tensors = dict(u.tensors)
                if fault == "malformed":
                    first = sorted(tensors)[0]
                    tensors[first] = torch.full_like(tensors[first], float("nan"))
                if fault == "late":
                    late.append((meta, tensors))
                    continue
                deliveries.append(self._deliver(coord, meta, tensors, clock))
                if deliveries[-1]["reason"] is None:
                    updates.append(u)
                    agents[aid] = m
            rec = coord.poll(clock)
            if rec is None:  # someone did not answer: the deadline passes
                clock = rnd.deadline + cfg.round_timeout_s / 2
                rec = coord.poll(clock)
            clock += cfg.round_timeout_s / 10
            if cfg.keep_trace:
                self.trace.append({"round": r, "global": self.global_state, "updates": updates, "new": rec.new_state,
                                   "deliveries": deliveries})
            if rec.new_state is None:
                self._record(rec.row(strategy=strategy.name, duration_s=time.perf_counter() - t0))
                continue
            self.backend.load(rec.new_state)
            self.global_state = self.backend.state()
            coord.set_global(self.global_state)
            self.version = rec.version
            self._record(rec.row(**self._evaluate(), strategy=strategy.name, agents=agents,
                                 **strategy.diagnostics(), duration_s=time.perf_counter() - t0))

    @staticmethod
    def _deliver(coord, meta: ModelUpdate, tensors: dict, now: float) -> dict:
        v = coord.offer(meta, tensors, now)
        return {"kind": "update", "agent_id": meta.agent_id, "meta": meta, "tensors": tensors, "reason": v.reason}

    def _run_async(self) -> None:
        """Buffered async aggregation through the service's AsyncCoordinator (edgetune/sim_async.py)."""
        from edgetune.sim_async import AsyncRun

        AsyncRun(self).run()


def run_simulation(cfg: SimConfig, *, backend=None, splits=None, log: Callable[[str], None] | None = None) -> SimResult:
    return Simulator(cfg, backend=backend, splits=splits, log=log).run()


def compare(configs: Mapping[str, SimConfig], *, output: Path | None = None,
            log: Callable[[str], None] | None = None) -> dict[str, SimResult]:
    """Run several configurations on the same data and one shared model instance.

    All configs must agree on the model, spec, data and limits (so that splits and the model
    are the same); each run's files go to output/<name>/, and output/accuracy.png overlays them."""
    if not configs:
        raise SimulationError("nothing to compare")
    first = next(iter(configs.values()))
    key = lambda c: (c.model, c.spec, c.data, c.train_limit, c.eval_limit, c.data_seed, c.cache_dir, c.device)  # noqa: E731
    for name, c in configs.items():
        if key(c) != key(first):
            raise SimulationError(f"config {name!r} differs from the first in model, spec, data or data sample; "
                                  "compare runs on one model and one split")
        c.check()
    splits = load_splits(first)
    backend = make_backend(first, splits[0] + splits[1], log)
    results = {}
    for name, c in configs.items():
        if output is not None:
            c = replace(c, output=Path(output) / name)
        results[name] = run_simulation(c, backend=backend, splits=splits, log=log)
    if output is not None:
        Path(output).mkdir(parents=True, exist_ok=True)
        plot_runs({n: r.rows for n, r in results.items()}, Path(output) / "accuracy.png",
                  f"{first.agents} agents, {first.partition}, model {first.model}")
    return results
