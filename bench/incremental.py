"""Incremental learning on the agent: a new domain from 200 labelled samples, with and without replay.

An agent learns three VADER domains (the edge classifier: MiniLM pruned to 4 layers, LoRA r=8,
new head; `--phase1-steps` steps of batch 32 on the three domains' training split), then 200
labelled samples of the fourth domain arrive in its SampleStore and it runs one incremental
fine-tuning (`edge_agent.incremental.fine_tune`, the agent's own code path: the new samples
except every `holdout_every`-th, which the agent keeps as its holdout, mixed with
`replay_ratio` x as many replay examples of the three domains it learned). Accuracy per domain
on the held-out test split (data.sentiment), before and after, for each replay ratio; every
ratio starts from the same adapter.

    python -m bench.incremental [--variants 0:0,1:0,2:0,1:1] [--new-domain tweets] [--phase1-steps 120] [--threads 1]

A variant is RATIO:DISTILL: replay examples per new sample, and the weight of the distillation
term on them (the model's own answers before the run; 0: labels only). "gain" is the new
domain's accuracy change, "worst old" the change on the learned domain that fared worst, "mean
old" the mean over the three, in points (negative: it fell). tests/test_incremental.py runs
the agent's default, 1:0.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge_agent.incremental import IncrementalConfig  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    new_domain: str = "tweets"
    phase1_steps: int = 120  # batch 32 on the three learned domains
    phase1_lr: float = 5e-3
    new_samples: int = 200  # labelled samples of the new domain that reach the store
    eval_per_domain: int = 0  # held-out texts per domain (0: the whole test split of each)
    max_length: int = 32
    seed: int = 0
    incremental: IncrementalConfig = field(default_factory=lambda: IncrementalConfig(
        min_new=1, replay_ratio=1.0, epochs=3, lr=1e-3, batch_size=16, holdout_every=10, distill_weight=0.0))


@dataclass
class Learned:
    """An agent after the three-domain phase, and everything the scenario measures it on."""

    scenario: Scenario
    trainer: object
    snapshot: dict  # the adapter after phase 1: every variant starts from it
    older: list  # the three domains' training examples (the agent's shard: the replay pool)
    new: list  # the new domain's samples that reach the store
    evalsets: dict  # domain -> held-out examples
    before: dict  # domain -> accuracy after phase 1
    phase1_seconds: float


def per_domain_accuracy(trainer, evalsets: dict, max_length: int) -> dict[str, float]:
    from models.train import evaluate

    return {d: evaluate(trainer.model, trainer.tokenizer, ex, max_length=max_length).accuracy for d, ex in evalsets.items()}


def learn_three_domains(sc: Scenario) -> Learned:
    from data.sentiment import DOMAINS, train_test_split
    from edge_agent.trainer import Trainer
    from models.classifier import ClassifierSpec

    if sc.new_domain not in DOMAINS:
        raise ValueError(f"new_domain must be one of {DOMAINS}")
    train, test = train_test_split()
    older = [e for e in train if e.domain != sc.new_domain]
    new = random.Random(sc.seed + 1).sample([e for e in train if e.domain == sc.new_domain], sc.new_samples)
    evalsets = {}
    for d in DOMAINS:
        ex = [e for e in test if e.domain == d]
        if sc.eval_per_domain and len(ex) > sc.eval_per_domain:
            ex = random.Random(sc.seed + 2).sample(ex, sc.eval_per_domain)
        evalsets[d] = ex
    trainer = Trainer(ClassifierSpec(max_length=sc.max_length, seed=sc.seed), lr=sc.phase1_lr, batch_size=32,
                      seed=sc.seed)
    t0 = time.perf_counter()
    trainer.train(older, epochs=1, max_steps=sc.phase1_steps, round_number=0)
    seconds = time.perf_counter() - t0
    return Learned(sc, trainer, trainer.state(), older, new, evalsets,
                   per_domain_accuracy(trainer, evalsets, sc.max_length), seconds)


def incremental_variant(learned: Learned, replay_ratio: float, distill: float, store_dir: str | Path) -> dict:
    """Restore the phase-1 adapter, store the new samples, run one incremental fine-tuning, measure."""
    import torch

    from edge_agent.incremental import fine_tune
    from edge_agent.store import SampleStore

    sc = learned.scenario
    cfg = replace(sc.incremental, replay_ratio=replay_ratio, distill_weight=distill)
    learned.trainer.load_global(learned.snapshot, 0)
    # BERT's dropout draws from torch's global RNG: every variant starts from the same state
    torch.manual_seed(sc.seed + 3)
    path = Path(store_dir) / f"samples-replay-{replay_ratio:g}-{distill:g}.db"
    path.unlink(missing_ok=True)
    with SampleStore(path) as store:
        store.add_many([(e.text, e.label, "feedback") for e in learned.new])
        result = fine_tune(learned.trainer, store, learned.older, cfg)
    after = per_domain_accuracy(learned.trainer, learned.evalsets, sc.max_length)
    return {"replay_ratio": replay_ratio, "distill": distill, "result": result, "after": after}


def row(learned: Learned, v: dict) -> dict:
    new_d = learned.scenario.new_domain
    b, a = learned.before, v["after"]
    old = [d for d in b if d != new_d]
    r = v["result"]
    out = {
        "replay ratio": v["replay_ratio"],
        "distill": v["distill"],
        "trained on": f"{r.new_examples} new + {r.replay_examples} replay",
        f"{new_d} before": round(b[new_d], 4),
        f"{new_d} after": round(a[new_d], 4),
        "gain, pts": round(100 * (a[new_d] - b[new_d]), 1),
    }
    for d in old:
        out[f"{d} before"] = round(b[d], 4)
        out[f"{d} after"] = round(a[d], 4)
    out["worst old, pts"] = round(min(100 * (a[d] - b[d]) for d in old), 1)
    out["mean old, pts"] = round(sum(100 * (a[d] - b[d]) for d in old) / len(old), 1)
    out["steps"] = r.steps
    out["train s"] = round(r.seconds, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="0:0,1:0,2:0,1:1",
                   help="comma-separated RATIO:DISTILL (replay examples per new sample : distillation weight)")
    p.add_argument("--new-domain", default=Scenario.new_domain)
    p.add_argument("--phase1-steps", type=int, default=Scenario.phase1_steps)
    p.add_argument("--eval-per-domain", type=int, default=Scenario.eval_per_domain)
    p.add_argument("--max-length", type=int, default=Scenario.max_length)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="incremental", help="results file: bench/results/NAME.json")
    args = p.parse_args()
    import torch

    from bench.common import report

    torch.set_num_threads(args.threads)
    sc = Scenario(new_domain=args.new_domain, phase1_steps=args.phase1_steps, eval_per_domain=args.eval_per_domain,
                  max_length=args.max_length, seed=args.seed)
    t0 = time.perf_counter()
    learned = learn_three_domains(sc)
    print(f"phase 1 ({sc.phase1_steps} steps on the other three domains): {learned.phase1_seconds:.0f}s; "
          f"accuracy {', '.join(f'{d} {a:.3f}' for d, a in learned.before.items())}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variants.split(","):
            ratio, distill = (float(x) for x in v.split(":"))
            rows.append(row(learned, incremental_variant(learned, ratio, distill, tmp)))
            print(rows[-1], flush=True)
    cfg = sc.incremental
    report(args.name, rows, meta={
        "scenario": {k: v for k, v in sc.__dict__.items() if k != "incremental"},
        "incremental": {k: v for k, v in cfg.__dict__.items() if k not in ("replay_ratio", "distill_weight")},
        "eval_sizes": {d: len(ex) for d, ex in learned.evalsets.items()},
        "phase1_seconds": round(learned.phase1_seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
    })


if __name__ == "__main__":
    main()
