"""Split learning's request/response: one step's activations out, its gradient back.

The request travels with MQTT 5 ResponseTopic + CorrelationData; the answer resolves a Future
keyed by the correlation id on paho's thread (broker.transport.expect_reply), so nothing polls.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Callable

from broker import codec
from broker.errors import WireError
from broker.messages import SplitForward, SplitGradient, parse
from broker.topics import Topics

if TYPE_CHECKING:
    from edge_agent.metrics import AgentMetrics

log = logging.getLogger("edgetune.agent")


class SplitClient:
    def __init__(self, transport, topics: Topics, agent_id: str, metrics: AgentMetrics, *, timeout_s: float,
                 retries: int, head_version: Callable[[], int], should_stop: Callable[[], bool]) -> None:
        self.transport, self.topics, self.agent_id, self.metrics = transport, topics, agent_id, metrics
        self.timeout_s, self.retries = timeout_s, retries
        self.head_version, self.should_stop = head_version, should_stop

    def request(self, step: int, encoding: str, tensors: dict, evaluate: bool = False) -> tuple[SplitGradient, dict]:
        """Publish one step's activations and wait (on a Future) for its gradient; resend on timeout.
        `evaluate`: an evaluation request (its own step numbers), answered with the loss only."""
        msg = SplitForward(agent_id=self.agent_id, step=step, encoding=encoding,
                           head_version=max(self.head_version(), 0), evaluate=evaluate)
        payload = codec.encode(msg, tensors)
        corr = f"{self.agent_id}:{'e' if evaluate else ''}{step}".encode()
        topic = self.topics.split_forward(self.agent_id)
        reply_topic = self.topics.split_gradient(self.agent_id)
        for attempt in range(self.retries + 1):
            fut = self.transport.expect_reply(corr)
            t0 = time.perf_counter()
            self.transport.publish(topic, payload, correlation=corr, response_topic=reply_topic)
            self.metrics.activation_bytes.inc(len(payload))
            try:
                m = fut.result(timeout=self.timeout_s)
            except FutureTimeout:
                self.transport.forget_reply(corr)
                self.metrics.split_resends.inc()
                log.warning("step %d: no gradient within %.0fs, resending (%d)", step, self.timeout_s, attempt + 1)
                if self.should_stop():
                    break
                continue
            self.metrics.split_round_trip.observe(time.perf_counter() - t0)
            self.metrics.gradient_bytes.inc(len(m.payload))
            frame = codec.decode(m.payload)
            reply = parse(frame.header, SplitGradient)
            if reply.step != step or reply.agent_id != self.agent_id:
                raise WireError(f"gradient for step {reply.step} of {reply.agent_id} answered step {step}")
            return reply, frame.tensors
        raise TimeoutError(f"no gradient for split step {step} after {self.retries + 1} tries: "
                           "is the aggregator running in split mode?")
