"""Learning modes side by side: FedAvg, FedProx, FedAdam, sequential, independent, centralized,
each on the same splits and example budget, iid and by-domain; held-out accuracy per round.

    python -m bench.strategies_compare [--rounds 10] [--partition iid by-domain] [--model head|full]

Default model: the simulator's cached-feature model ("head": frozen MiniLM-4L mean-pooled
sentence features, LoRA r=8 on a dense layer + a new classifier), so that the whole table
takes about a minute once the features are cached (the first run computes them for the whole
VADER set: minutes on 2 cores). `--model full` trains the real pruned MiniLM with LoRA
instead: about 0.3 s per step on 2 cores, so cut --rounds / --local-steps / --train-limit.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import report, simulation_args  # noqa: E402

HEAD_NOTE = ("cached-feature model: frozen MiniLM-L6 pruned to 4 layers, mean-pooled sentence features computed "
             "once; trained: LoRA r=8 (alpha 16) on a 384x384 dense (+tanh) and a new 2-way classifier, via peft")
FULL_NOTE = "the real edge classifier: MiniLM-L6 pruned to 4 layers, LoRA r=8 on query/value + classifier"


def runs(args) -> dict:
    from edgetune.simulate import SimConfig

    common = dict(agents=args.agents, rounds=args.rounds, local_steps=args.local_steps, lr=args.lr,
                  model=args.model, train_limit=args.train_limit, eval_limit=args.eval_limit, seed=args.seed,
                  eval_agents=False)
    return {
        "FedAvg": dict(mode="fedavg", **common),
        f"FedProx (mu={args.prox_mu:g})": dict(mode="fedprox", prox_mu=args.prox_mu, **common),
        f"FedAdam (eta={args.server_eta:g})": dict(mode="fedadam", strategy_options={"eta": args.server_eta}, **common),
        "sequential": dict(mode="sequential", **common),
        "independent (mean)": dict(mode="independent", **common),
        "centralized": dict(mode="centralized", **common),
    }, SimConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--agents", type=int, default=5)
    p.add_argument("--prox-mu", type=float, default=0.1)
    p.add_argument("--server-eta", type=float, default=1e-2)
    simulation_args(p, local_steps=20, partition=["iid", "by-domain"])
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from edgetune.simulate import compare

    t_all = time.perf_counter()
    rows = []
    specs, SimConfig = runs(args)
    for part in args.partition:
        configs = {name: SimConfig(partition=part, **kw) for name, kw in specs.items()}
        results = compare(configs, log=None)
        for name, res in results.items():
            acc = res.accuracies
            row = {"run": name, "partition": part, "round 0": acc[0]}
            row.update({f"r{i}": a for i, a in enumerate(acc[1:], 1)})
            row.update(final=acc[-1], best=max(acc[1:]), seconds=round(res.seconds, 1))
            if name.startswith("independent"):
                last = res.rows[-1]
                row["note"] = f"agents {last['accuracy_min']:.3f}..{last['accuracy_max']:.3f}"
            rows.append(row)
            print(f"{part:>9} {name:<22} " + " ".join(f"{a:.3f}" for a in acc), flush=True)
    wall = time.perf_counter() - t_all
    cols = ["run", "partition", "round 0"] + [f"r{i}" for i in range(1, args.rounds + 1)] + ["final", "best", "seconds", "note"]
    report("strategies_compare", rows, columns=cols, meta={
        "model": HEAD_NOTE if args.model == "head" else FULL_NOTE,
        "data": "VADER sentiment (4 domains), fixed hash split; " + (
            f"train sample {args.train_limit}" if args.train_limit else "all training examples") + ", " + (
            f"held-out sample {args.eval_limit}" if args.eval_limit else "all held-out examples"),
        "agents": args.agents, "rounds": args.rounds, "local_steps": args.local_steps, "batch_size": 32,
        "lr": args.lr, "optimizer": "AdamW, fresh each round (as the service's agents)",
        "prox_mu": args.prox_mu, "fedadam": {"eta": args.server_eta, "b1": 0.9, "b2": 0.99, "tau": 1e-3},
        "centralized": "pooled data; each round exactly the examples the agents saw together",
        "independent": "mean over agents of each agent's own model on the held-out split (no aggregation)",
        "wall_seconds": round(wall, 1),
    })
    print(f"wall: {wall:.0f}s")


if __name__ == "__main__":
    main()
