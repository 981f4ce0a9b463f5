"""The round engine: pure coordinators that every driver of a fleet runs.

A coordinator takes events (an agent came online or went offline, a round opened, an update
arrived, time passed) with the time they happened, decides (accept or refuse, when a round is
over, how to combine), and answers with typed results: a `Verdict` per update and a
`RoundRecord` per finished round or buffer step, carrying the new global state when there is
one. It owns the strategy and the global state it aggregates into; it has no broker, no clock,
no model and no metrics. Drivers:

- the MQTT service (aggregator/service.py): events from the broker, time.time() as the clock;
- the in-process simulator (edgetune/simulate.py): simulated agents, a virtual clock.

Both therefore run the same selection, validation, replay protection, strategy calls and
records. `SyncCoordinator` runs rounds (rounds.Round: selected agents, deadline, quorum);
`AsyncCoordinator` runs buffered asynchronous aggregation (async_buffer.AsyncBuffer, FedBuff).
A driver loads a record's `new_state` into its model and hands the model's state back with
`set_global` (so the next round starts from exactly what agents receive).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from aggregator.async_buffer import AsyncBuffer
from aggregator.rounds import Outcome, Rejection, Round, over_selected, select_agents
from aggregator.strategies import ClientUpdate, InvalidUpdate, report
from broker.messages import ModelUpdate

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Verdict:
    """What became of one update: accepted, queued for the next round, or refused (`reason` is the metrics label)."""

    agent_id: str
    reason: str | None = None
    message: str = ""
    queued: bool = False

    @property
    def accepted(self) -> bool:
        return self.reason is None and not self.queued


@dataclass
class RoundRecord:
    """One finished round (or async buffer step): who was asked, who counted, who was refused, what came of it."""

    round: int
    outcome: str  # complete, deadline, failed, drain
    selected: list[str]
    answered: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"agent_id", "reason"} of updates refused since the last record
    lost: list[str] = field(default_factory=list)  # selected agents that went offline during the round
    version: int = 0  # the global version after this round
    agents: dict[str, dict] = field(default_factory=dict)  # per-agent figures of the updates that counted
    strategy: dict[str, Any] = field(default_factory=dict)  # the strategy's own report of its last aggregate
    applied: list[dict] | None = None  # async: each applied update's base version, staleness and weight
    pending: int | None = None  # async, failed step: updates in the buffer at the deadline
    error: str | None = None
    aggregation_s: float | None = None
    new_state: StateDict | None = field(default=None, repr=False)  # the new global (None: it stays as it was)

    def row(self, **extra: Any) -> dict:
        """The metrics.jsonl row: the one place a row is built; `extra` adds the driver's figures
        (evaluation, durations, per-agent extras under "agents")."""
        row: dict[str, Any] = {"round": self.round, "outcome": self.outcome, "selected": list(self.selected),
                               "answered": list(self.answered), "dropped": list(self.dropped),
                               "rejected": list(self.rejected), "version": self.version}
        if self.lost:
            row["lost"] = list(self.lost)
        if self.error is not None:
            row["error"] = self.error
        if self.pending is not None:
            row["pending"] = self.pending
        if self.new_state is not None:
            agent_extra = extra.pop("agents", {})
            agents = {a: {**m, **agent_extra.get(a, {})} for a, m in self.agents.items()}
            counted = self.applied if self.applied is not None else self.agents.values()  # async: every applied update
            row.update(num_examples=sum(m["num_examples"] for m in counted),
                       train_loss=_mean([m["train_loss"] for m in self.agents.values()]))
            if self.aggregation_s is not None:
                row["aggregation_s"] = self.aggregation_s
            if self.applied is not None:
                row["applied"] = list(self.applied)
            row.update(self.strategy)
            row["agents"] = agents
        row.update(extra)
        return row


def agent_figures(meta: ModelUpdate) -> dict:
    """Per-agent figures of an update that counted, as the agent reported them."""
    return {"num_examples": meta.num_examples, "train_loss": meta.train_loss, "train_seconds": meta.train_seconds,
            "base_version": meta.base_version}


def _mean(xs: Iterable[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


class _Coordinator:
    """What both coordinators share: selection, replay protection, the record of refusals and losses."""

    def __init__(self, *, quorum: int, timeout_s: float, seed: int, selection_size: Callable[[int], int],
                 round_number: int = 0, task_hash: str = "", over_selection: float = 1.0) -> None:
        self.quorum, self.timeout_s, self.seed = quorum, timeout_s, seed
        self.task_hash = task_hash  # updates must carry it ("": no task check)
        self.selection_size = selection_size  # the updates a round needs, of this many online (0: all)
        self.over_selection = over_selection  # ask this many times as many agents; the first ones complete it
        self.round_number = round_number
        self._seen: set[tuple[str, int, str]] = set()
        self._rejected: list[dict] = []
        self._lost: list[str] = []

    def select(self, online: Iterable[str], number: int | None = None) -> tuple[str, ...]:
        """The agents a round (by default the next one) asks, from those online: seeded by (seed, round)."""
        online = list(online)
        number = self.round_number + 1 if number is None else number
        k = over_selected(self.selection_size(len(online)), len(online), self.over_selection)
        return select_agents(online, k, number, self.seed)

    def target(self, online: int) -> int:
        """Updates that complete a round (0: every agent selected); below the selection with over-selection."""
        k = self.selection_size(online)
        return k if self.over_selection > 1 and k and k < online else 0

    def _refuse(self, agent_id: str, reason: str, message: str) -> Verdict:
        self._rejected.append({"agent_id": agent_id, "reason": reason})
        return Verdict(agent_id, reason, message)

    def _replayed(self, meta: ModelUpdate) -> Verdict | None:
        """A replayed update, or one made for another task: refused before anything else."""
        key = (meta.agent_id, meta.round, meta.nonce)
        if key in self._seen:
            return self._refuse(meta.agent_id, "duplicate", f"replayed update {key}")
        if self.task_hash and meta.task_hash != self.task_hash:
            return self._refuse(meta.agent_id, "wrong_task", f"update from {meta.agent_id} made for task "
                                f"{meta.task_hash[:12] or '(none)'}, the fleet's is {self.task_hash[:12]}")
        return None

    def _take_refusals(self) -> tuple[list[dict], list[str]]:
        rejected, lost = self._rejected, self._lost
        self._rejected, self._lost = [], []
        return rejected, lost


class SyncCoordinator(_Coordinator):
    """Synchronous rounds: open a round for the selected agents, take their updates until every
    one answered or the deadline passed, then aggregate with the strategy (quorum permitting)."""

    def __init__(self, strategy, global_state: Mapping[str, torch.Tensor], *, quorum: int, timeout_s: float,
                 seed: int, selection_size: Callable[[int], int], version: int = 0, round_number: int = 0,
                 task_hash: str = "", over_selection: float = 1.0) -> None:
        super().__init__(quorum=quorum, timeout_s=timeout_s, seed=seed, selection_size=selection_size,
                         round_number=round_number, task_hash=task_hash, over_selection=over_selection)
        self.strategy = strategy
        self.global_state: StateDict = dict(global_state)
        self.version = version
        self.round: Round | None = None
        self._early: dict[str, tuple[ModelUpdate, dict]] = {}  # next round's updates that came first

    def set_global(self, state: Mapping[str, torch.Tensor]) -> None:
        self.global_state = dict(state)

    def open_round(self, online: Iterable[str], now: float) -> tuple[Round, list[Verdict]]:
        """Open the next round for the agents `select(online)` picks; updates for it that came
        early are offered now (their verdicts are returned with the round)."""
        number = self.round_number + 1
        online = list(online)
        selected = self.select(online, number)
        self.round = Round(number, selected, now + self.timeout_s, self.version, self.quorum, self.global_state,
                           target=self.target(len(online)))
        early, self._early = self._early, {}
        return self.round, [self.offer(meta, tensors, now) for meta, tensors in early.values() if meta.round == number]

    def agent_offline(self, agent_id: str, now: float) -> None:
        if self.round is not None and agent_id in self.round.selected and agent_id not in self.round.accepted:
            if agent_id not in self._lost:
                self._lost.append(agent_id)

    def offer(self, meta: ModelUpdate, tensors: dict[str, torch.Tensor], now: float) -> Verdict:
        replayed = self._replayed(meta)
        if replayed is not None:
            return replayed
        agent = meta.agent_id
        if meta.round <= self.round_number:  # whether or not the next round has opened yet
            return self._refuse(agent, "late", f"update from {agent} for round {meta.round}, which has closed")
        if self.round is None:
            if meta.round == self.round_number + 1 and meta.base_version == self.version:
                # the next round's update, queued by the broker while we were down (or raced ahead of
                # the announcement): kept until the round opens, checked then like any other
                self._early[agent] = (meta, tensors)
                return Verdict(agent, queued=True)
            return self._refuse(agent, "wrong_round", f"update from {agent} for round {meta.round} while no round is open")
        try:
            self.round.offer(meta, tensors, now)
        except Rejection as e:
            return self._refuse(agent, e.reason, str(e))
        self._seen.add((agent, meta.round, meta.nonce))
        return Verdict(agent)

    def poll(self, now: float) -> RoundRecord | None:
        """The open round's record once it is over (every selected agent answered, or the deadline passed)."""
        rnd = self.round
        if rnd is None:
            return None
        outcome = rnd.status(now)
        if outcome is Outcome.collecting:
            return None
        self.round = None
        self.round_number = rnd.number
        rejected, lost = self._take_refusals()
        rec = RoundRecord(rnd.number, outcome.value, list(rnd.selected), sorted(rnd.accepted), rnd.dropped,
                          rejected, lost, self.version)
        if outcome is Outcome.failed:
            return rec
        accepted = sorted(rnd.accepted.values(), key=lambda a: a.meta.agent_id)
        # checked at the boundary (Round.offer): the strategy does not check them again
        updates = [ClientUpdate(a.meta.agent_id, a.tensors, a.meta.num_examples, checked=True) for a in accepted]
        t0 = time.perf_counter()
        try:
            new_state = self.strategy.aggregate(self.global_state, updates)
        except (ValueError, InvalidUpdate) as e:  # e.g. krum with fewer updates than it needs
            rec.outcome, rec.error = Outcome.failed.value, str(e)
            return rec
        rec.aggregation_s = time.perf_counter() - t0
        rec.agents = {a.meta.agent_id: agent_figures(a.meta) for a in accepted}
        rec.strategy = report(self.strategy)
        self.version += 1
        rec.version, rec.new_state = self.version, new_state
        return rec


