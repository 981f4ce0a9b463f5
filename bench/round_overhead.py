"""Round overhead of the federated control plane as the fleet grows.

N light agents (edge_agent.light: the real protocol, synthetic adapters, no model; up to
--per-process agents as threads in each of a few processes) against a real Mosquitto
(broker.mosquitto_conf, target local) and the real aggregator service as a subprocess (`python -m
aggregator.cli run`, MiniLM, evaluating each round on --eval-limit examples).

A round's overhead is what the protocol and the aggregator add to the work itself:

    overhead = duration_s - train_seconds - eval_seconds        (metrics.jsonl, per round)

i.e. announcement, the global adapter's download, N updates' upload, decoding and checking
them, FedAvg and publishing the new global. The table splits it into `collect` (announcing,
collecting the updates, publishing the global: duration_s - aggregation_s - eval_seconds -
train_seconds) and `fedavg` (aggregation_s: the strategy's aggregate call).
Per fleet size it gives p50 and p95 over the rounds, and the per-agent overhead as a ratio to
the first (smallest) fleet's, measured in the same run (1.0: overhead grows linearly with N;
below 1: fixed costs amortised). Startup (model load, agents coming online) is not in a round.

    python -m bench.round_overhead [--agents 10 50 200] [--rounds 10] [--train-seconds 0.5]

tests/test_load.py runs one fleet of 200 through `run_fleet`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import report
from edgetune.local_broker import start_mosquitto

ROOT = Path(__file__).resolve().parents[1]


class FleetError(RuntimeError):
    pass


@dataclass
class FleetRun:
    agents: int
    rounds: list[dict]  # metrics.jsonl rows of rounds 1..R
    round0: dict  # the initial evaluation row
    wall_s: float  # from starting the processes to the last one's exit
    startup_s: float  # from start to round 1's announcement (aggregator's model load, agents online)
    agent_logs: list[Path]
    aggregator_log: Path
    sent: int  # updates the agents say they published
    connect_s: float | None = None  # swarm: from its start until every agent had connected once
    usage: dict | None = None  # Linux: CPU seconds and peak RSS (MB) of "broker", "aggregator", "agents"


def proc_usage(pid: int) -> tuple[float, float] | None:
    """(CPU seconds, peak RSS in MB) of a live process from /proc (None where there is no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    hwm = next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM:")), 0)
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"), hwm / 1024


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "EDGETUNE_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def run_fleet(agents: int, rounds: int, workdir: Path, *, train_seconds: float = 0.0, eval_limit: int = 20,
              per_process: int = 100, round_timeout: float = 120.0, timeout: float = 600.0, wait_for_agents: float = 120.0,
              fleet: str = "load", swarm: bool = False, round_agents: int | None = None) -> FleetRun:
    """One aggregator and `agents` light agents for `rounds` rounds; raises FleetError on failure.

    swarm: the agents run in one asyncio process (edge_agent.swarm, ids s-0 .. s-N-1) instead of
    light agents' threads, `per_process` to a process (ids p<process>-<i>). round_agents: the
    rounds the broker's queues are sized for (default: `agents`)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    broker = start_mosquitto(workdir=workdir / "mosquitto", round_agents=round_agents or agents)
    out = workdir / "aggregator"
    agg_log = workdir / "aggregator.log"
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    t0, started = time.monotonic(), time.time()
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "aggregator.cli", "run", "--broker", broker.url, "--fleet", fleet,
             "--rounds", str(rounds), "--min-agents", str(agents), "--expected-agents", str(agents),
             "--eval-limit", str(eval_limit), "--eval-data", "demo:vader", "--round-timeout", str(round_timeout),
             "--output-dir", str(out)],
            cwd=ROOT, env=_env(EDGETUNE_WAIT_FOR_AGENTS_S=wait_for_agents), stdout=open(agg_log, "w"),
            stderr=subprocess.STDOUT))
        if swarm:
            if train_seconds:
                raise ValueError("swarm agents train at once (train_seconds 0)")
            logs.append(workdir / "swarm.log")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "edge_agent.swarm", "--id", "s", "--count", str(agents), "--broker", broker.url,
                 "--fleet", fleet], cwd=ROOT, env=_env(), stdout=open(logs[0], "w"), stderr=subprocess.STDOUT))
        n_proc = 0 if swarm else max(1, math.ceil(agents / per_process))
        sizes = [agents // n_proc + (1 if i < agents % n_proc else 0) for i in range(n_proc)]
        for i, size in enumerate(sizes):
            log = workdir / f"agents-{i}.log"
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "edge_agent.light", "--id", f"p{i}", "--count", str(size), "--broker",
                 broker.url, "--fleet", fleet, "--train-seconds", str(train_seconds)],
                cwd=ROOT, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT))
        usage: dict[str, tuple[float, float]] = {}
        watched = {"broker": broker.proc, "aggregator": procs[0], **{f"agents-{i}": p for i, p in enumerate(procs[1:])}}

        def sample() -> None:  # the largest reading before each process exits (an exited, unreaped
            for name, proc in watched.items():  # process still shows its CPU, but no longer its peak RSS)
                u = proc_usage(proc.pid) if proc.poll() is None else None
                if u is not None:
                    prev = usage.get(name, (0.0, 0.0))
                    usage[name] = (max(u[0], prev[0]), max(u[1], prev[1]))

        _wait(procs[0], procs[1:], agg_log, logs, t0 + timeout, f"{agents} agents, {rounds} rounds", sample=sample)
        sample()
        wall = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        broker.close()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    sent, connect_s = 0, None
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("sent ") and line.endswith(" updates"):
                sent += int(line.split()[1])
            elif line.startswith("connected ") and line.endswith(" s"):  # the swarm's connect storm
                connect_s = float(line.split()[-2])
    startup = _startup_seconds(agg_log, started)
    return FleetRun(agents, [r for r in rows if r["round"] >= 1], next((r for r in rows if r["round"] == 0), {}),
                    wall, startup, logs, agg_log, sent, connect_s, usage or None)


def _wait(agg: subprocess.Popen, agent_procs: list[subprocess.Popen], agg_log: Path, logs: list[Path],
          deadline: float, what: str, grace: float = 60.0, sample=lambda: None) -> None:
    """Wait for every process; fail early on a crash, a traceback in an agent log, agents that
    all left while the aggregator still runs, or agents still running after it finished."""
    agents_done_at = agg_done_at = None
    while True:
        sample()
        now = time.monotonic()
        if agg.poll() is not None:
            if agg.returncode != 0:
                raise FleetError(f"{what}: the aggregator exited {agg.returncode}:\n{_tail(agg_log)}")
            agg_done_at = agg_done_at or now
        for p, log in zip(agent_procs, logs):
            if (p.poll() is not None and p.returncode != 0) or "Traceback" in log.read_text(errors="replace"):
                raise FleetError(f"{what}: {log.name} failed (exit {p.poll()}):\n{_tail(log)}")
        if all(p.poll() is not None for p in agent_procs):
            agents_done_at = agents_done_at or now
        if agg_done_at and agents_done_at:
            return
        if agents_done_at and now - agents_done_at > grace:
            raise FleetError(f"{what}: every agent process exited but the aggregator still runs:\n{_tail(agg_log)}")
        if agg_done_at and now - agg_done_at > grace:
            raise FleetError(f"{what}: the aggregator finished but agents still run:\n{_tail(logs[0])}")
        if now > deadline:
            raise FleetError(f"{what}: not done in time; aggregator:\n{_tail(agg_log)}\n--- {logs[0].name}:\n"
                             f"{_tail(logs[0])}")
        time.sleep(0.5)


def _startup_seconds(agg_log: Path, started: float) -> float:
    """Seconds from starting the processes (time.time()) to round 1's announcement, by the
    aggregator log's HH:MM:SS stamp (1 s resolution)."""
    for line in agg_log.read_text(errors="replace").splitlines():
        if "round 1: announced" in line:
            h, m, x = map(int, line.split(" ", 1)[0].split(":"))
            t = time.localtime(started)
            return float((h * 3600 + m * 60 + x - (t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec)) % 86400)
    return float("nan")


