"""Federated evaluation without a broker: the agents' reports summed into the fleet's figures
(aggregator/evaluation.py), the report's own checks (broker.messages.EvalReport), and the
service's handling of reports (counted refusals, rows, Prometheus)."""

from __future__ import annotations

import json
import math
import random

import pytest

from aggregator.evaluation import FederatedEval, classification_figures
from broker import codec
from broker.errors import SchemaError
from broker.messages import EvalReport, parse

LABELS = ["press", "learned", "adventure"]


def _report(agent, version, confusion, loss=1.0, **kw):
    return EvalReport(agent_id=agent, version=version, round=version, num_examples=sum(map(sum, confusion)),
                      loss=loss, confusion=confusion, **kw)


def _sklearn_like(y_true, y_pred, k):
    """Macro-F1 and accuracy computed from the predictions directly (the definition, not the code under test)."""
    f1s = []
    for c in range(k):
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s), sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def test_summed_reports_give_exactly_the_figures_of_one_evaluation_on_the_union():
    rng = random.Random(3)
    agents = {}
    for a in ("a1", "a2", "a3"):
        n = rng.randint(20, 60)
        y = [rng.randrange(3) for _ in range(n)]
        p = [t if rng.random() < 0.6 else rng.randrange(3) for t in y]
        agents[a] = (y, p)
    fe = FederatedEval(LABELS)
    assert fe.published(4, 3, expected=["a1", "a2", "a3"]) == []
    for a, (y, p) in agents.items():
        conf = [[sum(t == i and q == j for t, q in zip(y, p)) for j in range(3)] for i in range(3)]
        assert fe.add(_report(a, 4, conf, loss=0.5 + len(y) / 100)) is None
    (row,) = fe.take_complete()
    y_all = [t for y, _ in agents.values() for t in y]
    p_all = [q for _, p in agents.values() for q in p]
    f1, acc = _sklearn_like(y_all, p_all, 3)
    assert row["eval"] == "federated" and row["version"] == 4 and row["round"] == 3 and row["eval_agents"] == 3
    assert row["macro_f1"] == pytest.approx(f1, abs=1e-12) and row["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert row["eval_examples"] == len(y_all)
    # the loss is weighted by examples, not a mean of the agents' means
    want = sum((0.5 + len(y) / 100) * len(y) for y, _ in agents.values()) / len(y_all)
    assert row["loss"] == pytest.approx(want, rel=1e-12)
    assert set(row["per_class"]) == set(LABELS) and sum(c["support"] for c in row["per_class"].values()) == len(y_all)
    assert row["eval_per_agent"]["a1"]["examples"] == len(agents["a1"][0])
    assert fe.take_complete() == [] and not fe.open


def test_a_version_is_final_when_all_expected_reported_or_the_next_global_goes_out():
    fe = FederatedEval(LABELS)
    eye = [[5, 0, 0], [0, 5, 0], [0, 0, 5]]
    fe.published(0, 0, expected=[])  # the initial global: nobody online yet, so it waits for the next one
    assert fe.add(_report("a1", 0, eye)) is None and fe.take_complete() == []
    rows = fe.published(1, 1, expected=["a1", "a2"])
    assert [r["version"] for r in rows] == [0] and rows[0]["eval_agents"] == 1 and rows[0]["accuracy"] == 1.0
    assert fe.add(_report("a1", 1, eye)) is None and fe.take_complete() == []
    assert fe.waiting_for(["a1", "a2", "a3"]) == {"a2"} and fe.waiting_for(["a1"]) == set()
    (row,) = fe.close_all()  # the end of the run: a2 never reported
    assert row["eval_missing"] == ["a2"] and row["eval_agents"] == 1
    # refusals, each with the reason the service counts
    assert fe.add(_report("a2", 1, eye))[0] == "stale"  # already final
    assert fe.add(_report("a2", 9, eye))[0] == "stale"  # never published
    fe.published(2, 2, expected=["a1"])
    assert fe.add(_report("a1", 2, eye)) is None
    assert fe.add(_report("a1", 2, eye))[0] == "duplicate"
    fe.published(3, 3, expected=["a1"])
    assert fe.add(_report("a1", 3, [[1, 0], [0, 1]]))[0] == "bad_schema"  # two labels, the task has three
    # a version nobody was expected to evaluate and nobody did leaves no row
    fe2 = FederatedEval(LABELS)
    fe2.published(0, 0, expected=[])
    assert fe2.published(1, 1, expected=[]) == []


def test_split_mode_sums_tokens_into_a_perplexity():
    fe = FederatedEval([], mode="split")
    fe.published(1, 1, expected=["a", "b"])
    assert fe.add(EvalReport(agent_id="a", version=1, round=1, num_examples=4, loss=2.0, tokens=100)) is None
    assert fe.add(EvalReport(agent_id="b", version=1, round=1, num_examples=4, loss=3.0, tokens=300)) is None
    (row,) = fe.take_complete()
    assert row["loss"] == pytest.approx(2.75) and row["perplexity"] == pytest.approx(math.exp(2.75))
    assert row["eval_tokens"] == 400


def test_classification_figures_edge_cases():
    f = classification_figures([[3, 1, 0], [0, 0, 0], [2, 0, 0]], LABELS)
    assert f["accuracy"] == 0.5 and f["eval_examples"] == 6
    assert f["per_class"]["learned"]["f1"] == 0.0  # predicted once, never right: it counts
    assert f["per_class"]["adventure"]["recall"] == 0.0
    assert f["macro_f1"] == pytest.approx((2 * 3 / (2 * 3 + 2 + 1) + 0 + 0) / 3)
    g = classification_figures([[4, 0, 0], [0, 0, 0], [0, 0, 4]], LABELS)  # a class absent and never predicted
    assert g["per_class"]["learned"]["f1"] is None and g["macro_f1"] == 1.0


@pytest.mark.parametrize("bad, match", [
    (dict(confusion=[[1, 0], [0]]), "square"),
    (dict(confusion=[[1, -1], [0, 1]]), "non-negative"),
    (dict(confusion=[[1, 0], [0, 1]], num_examples=3), "sum to 2"),
    (dict(loss=float("nan")), "loss"),
    (dict(num_examples=0), "num_examples"),
])
def test_a_malformed_report_is_a_schema_error(bad, match):
    header = dict(kind="eval", protocol=2, agent_id="a1", version=0, round=0, num_examples=2, loss=0.5,
                  confusion=[[1, 0], [0, 1]])
    assert parse(header, EvalReport).num_examples == 2
    with pytest.raises(SchemaError, match=match):
        parse({**header, **bad}, EvalReport)


def test_the_service_records_reports_counts_refusals_and_sets_the_gauges(tmp_path):
    from aggregator.service import AggregatorService
    from aggregator.settings import AggregatorSettings
    from broker.messages import AgentState, AgentStatus, TaskDefinition
    from broker.transport import Incoming

    s = AggregatorSettings(output_dir=str(tmp_path), labels=LABELS, num_labels=3)
    svc = AggregatorService(s)
    svc.task_def = TaskDefinition(mode="federated", model="m", model_hash="0" * 64, labels=LABELS, max_length=8,
                                  lora_r=8, lora_alpha=16)
    svc.fed_eval = FederatedEval(LABELS)
    for a in ("a1", "a2"):
        svc.online[a] = AgentStatus(agent_id=a, state=AgentState.online, num_examples=10, eval_examples=3)
    svc.fed_eval.published(1, 1, expected=[a for a, st in svc.online.items() if st.eval_examples])

    def send(agent, report, topic_agent=None):
        svc._handle_eval(agent, Incoming(svc.topics.eval(topic_agent or agent), codec.encode(report), retain=False))

    rejected = lambda reason: svc.metrics.rejected.labels(reason=reason)._value.get()  # noqa: E731
    send("a1", _report("a1", 1, [[1, 0, 0], [0, 1, 0], [0, 1, 0]], task_hash=svc.task_def.hash))
    send("a2", _report("a1", 1, [[1, 0, 0], [0, 1, 0], [0, 0, 1]]))  # on a2's topic, claims a1
    send("a2", _report("a2", 1, [[1, 0, 0], [0, 1, 0], [0, 0, 1]], task_hash="f" * 64))  # another task
    assert rejected("bad_topic") == 1 and rejected("wrong_task") == 1
    assert not (tmp_path / "metrics.jsonl").exists()  # a2 has not reported yet
    send("a2", _report("a2", 1, [[1, 0, 0], [0, 1, 0], [0, 0, 1]]))
    (row,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["eval"] == "federated" and row["accuracy"] == 5 / 6 and row["eval_agents"] == 2
    gauge = lambda g, **lab: g.labels(**lab)._value.get()  # noqa: E731
    assert gauge(svc.metrics.eval_accuracy, source="federated") == 5 / 6
    assert gauge(svc.metrics.eval_macro_f1, source="federated") == pytest.approx(row["macro_f1"])
    assert gauge(svc.metrics.eval_class_f1, source="federated", label="press") == 1.0
    assert math.isnan(gauge(svc.metrics.eval_accuracy, source="central"))
    assert svc.metrics.eval_reports._value.get() == 2
    svc._handle_eval("a1", Incoming(svc.topics.eval("a1"), b"not a frame", retain=False))
    assert rejected("truncated") == 1


def test_the_split_server_evaluates_without_changing_the_tail():
    """Split mode's federated perplexity: an evaluation request gets the loss a training request
    would get from the same tail (micro-batched, padded), and the tail's weights do not move."""
    import torch

    from aggregator.split_server import SplitRequest, SplitServer
    from models.split import DecoderSpec, add_lora, causal_lm_labels, load_full_model, split_model

    spec = DecoderSpec(n_layer=3, n_embd=64, n_head=2, cut=1)
    _, tail = split_model(load_full_model(spec), spec.cut)
    tail = add_lora(tail, ["c_attn"])
    g = torch.Generator().manual_seed(0)
    reqs = []
    for i, t in enumerate((16, 24)):  # two lengths: padded and masked in one micro-batch
        ids = torch.randint(0, 50257, (2, t), generator=g)
        mask = torch.ones(2, t, dtype=torch.long)
        reqs.append(SplitRequest(f"a{i}", i, torch.randn(2, t, 64, generator=g), mask, causal_lm_labels(ids, mask),
                                 evaluate=True))
    server = SplitServer(tail, lr=1e-2, device="cpu")
    before = {k: v.clone() for k, v in server.tail.state_dict().items()}
    evaluated = {r.request.agent_id: r for r in server.evaluate(reqs)}
    assert all(torch.equal(v, server.tail.state_dict()[k]) for k, v in before.items()) and server.server_step == 0
    assert all(r.grad is None and r.tokens == r.request.labels[:, 1:].ne(-100).sum() for r in evaluated.values())
    trained = {r.request.agent_id: r for r in server.serve(reqs)}  # the first step's loss is the tail as it was
    for a, r in evaluated.items():
        assert abs(r.loss - trained[a].loss) <= 1e-5 * abs(r.loss), (r.loss, trained[a].loss)


def test_an_agent_holds_out_a_few_of_its_token_blocks_the_same_way_every_time():
    from edge_agent.runner import held_out_blocks

    train, held = held_out_blocks(100, 0.2, 8)
    assert len(held) == 8 and sorted(train + held) == list(range(100)) and held == held_out_blocks(100, 0.2, 8)[1]
    assert held_out_blocks(100, 0.0, 8) == (list(range(100)), [])
    assert held_out_blocks(1, 0.99, 8) == ([0], [])  # never all of them
