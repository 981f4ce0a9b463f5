"""CPU cost of a tree of aggregators against one aggregator, per 1,000 updates (aggregator/tree.py).

    python -m bench.tree_cost                      # 1,000 updates, K = 2 and 3 replicas, fedavg and fedadam
    python -m bench.tree_cost --updates 2000 --k 2 4

The updates have the demo adapter's names and shapes (MiniLM-4L LoRA r=8: 18 float32 tensors,
49,922 values, ~200 KB each), seeded random. The baseline in the same run is one aggregator:
each update checked (`check_update`, as the round does when it arrives) and the strategy's
`aggregate` over all of them. The tree: each replica checks and folds its share into a float64
partial (`Partial.fold`); the master combines the K partials and takes the server step once
(`tree_step`). Every phase is timed with the process's CPU clock (time.process_time), one after
the other in this process: a 2-core machine cannot show the wall-clock speed-up of replicas on
separate machines, but the CPU each process would spend is what the issue's targets are about
(the master at least 3x cheaper than one aggregator; replicas plus master at most 1.3x it).
Decoding frames off the wire is left out of both sides (bench.fedavg measures it).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=1000)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--strategies", nargs="+", default=["fedavg", "fedadam"])
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from aggregator.strategies import make_strategy
    from aggregator.strategies.base import ClientUpdate, check_update
    from aggregator.tree import Partial, tree_step
    from bench.common import report
    from bench.fedavg import adapter_shapes

    shapes = adapter_shapes()
    g = torch.Generator().manual_seed(0)
    current = {k: torch.randn(s, generator=g) * 0.01 for k, s in shapes.items()}
    updates = [ClientUpdate(f"a{i:05d}", {k: c + 0.001 * torch.randn(c.shape, generator=g) for k, c in current.items()},
                            num_examples=100 + i % 50, nonce=uuid.uuid4().hex) for i in range(args.updates)]
    per = 1000 / args.updates
    rows = []
    for name in args.strategies:
        strategy = make_strategy(name)
        t0 = time.process_time()
        for u in updates:
            check_update(current, u)
        single_state = strategy.aggregate(current, [ClientUpdate(u.agent_id, u.tensors, u.num_examples,
                                                                 nonce=u.nonce, checked=True) for u in updates])
        single = time.process_time() - t0
        rows.append({"strategy": name, "replicas": 0, "single_cpu_s": single * per, "replica_cpu_s": 0.0,
                     "master_cpu_s": single * per, "master_vs_single": 1.0, "total_vs_single": 1.0,
                     "max_abs_diff": 0.0})
        for k in args.k:
            tree = make_strategy(name)
            parts = [Partial(f"r{j}", 1) for j in range(k)]
            replica_cpu = []
            for j, p in enumerate(parts):
                t0 = time.process_time()
                for u in updates[j::k]:
                    p.fold(current, u, weighted=tree.tree_weighted)
                replica_cpu.append(time.process_time() - t0)
            t0 = time.process_time()
            state = tree_step(tree, current, parts)
            master = time.process_time() - t0
            diff = max(float((state[n].double() - single_state[n].double()).abs().max()) for n in state)
            rows.append({"strategy": name, "replicas": k, "single_cpu_s": single * per,
                         "replica_cpu_s": max(replica_cpu) * per, "master_cpu_s": master * per,
                         "master_vs_single": master / single, "total_vs_single": (sum(replica_cpu) + master) / single,
                         "max_abs_diff": diff})
    report("tree_cost", rows, meta={"updates": args.updates, "adapter_values": sum(t.numel() for t in current.values())},
           columns=["strategy", "replicas", "single_cpu_s", "replica_cpu_s", "master_cpu_s", "master_vs_single",
                    "total_vs_single", "max_abs_diff"])
    print("CPU-seconds per 1,000 updates; replica_cpu_s is the busiest replica's; replicas 0 is one aggregator")


if __name__ == "__main__":
    main()
