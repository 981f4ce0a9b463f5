"""Load: 200 light agents finish 5 rounds against a real Mosquitto and the real aggregator.

The agents are edge_agent.light (the real protocol, synthetic adapters, no model), 100 threads
in each of two processes; the aggregator is `python -m aggregator.cli run` (MiniLM, evaluating
each round on 20 examples). The harness is bench/round_overhead.py's `run_fleet`, which the
benchmark uses to time the same thing for several fleet sizes.
"""

from __future__ import annotations

from bench.round_overhead import overheads, percentile, run_fleet

AGENTS = 200
ROUNDS = 5


def test_200_agents_finish_5_rounds(tmp_path):
    run = run_fleet(AGENTS, ROUNDS, tmp_path, train_seconds=0.0, eval_limit=20, per_process=100,
                    round_timeout=120, timeout=300, wait_for_agents=90, fleet="loadtest")
    expected = {f"p{p}-{i}" for p in range(2) for i in range(AGENTS // 2)}
    rows = run.rounds
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)), rows
    for r in rows:
        assert r["outcome"] == "complete", f"round {r['round']}: {r['outcome']}, dropped {r.get('dropped')}"
        assert len(r["answered"]) == AGENTS and set(r["answered"]) == expected, (
            f"round {r['round']}: {len(r['answered'])} answers, missing {sorted(expected - set(r['answered']))[:10]}")
        assert r["num_examples"] == 100 * AGENTS
        assert r["eval_examples"] == 20
    assert [r["version"] for r in rows] == list(range(1, ROUNDS + 1))
    assert run.sent == AGENTS * ROUNDS, f"the agents say they sent {run.sent} updates"
    ov = overheads(run, 0.0)
    print(f"\n{AGENTS} agents x {ROUNDS} rounds in {run.wall_s:.0f}s (startup {run.startup_s:.0f}s); "
          f"round overhead p50 {percentile(ov, 0.5):.2f}s, max {max(ov):.2f}s; "
          f"FedAvg p50 {percentile([r['aggregation_s'] - r['eval_seconds'] for r in rows], 0.5):.3f}s")
