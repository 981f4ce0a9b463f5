"""The in-process simulator: every mode learns, and each mode does what it says.

All runs use the cached-feature model (SimConfig.model="head": frozen MiniLM sentence features,
LoRA on a dense layer + classifier) on a seeded 1,200 / 600 sample of the VADER splits, so
that a run of 5 agents x 10 rounds takes about a second. The first test of a fresh machine
pays once for the encoder features (~1,800 texts, then cached on disk).
"""

from __future__ import annotations

import json

import pytest
import torch

from aggregator.rounds import select_agents
from aggregator.strategies import FedAvg, delta_of, global_norm
from edgetune.simulate import MODES, SimConfig, SimulationError, Simulator, planned_steps, run_simulation

BASE = dict(train_limit=1200, eval_limit=600, local_steps=10, lr=2e-3, agents=5, rounds=6, seed=0)
LEARNED = 0.10  # every mode must gain at least 10 accuracy points over the untrained head (0.51)

# the service writes these keys in every completed round's row (aggregator/service.py _run_round)
SERVICE_KEYS = {"round", "outcome", "selected", "answered", "dropped", "accuracy", "loss", "eval_examples",
                "eval_seconds", "version", "num_examples", "duration_s"}


def cfg(**kw) -> SimConfig:
    return SimConfig(**{**BASE, **kw})


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_learns_and_writes_service_rows(mode, tmp_path):
    extra = {"prox_mu": 0.01} if mode == "fedprox" else {}
    if mode == "fedadam":
        extra = {"strategy_options": {"eta": 3e-3}}
    if mode == "async":
        extra = {"speeds": [1, 1, 2, 3, 5], "buffer_size": 3}
    res = run_simulation(cfg(mode=mode, output=tmp_path, **extra))
    acc = res.accuracies
    assert acc[0] < 0.55  # untrained classifier
    assert max(acc[-2:]) >= acc[0] + LEARNED, f"{mode} did not learn: {acc}"
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(res.rows))
    assert rows[0]["round"] == 0 and rows[0]["version"] == 0
    for row in rows[1:]:
        assert SERVICE_KEYS <= set(row), SERVICE_KEYS - set(row)
        assert row["mode"] == mode
    assert [r["round"] for r in rows] == list(range(len(rows)))
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_fedavg_round_is_the_strategy_over_the_agents_updates():
    res = run_simulation(cfg(rounds=3, keep_trace=True))
    for rec, row in zip(res.trace, res.rows[1:]):
        want = FedAvg().aggregate(rec["global"], rec["updates"])
        assert same(rec["new"], want)
        assert row["num_examples"] == sum(u.num_examples for u in rec["updates"])
        for u in rec["updates"]:
            assert row["agents"][u.agent_id]["update_norm"] == pytest.approx(global_norm(delta_of(rec["global"], u.tensors)))
    assert same(res.final_state, res.trace[-1]["new"])


def test_fedprox_pulls_local_updates_towards_the_global():
    plain = run_simulation(cfg(rounds=2, keep_trace=True))
    prox = run_simulation(cfg(mode="fedprox", prox_mu=5.0, rounds=2, keep_trace=True))
    # round 1 starts from the same global, so the proximal term is the only difference
    n_plain = [global_norm(delta_of(plain.trace[0]["global"], u.tensors)) for u in plain.trace[0]["updates"]]
    n_prox = [global_norm(delta_of(prox.trace[0]["global"], u.tensors)) for u in prox.trace[0]["updates"]]
    assert all(b < 0.9 * a for a, b in zip(n_plain, n_prox)), (n_plain, n_prox)


def test_sequential_final_adapter_equals_training_agent_by_agent():
    c = cfg(mode="sequential", rounds=3, participation=0.6)
    sim = Simulator(c)
    res = sim.run()
    b = sim.backend
    b.load(b.initial_state)
    for r in range(1, c.rounds + 1):
        order = [sim.agent_ids.index(a) for a in res.rows[r]["answered"]]
        assert order == sorted(order) and len(order) == 3
        for i in order:  # no reload in between: each starts from the previous agent's adapter
            sim.local_train(i, r)
    assert same(b.state(), res.final_state)
    assert [r["version"] for r in res.rows] == [0, 1, 2, 3]


def test_independent_never_aggregates():
    c = cfg(mode="independent", rounds=3)
    sim = Simulator(c)
    res = sim.run()
    b = sim.backend
    assert same(res.final_state, b.initial_state)  # no global moves
    assert all(r["version"] == 0 for r in res.rows)
    for i, a in enumerate(sim.agent_ids):  # each agent's adapter is its own training alone
        b.load(b.initial_state)
        for r in range(1, c.rounds + 1):
            sim.local_train(i, r)
        assert same(b.state(), res.agent_states[a])
        b.load(res.agent_states[a])
        ev = b.evaluate(sim.test_data)
        assert res.rows[-1]["agent_accuracy"][a]["accuracy"] == pytest.approx(ev.accuracy)
    states = list(res.agent_states.values())
    assert not same(states[0], states[1])
    last = res.rows[-1]
    per = [v["accuracy"] for v in last["agent_accuracy"].values()]
    assert last["accuracy"] == pytest.approx(sum(per) / len(per))
    assert last["accuracy_min"] == min(per) and last["accuracy_max"] == max(per)


