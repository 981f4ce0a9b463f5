"""The /metrics HTTP endpoint both sides serve (each defines its metrics in its own metrics.py)."""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Gauge, start_http_server


class BuildInfo:
    """`<prefix>build_info{version, protocol, ...labels} 1`: which release a process runs and, through
    `labels`, which fleet (and agent) it belongs to, for dashboards' variables and joins. The series
    appears with the first `set`; a later one replaces it."""

    def __init__(self, registry: CollectorRegistry, prefix: str, labels: tuple[str, ...]) -> None:
        self.registry, self.name, self.labels = registry, prefix + "build_info", labels
        self.gauge: Gauge | None = None

    def set(self, protocol: int, **labels: str) -> None:
        from common.release import release

        if self.gauge is None:
            self.gauge = Gauge(self.name, "The release this process runs, its wire protocol, and its fleet",
                               ["version", "protocol", *self.labels], registry=self.registry)
        self.gauge.clear()
        self.gauge.labels(version=release() or "unknown", protocol=str(protocol), **labels).set(1)


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0"):
    """Start /metrics in a daemon thread; port 0 picks a free one (server.server_port)."""
    return start_http_server(port, addr=addr, registry=registry)


def linger(seconds: float, stopped: Callable[[], bool]) -> None:
    """Keep serving a little after a run ends, so that Prometheus scrapes the last numbers."""
    deadline = time.monotonic() + seconds
    while not stopped() and time.monotonic() < deadline:
        time.sleep(0.2)
