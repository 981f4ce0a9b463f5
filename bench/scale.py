"""Scale on one Mosquitto: 200 to 10,000 agents a round, and what the broker's queue limit decides.

    python -m bench.scale                                  # 200, 1,000, 5,000, 10,000 agents, 2 rounds each
    python -m bench.scale --agents 200 2000 --rounds 3
    python -m bench.scale --agents 200 --old-limit 0       # without the contrast run

The agents are one swarm process (edge_agent.swarm: the real agent protocol, an MQTT connection
each, updates the size of the demo adapter, ~200 KB); the broker is Mosquitto with the project's
local config, its queues sized for a round of N (broker.mosquitto_conf.QueueSizing); the
aggregator is the real one (`python -m aggregator.cli run`, MiniLM, evaluating each global on 20
examples). The harness is bench/round_overhead.py's `run_fleet`, the suite's (tests/test_swarm.py
runs 2,000).

Per fleet size: the rounds that completed with every update, updates lost (sent by the swarm and
not counted by the aggregator), round overhead p50/p95 (duration - evaluation; the work itself is
nil), the connect storm (the swarm's start until every agent had connected, at most 200 opening
at once), and each process's CPU seconds per 1,000 updates and peak RSS (Linux /proc; the
aggregator's CPU includes loading its model, ~10 CPU-s). The baseline in the same run is the
first (smallest) fleet: `per_agent_vs_baseline` is the overhead per agent as a ratio to it.

The contrast (`--old-limit N`): N agents against the limit the project had before its queues were
sized (max_queued_messages 1000, what QueueSizing gives a round of 250): the statuses (and, if a
round starts, the updates) the broker dropped for the aggregator without a word show as agents it
never saw online (in the JSON's meta, `old_limit`).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import report  # noqa: E402
from bench.round_overhead import FleetError, done_with, per_agent_vs_baseline, percentile, run_fleet  # noqa: E402
from broker.mosquitto_conf import QueueSizing  # noqa: E402
from edge_agent.swarm import raise_open_files  # noqa: E402

OLD_LIMIT_AGENTS = 250  # QueueSizing(250).messages == 1000, the max_queued_messages of before


def contrast(n: int, work: Path, round_agents: int, wait_s: float) -> dict:
    """The old limit: N agents connect and the aggregator counts who it sees online (their retained
    statuses, QoS 1, pass through its queue during the connect storm); a round needs all N."""
    q = QueueSizing(round_agents)
    row = {"agents": n, "queue_messages": q.messages, "rounds": 0, "complete": 0}
    try:
        run = run_fleet(n, 1, work, swarm=True, eval_limit=20, round_timeout=240, timeout=wait_s + 600,
                        wait_for_agents=wait_s, fleet="scale", round_agents=round_agents)
    except FleetError as e:
        seen = re.search(r"after \d+s (\d+) of (\d+) agents are online", str(e))
        if seen is None:
            raise
        return {**row, "online_seen": int(seen.group(1)), "statuses_lost": n - int(seen.group(1))}
    counted = sum(len(r["answered"]) for r in run.rounds)
    return {**row, "rounds": len(run.rounds), "complete": sum(r["outcome"] == "complete" for r in run.rounds),
            "sent": run.sent, "lost": run.sent - counted, "online_seen": n, "statuses_lost": 0}


def measure(n: int, rounds: int, work: Path, round_agents: int, round_timeout: float) -> dict:
    run = run_fleet(n, rounds, work, swarm=True, eval_limit=20, round_timeout=round_timeout,
                    timeout=rounds * round_timeout + 600, wait_for_agents=600, fleet="scale", round_agents=round_agents)
    counted = sum(len(r["answered"]) for r in run.rounds)
    complete = [r for r in run.rounds if r["outcome"] == "complete" and len(r["answered"]) == n]
    ov = [r["duration_s"] - r.get("eval_seconds", 0.0) for r in run.rounds]
    usage = run.usage or {}
    per_k = 1000 / max(counted, 1)
    q = QueueSizing(round_agents)
    return {
        "agents": n, "queue_messages": q.messages, "rounds": len(run.rounds), "complete": len(complete),
        "sent": run.sent, "counted": counted, "lost": run.sent - counted,
        "overhead_p50_s": percentile(ov, 0.5), "overhead_p95_s": percentile(ov, 0.95),
        "overhead_per_agent_ms": 1000 * percentile(ov, 0.5) / n,
        "fedavg_p50_s": percentile([r.get("aggregation_s", 0.0) for r in run.rounds], 0.5),
        "connect_storm_s": run.connect_s, "startup_s": run.startup_s,
        "broker_cpu_per_1k": usage.get("broker", (float("nan"),))[0] * per_k,
        "aggregator_cpu_per_1k": usage.get("aggregator", (float("nan"),))[0] * per_k,
        "swarm_cpu_per_1k": usage.get("agents-0", (float("nan"),))[0] * per_k,
        "broker_rss_mb": usage.get("broker", (0, float("nan")))[1],
        "aggregator_rss_mb": usage.get("aggregator", (0, float("nan")))[1],
        "swarm_rss_mb": usage.get("agents-0", (0, float("nan")))[1],
        "wall_s": run.wall_s,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, nargs="+", default=[200, 1000, 5000, 10000], help="the first is the baseline")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--round-timeout", type=float, default=300.0)
    ap.add_argument("--old-limit", type=int, default=10000,
                    help="agents for one round against the old queue limit (0: skip)")
    ap.add_argument("--old-limit-wait", type=float, default=150.0,
                    help="seconds the contrast's aggregator waits for its agents to come online")
    ap.add_argument("--keep", action="store_true", help="keep the working folder (logs, metrics.jsonl)")
    args = ap.parse_args(argv)
    try:
        raise_open_files(max(args.agents + [args.old_limit]))  # the broker, our child, inherits it
    except OSError as e:
        raise SystemExit(str(e)) from None
    base = Path(tempfile.mkdtemp(prefix="edgetune-scale-"))
    rows, t0 = [], time.monotonic()
    try:
        for n in args.agents:
            try:
                row = measure(n, args.rounds, base / f"n{n}", n, args.round_timeout)
            except FleetError as e:
                raise SystemExit(f"{n} agents: {e}") from None
            rows.append(row)
            print(f"{n} agents, queue {row['queue_messages']}: {row['complete']}/{row['rounds']} rounds complete, "
                  f"{row['lost']} of {row['sent']} updates lost, overhead p50 {row['overhead_p50_s']:.1f}s "
                  f"({row['wall_s']:.0f}s wall)", flush=True)
        if args.old_limit:
            old = contrast(args.old_limit, base / "old-limit", OLD_LIMIT_AGENTS, args.old_limit_wait)
            print(f"{args.old_limit} agents against the old limit (queue {old['queue_messages']}): the aggregator saw "
                  f"{old['online_seen']} online, {old['statuses_lost']} statuses dropped by the broker", flush=True)
    finally:
        done_with(base, args.keep)
    baseline = per_agent_vs_baseline(rows)
    meta_old = {"old_limit": old} if args.old_limit else {}
    report("scale", rows, columns=[
        "agents", "queue_messages", "rounds", "complete", "sent", "lost", "overhead_p50_s", "overhead_p95_s",
        "overhead_per_agent_ms", "per_agent_vs_baseline", "fedavg_p50_s", "connect_storm_s", "broker_cpu_per_1k",
        "aggregator_cpu_per_1k", "swarm_cpu_per_1k", "broker_rss_mb", "aggregator_rss_mb", "swarm_rss_mb",
    ], meta={"rounds": args.rounds, "baseline_agents": baseline["agents"], "wall_s": time.monotonic() - t0,
             "overhead": "duration_s - eval_seconds per round (the swarm trains at once)",
             "cpu_per_1k": "CPU seconds of the process over the whole run per 1,000 updates counted", **meta_old})


if __name__ == "__main__":
    main()