def test_centralized_sees_the_same_number_of_examples():
    fed = run_simulation(cfg(rounds=3, participation=0.6))
    cen = run_simulation(cfg(mode="centralized", rounds=3, participation=0.6))
    for f, c in zip(fed.rows[1:], cen.rows[1:]):
        assert c["num_examples"] == c["federated_examples"] == f["num_examples"]
        assert c["selected"] == f["selected"]


def test_participation_fraction_with_minimum_and_seeded_selection():
    res = run_simulation(cfg(rounds=4, participation=0.2, min_agents=2, seed=3))
    ids = [f"agent-{i + 1}" for i in range(5)]
    for row in res.rows[1:]:
        assert len(row["selected"]) == 2  # round(0.2 * 5) = 1, raised to the minimum
        assert tuple(row["selected"]) == select_agents(ids, 2, row["round"], 3)
    assert len({tuple(r["selected"]) for r in res.rows[1:]}) > 1


def test_planned_steps_matches_train_local():
    assert planned_steps(240, epochs=1, max_steps=10, batch_size=32) == (8, 240)
    assert planned_steps(240, epochs=2, max_steps=10, batch_size=32) == (10, 240 + 64)
    assert planned_steps(100, epochs=1, max_steps=0, batch_size=32) == (4, 100)


def test_bad_configurations_say_what_to_change():
    with pytest.raises(SimulationError, match="choose one of"):
        cfg(mode="gossip").check()
    with pytest.raises(SimulationError, match="prox_mu"):
        cfg(mode="fedprox").check()
    with pytest.raises(SimulationError, match="attack"):
        cfg(attackers=1).check()
    with pytest.raises(SimulationError, match="speeds"):
        cfg(mode="async", speeds=[1, 2]).check()


def test_compare_cli_runs_modes_into_one_folder(tmp_path):
    import typer
    from typer.testing import CliRunner

    from edgetune.compare_cli import compare

    app = typer.Typer()
    app.command()(compare)
    app.command("noop")(lambda: None)  # two commands: typer keeps "compare" as a subcommand
    out = tmp_path / "cmp"
    r = CliRunner().invoke(app, ["compare", "--modes", "fedavg,centralized", "--rounds", "2", "--train-limit", "1200",
                                 "--eval-limit", "600", "--local-steps", "10", "--lr", "2e-3", "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "accuracy.png").exists() and (out / "summary.json").exists()
    assert (out / "fedavg" / "metrics.jsonl").exists() and (out / "centralized" / "metrics.jsonl").exists()
    assert "| fedavg |" in r.output
    bad = CliRunner().invoke(app, ["compare", "--modes", "fedavg,gossip", "--output", str(out)])
    assert bad.exit_code == 2 and "gossip" in bad.output


def test_users_own_data_file_with_string_labels(tmp_path):
    from data.sentiment import train_test_split

    train, test = train_test_split()
    pick = train[:300] + test[:100]  # texts whose features the other tests already cached
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"text": e.text, "label": ["neg", "pos"][e.label], "domain": e.domain,
                                          "id": e.uid}) for e in pick))
    res = run_simulation(cfg(data=str(path), train_limit=0, eval_limit=0, rounds=2, agents=3, partition="by-domain"))
    assert res.rows[0]["eval_examples"] > 0 and len(res.accuracies) == 3
    with pytest.raises(SimulationError, match="text"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"label": 1}))
        run_simulation(cfg(data=str(bad)))


def test_real_model_path_runs_fedprox_through_train_local():
    """Wiring, not learning: the real pruned MiniLM + LoRA (model="full") goes through the same
    loop (train_local with the proximal term, peft state swaps) in 2 agents x 2 steps (~20 s)."""
    from aggregator.strategies import FedAvg

    c = SimConfig(model="full", mode="fedprox", prox_mu=0.01, agents=2, rounds=1, local_steps=2, train_limit=128,
                  eval_limit=32, keep_trace=True)
    sim = Simulator(c)
    res = sim.run()
    rec = res.trace[0]
    assert len(rec["updates"]) == 2 and all(u.num_examples == 64 for u in rec["updates"])
    assert same(res.final_state, FedAvg().aggregate(rec["global"], rec["updates"]))
    assert global_norm(delta_of(sim.backend.initial_state, res.final_state)) > 0
    assert any("query.lora_A" in k for k in res.final_state) and any("classifier" in k for k in res.final_state)
    assert res.rows[1]["eval_examples"] == 32 and "accuracy" not in res.rows[1]["agents"]["agent-1"]
