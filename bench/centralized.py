"""The centralized baseline that a federated run is compared with.

    python -m bench.centralized                       # both partitions, 800 steps each
    python -m bench.centralized --partition iid --steps 200 --eval-every 50 --threads 2

Same model (ClassifierSpec defaults: MiniLM pruned to 4 layers, LoRA r=8 on query/value, new
head), same data (the VADER training split), same optimiser (AdamW, lr and batch size of
`edgetune run`'s defaults), same max_length, and by default the same number of examples as the
default federated run: agents x rounds x max_local_steps x batch = 4 x 5 x 40 x 32 = 25,600
examples = 800 steps of 32 (taken from edgetune.runner.RunOptions, so it follows the defaults).

One centralized model per partition:

- `iid`: the pooled training split, shuffled;
- `by-domain`: the union of the by-domain shards of `edgetune run` (4 agents, partition seed 0),
  shuffled. A centralized trainer sees the union whatever the partition, and the union of
  either partition is the whole training split. With the shipped data the union of the
  by-domain shards, concatenated shard by shard, is even the training split in its own order
  (the split is in file order, one domain after another, and each shard is one domain with
  sorted indices), so the same shuffle gives the same batches and the same model: the bench
  notices that the pooled lists are identical and trains one model for both, reported as
  "iid = by-domain". The centralized number is therefore one number, whatever the partition.

Training is one AdamW over all steps (the federated agents restart theirs every round). Batches
are exactly `batch` examples, drawn from successive shuffled passes over the data (a batch may
straddle two passes), so `steps x batch` examples are seen. Accuracy is measured on a fixed,
seeded subset of the held-out split at each checkpoint (the subset the aggregator uses with
`--eval-limit N`: random.Random(0).sample(test, N)) and on the full held-out split
(data.sentiment.train_test_split()[1]) at the end, with per-domain accuracies there.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def federated_defaults() -> dict:
    from edgetune.runner import RunOptions

    o = RunOptions()
    return {
        "agents": o.agents, "rounds": o.rounds, "max_local_steps": o.max_local_steps,
        "batch_size": o.batch_size, "lr": o.lr, "partition_seed": o.seed,
        "steps": o.agents * o.rounds * o.max_local_steps,
    }


def pooled_examples(partition_name: str, train: list, agents: int, seed: int) -> list:
    """The examples a centralized trainer gets for this partition: the union of its shards."""
    from data.partition import partition

    if partition_name == "iid":
        return list(train)
    parts = partition(partition_name, labels=[e.label for e in train], domains=[e.domain for e in train],
                      k=agents, seed=seed)
    union = [train[i] for p in parts for i in p]
    assert len(union) == len(train) and len({e.uid for e in union}) == len(train)
    return union


def batches(examples: list, batch_size: int, seed: int):
    """Endless batches of exactly batch_size: successive passes, each shuffled by one rng."""
    rng = random.Random(seed)
    buf: list = []
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for j in order:
            buf.append(examples[j])
            if len(buf) == batch_size:
                yield buf
                buf = []


def run_partition(name: str, examples: list, subset: list, test: list, args, fed: dict, echo=print) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from data.sentiment import DOMAINS
    from models.classifier import ClassifierSpec, build_classifier, load_tokenizer
    from models.train import _encode, evaluate, predict_logits, trainable_parameters

    spec = ClassifierSpec(max_length=args.max_length)
    model = build_classifier(spec)  # the same head init (spec.seed) for every partition
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(args.seed)  # dropout
    opt = torch.optim.AdamW(trainable_parameters(model), lr=args.lr)
    rows: list[dict] = []
    t0 = time.perf_counter()
    train_s = 0.0
    losses: list[float] = []

    def checkpoint(step: int, full: bool) -> None:
        te = time.perf_counter()
        if full:
            logits = predict_logits(model, tokenizer, [e.text for e in test], max_length=spec.max_length)
            labels = torch.tensor([e.label for e in test], dtype=torch.long)
            right = logits.argmax(-1) == labels
            acc, loss, n = float(right.float().mean()), float(F.cross_entropy(logits, labels)), len(test)
            per = {d: float(right[[i for i, e in enumerate(test) if e.domain == d]].float().mean()) for d in DOMAINS}
        else:
            r = evaluate(model, tokenizer, subset, max_length=spec.max_length)
            acc, loss, n, per = r.accuracy, r.loss, r.n, {}
        eval_s = time.perf_counter() - te
        row = {
            "partition": name,
            "step": step,
            "examples seen": step * args.batch_size,
            "eval set": f"full test ({n})" if full else f"subset ({n})",
            "accuracy": acc,
            "eval loss": loss,
            "train loss (last 100)": (sum(losses[-100:]) / len(losses[-100:])) if losses else float("nan"),
            "train s": train_s,
            "eval s": eval_s,
            **per,
        }
        rows.append(row)
        extra = "  " + " ".join(f"{d} {a:.4f}" for d, a in per.items()) if per else ""
        echo(f"[{name}] step {step:>4}: {row['eval set']:<16} accuracy {acc:.4f}  loss {loss:.4f}  "
             f"(train {train_s:.0f}s, eval {eval_s:.0f}s){extra}", flush=True)

    checkpoint(0, full=False)
    stream = batches(examples, args.batch_size, args.seed)
    for step in range(1, args.steps + 1):
        ts = time.perf_counter()
        model.train()
        batch = next(stream)
        enc = _encode(tokenizer, [e.text for e in batch], spec.max_length)
        labels = torch.tensor([e.label for e in batch], dtype=torch.long)
        loss = F.cross_entropy(model(**enc).logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        train_s += time.perf_counter() - ts
        if step == args.steps:
            checkpoint(step, full=True)
        elif args.eval_every and step % args.eval_every == 0:
            checkpoint(step, full=False)
    echo(f"[{name}] {args.steps} steps in {train_s:.0f}s of training ({train_s / max(args.steps, 1):.2f} s/step), "
         f"{time.perf_counter() - t0:.0f}s with evaluation", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    fed = federated_defaults()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=fed["steps"],
                    help=f"training steps (default {fed['steps']} = agents {fed['agents']} x rounds {fed['rounds']} "
                         f"x max_local_steps {fed['max_local_steps']}, the default federated run's budget)")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between checkpoint evaluations (0: only the end)")
    ap.add_argument("--eval-subset", type=int, default=1000, help="held-out examples at intermediate checkpoints")
    ap.add_argument("--partition", choices=("iid", "by-domain", "both"), default="both")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--batch-size", type=int, default=fed["batch_size"])
    ap.add_argument("--lr", type=float, default=fed["lr"])
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="shuffle and dropout seed")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be at least 1")

    import torch

    from bench.common import report
    from data.sentiment import DOMAINS, train_test_split

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    train, test = train_test_split()
    subset = random.Random(0).sample(test, args.eval_subset) if 0 < args.eval_subset < len(test) else test
    parts = ["iid", "by-domain"] if args.partition == "both" else [args.partition]
    print(f"train {len(train)} examples, test {len(test)} (checkpoints on a seeded subset of {len(subset)}); "
          f"{args.steps} steps x batch {args.batch_size} = {args.steps * args.batch_size:,} examples per partition "
          f"({args.steps * args.batch_size / len(train):.2f} passes); AdamW lr {args.lr}; {args.threads} threads", flush=True)
    # identical pooled data in identical order trains the identical model: train it once
    groups: dict[tuple, list[str]] = {}
    pooled = {}
    for p in parts:
        pooled[p] = pooled_examples(p, train, fed["agents"], fed["partition_seed"])
        groups.setdefault(tuple(e.uid for e in pooled[p]), []).append(p)
    rows: list[dict] = []
    for names in groups.values():
        if len(names) > 1:
            print(f"{' and '.join(names)}: the union of the shards is the same examples in the same order "
                  f"(the training split); one centralized model serves for {' and '.join(names)}", flush=True)
        rows += run_partition(" = ".join(names), pooled[names[0]], subset, test, args, fed)
    wall = time.perf_counter() - t0
    report(
        "centralized",
        rows,
        columns=["partition", "step", "examples seen", "eval set", "accuracy", "eval loss", "train loss (last 100)",
                 "train s", *DOMAINS],
        meta={
            "what": "centralized baseline: one model per partition on the union of its shards, same budget as the "
                    "default federated run",
            "model": "MiniLM (all-MiniLM-L6-v2) pruned to 4 layers, LoRA r=8 on query/value, new 2-class head",
            "steps": args.steps, "batch_size": args.batch_size, "examples_per_partition": args.steps * args.batch_size,
            "lr": args.lr, "optimizer": "AdamW (torch defaults otherwise), one optimizer for the whole run",
            "max_length": args.max_length, "threads": args.threads, "seed": args.seed,
            "federated_defaults": fed,
            "train_examples": len(train), "test_examples": len(test),
            "checkpoint_eval": f"random.Random(0).sample(test, {len(subset)})",
            "final_eval": f"full test split ({len(test)})",
            "wall_s": wall,
        },
    )
    print(f"\ncheckpoints before the last: accuracy on the seeded subset of {len(subset)} held-out examples; "
          f"the last row per partition: the full held-out split ({len(test)}), with per-domain accuracy")
    print(f"wall time: {wall:.0f}s ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
