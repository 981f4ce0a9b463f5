"""The agent's side of the round protocol as a pure state machine (the twin of aggregator.rounds.Round).

No broker, no model, no disk, no clock of its own: a driver (edge_agent.runner.AgentRunner, the
real agent; edge_agent.light.LightAgent, the synthetic one) feeds it what arrives and does what it
answers. Every event method returns a list of typed actions, in the order to carry them out:

    events                                  actions
    connected()                             PublishStatus(online)
    on_announcement(RoundAnnouncement)      -   (recorded: acted on by poll)
    on_global(GlobalAdapter, tensors)       LoadGlobal (newer than held); confirm with global_loaded
    poll(now)   after the queue is drained  Finish | Skip | PublishStatus(training) + Train | Idle
    trained(round, update)                  SendUpdate (the update is in the outbox until sent)
    sent(round)                             PublishStatus(idle)
    restore(round, update)                  SendUpdate(resend=True) (a durable outbox after a restart)
    stop()                                  -   (no new work; an update trained after it is not sent)

The rules (each one a past fix; tests/test_agent_protocol.py drives them without a broker):

- Announcements only record; decisions wait for `poll`, which the driver calls once it has read
  its whole queue. A slow agent in an async fleet so starts from the newest announcement and
  global, not from each stale one it missed while it trained: the newest announcement that
  selects this agent replaces any earlier one.
- An announcement is for this agent if it selects it and the round is not answered yet (sent,
  in the outbox or in training). One that does not select it changes nothing.
- A round trains once the agent holds the announced global (announcement and global arrive in
  either order; a late joiner gets both as retained messages at connect). If the agent holds a
  newer global than the one announced, the round is stale: skipped.
- The final announcement ends the run once its global is held, or `final_grace_s` after it was
  first polled (the final global may never come). From then on no new round starts. A later
  non-final announcement clears it: a run (re)started after a retained final from an earlier run.
- An agent can outlive a run (a device daemon): announcements and globals carry the aggregator's
  run id, and one from another run than the machine's starts it afresh (no global held, no round
  answered, not finished), so the next run's round 1 and global v0 are not taken for stale ones.
  An empty run id (an aggregator that sends none) changes nothing.
- Retained messages need nothing special: a global no newer than the held one is ignored, and an
  answered round is not trained again (a cleared retained message never reaches the machine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from broker.messages import AgentState, GlobalAdapter, RoundAnnouncement

FINAL_GRACE_S = 30.0  # how long a final announcement waits for its global before the run ends anyway


# -- actions: what the driver does next ---------------------------------------------------------
@dataclass(frozen=True)
class PublishStatus:
    """Publish this agent's (retained) status with the held global version."""

    state: AgentState


@dataclass(frozen=True)
class LoadGlobal:
    """Install a newer global adapter; on success call `global_loaded(header.version)`."""

    header: GlobalAdapter
    tensors: Any

    @property
    def version(self) -> int:
        return self.header.version


@dataclass(frozen=True)
class Train:
    """Train locally for this round from the held global; then call `trained(round, update)`."""

    announcement: RoundAnnouncement

    @property
    def round(self) -> int:
        return self.announcement.round

    @property
    def base_version(self) -> int:
        return self.announcement.global_version


@dataclass(frozen=True)
class SendUpdate:
    """Publish this (opaque, driver-built) update and wait for the broker; then call `sent(round)`.

    `resend`: restored from a durable outbox after a restart (already on disk, not counted again)."""

    round: int
    update: Any
    resend: bool = False


@dataclass(frozen=True)
class Skip:
    """A recorded round that will not be trained; `reason` is "superseded" or "final" (for the log)."""

    round: int
    reason: str
    held_version: int


@dataclass(frozen=True)
class Finish:
    """The run is over: the final global is held (or `timed_out` waiting for it)."""

    global_version: int
    final_version: int
    timed_out: bool = False


@dataclass(frozen=True)
class Idle:
    """Nothing to do for the protocol and no round waits for its global: time for background work."""


Action = Union[PublishStatus, LoadGlobal, Train, SendUpdate, Skip, Finish, Idle]


