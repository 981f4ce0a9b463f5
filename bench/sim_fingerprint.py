"""The in-process simulator's per-round accuracies and final global, as a fingerprint of its logic.

    python -m bench.sim_fingerprint [--against bench/recorded/sim_fingerprint-BEFORE.json]

Runs a fixed set of simulator scenarios (every learning mode, robust and DP strategies, an
attacker, buffered async with redelivery) on the cached-feature model and a seeded 1,200 / 600
sample of VADER, and prints each run's held-out accuracy per round (full float repr) and the
sha256 of its final global adapter. `--against` compares with an earlier run's JSON and reports,
per scenario, whether accuracies and the final state are bit-identical: a restructure of the
round code must leave every line "identical".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import report  # noqa: E402

BASE = dict(train_limit=1200, eval_limit=600, local_steps=10, lr=2e-3, agents=5, rounds=4, seed=0)

SCENARIOS = {
    "fedavg": dict(mode="fedavg"),
    "fedavg-dirichlet-60%": dict(mode="fedavg", partition="dirichlet", participation=0.6),
    "fedprox": dict(mode="fedprox", prox_mu=0.01),
    "fedadam": dict(mode="fedadam", strategy_options={"eta": 3e-3}),
    "fedyogi": dict(mode="fedavg", strategy="fedyogi", strategy_options={"eta": 3e-3}),
    "median-flip": dict(mode="fedavg", strategy="median", attackers=1, attack="flip"),
    "trimmed-scale": dict(mode="fedavg", strategy="trimmed_mean", strategy_options={"beta": 0.2}, attackers=1,
                          attack="scale"),
    "krum-flip": dict(mode="fedavg", strategy="krum", strategy_options={"f": 1, "m": 3}, attackers=1, attack="flip"),
    "clip": dict(mode="fedavg", strategy="clip", strategy_options={"bound": 0.05}),
    "dp_fedavg": dict(mode="fedavg", strategy="dp_fedavg", strategy_options={"clip_norm": 0.2, "noise_multiplier": 0.5}),
    "sequential": dict(mode="sequential"),
    "independent": dict(mode="independent"),
    "centralized": dict(mode="centralized"),
    "async": dict(mode="async", speeds=[1, 1, 2, 3, 5], buffer_size=3, redeliver=0.3),
}


def state_hash(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", help="an earlier run's JSON (bench/results/sim_fingerprint.json) to compare with")
    p.add_argument("--only", nargs="*", help="run only these scenarios")
    args = p.parse_args()
    from edgetune.simulate import SimConfig, run_simulation

    before = {}
    if args.against:
        before = {r["scenario"]: r for r in json.load(open(args.against))["rows"]}
    rows = []
    for name, kw in SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        res = run_simulation(SimConfig(**{**BASE, **kw}))
        row = {"scenario": name, "accuracies": [repr(a) for a in res.accuracies], "final_state": state_hash(res.final_state),
               "seconds": round(time.perf_counter() - t0, 1)}
        if name in before:
            same = before[name]["accuracies"] == row["accuracies"] and before[name]["final_state"] == row["final_state"]
            row["vs_before"] = "identical" if same else "DIFFERENT"
        rows.append(row)
        print(f"{name:<22} {' '.join(f'{float(a):.4f}' for a in row['accuracies'])} {row['final_state']} "
              f"{row.get('vs_before', '')}", flush=True)
    report("sim_fingerprint", rows, columns=["scenario", "accuracies", "final_state", "vs_before", "seconds"],
           meta={"setting": BASE, "against": args.against})
    if any(r.get("vs_before") == "DIFFERENT" for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
