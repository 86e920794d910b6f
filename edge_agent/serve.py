"""``fedmq-agent predict --serve``: the device's global model behind a small local HTTP JSON endpoint.

One long-lived process, one interpreter: weights are reloaded only when the agent has written a
newer ``global.msgpack`` (:meth:`LocalModel.refresh` is one ``stat`` per request otherwise).

* ``GET /v1/model`` -> ``{"run", "round", "model_id", "x_shape", "num_classes", "batch_size", "runtime"}``
* ``POST /v1/predict`` with ``{"x": [[...], ...]}`` (n examples of ``x_shape``, or one example)
  -> ``{"labels": [...], "probabilities": [[...], ...], "run", "round", "model_id"}``
* errors: ``{"error": "..."}`` with 400 (bad input), 404, 411/413 (body length), 503 (no verified
  global model yet, or the cached one does not fit: the agent has not received a usable one).

It binds to 127.0.0.1 by default and has no authentication: anything that can reach the port can
ask for predictions (not change the model). Requests are served one at a time (one interpreter).
Request bodies are untrusted: bounded in size, parsed as JSON only, checked against the model's
input shape before they reach the interpreter.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from fedmq.broker.errors import FedmqError

from .local_model import LocalModel
from .trainer import DataError

log = logging.getLogger(__name__)
MAX_BODY = 8 * 1024 * 1024


class _Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PredictServer(ThreadingHTTPServer):
    """An HTTP server around one :class:`LocalModel` (requests serialized by a lock)."""

    daemon_threads = True

    def __init__(self, model: LocalModel, host: str = "127.0.0.1", port: int = 8765, max_body: int = MAX_BODY) -> None:
        self.model, self.max_body = model, max_body
        self.lock = threading.Lock()
        self._last_problem = ""
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def current(self) -> LocalModel:
        """The model, refreshed if the agent wrote a newer global (called under ``lock``)."""
        try:
            if self.model.refresh():
                log.info("serving the global model of run %s round %d", self.model.run, self.model.round)
            self._last_problem = ""
        except FedmqError as e:
            if str(e) != self._last_problem:  # once per problem, not once per request
                log.warning("%s", e)
                self._last_problem = str(e)
            if not self.model.ready:
                raise _Refusal(503, str(e)) from None
            # a refused newer global: keep serving the verified weights we have
        return self.model


class _Handler(BaseHTTPRequestHandler):
    server: PredictServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # a client that stops sending does not hold a thread forever

    def log_message(self, fmt: str, *args: Any) -> None:  # through logging, not stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?")[0] != "/v1/model":
            self._send(404, {"error": "unknown path: GET /v1/model or POST /v1/predict"})
            return
        try:
            with self.server.lock:
                self._send(200, self.server.current().info())
        except _Refusal as e:
            self._send(e.status, {"error": str(e)})

    def do_POST(self) -> None:  # noqa: N802
        try:
            if self.path.split("?")[0] != "/v1/predict":
                raise _Refusal(404, "unknown path: GET /v1/model or POST /v1/predict")
            x = self._read_x()
            with self.server.lock:
                model = self.server.current()
                try:
                    p = model.predict(x)
                except DataError as e:
                    raise _Refusal(400, str(e)) from None
            self._send(200, {"labels": p.labels.tolist(), "probabilities": p.probabilities.tolist(), "run": p.run,
                             "round": p.round, "model_id": p.model_id})
        except _Refusal as e:
            self.close_connection = e.status in (411, 413)  # the unread body would be taken for a request
            self._send(e.status, {"error": str(e)})

    def _read_x(self) -> np.ndarray:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise _Refusal(411, "Content-Length required")
        n = int(length)
        if n > self.server.max_body:
            raise _Refusal(413, f"request body of {n} bytes, the limit is {self.server.max_body}")
        body = self.rfile.read(n)
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise _Refusal(400, f"body is not JSON: {type(e).__name__}") from None
        if not isinstance(doc, dict) or "x" not in doc:
            raise _Refusal(400, 'body must be a JSON object {"x": [...]}')
        try:
            x = np.asarray(doc["x"], dtype=np.float32)
        except (ValueError, TypeError, RecursionError):
            raise _Refusal(400, '"x" must be a rectangular array of numbers') from None
        if x.size == 0:
            raise _Refusal(400, '"x" holds no examples')
        return x


def serve(model: LocalModel, host: str, port: int, ready: Any = None) -> None:
    """Serve until interrupted; ``ready(url)`` is called once the socket listens."""
    srv = PredictServer(model, host, port)
    try:
        if ready is not None:
            ready(srv.url)
        srv.serve_forever(poll_interval=0.5)
    finally:
        srv.server_close()
