"""The agent's loopback HTTP API over real HTTP: predictions, feedback, and refusals that store nothing."""

from __future__ import annotations

import http.client
import json
import os
import threading

import numpy as np
import pytest

from edge_agent.http_api import NotLoopback, make_server
from edge_agent.metrics import AgentMetrics
from edge_agent.store import SampleStore

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class StubPredictor:
    """Positive when the text contains "good"; counts the texts it saw."""

    labels = ("negative", "positive")
    version = 7
    backend = "stub"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def predict(self, texts):
        self.calls.append(list(texts))
        p = np.array([[0.2, 0.8] if "good" in t else [0.9, 0.1] for t in texts], dtype=np.float32)
        return [int(i) for i in p.argmax(1)], p


@pytest.fixture
def api(tmp_path):
    predictor, metrics = StubPredictor(), AgentMetrics()
    store = SampleStore(tmp_path / "samples.db", 100, max_text_chars=500)
    server = make_server(predictor, store, metrics=metrics).start()
    yield server, predictor, store, metrics
    server.stop()
    store.close()


def call(server, method, path, body=None, *, raw: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    assert resp.getheader("Content-Type") == "application/json"
    return resp.status, json.loads(payload)


def counter(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_healthz(api):
    server, _, store, _ = api
    assert server.url.startswith("http://127.0.0.1:")
    status, body = call(server, "GET", "/healthz")
    assert status == 200
    assert body == {"status": "ok", "model_version": 7, "labels": ["negative", "positive"], "samples": 0}


def test_predict_one_and_many(api):
    server, predictor, store, metrics = api
    status, body = call(server, "POST", "/predict", {"text": "a good day"})
    assert status == 200
    assert body["label"] == "positive" and body["label_id"] == 1 and body["model_version"] == 7
    assert body["probabilities"] == pytest.approx([0.2, 0.8])

    status, body = call(server, "POST", "/predict", {"texts": ["good", "bad", "so good"]})
    assert status == 200
    assert body["labels"] == ["positive", "negative", "positive"] and body["label_ids"] == [1, 0, 1]
    assert np.allclose(np.sum(body["probabilities"], axis=1), 1.0, atol=1e-5)
    assert predictor.calls == [["a good day"], ["good", "bad", "so good"]]
    assert counter(metrics, "edgetune_agent_predictions_total", backend="stub") == 4
    assert counter(metrics, "edgetune_agent_predict_seconds_count") == 2
    assert store.count() == 0  # predictions are not stored unless record_inputs=True


def test_feedback_is_stored(api):
    server, _, store, metrics = api
    status, body = call(server, "POST", "/feedback", {"text": "loved it", "label": "positive"})
    assert status == 201 and body == {"id": 1}
    status, body = call(server, "POST", "/feedback", {"text": "hated it", "label": 0})
    assert status == 201 and body == {"id": 2}
    rows = store.labelled()
    assert [(r.text, r.label, r.source) for r in rows] == [("loved it", 1, "feedback"), ("hated it", 0, "feedback")]
    assert counter(metrics, "edgetune_agent_samples_stored") == 2
    assert call(server, "GET", "/healthz")[1]["samples"] == 2


BAD_REQUESTS = [
    # (path, raw body, headers, status, error code)
    ("/feedback", b"{not json", None, 400, "malformed_json"),
    ("/feedback", b"\xff\xfe", None, 400, "malformed_json"),
    ("/feedback", b"[1, 2]", None, 400, "bad_type"),
    ("/feedback", json.dumps({"label": 1}).encode(), None, 400, "missing_field"),
    ("/feedback", json.dumps({"text": "fine"}).encode(), None, 400, "missing_field"),
    ("/feedback", json.dumps({"text": 5, "label": 1}).encode(), None, 400, "bad_type"),
    ("/feedback", json.dumps({"text": "fine", "label": 1.5}).encode(), None, 400, "bad_type"),
    ("/feedback", json.dumps({"text": "fine", "label": True}).encode(), None, 400, "bad_type"),
    ("/feedback", json.dumps({"text": "fine", "label": None}).encode(), None, 400, "bad_type"),
    ("/feedback", json.dumps({"text": "fine", "label": ["positive"]}).encode(), None, 400, "bad_type"),
    ("/feedback", json.dumps({"text": "", "label": 1}).encode(), None, 422, "empty_text"),
    ("/feedback", json.dumps({"text": "x" * 501, "label": 1}).encode(), None, 422, "text_too_long"),
    ("/feedback", json.dumps({"text": "fine", "label": "neutral"}).encode(), None, 422, "unknown_label"),
    ("/feedback", json.dumps({"text": "fine", "label": 2}).encode(), None, 422, "unknown_label"),
    ("/feedback", json.dumps({"text": "fine", "label": 1}).encode(), {"Content-Type": "text/plain"}, 415, "bad_content_type"),
    ("/feedback", json.dumps({"text": "fine", "label": 1}).encode(), {"Host": "evil.example:80"}, 403, "bad_host"),
    ("/feedback", b"{}", {"Content-Length": str(2 << 20)}, 413, "body_too_large"),
    ("/predict", b"{oops", None, 400, "malformed_json"),
    ("/predict", json.dumps({}).encode(), None, 400, "missing_field"),
    ("/predict", json.dumps({"text": "a", "texts": ["b"]}).encode(), None, 400, "missing_field"),
    ("/predict", json.dumps({"text": ["a"]}).encode(), None, 400, "bad_type"),
    ("/predict", json.dumps({"texts": "a"}).encode(), None, 400, "bad_type"),
    ("/predict", json.dumps({"texts": ["ok", 3]}).encode(), None, 400, "bad_type"),
    ("/predict", json.dumps({"texts": []}).encode(), None, 422, "empty_batch"),
    ("/predict", json.dumps({"texts": ["a"] * 65}).encode(), None, 422, "batch_too_large"),
    ("/predict", json.dumps({"text": "y" * 501}).encode(), None, 422, "text_too_long"),
    ("/predict", json.dumps({"text": "  "}).encode(), None, 422, "empty_text"),
    ("/nowhere", json.dumps({"text": "a"}).encode(), None, 404, "not_found"),
]


@pytest.mark.parametrize("path,raw,headers,status,code", BAD_REQUESTS, ids=[f"{p}-{c}-{i}" for i, (p, _, _, _, c) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_4xx_and_store_nothing(api, path, raw, headers, status, code):
    server, predictor, store, metrics = api
    got_status, body = call(server, "POST", path, raw=raw, headers=headers)
    assert (got_status, body["error"]) == (status, code), body
    assert isinstance(body["detail"], str) and body["detail"]
    assert store.count() == 0
    assert predictor.calls == []
    assert counter(metrics, "edgetune_agent_predictions_total", backend="stub") == 0
    # the server is still fine afterwards
    assert call(server, "GET", "/healthz")[0] == 200


def test_wrong_method_and_missing_length(api):
    server, _, store, _ = api
    assert call(server, "GET", "/predict")[1]["error"] == "method_not_allowed"
    assert call(server, "POST", "/healthz", {})[0] == 405
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", "/feedback")
    conn.putheader("Content-Type", "application/json")
    conn.endheaders()  # no Content-Length, no body
    resp = conn.getresponse()
    assert resp.status == 411 and json.loads(resp.read())["error"] == "length_required"
    conn.close()
    assert store.count() == 0


def test_keep_alive_and_concurrent_clients(api):
    server, predictor, store, _ = api
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for i in range(3):  # several requests on one connection
        conn.request("POST", "/feedback", body=json.dumps({"text": f"item {i}", "label": i % 2}), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 201 and json.loads(resp.read()) == {"id": i + 1}
    conn.close()

    results = []

    def client(k):
        for _ in range(10):
            results.append(call(server, "POST", "/predict", {"text": f"good {k}"})[0])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == [200] * 60 and store.count() == 3


def test_record_inputs_stores_unlabelled_predictions(tmp_path):
    store = SampleStore(tmp_path / "s.db", 100)
    server = make_server(StubPredictor(), store, record_inputs=True).start()
    try:
        assert call(server, "POST", "/predict", {"texts": ["good", "bad"]})[0] == 200
        assert store.count() == 2 and store.count_labelled_since(0) == 0
    finally:
        server.stop()
        store.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "192.168.1.10", "::1", "127.0.0.2", "example.com"])
def test_refuses_to_bind_other_than_loopback(tmp_path, host):
    with SampleStore(tmp_path / "s.db", 10) as store:
        with pytest.raises(NotLoopback, match="127.0.0.1"):
            make_server(StubPredictor(), store, host=host)


def test_with_a_real_onnx_predictor(tmp_path):
    """End to end: an exported (randomly initialised, 1-layer) classifier served over HTTP."""
    from edge_agent.inference import OnnxPredictor
    from models.classifier import ClassifierSpec, build_classifier, load_tokenizer
    from models.onnx_export import export_onnx

    spec = ClassifierSpec(num_layers=1)
    export_onnx(build_classifier(spec), load_tokenizer(spec), tmp_path / "model", labels=["negative", "positive"], adapter_version=3)
    predictor = OnnxPredictor(tmp_path / "model")
    metrics = AgentMetrics()
    with SampleStore(tmp_path / "s.db", 10) as store:
        server = make_server(predictor, store, metrics=metrics).start()
        try:
            status, body = call(server, "POST", "/predict", {"texts": ["What a wonderful film.", "Dull, long and badly acted."]})
            assert status == 200 and body["model_version"] == 3
            ids, probs = predictor.predict(["What a wonderful film.", "Dull, long and badly acted."])
            assert body["label_ids"] == ids
            assert np.allclose(body["probabilities"], probs, atol=1e-5)
            assert counter(metrics, "edgetune_agent_predictions_total", backend="onnxruntime") == 2
            assert call(server, "POST", "/feedback", {"text": "What a wonderful film.", "label": "positive"}) == (201, {"id": 1})
        finally:
            server.stop()


def test_predictor_failure_is_a_json_500(tmp_path):
    class Broken(StubPredictor):
        def predict(self, texts):
            raise RuntimeError("onnxruntime exploded")

    with SampleStore(tmp_path / "s.db", 10) as store:
        server = make_server(Broken(), store, record_inputs=True).start()
        try:
            status, body = call(server, "POST", "/predict", {"text": "good"})
            assert status == 500 and body["error"] == "internal" and "exploded" not in body["detail"]
            assert store.count() == 0
            assert call(server, "GET", "/healthz")[0] == 200
        finally:
            server.stop()