def overheads(run: FleetRun, train_seconds: float) -> list[float]:
    return [r["duration_s"] - train_seconds - r.get("eval_seconds", 0.0) for r in run.rounds]


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def done_with(base: Path, keep: bool) -> None:
    """A bench's working folder at the end: kept (and said where) or removed."""
    if keep:
        print(f"kept: {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)


def per_agent_vs_baseline(rows: list[dict]) -> dict:
    """Each row's overhead per agent as a ratio to the first row's (the baseline, which it returns)."""
    baseline = rows[0]
    for r in rows:
        r["per_agent_vs_baseline"] = r["overhead_per_agent_ms"] / baseline["overhead_per_agent_ms"]
    return baseline


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, nargs="+", default=[10, 50, 200], help="fleet sizes; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--train-seconds", type=float, default=0.5, help="each agent's simulated training per round")
    ap.add_argument("--eval-limit", type=int, default=20)
    ap.add_argument("--per-process", type=int, default=100, help="light agents (threads) per process")
    ap.add_argument("--keep", action="store_true", help="keep the working folder (logs, metrics.jsonl)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    base = Path(tempfile.mkdtemp(prefix="edgetune-round-overhead-"))
    rows = []
    t_all = time.monotonic()
    try:
        for n in args.agents:
            run = run_fleet(n, args.rounds, base / f"n{n}", train_seconds=args.train_seconds,
                            eval_limit=args.eval_limit, per_process=args.per_process,
                            timeout=max(600.0, 10 * args.rounds + n))
            complete = [r for r in run.rounds if r.get("outcome") == "complete" and len(r["answered"]) == n]
            if len(complete) != args.rounds:
                raise FleetError(f"{n} agents: only {len(complete)} of {args.rounds} rounds complete with {n} answers")
            ov = overheads(run, args.train_seconds)
            agg = [r["aggregation_s"] for r in run.rounds]
            collect = [r["duration_s"] - r["aggregation_s"] - r.get("eval_seconds", 0.0) - args.train_seconds
                       for r in run.rounds]
            dur = [r["duration_s"] for r in run.rounds]
            ev = [r["eval_seconds"] for r in run.rounds]
            rows.append({
                "agents": n, "rounds": len(run.rounds),
                "duration_p50_s": percentile(dur, 0.5), "eval_p50_s": percentile(ev, 0.5),
                "overhead_p50_s": percentile(ov, 0.5), "overhead_p95_s": percentile(ov, 0.95),
                "fedavg_p50_s": percentile(agg, 0.5), "collect_p50_s": percentile(collect, 0.5),
                "overhead_per_agent_ms": 1000 * percentile(ov, 0.5) / n,
                "startup_s": run.startup_s, "fleet_wall_s": run.wall_s,
            })
            print(f"{n} agents: overhead p50 {rows[-1]['overhead_p50_s']:.3f}s p95 {rows[-1]['overhead_p95_s']:.3f}s "
                  f"({run.wall_s:.0f}s wall)", flush=True)
    finally:
        done_with(base, args.keep)
    baseline = per_agent_vs_baseline(rows)
    for r in rows:
        r["p50_vs_baseline"] = r["overhead_p50_s"] / baseline["overhead_p50_s"]
    report("round_overhead", rows, columns=[
        "agents", "rounds", "duration_p50_s", "eval_p50_s", "overhead_p50_s", "overhead_p95_s", "collect_p50_s",
        "fedavg_p50_s", "overhead_per_agent_ms", "per_agent_vs_baseline", "p50_vs_baseline", "startup_s", "fleet_wall_s",
    ], meta={"rounds": args.rounds, "train_seconds": args.train_seconds, "eval_limit": args.eval_limit,
             "per_process": args.per_process, "baseline_agents": baseline["agents"],
             "overhead": "duration_s - train_seconds - eval_seconds, per round (aggregator metrics.jsonl)",
             "collect": "duration_s - aggregation_s - eval_seconds - train_seconds: announcing, collecting "
                        "the N updates, loading and publishing the new global",
             "fedavg": "aggregation_s: the strategy's aggregate call",
             "wall_s": time.monotonic() - t_all})
    print(f"total wall time: {time.monotonic() - t_all:.0f}s")


if __name__ == "__main__":
    main()
