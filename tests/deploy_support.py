"""Helpers shared by the deployment tests (tests/test_deploy_*.py).

A tool the tests need and do not find fails the test with what to install: these checks never
skip silently.
"""

from __future__ import annotations

import importlib
import json
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "edgetune"
DASHBOARD = CHART / "dashboards" / "edgetune.json"
COMPOSE = DEPLOY / "compose.yaml"
MOSQUITTO_DIR = DEPLOY / "mosquitto"


def need_module(name: str, install: str) -> ModuleType:
    """Import `name`, or fail the test saying what to install."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.fail(f"the deployment tests need the Python module {name!r} ({e}); install it: {install}")


def need_executable(name: str, install: str, *candidates: str) -> str:
    """The path of an executable on PATH (or at one of `candidates`), or fail saying what to install."""
    found = shutil.which(name)
    if found:
        return found
    # a pip-installed tool sits beside the interpreter, which need not be on PATH
    # (scripts/test runs .venv/bin/python without activating the venv)
    for scripts in {sysconfig.get_path("scripts"), str(Path(sys.executable).parent)}:
        found = shutil.which(name, path=scripts)
        if found:
            return found
    for c in candidates:
        if Path(c).is_file():
            return c
    pytest.fail(f"the deployment tests need the program {name!r}, which is not on PATH; install it: {install}")


_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser: many times faster


class UniqueKeyLoader(_SafeLoader):  # type: ignore[misc, valid-type]
    """A safe loader that refuses duplicate mapping keys (PyYAML keeps the last one silently;
    Kubernetes and Docker Compose refuse them)."""


def _construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` may bring keys that the mapping then overrides: allowed
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = True
    return yaml.constructor.SafeConstructor.construct_mapping(loader, node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml_all(text: str) -> list[Any]:
    return [d for d in yaml.load_all(text, Loader=UniqueKeyLoader) if d]  # noqa: S506


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_lines(text: str) -> list[str]:
    """The directive lines of a Mosquitto config or ACL file: no comments, no blank lines,
    whitespace collapsed."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(" ".join(line.split()))
    return out


class Prometheus:
    """A running Prometheus (see `run_prometheus`), queried through its HTTP API."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def query(self, expr: str, at: float | None = None) -> list[Any] | None:
        """The result of an instant query (a list of series), or None while Prometheus is not up.
        A query Prometheus refuses (a syntax error, an unknown function) fails the test."""
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            if e.code == 503:
                return None  # up, but its storage is still starting (slow on a loaded machine)
            pytest.fail(f"Prometheus refused {expr!r}: {e.read().decode()}")
        except OSError:
            return None  # not up yet
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.query("vector(1)") is None:
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus did not answer within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.2)


@contextmanager
def run_prometheus(
    binary: str, jobs: dict[str, list[int]], workdir: Path, interval: str = "1s"
) -> Iterator[Prometheus]:
    """A real Prometheus (`binary`) on a free loopback port that scrapes 127.0.0.1:PORT/metrics
    of every port in `jobs` (job name -> ports) every `interval`; stopped on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [f"global: {{scrape_interval: {interval}, scrape_timeout: {interval}, evaluation_interval: {interval}}}",
             "scrape_configs:"]
    for job, ports in jobs.items():
        targets = ", ".join(f"'127.0.0.1:{p}'" for p in ports)
        lines.append(f"  - job_name: {job}\n    static_configs: [{{targets: [{targets}]}}]")
    config = workdir / "prometheus.yml"
    config.write_text("\n".join(lines) + "\n")
    port = free_port()
    log_path = workdir / "prometheus.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        yield Prometheus(proc, port, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