class AsyncCoordinator(_Coordinator):
    """Buffered asynchronous aggregation (FedBuff): any online or once-selected agent's update,
    from the current global or one at most max_staleness versions older, goes into the buffer;
    a full buffer is the next global. A step that reaches its deadline applies a partial buffer
    of at least the quorum; `close()` ends the run, applying whatever is left ("drain")."""

    def __init__(self, buffer: AsyncBuffer, *, quorum: int, timeout_s: float, seed: int,
                 selection_size: Callable[[int], int], round_number: int = 0, task_hash: str = "") -> None:
        super().__init__(quorum=quorum, timeout_s=timeout_s, seed=seed, selection_size=selection_size,
                         round_number=round_number, task_hash=task_hash)
        self.buffer = buffer
        self.online: set[str] = set()
        self.selected_ever: set[str] = set()
        self.closed = False
        self._step: tuple[int, tuple[str, ...], float] | None = None  # (number, selected, deadline)
        self._metas: dict[str, ModelUpdate] = {}  # "agent:nonce" -> the updates in the buffer now
        self._done: list[RoundRecord] = []  # steps completed by a full buffer, not yet polled

    @property
    def version(self) -> int:
        return self.buffer.version

    @property
    def global_state(self) -> StateDict:
        return self.buffer.global_state

    def agent_online(self, agent_id: str) -> None:
        self.online.add(agent_id)

    def agent_offline(self, agent_id: str, now: float) -> None:
        self.online.discard(agent_id)

    def open_step(self, online: Iterable[str], now: float) -> tuple[str, ...]:
        """Announce the current global to the agents `select(online)` picks; they and the agents
        selected before may send updates until the step's deadline."""
        number = self.round_number + 1
        selected = self.select(online, number)
        self.selected_ever |= set(selected)
        self._step = (number, selected, now + self.timeout_s)
        return selected

    def offer(self, meta: ModelUpdate, tensors: dict[str, torch.Tensor], now: float) -> Verdict:
        replayed = self._replayed(meta)
        if replayed is not None:
            return replayed
        agent = meta.agent_id
        if self.closed:
            return self._refuse(agent, "wrong_round", f"update from {agent} after the run's last step")
        if agent not in self.online and agent not in self.selected_ever:
            return self._refuse(agent, "not_selected", f"update from {agent}, which is neither online nor selected")
        try:
            stepped = self.buffer.add(ClientUpdate(agent, tensors, meta.num_examples, base_version=meta.base_version,
                                                   nonce=meta.nonce))
        except InvalidUpdate as e:
            return self._refuse(agent, e.reason, f"update from {agent}: {e}")
        self._seen.add((agent, meta.round, meta.nonce))
        self._metas[f"{agent}:{meta.nonce}"] = meta
        if stepped is not None:
            self._done.append(self._applied("complete", stepped))
        return Verdict(agent)

    def poll(self, now: float) -> RoundRecord | None:
        """The next finished step: a full buffer, or at the deadline a partial one (or a failed step below the quorum)."""
        if self._done:
            return self._done.pop(0)
        if self._step is None or now <= self._step[2]:
            return None
        number, selected, _ = self._step
        if self.buffer.pending < self.quorum:
            self._step = None
            self.round_number = number
            rejected, lost = self._take_refusals()
            return RoundRecord(number, Outcome.failed.value, list(selected), rejected=rejected, lost=lost,
                               version=self.version, pending=self.buffer.pending)
        return self._applied(Outcome.deadline.value, self.buffer.flush())

    def close(self) -> RoundRecord | None:
        """End the run: refuse what comes after, apply what is in the buffer (a "drain" step) or None."""
        self.closed = True
        return self._applied("drain", self.buffer.flush()) if self.buffer.pending else None

    def _applied(self, outcome: str, new_state: StateDict) -> RoundRecord:
        if self._step is not None and outcome != "drain":
            number, selected = self._step[0], list(self._step[1])
        else:
            number, selected = self.round_number + 1, []
        self._step = None
        self.round_number = number
        applied = self.buffer.last_applied
        metas = [self._metas.pop(k) for k in list(self._metas)]
        rejected, lost = self._take_refusals()
        return RoundRecord(number, outcome, selected, answered=sorted({a.agent_id for a in applied}),
                           rejected=rejected, lost=lost, version=self.buffer.version,
                           agents={m.agent_id: agent_figures(m) for m in metas},
                           applied=[dict(agent_id=a.agent_id, base_version=a.base_version, staleness=a.staleness,
                                         num_examples=a.num_examples, weight=a.weight) for a in applied],
                           aggregation_s=0.0, new_state=new_state)
