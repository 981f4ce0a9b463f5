"""Poisoning: held-out accuracy of FedAvg and the robust strategies with 1 of 5 agents
sending boosted (x10) or sign-flipped (x1 and x10) deltas, against the clean run.

    python -m bench.poisoning [--rounds 10] [--partition iid] [--model head|full]

"accuracy" is the mean of the last 3 rounds' held-out accuracy; "drop" is clean minus
attacked, in points. Default model: the simulator's cached-feature model (see
bench/strategies_compare.py); about a minute once the features are cached.
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

ATTACKS = {  # column -> (attack, attack_scale, flip_scale)
    "clean": (None, 10.0, 1.0),
    "scale x10": ("scale", 10.0, 1.0),
    "flip x1": ("flip", 10.0, 1.0),
    "flip x10": ("flip", 10.0, 10.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--agents", type=int, default=5)
    p.add_argument("--attackers", type=int, default=1)
    p.add_argument("--clip-bound", type=float, default=0.5)
    simulation_args(p, local_steps=10)
    args = p.parse_args()
    from edgetune.simulate import SimConfig, load_splits, make_backend, run_simulation

    f = args.attackers
    strategies = {
        "fedavg": ("fedavg", {}),
        "median": ("median", {}),
        "trimmed_mean (beta 0.2)": ("trimmed_mean", {"beta": 0.2}),
        f"krum (f={f}, m=3)": ("krum", {"f": f, "m": 3}),
        f"clip (bound {args.clip_bound:g})": ("clip", {"bound": args.clip_bound}),
    }
    t_all = time.perf_counter()
    base = dict(agents=args.agents, rounds=args.rounds, partition=args.partition, local_steps=args.local_steps, lr=args.lr,
                model=args.model, train_limit=args.train_limit, eval_limit=args.eval_limit, seed=args.seed,
                eval_agents=False)
    first = SimConfig(**base)
    splits = load_splits(first)
    backend = make_backend(first, splits[0] + splits[1])
    rows = []
    attackers = None
    for label, (name, opts) in strategies.items():
        row = {"strategy": label}
        for col, (attack, a_scale, f_scale) in ATTACKS.items():
            cfg = SimConfig(strategy=name, strategy_options=dict(opts), attackers=args.attackers if attack else 0,
                            attack=attack, attack_scale=a_scale, flip_scale=f_scale, **base)
            res = run_simulation(cfg, backend=backend, splits=splits)
            attackers = res.attackers or attackers
            row[col] = statistics.mean(res.accuracies[-3:])
            if attack:
                row[f"drop {col}"] = round(100 * (row["clean"] - row[col]), 1)
        rows.append(row)
        print(row, flush=True)
    wall = time.perf_counter() - t_all
    cols = ["strategy", "clean"] + [c for c in ATTACKS if c != "clean"] + [f"drop {c}" for c in ATTACKS if c != "clean"]
    report("poisoning", rows, columns=cols, meta={
        "model": HEAD_NOTE if args.model == "head" else FULL_NOTE,
        "setup": f"{args.agents} agents, {args.partition}, {args.attackers} attacker(s) {attackers}, {args.rounds} rounds, "
                 f"{args.local_steps} local AdamW steps (lr {args.lr:g}, batch 32)",
        "metric": "held-out accuracy, mean of the last 3 rounds; drop = clean - attacked, points",
        "attacks": "scale x10: send global + 10*delta; flip x1: global - delta; flip x10: global - 10*delta",
        "train_limit": args.train_limit, "eval_limit": args.eval_limit, "wall_seconds": round(wall, 1),
    })
    print(f"wall: {wall:.0f}s")


if __name__ == "__main__":
    main()
