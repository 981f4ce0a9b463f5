"""The /metrics HTTP endpoint both sides serve (each defines its metrics in its own metrics.py)."""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Gauge, start_http_server


def build_info(registry: CollectorRegistry, prefix: str, protocol: int, **labels: str) -> Gauge:
    """`<prefix>build_info{version, protocol, ...labels} 1`: which release a process runs and, through
    `labels`, which fleet (and agent) it belongs to, for dashboards' variables and joins."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("edgetune")
    except PackageNotFoundError:
        v = "unknown"
    g = Gauge(prefix + "build_info", "The release this process runs, its wire protocol, and its fleet",
              ["version", "protocol", *labels], registry=registry)
    g.labels(version=v, protocol=str(protocol), **labels).set(1)
    return g


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0"):
    """Start /metrics in a daemon thread; port 0 picks a free one (server.server_port)."""
    return start_http_server(port, addr=addr, registry=registry)


def linger(seconds: float, stopped: Callable[[], bool]) -> None:
    """Keep serving a little after a run ends, so that Prometheus scrapes the last numbers."""
    deadline = time.monotonic() + seconds
    while not stopped() and time.monotonic() < deadline:
        time.sleep(0.2)
