"""The simulator's async mode: FedBuff through the service's AsyncCoordinator on a virtual clock.

Agent i takes steps x speeds[i] simulated seconds per local update and starts the next one from
whatever global is current when it has sent; every buffer_size updates make a server step (a
"round" in the metrics). rounds x buffer_size local updates in all, then close() applies what
is left (a "drain" step). With redeliver > 0 a delivery may come twice (MQTT QoS 1); the
coordinator refuses the copy. Part of the in-process simulator (edgetune/simulate.py).
"""

from __future__ import annotations

import heapq
import random
import time

from aggregator.async_buffer import AsyncBuffer
from aggregator.coordinator import AsyncCoordinator, RoundRecord
from broker.messages import ModelUpdate
from edgetune.sim_config import SimulationError, poison


class AsyncRun:
    def __init__(self, sim) -> None:
        self.sim = sim
        cfg = self.cfg = sim.cfg
        self.buf = AsyncBuffer(cfg.buffer_size, cfg.staleness_weight, cfg.staleness_a, global_state=sim.global_state,
                               server_lr=cfg.server_lr, max_staleness=cfg.max_staleness)
        self.coord = AsyncCoordinator(self.buf, **sim._coordinator_options())
        for a in sim.agent_ids:
            self.coord.agent_online(a)
        self.speeds = list(cfg.speeds) if cfg.speeds is not None else [1.0] * cfg.agents
        self.total = cfg.rounds * cfg.buffer_size
        self.heap: list[tuple[float, int, int]] = []  # (finish time, job number, agent index)
        self.jobs: dict[int, dict] = {}
        self.started = 0
        self.counts = [0] * cfg.agents
        if cfg.keep_trace:
            sim.trace.append({"globals": {0: dict(self.buf.global_state)}, "jobs": self.jobs, "deliveries": []})
        sim.async_stats = self.stats = {"delivered": 0, "duplicates_refused": 0, "stale_refused": 0, "applied": 0}

    def start(self, i: int, now: float) -> None:
        """Agent i starts its next local update from the current global (unless all are started)."""
        sim, cfg = self.sim, self.cfg
        if self.started >= self.total:
            return
        job = self.started
        self.started += 1
        self.counts[i] += 1
        aid = sim.agent_ids[i]
        current = self.buf.global_state
        sim.backend.load(current)
        res = sim.local_train(i, self.counts[i])
        tensors = sim.backend.state()
        if aid in sim.attackers:
            tensors = poison(current, tensors, cfg.attack, cfg.attack_scale if cfg.attack == "scale" else cfg.flip_scale)
        n = min(res.examples_seen, len(sim.shards[i]))
        self.jobs[job] = {"agent": aid, "base_version": self.buf.version, "nonce": f"{aid}-{self.counts[i]}",
                          "num_examples": n, "start": now, "finish": now + res.steps * self.speeds[i],
                          "train_loss": res.mean_loss, "steps": res.steps, "status": "in flight", "round": self.counts[i]}
        if cfg.keep_trace:
            self.jobs[job]["tensors"] = tensors
        self.jobs[job]["_tensors"] = tensors
        heapq.heappush(self.heap, (self.jobs[job]["finish"], job, i))

    def record_step(self, rec: RoundRecord, now: float, t_step: float) -> None:
        sim = self.sim
        sim.version = rec.version
        sim.backend.load(rec.new_state)
        sim.global_state = sim.backend.state()
        if self.cfg.keep_trace:
            sim.trace[0]["globals"][rec.version] = sim.global_state
        agents: dict[str, dict] = {}
        for a in rec.applied:
            m = agents.setdefault(a["agent_id"], {"updates": 0, "examples": 0, "staleness": [],
                                                  "attacker": a["agent_id"] in sim.attackers})
            m["updates"] += 1
            m["examples"] += a["num_examples"]
            m["staleness"].append(a["staleness"])
        ids = [a["agent_id"] for a in rec.applied]
        sim._record(rec.row(**sim._evaluate(), selected=ids, answered=ids, strategy="fedbuff", time=now,
                            max_staleness_seen=max(a["staleness"] for a in rec.applied),
                            duration_s=time.perf_counter() - t_step, agents=agents))

    def deliver(self, job: int, now: float, copies: int) -> None:
        """Offer the job's update (copies times) and record every step it completes."""
        j = self.jobs[job]
        meta = ModelUpdate(agent_id=j["agent"], round=j["round"], base_version=j["base_version"],
                           num_examples=j["num_examples"], nonce=j["nonce"], train_loss=j["train_loss"],
                           task_hash=self.cfg.task_hash)
        tensors = j.pop("_tensors")
        j["step"] = self.buf.version + 1  # the server step that will apply it, if taken
        for c in range(copies):
            self.stats["delivered"] += 1
            verdict = self.coord.offer(meta, tensors, now)
            if self.cfg.keep_trace:
                self.sim.trace[0]["deliveries"].append({"kind": "update", "agent_id": meta.agent_id, "meta": meta,
                                                        "tensors": tensors, "reason": verdict.reason})
            if verdict.reason == "stale":
                j["status"] = "stale"
                self.stats["stale_refused"] += 1
                continue
            if verdict.reason == "duplicate" and c > 0:  # the redelivered copy
                self.stats["duplicates_refused"] += 1
                continue
            if not verdict.accepted:
                raise SimulationError(f"the coordinator refused {j['agent']}'s update: {verdict.message}")
            j["status"] = "applied"
            self.stats["applied"] += 1
            while (rec := self.coord.poll(now)) is not None:
                self.record_step(rec, now, self.t_step)
                self.t_step = time.perf_counter()

    def run(self) -> None:
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}:redeliver")
        for i in range(cfg.agents):
            self.start(i, 0.0)
        self.t_step = time.perf_counter()
        now = 0.0
        while self.heap:
            now, job, i = heapq.heappop(self.heap)
            self.deliver(job, now, 2 if cfg.redeliver and rng.random() < cfg.redeliver else 1)
            self.start(i, now)
        rec = self.coord.close()
        if rec is not None:
            self.record_step(rec, now, self.t_step)
        for j in self.jobs.values():
            j.pop("_tensors", None)
        self.sim.async_jobs = self.jobs
