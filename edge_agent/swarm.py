"""A swarm: thousands of agents in one asyncio process, for load tests and scale benchmarks.

Each agent is the light agent's (edge_agent.light): the real protocol machine
(edge_agent.protocol.AgentProtocol) fed and acted on by the real loop's code
(edge_agent.driver.ProtocolDriver: frames checked, task, announcements, globals, statuses), a
synthetic update (`synthetic_update`: the global plus seeded noise) in place of training. What
differs is only the transport: every agent has its own MQTT connection (its own client id, will
and subscriptions, as a device has), made with aiomqtt, which runs paho's client on asyncio's
loop. There is no thread per agent, so 10,000 fit in one process on 2 cores where the light
agent's thread-per-client design stops at a few hundred.

    python -m edge_agent.swarm --count 2000 --id s --broker mqtt://127.0.0.1:1883 --fleet load

It prints `connected N agents in S s` once all are connected (the connect storm: at most
--connect-concurrency connections opening at once, each retried with jittered backoff) and
`sent N updates` at the end, like the light agent. Needs the `swarm` extra (aiomqtt).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import time
from collections import deque
from typing import Any

from broker.messages import AgentState
from broker.transport import BrokerAddress
from edge_agent.driver import ProtocolDriver
from edge_agent.light import light_update
from edge_agent.protocol import LoadGlobal, SendUpdate, Train

log = logging.getLogger("edgetune.swarm")
_GLOBALS: dict[tuple[str, int], dict] = {}  # (run id, version) -> the global's tensors, shared by the swarm's agents (read only)
POLL_S = 0.5  # how often the swarm polls every agent's protocol machine (deadlines, the run's end)


def _aiomqtt():
    try:
        import aiomqtt
    except ImportError:
        raise SystemExit("the swarm needs aiomqtt: pip install 'edgetune[swarm]' (or aiomqtt)") from None
    return aiomqtt


def raise_open_files(agents: int) -> None:
    """Raise this process's soft limit on open files to a socket per agent and some to spare (a
    broker started from here inherits it), or raise OSError saying what to do."""
    import resource

    need = agents + 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise OSError(f"{agents} agents need {need} open files; this process may have {hard}: raise it (ulimit -n {need})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class _Outbox:
    """The transport face ProtocolDriver publishes through: each publish queues for the agent's
    connection, whose task publishes them in order (QoS 1) and keeps any the broker has not
    acknowledged for the next connection."""

    def __init__(self) -> None:
        self.queue: deque[tuple[str, bytes, bool]] = deque()
        self.wake = asyncio.Event()  # set when there is something to publish

    def publish(self, topic: str, payload: bytes, retain: bool = False, wait: bool = False, **_: Any) -> None:
        self.queue.append((topic, payload, retain))
        self.wake.set()


class SwarmAgent(ProtocolDriver):
    """One agent of the swarm: the light agent's protocol and synthetic update, publishing through
    an outbox that its connection's task empties."""

    as_torch = False
    log = log

    def __init__(self, agent_id: str, fleet: str, *, num_examples: int = 100) -> None:
        self._init_protocol(agent_id, fleet)
        self.example_count = num_examples
        self.global_tensors: dict = {}
        self.transport = _Outbox()
        self.sent = 0
        self.rejections: list[tuple[str, str]] = []
        self.stop = False
        self.live = False  # connected and subscribed: the swarm's ticker polls it
        self.done = asyncio.Event()  # finished the run, or stopped

    def num_examples(self) -> int:
        return self.example_count

    def stopping(self) -> bool:
        return self.stop

    def load_global(self, a: LoadGlobal) -> bool:
        # one decoded copy of each global for the whole swarm (10,000 copies of the demo adapter are
        # 2 GB): every agent's own decode is dropped for the first one of its (run, version)
        key = (a.header.run_id, a.version)
        self.global_tensors = _GLOBALS.setdefault(key, a.tensors)
        for old in [k for k in _GLOBALS if k[0] != key[0] or k[1] < key[1] - 1]:
            del _GLOBALS[old]
        return True

    def train(self, a: Train) -> None:
        self.trained(a.round, light_update(self.proto.agent_id, a, self.global_tensors, self.example_count))

    def send_update(self, a: SendUpdate) -> None:
        self.transport.publish(self.topics.update(self.proto.agent_id), a.update)  # counted in `sent` once acknowledged

    def rejected(self, reason: str, msg: str) -> None:
        self.rejections.append((reason, msg))
        super().rejected(reason, msg)


