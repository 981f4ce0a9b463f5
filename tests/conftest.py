"""Shared fixtures: a real Mosquitto started with the project's config on a free port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from edgetune.local_broker import LocalBroker, start_mosquitto

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property tests check what is generated, not how fast: hypothesis' wall-clock deadline and its
# "too slow" health check measure the machine (2 shared cores in CI), and speed is measured by
# bench/, not by timed tests.
settings.register_profile("edgetune", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("edgetune")


@pytest.fixture
def mosquitto(tmp_path) -> LocalBroker:
    """A fresh mosquitto (project config) on a free loopback port; fails if mosquitto is missing."""
    b = start_mosquitto(workdir=tmp_path / "mosquitto")
    yield b
    b.close()


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "EDGETUNE_THREADS": "1",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def spawn(module: str, args: list[str], log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=child_env(**env),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], timeout: float, logs: list[Path] = ()) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            tails = "\n".join(f"--- {lg}\n{lg.read_text()[-2000:]}" for lg in logs)
            pytest.fail(f"processes did not finish within {timeout}s\n{tails}")


def finish_all(procs: list[subprocess.Popen], timeout: float, logs: list[Path]) -> None:
    """wait_all, kill whatever is left, then fail with its log's tail if any exited non-zero."""
    try:
        wait_all(procs, timeout, logs)
    finally:
        kill_all(procs)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"{log.name} exited {p.returncode}:\n{log.read_text()[-3000:]}"


def kill_all(procs) -> None:
    """Kill whichever of `procs` are still running (a test's cleanup)."""
    for p in procs:
        if p.poll() is None:
            p.kill()


def join_demo_task(state_dir: Path, **aggregator_settings) -> None:
    """The state dir of an agent that has built its model for the fleet's task (the demo's, or the one
    these aggregator settings give): the agent saves the task there, and the device commands read
    its labels."""
    from aggregator.settings import AggregatorSettings
    from broker.messages import TaskDefinition
    from edge_agent.local_settings import save_task
    from models.settings import task_fields

    save_task(state_dir, TaskDefinition(**task_fields(AggregatorSettings(**aggregator_settings))))