@dataclass
class AgentProtocol:
    agent_id: str
    final_grace_s: float | None = FINAL_GRACE_S  # None: wait for the final global for ever
    global_version: int = -1  # the global adapter held (loaded), -1 before the first
    pending: RoundAnnouncement | None = None  # the newest announcement that selects us, not yet acted on
    final_version: int | None = None  # set by a final announcement, cleared by a non-final one
    training: int | None = None  # the round being trained
    outbox: dict[int, SendUpdate] = field(default_factory=dict)  # round -> its update, not yet confirmed sent
    done: set[int] = field(default_factory=set)  # rounds whose update the broker acknowledged
    finished: bool = False
    stopped: bool = False
    run_id: str = ""  # the aggregator's run the machine's state belongs to ("": none seen yet)
    _final_deadline: float | None = None

    def _run(self, run_id: str) -> None:
        """A message of run `run_id`: from another run than ours, start afresh."""
        if not run_id or run_id == self.run_id:
            return
        if self.run_id:
            self.global_version, self.pending, self.final_version, self._final_deadline = -1, None, None, None
            self.outbox, self.done, self.finished = {}, set(), False
        self.run_id = run_id

    def answered(self, round_number: int) -> bool:
        """This round's update is trained, being trained or sent: never train it again."""
        return round_number in self.done or round_number in self.outbox or round_number == self.training

    # -- events ---------------------------------------------------------------------------------
    def connected(self) -> list[Action]:
        """The transport (re)connected: announce ourselves again."""
        return [PublishStatus(AgentState.online)]

    def on_announcement(self, ann: RoundAnnouncement) -> list[Action]:
        self._run(ann.run_id)
        if ann.final:
            self.final_version = ann.global_version
            return []
        # a run (re)started after an earlier final announcement
        self.final_version, self._final_deadline = None, None
        if self.agent_id in ann.selected and not self.answered(ann.round):
            self.pending = ann
        return []

    def on_global(self, header: GlobalAdapter, tensors: Any) -> list[Action]:
        self._run(header.run_id)
        if header.version <= self.global_version:
            return []  # the retained one we hold, or an older one
        return [LoadGlobal(header, tensors)]

    def global_loaded(self, version: int) -> list[Action]:
        """The driver installed the global of a LoadGlobal (a refused one is simply not confirmed)."""
        self.global_version = max(self.global_version, version)
        return []

    def poll(self, now: float) -> list[Action]:
        """What to do now that the queue is drained. `now`: the driver's monotonic clock, seconds."""
        if self.stopped or self.finished:
            return []
        if self.final_version is not None:
            if self._final_deadline is None:
                self._final_deadline = now + (self.final_grace_s if self.final_grace_s is not None else float("inf"))
            held = self.global_version >= self.final_version
            if held or now > self._final_deadline:
                self.finished = True
                return [Finish(self.global_version, self.final_version, timed_out=not held)]
        ann = self.pending
        if ann is None:
            return [Idle()]
        if self.final_version is not None:
            self.pending = None  # the run is over: no new work
            return [Skip(ann.round, "final", self.global_version), Idle()]
        if self.global_version < ann.global_version:
            return []  # wait for the announced global
        self.pending = None
        if self.global_version > ann.global_version:
            return [Skip(ann.round, "superseded", self.global_version)]
        self.training = ann.round
        return [PublishStatus(AgentState.training), Train(ann)]

    def trained(self, round_number: int, update: Any) -> list[Action]:
        """Local training for `round_number` ended with `update` (opaque to the machine)."""
        if self.training == round_number:
            self.training = None
        if self.stopped:
            return []  # stopped mid-training: the update is not sent
        send = self.outbox[round_number] = SendUpdate(round_number, update)
        return [send]

    def restore(self, round_number: int, update: Any) -> list[Action]:
        """An update found in a durable outbox at start: send it again, and don't train its round."""
        send = self.outbox[round_number] = SendUpdate(round_number, update, resend=True)
        return [send]

    def sent(self, round_number: int) -> list[Action]:
        """The broker acknowledged the update of `round_number`."""
        send = self.outbox.pop(round_number, None)
        self.done.add(round_number)
        # a resend at start-up comes before the agent is even online: no status for it
        return [PublishStatus(AgentState.idle)] if send is not None and not send.resend else []

    def stop(self) -> list[Action]:
        self.stopped = True
        self.pending = None
        return []