class Swarm:
    """`count` SwarmAgents named `<prefix>-0` .. `<prefix>-<count-1>`, each on its own connection."""

    def __init__(self, broker_url: str, fleet: str, count: int, *, prefix: str = "s", num_examples: int = 100,
                 protocol: int = 5, connect_concurrency: int = 200, keepalive: int = 120, seed: int = 0) -> None:
        self.address = BrokerAddress.parse(broker_url)
        if self.address.tls:
            raise ValueError("the swarm connects over plain MQTT only (a load test on the broker's own host)")
        self.fleet, self.protocol, self.keepalive = fleet, protocol, keepalive
        self.agents = [SwarmAgent(f"{prefix}-{i}", fleet, num_examples=num_examples) for i in range(count)]
        self.connect_concurrency = connect_concurrency
        self.rng = random.Random(seed)
        self.connected = 0
        self.connect_seconds: float | None = None  # from the start to the last agent's first connection
        self.reconnects = 0

    @property
    def sent(self) -> int:
        return sum(a.sent for a in self.agents)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run every agent until each has finished (the run's final announcement and global) or `stop` is set."""
        stop = stop or asyncio.Event()
        gate = asyncio.Semaphore(self.connect_concurrency)
        t0 = time.monotonic()
        ticker = asyncio.create_task(self._tick(stop))
        try:
            await asyncio.gather(*(self._agent(a, gate, stop, t0) for a in self.agents))
        finally:
            ticker.cancel()

    async def _tick(self, stop: asyncio.Event) -> None:
        """Poll every connected agent's machine every POLL_S (its deadlines, the end of the run): one
        timer for the swarm, not one per agent."""
        while True:
            await asyncio.sleep(POLL_S)
            now = time.monotonic()
            for a in self.agents:
                if stop.is_set():
                    a.stop = True
                if a.live and not a.done.is_set():
                    if a.stop:
                        a.proto.stop()
                    a.act(a.proto.poll(now))
                    if a.proto.finished or a.stop:
                        a.done.set()

    async def _agent(self, agent: SwarmAgent, gate: asyncio.Semaphore, stop: asyncio.Event, t0: float) -> None:
        aiomqtt = _aiomqtt()
        version = aiomqtt.ProtocolVersion.V5 if self.protocol == 5 else aiomqtt.ProtocolVersion.V311
        will = aiomqtt.Will(agent.topics.status(agent.proto.agent_id), agent.status_frame(AgentState.offline),
                            qos=1, retain=True)
        first, backoff = True, 0.5
        while not (stop.is_set() or agent.proto.finished):
            try:
                async with gate:
                    client = aiomqtt.Client(self.address.host, self.address.port, protocol=version, will=will,
                                            identifier=f"edgetune-agent-{agent.proto.agent_id}",
                                            keepalive=self.keepalive, timeout=60)
                    await client.__aenter__()
                try:
                    if first:
                        first = False
                        self.connected += 1
                        if self.connected == len(self.agents):
                            self.connect_seconds = time.monotonic() - t0
                            print(f"connected {self.connected} agents in {self.connect_seconds:.1f} s", flush=True)
                    else:
                        self.reconnects += 1
                    backoff = 0.5
                    await self._session(agent, client)
                finally:
                    agent.live = False
                    await client.__aexit__(None, None, None)
            except aiomqtt.MqttError as e:
                if stop.is_set():
                    return
                delay = backoff * (0.5 + self.rng.random())  # jittered: a swarm must not reconnect in lockstep
                log.debug("%s: %s; reconnecting in %.1fs", agent.proto.agent_id, e, delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, 30.0)

    async def _session(self, agent: SwarmAgent, client) -> None:
        """One connection's life: a reader feeding the machine, a writer emptying the outbox, until
        the agent is done (or the connection breaks: the error goes up, and the agent reconnects)."""
        for topic in (agent.topics.task, agent.topics.round, agent.topics.global_adapter, agent.topics.keys):
            await client.subscribe(topic, qos=1)
        agent.act(agent.proto.connected())
        agent.live = True

        async def read() -> None:
            async for m in client.messages:
                agent.take(str(m.topic), bytes(m.payload))
                agent.act(agent.proto.poll(time.monotonic()))
                if agent.proto.finished:
                    agent.done.set()

        async def write() -> None:
            while True:
                await agent.transport.wake.wait()
                agent.transport.wake.clear()
                await self._flush(agent, client)

        tasks = [asyncio.create_task(read()), asyncio.create_task(write()), asyncio.create_task(agent.done.wait())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not tasks[2] and t.exception() is not None:
                    raise t.exception()
        finally:
            for t in tasks:
                t.cancel()
        await self._flush(agent, client)
        await client.publish(agent.topics.status(agent.proto.agent_id), agent.status_frame(AgentState.offline),
                             qos=1, retain=True)

    @staticmethod
    async def _flush(agent: SwarmAgent, client) -> None:
        """Publish what the agent queued, in order; a message leaves the queue once the broker has
        acknowledged it (a broken connection keeps it for the next)."""
        q, updates = agent.transport.queue, agent.topics.update(agent.proto.agent_id)
        while q:
            topic, payload, retain = q[0]
            await client.publish(topic, payload, qos=1, retain=retain)
            q.popleft()
            if topic == updates:
                agent.sent += 1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, required=True, help="agents: <id>-0 .. <id>-N-1")
    ap.add_argument("--id", default="s")
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--fleet", default="default")
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--protocol", type=int, choices=[4, 5], default=5, help="MQTT 3.1.1 (4) or 5")
    ap.add_argument("--connect-concurrency", type=int, default=200)
    args = ap.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(name)s: %(message)s")
    _aiomqtt()
    try:
        raise_open_files(args.count)
    except OSError as e:
        raise SystemExit(str(e)) from None
    swarm = Swarm(args.broker, args.fleet, args.count, prefix=args.id, num_examples=args.examples,
                  protocol=args.protocol, connect_concurrency=args.connect_concurrency)

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await swarm.run(stop)

    asyncio.run(go())
    print(f"sent {swarm.sent} updates", flush=True)


if __name__ == "__main__":
    main()
