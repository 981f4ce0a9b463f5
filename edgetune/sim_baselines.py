"""The simulator's modes that aggregate nothing: sequential, independent and centralized
training, the baselines the federated modes are measured against. A mixin of Simulator
(edgetune/simulate.py), which provides the agents, their shards, training and records.
"""

from __future__ import annotations

import random
import time

import torch

from aggregator.strategies import StateDict, delta_of, global_norm
from edgetune.sim_config import planned_steps
from models.train import EvalResult


class BaselineModes:
    def _run_sequential(self) -> None:
        for r in range(1, self.cfg.rounds + 1):
            t0 = time.perf_counter()
            selected = self._selected(r)
            agents = {}
            self.backend.load(self.global_state)
            for i in selected:  # in agent order; each starts from the previous one's adapter
                before = self.backend.state()
                res = self.local_train(i, r)
                after = self.backend.state()
                agents[self.agent_ids[i]] = self._agent_metrics(self.agent_ids[i], res, min(res.examples_seen, len(self.shards[i])),
                                                                global_norm(delta_of(before, after)))
            if self.cfg.keep_trace:
                self.trace.append({"round": r, "global": self.global_state, "order": [self.agent_ids[i] for i in selected]})
            self.global_state = self.backend.state()
            self.version += 1
            self._record(self._round_row(r, selected, agents, t0, strategy="sequential"))

    def _run_independent(self) -> dict[str, StateDict]:
        states = {a: {k: t.clone() for k, t in self.global_state.items()} for a in self.agent_ids}
        evals: dict[str, EvalResult] = {}
        for i, a in enumerate(self.agent_ids):  # untrained: all the same
            evals[a] = self.backend.evaluate(self.test_data) if not evals else next(iter(evals.values()))
        for r in range(1, self.cfg.rounds + 1):
            t0 = time.perf_counter()
            selected = self._selected(r)
            agents = {}
            for i in selected:
                a = self.agent_ids[i]
                self.backend.load(states[a])
                res = self.local_train(i, r)
                new = self.backend.state()
                agents[a] = self._agent_metrics(a, res, min(res.examples_seen, len(self.shards[i])), global_norm(delta_of(states[a], new)))
                states[a] = new
                evals[a] = self.backend.evaluate(self.test_data)
            ev_t0 = time.perf_counter()
            per_agent = {a: {"accuracy": e.accuracy, "loss": e.loss} for a, e in evals.items()}
            for a, m in agents.items():
                m.update(per_agent[a])
            row = {"round": r, "outcome": "complete", "selected": [self.agent_ids[i] for i in selected],
                   "answered": list(agents), "dropped": [],
                   "accuracy": sum(e.accuracy for e in evals.values()) / len(evals),
                   "loss": sum(e.loss for e in evals.values()) / len(evals),
                   "eval_examples": len(self.test_data), "eval_seconds": time.perf_counter() - ev_t0,
                   "version": 0, "num_examples": sum(m["examples"] for m in agents.values()),
                   "train_loss": sum(m["train_loss"] for m in agents.values()) / max(len(agents), 1),
                   "strategy": "none", "accuracy_min": min(e.accuracy for e in evals.values()),
                   "accuracy_max": max(e.accuracy for e in evals.values()), "agent_accuracy": per_agent,
                   "duration_s": time.perf_counter() - t0, "agents": agents}
            self._record(row)
        self.backend.load(self.global_state)
        return states

    def _run_centralized(self) -> None:
        cfg = self.cfg
        n_pool = len(self.train_examples)
        for r in range(1, cfg.rounds + 1):
            t0 = time.perf_counter()
            selected = self._selected(r)
            budget = sum(planned_steps(len(self.shards[i]), epochs=cfg.local_epochs, max_steps=cfg.local_steps,
                                       batch_size=cfg.batch_size)[1] for i in selected)
            # exactly `budget` examples of the pooled data (seeded permutations, repeated if needed),
            # one pass in batches of batch_size
            rng = random.Random(f"{cfg.seed}:centralized:{r}")
            picks: list[int] = []
            while len(picks) < budget:
                perm = list(range(n_pool))
                rng.shuffle(perm)
                picks.extend(perm[: budget - len(picks)])
            data = self.backend.data([self.train_examples[j] for j in picks])
            self.backend.load(self.global_state)
            seed = self.train_seed(0, r)
            torch.manual_seed(seed)
            res = self.backend.train(data, epochs=1, max_steps=0, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)
            self.global_state = self.backend.state()
            self.version += 1
            row = {"round": r, "outcome": "complete", "selected": [self.agent_ids[i] for i in selected],
                   "answered": ["pooled"], "dropped": [], **self._evaluate(), "version": self.version,
                   "num_examples": res.examples_seen, "federated_examples": budget, "steps": res.steps,
                   "train_loss": res.mean_loss, "strategy": "centralized"}
            row["duration_s"] = time.perf_counter() - t0
            self._record(row)

