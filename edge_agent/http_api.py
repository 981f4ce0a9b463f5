"""The agent's local HTTP API: predictions and user feedback, on the loopback interface only.

    POST /predict   {"text": "..."}            -> {"label", "label_id", "probabilities": [..]}
                    {"texts": ["...", ...]}    -> {"labels", "label_ids", "probabilities": [[..]]}
    POST /feedback  {"text": "...", "label": "positive" | 1}  -> 201 {"id": n}
    GET  /healthz                               -> {"status": "ok", "model_version", "labels", "samples"}

Errors are JSON {"error": code, "detail": message} with a 4xx status (503 "no_model" while the
agent has no model to serve yet), and a refused request
stores nothing. The API has no authentication, so it binds 127.0.0.1 only and refuses any other
address. Against web pages in a local browser it also requires `Content-Type: application/json`
on POST (a cross-origin page cannot send that without a CORS preflight, which this server never
grants) and a Host header naming the loopback (DNS rebinding).

The predictor (anything with `predict(texts) -> (label ids, probabilities)`, `labels` and
optionally `version`/`backend`, e.g. `OnnxPredictor` or `ModelSlot`) and the store
(`SampleStore`) are handed in; so is the optional `AgentMetrics`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_agent.inference import ModelLoadError
from edge_agent.store import InvalidSample

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_LOOPBACK_NAMES = {"127.0.0.1", "localhost"}


class NotLoopback(ValueError):
    pass


class _Refused(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def _check_host(host: str) -> str:
    if host not in _LOOPBACK_NAMES:
        raise NotLoopback(
            f"the edge HTTP API binds to 127.0.0.1 only (it has no authentication), not {host!r}; "
            "to reach it from another host, put an authenticating reverse proxy in front of it"
        )
    return LOOPBACK


class EdgeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, predictor, store, *, host: str = LOOPBACK, port: int = 0, metrics=None,
                 max_body_bytes: int = 1 << 20, max_batch: int = 64, max_text_chars: int | None = None,
                 record_inputs: bool = False) -> None:
        self.predictor = predictor
        self.store = store
        self.metrics = metrics
        self.max_body_bytes = int(max_body_bytes)
        self.max_batch = int(max_batch)
        self.max_text_chars = int(max_text_chars or getattr(store, "max_text_chars", 2000))
        self.record_inputs = record_inputs  # store each predicted text as an unlabelled sample
        self._thread: threading.Thread | None = None
        super().__init__((_check_host(host), port), _Handler)
        if self.server_address[0] != LOOPBACK:  # belt and braces
            self.server_close()
            raise NotLoopback(f"bound to {self.server_address[0]}, not 127.0.0.1")

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> "EdgeHTTPServer":
        """Serve on a background (daemon) thread; returns self."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="edge-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def make_server(predictor, store, *, host: str = LOOPBACK, port: int = 0, metrics=None, **kwargs) -> EdgeHTTPServer:
    """The server, bound (port 0: a free port) but not serving yet: call `.start()` or `.serve_forever()`."""
    return EdgeHTTPServer(predictor, store, host=host, port=port, metrics=metrics, **kwargs)


