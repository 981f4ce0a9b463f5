"""Client-level DP (DP-FedAvg): held-out accuracy against epsilon for a few noise multipliers.

    python -m bench.dp_epsilon [--noise 0 0.5 1 2] [--agents 100] [--participation 0.2] [--rounds 30]

Each row is one run: clip each agent's delta to --clip-norm, average uniformly, add Gaussian
noise of std z * C / n; epsilon at --delta from the RDP accountant of the sampled Gaussian
mechanism with q = n / N per round. "no DP" is plain FedAvg on the same agents and rounds.
Default model: the simulator's cached-feature model (see bench/strategies_compare.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import report, simulation_args  # noqa: E402
from bench.strategies_compare import FULL_NOTE, HEAD_NOTE  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    p.add_argument("--clip-norm", type=float, default=0.2)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--participation", type=float, default=0.2)
    p.add_argument("--rounds", type=int, default=30)
    simulation_args(p, local_steps=10)
    args = p.parse_args()
    from edgetune.simulate import SimConfig, load_splits, make_backend, run_simulation

    t_all = time.perf_counter()
    base = dict(agents=args.agents, participation=args.participation, rounds=args.rounds, partition=args.partition,
                local_steps=args.local_steps, lr=args.lr, model=args.model, train_limit=args.train_limit,
                eval_limit=args.eval_limit, seed=args.seed, eval_agents=False)
    first = SimConfig(**base)
    splits = load_splits(first)
    backend = make_backend(first, splits[0] + splits[1])
    rows = []
    plain = run_simulation(first, backend=backend, splits=splits)
    rows.append({"run": "no DP (FedAvg)", "noise multiplier": "-", "clip": "-", "q": args.participation,
                 "epsilon": "-", "accuracy": statistics.mean(plain.accuracies[-3:]), "final": plain.accuracy,
                 "seconds": round(plain.seconds, 1)})
    print(rows[-1], flush=True)
    for z in args.noise:
        cfg = SimConfig(strategy="dp_fedavg", strategy_options={"clip_norm": args.clip_norm, "noise_multiplier": z,
                                                                 "delta": args.delta}, **base)
        res = run_simulation(cfg, backend=backend, splits=splits)
        last = res.rows[-1]
        eps = last["epsilon"]
        clipped = statistics.mean(sum(n > args.clip_norm for n in r["unclipped_norms"]) / len(r["unclipped_norms"])
                                  for r in res.rows[1:])
        rows.append({"run": "DP-FedAvg", "noise multiplier": z, "clip": args.clip_norm, "q": last["sample_rate"],
                     "epsilon": "inf" if eps is None else round(eps, 2), "accuracy": statistics.mean(res.accuracies[-3:]),
                     "final": res.accuracy, "noise std": last["noise_std"], "clipped share": round(clipped, 2),
                     "seconds": round(res.seconds, 1)})
        print(rows[-1], flush=True)
    wall = time.perf_counter() - t_all
    report("dp_epsilon", rows, columns=["run", "noise multiplier", "clip", "q", "epsilon", "accuracy", "final",
                                        "noise std", "clipped share", "seconds"], meta={
        "model": HEAD_NOTE if args.model == "head" else FULL_NOTE,
        "setup": f"{args.agents} agents ({args.partition}), {args.participation:g} of them per round, {args.rounds} rounds, "
                 f"{args.local_steps} local AdamW steps (lr {args.lr:g}, batch 32)",
        "epsilon": f"(epsilon, delta={args.delta:g})-DP at the agent level after all rounds, RDP accountant "
                   "(aggregator/strategies/accountant.py), fixed-size sampling approximated as Poisson with q = n/N",
        "metric": "accuracy = held-out accuracy, mean of the last 3 rounds; final = last round",
        "train_limit": args.train_limit, "eval_limit": args.eval_limit, "wall_seconds": round(wall, 1),
    })
    print(f"wall: {wall:.0f}s")


if __name__ == "__main__":
    main()
