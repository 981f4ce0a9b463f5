"""The live progress of a run, from what the fleet says on the broker. Pure: no paho, no terminal.

The runner's monitor (edgetune/progress_monitor.py) decodes the retained round announcement,
globals and agent statuses and the agents' evaluation reports, and feeds them here together with
the aggregator's metrics rows; this model answers two ways:

    p = RunProgress(rounds=5)
    p.feed(message, now)     # an AgentStatus, RoundAnnouncement, GlobalAdapter or EvalReport
    p.cleared("agent-3")     # an agent's retained status was cleared (empty payload)
    p.row(row)               # a metrics.jsonl row (a round's train loss per agent; evaluation done)
    p.take_lines()           # plain lines of what changed since the last call (not a TTY)
    p.view(now, width)       # the lines of the compact live view (a TTY redraws them in place)

Plain lines come only on changes: a round starting, a global published, a version's evaluation
complete, and agents changing state, net since the last call and grouped by state (one line for
all the agents that started training), so a fleet of a hundred prints a few lines per round,
not hundreds. A training step is shown only in the live view: a training agent's status carries
`step`/`steps` (the steps done in the round, of those planned), refreshed every few seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from broker.messages import AgentState, AgentStatus, EvalReport, GlobalAdapter, RoundAnnouncement

GONE = (AgentState.offline.value, AgentState.refused.value)  # states of agents that will not evaluate
MAX_NAMES = 6  # agents named in one plain line; more are counted
KEEP_VERSIONS = 8  # versions whose evaluation reports are kept


def natural_key(name: str) -> list:
    """agent-2 before agent-10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def clock(seconds: float) -> str:
    seconds = int(max(0, round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


@dataclass
class AgentView:
    agent_id: str
    state: str = ""  # an AgentState value ("": no status yet)
    global_version: int = -1
    num_examples: int = 0
    eval_examples: int = 0
    reason: str | None = None  # why it refused
    step: int | None = None  # a training agent's status: the steps done in this round, of `steps`
    steps: int | None = None
    train_loss: float | None = None  # its last round's mean training loss (from the metrics rows)
    reported: str = ""  # the state the plain lines last gave


class RunProgress:
    def __init__(self, rounds: int = 0) -> None:
        self.rounds = rounds  # the run's rounds (0: not known)
        self.agents: dict[str, AgentView] = {}
        self.announcement: RoundAnnouncement | None = None
        self.global_version: int | None = None  # the newest global published
        self.global_round = 0
        self.reports: dict[int, set[str]] = {}  # version -> the agents that reported their evaluation of it
        self.evaluated: set[int] = set()  # versions whose evaluation is complete (said, or in the metrics)
        self._events: list[str] = []  # plain lines waiting for take_lines, in order

    # -- input -------------------------------------------------------------------------------
    def feed(self, msg, now: float | None = None) -> None:
        """One decoded message; `now` (unix time of its arrival) gives a new round's line its time left."""
        if isinstance(msg, AgentStatus):
            self.status(msg)
        elif isinstance(msg, RoundAnnouncement):
            self.announce(msg, now)
        elif isinstance(msg, GlobalAdapter):
            self.published(msg)
        elif isinstance(msg, EvalReport):
            self.evaluation(msg)

    def status(self, st: AgentStatus) -> None:
        a = self.agents.setdefault(st.agent_id, AgentView(st.agent_id))
        a.state = st.state.value if isinstance(st.state, AgentState) else str(st.state)
        a.global_version, a.num_examples, a.eval_examples = st.global_version, st.num_examples, st.eval_examples
        a.reason = st.reason
        a.step, a.steps = st.step, st.steps
        self._check_evaluation()  # an agent gone offline is no longer awaited

    def cleared(self, agent_id: str) -> None:
        self.agents.pop(agent_id, None)

    def announce(self, ann: RoundAnnouncement, now: float | None = None) -> None:
        old = self.announcement
        self.announcement = ann
        if old is not None and (old.round, old.final, old.run_id) == (ann.round, ann.final, ann.run_id):
            return  # the same announcement again (a reconnect's retained copy)
        if ann.final:
            self._events.append(f"the aggregator announced the end of the run (after round {ann.round})")
        else:
            deadline = f", deadline in {clock(ann.deadline - now)}" if now is not None else ""
            self._events.append(f"round {self._of(ann.round)} started: {len(ann.selected)} agents selected, from "
                                f"global v{ann.global_version}{deadline}")

    def published(self, g: GlobalAdapter) -> None:
        if self.global_version is not None and g.version <= self.global_version:
            return
        self.global_version, self.global_round = g.version, g.round
        self._events.append(f"global v{g.version} published" + (f" (round {g.round})" if g.round else " (initial)"))
        self._check_evaluation()

    def evaluation(self, r: EvalReport) -> None:
        self.reports.setdefault(r.version, set()).add(r.agent_id)
        for old in sorted(self.reports)[:-KEEP_VERSIONS]:
            del self.reports[old]
        self._check_evaluation()

    def row(self, row: dict) -> None:
        """A metrics row: each agent's training loss of the round; a federated evaluation row closes its version."""
        if row.get("eval") == "federated":
            self.evaluated.add(row["version"])
            return
        for agent, figures in (row.get("agents") or {}).items():
            if agent in self.agents and figures.get("train_loss") is not None:
                self.agents[agent].train_loss = figures["train_loss"]

    # -- evaluation --------------------------------------------------------------------------
    def expected(self, version: int) -> set[str]:
        """The agents whose evaluation of `version` is awaited: those up with a held-out slice, and any that
        reported it."""
        up = {a.agent_id for a in self.agents.values() if a.eval_examples > 0 and a.state and a.state not in GONE}
        return up | self.reports.get(version, set())

    def _check_evaluation(self) -> None:
        v = self.global_version
        if v is None or v in self.evaluated:
            return
        got, expected = self.reports.get(v, set()), self.expected(v)
        if got and got >= expected:
            self.evaluated.add(v)
            self._events.append(f"global v{v} evaluated on the devices: {len(got)}/{len(expected)} agents reported")

    # -- output ------------------------------------------------------------------------------
    def take_lines(self) -> list[str]:
        """What changed since the last call, as plain lines: the events in order, then the agents' changes
        of state (net: an agent that went training and back to idle since the last call shows idle)."""
        lines, self._events = self._events, []
        by_state: dict[str, list[AgentView]] = {}
        for a in sorted(self.agents.values(), key=lambda a: natural_key(a.agent_id)):
            if a.state and a.state != a.reported:
                by_state.setdefault(a.state, []).append(a)
                a.reported = a.state
        for state, agents in by_state.items():
            if state == AgentState.refused.value:
                lines += [f"{a.agent_id} refused: {a.reason or 'no reason given'}" for a in agents]
            elif len(agents) == 1:
                lines.append(f"{agents[0].agent_id} {state}{self._detail(agents[0])}")
            else:
                names = ", ".join(a.agent_id for a in agents[:MAX_NAMES])
                more = f" and {len(agents) - MAX_NAMES} more" if len(agents) > MAX_NAMES else ""
                lines.append(f"{len(agents)} agents {state}: {names}{more}")
        return lines

    @staticmethod
    def _detail(a: AgentView) -> str:
        if a.state == AgentState.online.value:
            return f" ({a.num_examples} examples)"
        if a.global_version >= 0 and a.state != AgentState.offline.value:
            return f" (global v{a.global_version})"
        return ""

    def view(self, now: float, width: int = 100, max_agents: int = 12) -> list[str]:
        """The live view at unix time `now`: the round and its deadline, the newest global and its
        evaluation, then one line per agent (the first `max_agents`, the rest counted by state);
        every line cut to `width` characters."""
        ann = self.announcement
        if ann is None:
            head = "waiting for the aggregator's first round"
        elif ann.final:
            head = f"run over after round {self._of(ann.round)}"
        else:
            left = ann.deadline - now
            deadline = f"deadline in {clock(left)}" if left >= 0 else f"deadline passed {clock(-left)} ago"
            head = (f"round {self._of(ann.round)}  {len(ann.selected)} selected  from global v{ann.global_version}  "
                    f"{deadline}")
        lines = [head]
        if self.global_version is not None:
            line = f"global v{self.global_version}" + (f" (round {self.global_round})" if self.global_round else
                                                        " (initial)")
            v = self.global_version
            got, expected = len(self.reports.get(v, ())), len(self.expected(v))
            if v in self.evaluated:
                line += f"  evaluated on the devices ({got}/{expected})" if got else "  evaluated"
            elif expected:
                line += f"  evaluation: {got}/{expected} agents reported"
            lines.append(line)
        agents = sorted(self.agents.values(), key=lambda a: natural_key(a.agent_id))
        name_w = max((len(a.agent_id) for a in agents[:max_agents]), default=0)
        selected = set(ann.selected) if ann is not None and not ann.final else set()
        steps = any(a.step is not None for a in agents[:max_agents])  # a column only where some status has one
        for a in agents[:max_agents]:
            lines.append(self._agent_line(a, name_w, a.agent_id in selected, steps))
        if len(agents) > max_agents:
            counts: dict[str, int] = {}
            for a in agents[max_agents:]:
                counts[a.state or "unknown"] = counts.get(a.state or "unknown", 0) + 1
            lines.append(f"  and {len(agents) - max_agents} more: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        return [x[:width] for x in lines]

    @staticmethod
    def _agent_line(a: AgentView, name_w: int, selected: bool, steps: bool) -> str:
        if a.state == AgentState.refused.value:
            return f"{'*' if selected else ' '} {a.agent_id:<{name_w}}  refused: {a.reason or 'no reason given'}"
        step = ""
        if a.step is not None:
            step = f"step {a.step}/{a.steps}" if a.steps else f"step {a.step}"
        parts = [f"{'*' if selected else ' '} {a.agent_id:<{name_w}}", f"{a.state or '?':<8}"] + \
            ([f"{step:<13}"] if steps else []) + \
            [f"{a.num_examples:>7} examples", f"global v{a.global_version}" if a.global_version >= 0 else "no global"]
        if a.train_loss is not None:
            parts.append(f"loss {a.train_loss:.4f}")
        return "  ".join(parts).rstrip()

    def _of(self, round_number: int) -> str:
        return f"{round_number}/{self.rounds}" if self.rounds else str(round_number)
