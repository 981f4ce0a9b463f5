"""Your own task: federated against centralized training, and federated against central evaluation.

    python -m bench.own_task                     # iid and skewed, 3 agents, 5 rounds of 10 steps
    python -m bench.own_task --record            # also write bench/recorded/own_task.json (the test's figure)

The task is the Brown corpus genre of a sentence (data/genres.py: press reportage, learned,
adventure; 150 sentences each), one file per agent (CSV, JSONL, Parquet), written twice:

- `iid`: an even random split;
- `skewed`: each agent takes 60% of its rows from one genre (label skew).

For each, three figures on the same rows, the union of the agents' held-out slices (20% of each
file by hash, data.sources.holdout_split, never trained on):

- **federated**: `edgetune run --agent-data ...` (real processes over an embedded Mosquitto, the
  runner's defaults: batch 32, AdamW lr 5e-3), its final global evaluated on the devices
  (federated evaluation: the agents' confusion matrices summed);
- **central evaluation of the same checkpoints**: the same run is given the union of the held-out
  rows as `--eval-data`, so the aggregator evaluates every global itself; the two must agree
  (same model, same rows; only batch composition differs, so at most a near-tie prediction);
- **centralized**: one model (same base, LoRA, head seed) trained in this process on the union of
  the agents' training rows with the same examples seen: each agent's rows once a round (the
  runner's one local epoch, capped at max_local_steps batches), summed over agents and rounds.

Macro-F1 is the headline (3 balanced classes; accuracy too). Ratios are within one run, so the
machine's speed does not enter; seconds are reported for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(k, v)

from bench.common import report  # noqa: E402

GENRES = ("a", "j", "n")
SKEW = {"iid": 0.0, "skewed": 0.6}
RECORDED = ROOT / "bench" / "recorded" / "own_task.json"


def held_out_union(files: list[Path], labels: list[str], fraction: float):
    from data.sources import holdout_split, load_source

    train, held, per_file = [], [], []
    for f in files:
        t, h = holdout_split(load_source(str(f), labels=labels).examples, fraction)
        train += t
        held += h
        per_file.append(len(t))
    return train, held, per_file


def examples_seen(per_agent: list[int], rounds: int, max_local_steps: int, batch_size: int) -> int:
    """What the federated run's agents train on: each round one pass over its rows (the runner's
    one local epoch), capped at max_local_steps batches."""
    return rounds * sum(min(n, max_local_steps * batch_size) for n in per_agent)


def federated(files: list[Path], heldout_file: Path, out: Path, args) -> tuple[list[dict], float]:
    from edgetune import run_data
    from edgetune.runner import RunOptions, run_local

    opts = RunOptions(rounds=args.rounds, max_local_steps=args.max_local_steps, output=out, lr=args.lr,
                      batch_size=args.batch_size, num_layers=args.num_layers, eval_data=str(heldout_file),
                      seed=args.seed)
    run_data.resolve(opts, agent_data=str(files[0].parent / "agent-*"))
    t0 = time.time()
    run_local(opts, echo=lambda line: print("   ", line, flush=True))
    rows = [json.loads(x) for x in (out / "aggregator" / "metrics.jsonl").read_text().splitlines()]
    return rows, time.time() - t0


def centralized(train: list, held: list, labels: list[str], steps: int, args) -> dict:
    import torch

    from aggregator.evaluation import classification_figures
    from models.classifier import ClassifierSpec, build_classifier, load_tokenizer
    from models.train import evaluate, train_local

    torch.set_num_threads(args.threads)
    spec = ClassifierSpec(num_labels=len(labels), num_layers=args.num_layers)
    model, tok = build_classifier(spec), load_tokenizer(spec)
    t0 = time.time()
    train_local(model, tok, train, epochs=10**6, max_steps=steps, batch_size=args.batch_size, lr=args.lr,
                max_length=spec.max_length, seed=args.seed)
    r = evaluate(model, tok, held, max_length=spec.max_length)
    return {**classification_figures(r.confusion, labels), "seconds": time.time() - t0}


def run_partition(name: str, work: Path, args) -> dict:
    from data.genres import label_names, write_agent_files, write_rows

    labels = label_names(GENRES)
    files = write_agent_files(work / name / "data", GENRES, args.per_class, 3, SKEW[name], args.seed)
    train, held, per_agent = held_out_union(files, labels, 0.2)
    heldout_file = write_rows(work / name / "heldout.csv", held)
    print(f"{name}: {len(train)} training rows, {len(held)} held out, files {[f.name for f in files]}", flush=True)
    rows, fed_s = federated(files, heldout_file, work / name / "run", args)
    fed = {r["version"]: r for r in rows if r.get("eval") == "federated"}
    central = {r["version"]: r for r in rows if r.get("eval") == "central"}
    last = max(fed)
    seen = examples_seen(per_agent, args.rounds, args.max_local_steps, args.batch_size)
    steps = -(-seen // args.batch_size)  # the same examples seen, in full batches
    cen = centralized(train, held, labels, steps, args)
    agree = max(abs(fed[v]["macro_f1"] - central[v]["macro_f1"]) for v in fed if v in central)
    return {
        "partition": name, "held_out": len(held), "macro_f1_round0": fed[0]["macro_f1"],
        "federated_macro_f1": fed[last]["macro_f1"], "central_eval_macro_f1": central[last]["macro_f1"],
        "centralized_macro_f1": cen["macro_f1"], "gap": cen["macro_f1"] - fed[last]["macro_f1"],
        "federated_accuracy": fed[last]["accuracy"], "centralized_accuracy": cen["accuracy"],
        "fed_vs_central_eval_max_diff": agree, "examples_seen": seen,
        "centralized_steps": steps,
        "federated_s": fed_s, "centralized_s": cen["seconds"],
        "federated_per_round": [fed[v]["macro_f1"] for v in sorted(fed)],
    }


def main(argv: list[str] | None = None) -> None:
    from edgetune.runner import RunOptions

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--partitions", nargs="+", default=list(SKEW), choices=list(SKEW))
    p.add_argument("--per-class", type=int, default=150)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-local-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=RunOptions.lr, help="the agents' (and centralized) AdamW lr")
    p.add_argument("--batch-size", type=int, default=RunOptions.batch_size)
    p.add_argument("--num-layers", type=int, default=4, help="encoder layers kept (the task's pruning)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "own_task")
    p.add_argument("--record", action="store_true", help=f"also write {RECORDED.relative_to(ROOT)}")
    args = p.parse_args(argv)
    rows = [run_partition(name, args.work, args) for name in args.partitions]
    config = {"genres": list(GENRES), "per_class": args.per_class, "agents": 3, "rounds": args.rounds,
              "max_local_steps": args.max_local_steps, "lr": args.lr, "batch_size": args.batch_size,
              "num_layers": args.num_layers, "seed": args.seed}
    name = "own_task" if len(args.partitions) == len(SKEW) else f"own_task_{'_'.join(args.partitions)}"
    path = report(name, rows, meta={"config": config}, columns=[
        "partition", "held_out", "macro_f1_round0", "federated_macro_f1", "central_eval_macro_f1",
        "centralized_macro_f1", "gap", "fed_vs_central_eval_max_diff", "federated_s", "centralized_s"])
    if args.record:
        record(rows, config, machine_of(path))


def machine_of(results: Path) -> dict:
    return json.loads(results.read_text()).get("machine", {})


def record(rows: list[dict], config: dict, machine: dict) -> None:
    """bench/recorded/own_task.json: these partitions' rows, merged with the partitions recorded
    before under the same config (the test reads the iid centralized figure from it)."""
    old = json.loads(RECORDED.read_text()) if RECORDED.exists() else {}
    runs = old.get("runs", {}) if old.get("config") == config else {}
    runs.update({r["partition"]: {**r, "machine": machine} for r in rows})
    RECORDED.write_text(json.dumps({"config": config, "runs": runs, "command": "python -m bench.own_task --record"},
                                   indent=2) + "\n")
    print(f"recorded: {RECORDED}")


if __name__ == "__main__":
    main()
