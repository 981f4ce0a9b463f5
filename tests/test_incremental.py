"""Incremental learning on the agent.

The selection logic (new samples, holdout, replay) against a stub trainer, then the issue's
must-show on the real edge classifier: an agent that learned three VADER domains receives 200
labelled samples of the fourth; after one incremental fine-tuning (with replay) its accuracy on
the fourth rises by at least 10 points while its accuracy on EACH of the other three falls by at
most 1 point. The same run without replay, and its forgetting: bench/incremental.py and
BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from edge_agent.incremental import IncrementalConfig, fine_tune, holdout, pending, select_mix, trainable
from edge_agent.store import SampleStore


@dataclass(frozen=True)
class Ex:
    text: str
    label: int


class StubTrainer:
    def __init__(self, stop_after: bool = False) -> None:
        self.calls: list[dict] = []

    def train(self, examples, **kw):
        self.calls.append({"examples": list(examples), **kw})
        return SimpleNamespace(num_examples=len(examples), result=SimpleNamespace(steps=3, mean_loss=0.5, seconds=0.1))


@pytest.fixture
def store(tmp_path):
    s = SampleStore(tmp_path / "samples.db", 1000)
    yield s
    s.close()


def test_pending_skips_unlabelled_used_and_holdout_samples(store):
    cfg = IncrementalConfig(holdout_every=5)
    store.add_many([(f"t{i}", i % 2) for i in range(1, 13)] + [("no label", None)])  # ids 1..12, 13
    assert [s.id for s in pending(store, cfg)] == [1, 2, 3, 4, 6, 7, 8, 9, 11, 12]
    assert [s.id for s in holdout(store, cfg)] == [5, 10]
    store.mark_used([1, 2, 5])
    assert [s.id for s in pending(store, cfg)] == [3, 4, 6, 7, 8, 9, 11, 12]
    assert [s.id for s in trainable(store, cfg)] == [1, 2, 3, 4, 6, 7, 8, 9, 11, 12]


def test_mix_draws_replay_from_the_shard_and_earlier_samples_only(store):
    cfg = IncrementalConfig(replay_ratio=2.0, holdout_every=10)
    store.add_many([(f"old{i}", 0) for i in range(1, 10)])  # ids 1..9: trained on by an earlier run
    store.mark_used(range(1, 10))
    store.add_many([(f"new{i}", 1) for i in range(10, 16)])  # ids 10..15; 10 is a holdout sample
    older = [Ex(f"shard{i}", 1) for i in range(20)]
    mix = select_mix(store, older, cfg, run=3)
    assert [s.text for s in mix.new] == ["new11", "new12", "new13", "new14", "new15"]
    assert len(mix.replay) == 10
    texts = {e.text for e in mix.replay}
    assert texts <= {e.text for e in older} | {f"old{i}" for i in range(1, 10)}
    assert "new10" not in texts and not any(t.startswith("new") for t in texts)
    assert select_mix(store, older, cfg, run=3).replay == mix.replay  # seeded
    assert select_mix(store, older, cfg, run=4).replay != mix.replay
    assert select_mix(store, older, IncrementalConfig(replay_ratio=0), run=3).replay == []
    # a pool smaller than asked for: all of it
    assert len(select_mix(store, older[:2], IncrementalConfig(replay_ratio=100.0), run=0).replay) == 2 + 9


def test_fine_tune_trains_on_the_mix_and_marks_the_new_samples_used(store):
    cfg = IncrementalConfig(replay_ratio=1.0, epochs=2, lr=2e-3, batch_size=8, holdout_every=10, distill_weight=0)
    store.add_many([(f"new{i}", i % 2) for i in range(1, 12)])  # 10 is a holdout sample
    t = StubTrainer()
    r = fine_tune(t, store, [Ex("shard", 0)] * 30, cfg, run=1)
    assert (r.new_examples, r.replay_examples, r.examples, r.steps, r.completed) == (10, 10, 20, 3, True)
    (call,) = t.calls
    assert (call["epochs"], call["lr"], call["batch_size"], call["proximal"]) == (2, 2e-3, 8, False)
    assert sorted(e.text for e in call["examples"][:10]) == sorted(f"new{i}" for i in range(1, 12) if i != 10)
    assert pending(store, cfg) == []
    assert not store.get(10).used_in_training  # the holdout sample is never trained on
    assert fine_tune(t, store, [], cfg) is None and len(t.calls) == 1


def test_relearning_stored_samples_replays_only_the_others(store):
    """After a new global: the stored samples are learned again; replay never repeats them."""
    cfg = IncrementalConfig(replay_ratio=5.0, holdout_every=10, distill_weight=0)
    store.add_many([(f"s{i}", i % 2) for i in range(1, 7)])
    store.mark_used([1, 2, 3])
    again = trainable(store, cfg)
    mix = select_mix(store, [Ex("shard", 0)] * 4, cfg, run=0, new=again)
    assert [s.id for s in mix.new] == [1, 2, 3, 4, 5, 6]
    assert [e.text for e in mix.replay] == ["shard"] * 4
    r = fine_tune(StubTrainer(), store, [], cfg, new=again)
    assert (r.new_examples, r.replay_examples) == (6, 0) and pending(store, cfg) == []


def test_a_stopped_run_leaves_the_samples_pending(store):
    cfg = IncrementalConfig()
    store.add_many([("a", 1), ("b", 0)])
    r = fine_tune(StubTrainer(), store, [], cfg, should_stop=lambda: True)
    assert r.completed is False
    assert len(pending(store, cfg)) == 2


def test_config_refuses_nonsense():
    with pytest.raises(ValueError, match="replay_ratio"):
        IncrementalConfig(replay_ratio=-1)
    with pytest.raises(ValueError, match="holdout_every"):
        IncrementalConfig(holdout_every=1)
    with pytest.raises(ValueError, match="distill_weight"):
        IncrementalConfig(distill_weight=-0.5)


# -- the must-show: a fourth domain learned, the other three kept ------------------------------


def test_agent_learns_a_fourth_domain_from_200_samples_without_forgetting_the_other_three(tmp_path):
    """MiniLM pruned to 4 layers with LoRA r=8 (the shipped edge classifier, texts cut at 32
    tokens), 120 steps of batch 32 on movie, amazon and nyt; then 200 labelled tweets reach its
    store and the agent's incremental run (its default settings: every 10th sample kept as
    holdout, so 180 new + 180 replay of the three domains, 3 epochs, lr 1e-3) fine-tunes
    it. Accuracy on each domain's whole held-out test split (data.sentiment), before and after."""
    from bench.incremental import Scenario, incremental_variant, learn_three_domains
    from edge_agent.settings import AgentSettings

    import torch

    sc = Scenario()
    agent = IncrementalConfig.from_settings(AgentSettings(agent_id="t"))
    for f in ("replay_ratio", "epochs", "max_steps", "lr", "batch_size", "holdout_every", "distill_weight"):
        assert getattr(sc.incremental, f) == getattr(agent, f), f"the scenario must run the agent's default {f}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as an agent runs (EDGETUNE_THREADS=1 in the tests); on a shared 2-core
    try:  # machine 2 torch threads ran this 3-5x slower than 1
        learned = learn_three_domains(sc)
        v = incremental_variant(learned, sc.incremental.replay_ratio, sc.incremental.distill_weight, tmp_path)
    finally:
        torch.set_num_threads(threads)
    r, before, after = v["result"], learned.before, v["after"]
    print("\n" + "\n".join(f"{d:7s} n={len(learned.evalsets[d]):5d} before {before[d]:.4f} after {after[d]:.4f} "
                           f"({100 * (after[d] - before[d]):+.1f} pts)" for d in before))
    print(f"trained on {r.new_examples} new + {r.replay_examples} replay, {r.steps} steps, {r.seconds:.0f}s; "
          f"phase 1 {learned.phase1_seconds:.0f}s")
    assert (r.new_examples, r.replay_examples, r.completed) == (180, 180, True)
    new = sc.new_domain
    assert 100 * (after[new] - before[new]) >= 10, f"{new}: {before[new]:.4f} -> {after[new]:.4f}"
    for d in before:
        if d != new:  # each of the other three, not their mean
            assert 100 * (after[d] - before[d]) >= -1 - 1e-6, f"{d}: {before[d]:.4f} -> {after[d]:.4f}"
