"""The runner's live progress: a read-only MQTT subscriber feeding edgetune.progress, and its output.

`open_progress()` connects a monitor (its own client id, a clean session, subscribed to the fleet's
round, global, status and evaluation topics; it publishes nothing) and returns a ProgressDisplay
that the runner's loop drives:

    display.echo(line)   # a permanent line (the per-round summary, the runner's notices)
    display.row(row)     # a metrics row, to the model
    display.tick()       # read what the monitor's queue holds; print what changed, or redraw

paho's thread only puts messages in the transport's queue (broker.transport); decoding, the model
and the terminal are the runner's thread's. Modes: "tty" redraws a compact view in place below the
permanent lines with ANSI cursor movement, when what it shows changed and at most every
`min_interval_s`; "plain" prints edgetune.progress's lines of changes; "off" (or a monitor that
cannot connect: one warning) leaves only the permanent lines.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from broker import codec
from broker.errors import WireError
from broker.messages import AgentStatus, EvalReport, GlobalAdapter, RoundAnnouncement, parse
from broker.settings import ConnectionSettings
from broker.topics import Topics, TopicKind
from broker.transport import BrokerError, Incoming, MqttTransport
from edgetune.progress import RunProgress

MODES = ("auto", "tty", "plain", "off")
_MODELS = {TopicKind.status: AgentStatus, TopicKind.round: RoundAnnouncement,
           TopicKind.global_adapter: GlobalAdapter, TopicKind.eval: EvalReport}


def resolve_mode(mode: str, stream) -> str:
    """auto: tty where `stream` is a terminal (and TERM is not "dumb"), else plain."""
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: give one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    isatty = getattr(stream, "isatty", None)
    return "tty" if isatty is not None and isatty() and os.environ.get("TERM") != "dumb" else "plain"


def decode(topics: Topics, m: Incoming, max_size: int):
    """The message on `m` (AgentStatus, RoundAnnouncement, GlobalAdapter or EvalReport), ("cleared", agent)
    for an agent's cleared status, or None for anything else or anything that does not decode."""
    try:
        t = topics.parse(m.topic)
        model = _MODELS.get(t.kind)
        if model is None:
            return None
        if not m.payload:
            return ("cleared", t.agent_id) if t.kind is TopicKind.status else None
        msg = parse(codec.decode(m.payload, max_size=max_size, as_torch=False).header, model)
    except WireError:
        return None
    if t.agent_id is not None and getattr(msg, "agent_id", t.agent_id) != t.agent_id:
        return None  # a message about another agent than its topic's
    return msg


class Monitor:
    """A read-only subscriber to the fleet's progress topics."""

    def __init__(self, conn: ConnectionSettings, client_id: str | None = None) -> None:
        self.topics = Topics(conn.fleet)
        self.max_size = conn.max_packet_bytes
        self.transport: MqttTransport = conn.transport(client_id or f"edgetune-monitor-{conn.fleet}-{os.getpid()}",
                                                       persistent_session=False)
        for topic in (self.topics.round, self.topics.global_adapter, self.topics.all_status, self.topics.all_eval):
            self.transport.subscribe(topic)

    def connect(self, timeout: float = 5.0) -> None:
        self.transport.connect(timeout)

    def drain(self, model: RunProgress, now: float | None = None) -> int:
        """Feed `model` everything queued; how many messages that was."""
        n = 0
        while (m := self.transport.get(timeout=0)) is not None:
            msg = decode(self.topics, m, self.max_size)
            if isinstance(msg, tuple):
                model.cleared(msg[1])
            elif msg is not None:
                model.feed(msg, time.time() if now is None else now)
            n += 1
        return n

    def close(self) -> None:
        self.transport.close()


def erase(lines: int) -> str:
    """ANSI: to the start of the line `lines` up, and clear from there to the end of the screen."""
    return f"\x1b[{lines}F\x1b[J" if lines else ""


class ProgressDisplay:
    def __init__(self, mode: str, echo, model: RunProgress | None = None, monitor: Monitor | None = None,
                 write=None, size=shutil.get_terminal_size, min_interval_s: float = 0.25, clock=time.time) -> None:
        self.mode = mode if model is not None else "off"
        self._echo, self.model, self.monitor = echo, model, monitor
        self._write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        self._size, self.min_interval_s, self._clock = size, min_interval_s, clock
        self._drawn: list[str] = []  # the view on the screen now (tty)
        self._last_draw = 0.0

    def echo(self, line: str) -> None:
        if self.mode == "tty" and self._drawn:
            self._write(erase(len(self._drawn)))
            self._echo(line)
            self._write("".join(x + "\n" for x in self._drawn))
        else:
            self._echo(line)

    def row(self, row: dict) -> None:
        if self.model is not None:
            self.model.row(row)

    def tick(self) -> None:
        if self.model is None:
            return
        now = self._clock()
        if self.monitor is not None:
            self.monitor.drain(self.model, now)
        if self.mode == "plain":
            for line in self.model.take_lines():
                self._echo(line)
            return
        if now - self._last_draw < self.min_interval_s:
            return
        cols, rows = self._size()
        view = self.model.view(now, width=max(20, cols - 1), max_agents=max(1, rows - 6))
        if view != self._drawn:
            self._write(erase(len(self._drawn)) + "".join(x + "\n" for x in view))
            self._drawn, self._last_draw = view, now

    def close(self) -> None:
        """Take the view off the screen (the run's summary follows) and disconnect the monitor."""
        if self.mode == "tty" and self._drawn:
            self._write(erase(len(self._drawn)))
            self._drawn = []
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None


def open_progress(mode: str, conn: ConnectionSettings, rounds: int, echo, stream=None,
                  timeout: float = 5.0) -> ProgressDisplay:
    """The display for `mode` (auto: tty or plain after `stream`, default stdout) with its monitor connected;
    where the monitor cannot connect, one warning and a display of the permanent lines only."""
    mode = resolve_mode(mode, stream if stream is not None else sys.stdout)
    if mode == "off":
        return ProgressDisplay("off", echo)
    monitor = Monitor(conn)
    try:
        monitor.connect(timeout)
    except BrokerError as e:
        echo(f"warning: no live progress ({e}); the round lines follow")
        return ProgressDisplay("off", echo)
    return ProgressDisplay(mode, echo, RunProgress(rounds), monitor)
