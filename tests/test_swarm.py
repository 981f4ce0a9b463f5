"""Scale: 2,000 agents in one asyncio process (edge_agent.swarm: the real agent protocol, each on
its own MQTT connection, updates the size of the demo adapter, ~200 KB) against a real Mosquitto
with the project's config sized for a round of 2,000 (broker.mosquitto_conf.QueueSizing) and the
real aggregator: every round counts every agent's update once, none lost at the broker.
bench/scale.py runs the same harness at 200 to 10,000 agents."""

from __future__ import annotations

import resource

import pytest

from bench.round_overhead import run_fleet
from edge_agent.swarm import raise_open_files

AGENTS = 2000
ROUNDS = 2


@pytest.fixture(autouse=True)
def open_files():
    """The swarm and the broker each hold a socket per agent: this process's limit is raised (the
    broker, its child, inherits it), or the test fails saying what to do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        raise_open_files(AGENTS)
    except OSError as e:
        pytest.fail(f"{e}: run the tests with a higher limit")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_2000_swarm_agents_finish_rounds_with_every_update_counted_once(tmp_path):
    run = run_fleet(AGENTS, ROUNDS, tmp_path, swarm=True, eval_limit=20, round_timeout=240, timeout=600,
                    wait_for_agents=240, fleet="swarmtest")
    expected = {f"s-{i}" for i in range(AGENTS)}
    assert [r["round"] for r in run.rounds] == list(range(1, ROUNDS + 1)), run.rounds
    for r in run.rounds:
        assert r["outcome"] == "complete", f"round {r['round']}: {r['outcome']}, {len(r['answered'])} answered"
        assert len(r["answered"]) == AGENTS and set(r["answered"]) == expected, (
            f"round {r['round']}: missing {sorted(expected - set(r['answered']))[:10]}")
        assert not r["rejected"] and not r["dropped"], (r["rejected"][:5], r["dropped"][:5])
        assert r["num_examples"] == 100 * AGENTS
    assert run.sent == AGENTS * ROUNDS, f"the swarm says it sent {run.sent} updates"
    assert run.connect_s is not None, "the swarm did not report its connect storm"
    durations = ", ".join(f"{r['duration_s']:.1f}s" for r in run.rounds)
    print(f"\n{AGENTS} swarm agents x {ROUNDS} rounds in {run.wall_s:.0f}s (startup {run.startup_s:.0f}s, connect storm "
          f"{run.connect_s:.1f}s); rounds {durations}; {run.usage}")