class _Handler(BaseHTTPRequestHandler):
    server: EdgeHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a connection may sit idle or half-sent
    server_version = "edgetune-agent"

    # -- plumbing ---------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, detail: str) -> None:
        self._send(status, {"error": code, "detail": detail})

    def _check_host_header(self) -> None:
        host = (self.headers.get("Host") or "").strip()
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if name not in _LOOPBACK_NAMES:
            raise _Refused(HTTPStatus.FORBIDDEN, "bad_host", f"Host {host!r} is not the loopback address")

    def _json_body(self) -> dict:
        ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise _Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "bad_content_type", "send the body as Content-Type: application/json")
        if self.headers.get("Transfer-Encoding"):
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "length_required", "send a Content-Length (chunked bodies are not accepted)")
        raw_len = self.headers.get("Content-Length")
        if raw_len is None:
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "length_required", "send a Content-Length header")
        try:
            n = int(raw_len)
        except ValueError:
            raise _Refused(HTTPStatus.BAD_REQUEST, "bad_length", "Content-Length is not a number") from None
        if n < 0:
            raise _Refused(HTTPStatus.BAD_REQUEST, "bad_length", "Content-Length is negative")
        if n > self.server.max_body_bytes:
            raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body_too_large", f"body of {n} bytes; the limit is {self.server.max_body_bytes}")
        raw = self.rfile.read(n)
        self._body_done = True
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Refused(HTTPStatus.BAD_REQUEST, "malformed_json", f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise _Refused(HTTPStatus.BAD_REQUEST, "bad_type", "body must be a JSON object")
        return body

    def _text(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise _Refused(HTTPStatus.BAD_REQUEST, "bad_type", f"{field} must be a string, not {type(value).__name__}")
        if not value.strip():
            raise _Refused(HTTPStatus.UNPROCESSABLE_ENTITY, "empty_text", f"{field} is empty")
        if len(value) > self.server.max_text_chars:
            raise _Refused(
                HTTPStatus.UNPROCESSABLE_ENTITY, "text_too_long",
                f"{field} has {len(value)} characters; the limit is {self.server.max_text_chars}",
            )
        return value

    def _skip_body(self) -> None:
        """After a refusal: read an unread body (so the connection stays usable), or close."""
        if getattr(self, "_body_done", True):
            return
        self._body_done = True
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = -1
        if self.headers.get("Transfer-Encoding") or not 0 <= n <= self.server.max_body_bytes:
            self.close_connection = True  # cannot tell where the next request starts
        elif n:
            self.rfile.read(n)

    def _dispatch(self, routes: dict) -> None:
        path = self.path.split("?", 1)[0]
        self._body_done = False  # set once the body (if any) has been read
        try:
            self._check_host_header()
            fn = routes.get(path)
            if fn is None:
                other = "POST" if self.command == "GET" else "GET"
                if path in _ROUTES[other]:
                    raise _Refused(HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", f"use {other} {path}")
                raise _Refused(HTTPStatus.NOT_FOUND, "not_found", f"no endpoint {path}: use POST /predict, POST /feedback or GET /healthz")
            fn(self)
        except _Refused as r:
            self._skip_body()
            self._error(r.status, r.code, r.detail)
        except Exception:
            log.exception("edge HTTP API: %s %s failed", self.command, path)
            self._skip_body()
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal", "the agent failed to answer; see its log")

    def do_GET(self) -> None:  # noqa: N802 (stdlib's name)
        self._dispatch(_ROUTES["GET"])

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(_ROUTES["POST"])

    # -- endpoints --------------------------------------------------------------------------

    def healthz(self) -> None:
        p, s = self.server.predictor, self.server.store
        self._send(HTTPStatus.OK, {
            "status": "ok",
            "model_version": getattr(p, "version", None),
            "labels": list(getattr(p, "labels", ())),
            "samples": s.count() if s is not None else None,
        })

    def predict(self) -> None:
        body = self._json_body()
        if ("text" in body) == ("texts" in body):
            raise _Refused(HTTPStatus.BAD_REQUEST, "missing_field", 'send exactly one of "text" (a string) or "texts" (a list of strings)')
        single = "text" in body
        if single:
            texts = [self._text(body["text"], "text")]
        else:
            items = body["texts"]
            if not isinstance(items, list):
                raise _Refused(HTTPStatus.BAD_REQUEST, "bad_type", f"texts must be a list of strings, not {type(items).__name__}")
            if not items:
                raise _Refused(HTTPStatus.UNPROCESSABLE_ENTITY, "empty_batch", "texts is empty")
            if len(items) > self.server.max_batch:
                raise _Refused(HTTPStatus.UNPROCESSABLE_ENTITY, "batch_too_large", f"{len(items)} texts; the limit is {self.server.max_batch}")
            texts = [self._text(t, f"texts[{i}]") for i, t in enumerate(items)]
        srv = self.server
        t0 = time.perf_counter()
        try:
            ids, probs = srv.predictor.predict(texts)
        except ModelLoadError as e:  # e.g. a ModelSlot before the agent exported its first model
            raise _Refused(HTTPStatus.SERVICE_UNAVAILABLE, "no_model", f"{e}; the agent exports its model when it "
                           "receives a global adapter: retry later") from None
        elapsed = time.perf_counter() - t0
        if srv.metrics is not None:
            srv.metrics.predictions.labels(backend=getattr(srv.predictor, "backend", "unknown")).inc(len(texts))
            srv.metrics.predict_seconds.observe(elapsed)
        if srv.record_inputs and srv.store is not None:
            srv.store.add_many([(t, None, "predict") for t in texts])
        names = list(srv.predictor.labels)
        ids = [int(i) for i in ids]
        rows = [[round(float(x), 6) for x in row] for row in probs]
        if single:
            self._send(HTTPStatus.OK, {"label": names[ids[0]], "label_id": ids[0], "probabilities": rows[0], "model_version": getattr(srv.predictor, "version", None)})
        else:
            self._send(HTTPStatus.OK, {"labels": [names[i] for i in ids], "label_ids": ids, "probabilities": rows, "model_version": getattr(srv.predictor, "version", None)})

    def feedback(self) -> None:
        body = self._json_body()
        for field in ("text", "label"):
            if field not in body:
                raise _Refused(HTTPStatus.BAD_REQUEST, "missing_field", f'"{field}" is required: {{"text": "...", "label": "<class name or index>"}}')
        text = self._text(body["text"], "text")
        label = body["label"]
        if label is None or isinstance(label, bool) or not isinstance(label, (str, int)):
            raise _Refused(HTTPStatus.BAD_REQUEST, "bad_type", "label must be a class name (string) or index (integer)")
        store = self.server.store
        if store is None:
            raise _Refused(HTTPStatus.SERVICE_UNAVAILABLE, "no_store", "this device only serves predictions "
                           "(edgetune-agent serve): it keeps no feedback")
        try:
            sample_id = store.add(text, label, source="feedback")
        except InvalidSample as e:
            status = HTTPStatus.BAD_REQUEST if e.reason in ("bad_type",) else HTTPStatus.UNPROCESSABLE_ENTITY
            raise _Refused(status, e.reason, str(e)) from None
        if self.server.metrics is not None:
            self.server.metrics.samples_stored.set(store.count())
        self._send(HTTPStatus.CREATED, {"id": sample_id})


_ROUTES = {
    "GET": {"/healthz": _Handler.healthz},
    "POST": {"/predict": _Handler.predict, "/feedback": _Handler.feedback},
}
