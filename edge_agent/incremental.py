"""Incremental fine-tuning on the device: new labelled samples from the store, mixed with replay.

Between federated rounds the agent fine-tunes its LoRA on the labelled samples users gave since
its last run (`SampleStore`, `used_in_training = 0`), mixed with a replay sample of older data
(the agent's own shard and labelled samples of earlier runs), so that learning a new domain
does not erase the old ones (catastrophic forgetting). The replay size is `replay_ratio` times
the number of new samples. Optionally (`distill_weight` > 0) the run also keeps the model's own
answers from before the run on the replay examples (a distillation term, as in dark experience
replay); measured on VADER it did not forget less than labels alone (BENCHMARKS.md), so it is off
by default.

Every `holdout_every`-th labelled sample (by store id) is a holdout sample: it is never trained
on, here or in a round, and serves to check a newly exported model before it replaces the one
in service (`edge_agent.inference.ModelSlot`).

No I/O beyond the store handed in, no MQTT, no metrics: the runner calls `fine_tune` on its
main loop thread and counts what it returns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from edge_agent.store import Sample, SampleStore


@dataclass(frozen=True)
class IncrementalConfig:
    min_new: int = 50  # run when this many new labelled samples are waiting (0: never on its own)
    replay_ratio: float = 1.0  # replay examples per new sample (0: no replay)
    epochs: int = 3
    max_steps: int = 0  # 0: no cap
    lr: float = 1e-3
    batch_size: int = 16
    holdout_every: int = 10
    seed: int = 0
    # weight of a distillation term on the replay examples: KL from the model's own predictions
    # before the run (so the run keeps its answers on older data as well as their labels); 0: off
    distill_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.replay_ratio < 0:
            raise ValueError("replay_ratio must be >= 0")
        if self.distill_weight < 0:
            raise ValueError("distill_weight must be >= 0")
        if self.holdout_every < 2:
            raise ValueError("holdout_every must be >= 2 (else every sample would be held out)")

    @classmethod
    def from_settings(cls, s) -> "IncrementalConfig":
        return cls(min_new=s.incremental_min_new, replay_ratio=s.incremental_replay_ratio, epochs=s.incremental_epochs,
                   max_steps=s.incremental_max_steps, lr=s.incremental_lr, batch_size=s.incremental_batch_size,
                   holdout_every=s.holdout_every, seed=s.train_seed, distill_weight=s.incremental_distill)


def is_holdout(sample_id: int, every: int) -> bool:
    return sample_id % every == 0


def pending(store: SampleStore, cfg: IncrementalConfig) -> list[Sample]:
    """Labelled samples not trained on yet (holdout samples excluded), oldest first."""
    return [s for s in store.labelled(unused_only=True) if not is_holdout(s.id, cfg.holdout_every)]


def trainable(store: SampleStore, cfg: IncrementalConfig) -> list[Sample]:
    """Every labelled sample that may be trained on (all but the holdout), oldest first."""
    return [s for s in store.labelled() if not is_holdout(s.id, cfg.holdout_every)]


def trainable_count(store: SampleStore, cfg: IncrementalConfig) -> int:
    """len(trainable(store, cfg)), counted in SQL."""
    return store.count_labelled(skip_every=cfg.holdout_every)


def holdout(store: SampleStore, cfg: IncrementalConfig, limit: int = 500) -> list[Sample]:
    """The newest `limit` labelled holdout samples, oldest first."""
    rows = [s for s in store.labelled() if is_holdout(s.id, cfg.holdout_every)]
    return rows[-limit:] if limit else []


@dataclass(frozen=True)
class Mix:
    new: list[Sample]
    replay: list  # older examples (objects with .text and .label): the shard and earlier samples

    @property
    def examples(self) -> list:
        return [*self.new, *self.replay]


def select_mix(store: SampleStore, older: Sequence, cfg: IncrementalConfig, *, run: int = 0,
               new: Sequence[Sample] | None = None) -> Mix:
    """The new samples, and `replay_ratio` x as many drawn at random (seeded by `run`) from the older data.

    new: the samples to learn (default: `pending`, those no run trained on yet). Older data:
    `older` (the agent's own training examples) and the store's labelled samples that earlier
    runs already trained on, other than `new` (holdout samples never).
    """
    new = list(pending(store, cfg) if new is None else new)
    want = round(len(new) * cfg.replay_ratio) if new else 0
    if want == 0:
        return Mix(new, [])
    ids = {s.id for s in new}
    earlier = [s for s in trainable(store, cfg) if s.used_in_training and s.id not in ids]
    pool = len(older) + len(earlier)
    picks = sorted(random.Random(cfg.seed * 1_000_003 + run).sample(range(pool), min(want, pool)))
    replay = [older[i] if i < len(older) else earlier[i - len(older)] for i in picks]
    return Mix(new, replay)


@dataclass(frozen=True)
class IncrementalResult:
    new_examples: int
    replay_examples: int
    examples: int  # distinct examples trained on (new + replay)
    steps: int
    mean_loss: float
    seconds: float
    completed: bool  # False: stopped early; the new samples stay pending


def fine_tune(trainer, store: SampleStore, older: Sequence, cfg: IncrementalConfig, *, run: int = 0,
              should_stop: Callable[[], bool] | None = None,
              new: Sequence[Sample] | None = None) -> IncrementalResult | None:
    """One incremental run on the trainer's model (in place); None when there is nothing to learn.

    `trainer` is an `edge_agent.trainer.Trainer` (anything with its `train`). `new`: the samples
    to learn (default: the pending ones). They are marked used in the store once the run
    completed, so the next run sees only newer ones.
    """
    mix = select_mix(store, older, cfg, run=run, new=new)
    if not mix.new:
        return None
    if cfg.distill_weight and mix.replay:
        r = train_with_replay(trainer.model, trainer.tokenizer, mix, cfg, max_length=trainer.spec.max_length,
                              seed=cfg.seed * 100_003 + 1_000_000 + run, should_stop=should_stop)
    else:
        r = trainer.train(mix.examples, epochs=cfg.epochs, max_steps=cfg.max_steps, round_number=1_000_000 + run,
                          should_stop=should_stop, lr=cfg.lr, batch_size=cfg.batch_size, proximal=False).result
    completed = not (should_stop is not None and should_stop())
    if completed:
        store.mark_used(s.id for s in mix.new)
    return IncrementalResult(len(mix.new), len(mix.replay), len(mix.examples), r.steps, r.mean_loss, r.seconds, completed)


def train_with_replay(model, tokenizer, mix: Mix, cfg: IncrementalConfig, *, max_length: int, seed: int,
                      should_stop: Callable[[], bool] | None = None):
    """`cfg.epochs` shuffled passes over new + replay (cross-entropy on every label) plus, on the
    replay examples of each batch, `cfg.distill_weight` x KL(the model's predictions before the
    run || now). Returns a models.train.TrainResult."""
    import torch
    import torch.nn.functional as F

    from models.train import predict_logits, train_local

    n_new = len(mix.new)
    before = F.softmax(predict_logits(model, tokenizer, [e.text for e in mix.replay], max_length=max_length), -1)  # [R, C]

    def distill(logits: torch.Tensor, idx: list[int]) -> torch.Tensor | None:
        rows = [k for k, j in enumerate(idx) if j >= n_new]  # the batch's replay examples
        if not rows:
            return None
        target = before[torch.tensor([idx[k] - n_new for k in rows])]  # [R_b, C]
        kl = F.kl_div(F.log_softmax(logits[rows], -1), target, reduction="batchmean")
        return cfg.distill_weight * kl * len(rows) / len(idx)

    return train_local(model, tokenizer, mix.examples, epochs=cfg.epochs, max_steps=cfg.max_steps,
                       batch_size=cfg.batch_size, lr=cfg.lr, max_length=max_length, seed=seed,
                       should_stop=should_stop, extra_loss=distill)
