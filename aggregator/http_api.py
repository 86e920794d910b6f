"""The aggregator's HTTP endpoint: Prometheus /metrics, the fleet and round state as JSON, the dashboard.

One small threaded server (stdlib ``http.server``) on ``[service] http_port``: the operator's view
must not need anything the offline machines do not have. Routes (GET and HEAD only):

- ``/metrics``: Prometheus text format (the service's own registry);
- ``/api/status``: service, open round, fleet counts, rejections, the last closed rounds;
- ``/api/fleet?state=&q=&limit=``: the device table (``aggregator.fleet``), filtered;
- ``/healthz``: 200 while the service loop runs, 503 otherwise;
- ``/`` and ``/static/<file>``: the dashboard (files shipped in ``fedmq.aggregator/dashboard``).

Everything it serves comes from snapshot callables of the service; it never touches round state.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
         ".json": "application/json"}
STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FLEET_STATES = ("online", "offline", "idle", "training", "error", "excluded", "unknown")
MAX_LIMIT = 100_000


def filter_devices(rows: list[dict], state: str = "", q: str = "", limit: int = 1000) -> dict:
    """The /api/fleet answer: rows matching ``state`` (or "online"/"excluded") and id substring ``q``."""
    out = []
    matched = 0
    for r in rows:
        if state == "online" and not r["online"]:
            continue
        if state == "excluded" and not r["excluded"]:
            continue
        if state not in ("", "online", "excluded") and r["state"] != state:
            continue
        if q and q not in r["agent"]:
            continue
        matched += 1
        if len(out) < limit:
            out.append(r)
    return {"total": len(rows), "matched": matched, "devices": out}


class StatusServer:
    """Serves the routes above from ``status()`` and ``devices()`` (both called on the HTTP threads)."""

    def __init__(self, registry: CollectorRegistry, status: Callable[[], dict], devices: Callable[[], list[dict]],
                 alive: Callable[[], bool]) -> None:
        self.registry, self.status, self.devices, self.alive = registry, status, devices, alive
        self.httpd: ThreadingHTTPServer | None = None
        self._dashboard = resources.files("fedmq.aggregator") / "dashboard"

    def start(self, port: int, addr: str = "127.0.0.1") -> int:
        """Bind and serve in a daemon thread; return the bound port (``port`` 0 picks a free one)."""
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "fedmq"
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # access log at debug: a polling page is not news
                log.debug("%s %s", self.address_string(), fmt % args)

            def do_HEAD(self):
                self._serve(head=True)

            def do_GET(self):
                self._serve(head=False)

            def _send(self, code: int, body: bytes, ctype: str, head: bool) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, doc: dict, head: bool) -> None:
                self._send(200, json.dumps(doc, separators=(",", ":"), allow_nan=False, default=str).encode(),
                           "application/json", head)

            def _serve(self, head: bool) -> None:
                try:
                    url = urlsplit(self.path[:2048])
                    path = url.path
                    if path == "/metrics":
                        self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST, head)
                    elif path == "/api/status":
                        self._json(server.status(), head)
                    elif path == "/api/fleet":
                        qs = parse_qs(url.query[:1024])
                        state = qs.get("state", [""])[0]
                        if state and state not in FLEET_STATES:
                            self._send(400, f"state must be one of {FLEET_STATES}".encode(), "text/plain", head)
                            return
                        try:
                            limit = min(MAX_LIMIT, max(0, int(qs.get("limit", ["1000"])[0])))
                        except ValueError:
                            self._send(400, b"limit must be an integer", "text/plain", head)
                            return
                        doc = filter_devices(server.devices(), state, qs.get("q", [""])[0][:128], limit)
                        self._json({"ts": time.time(), **doc}, head)
                    elif path == "/healthz":
                        ok = server.alive()
                        self._send(200 if ok else 503, b"ok\n" if ok else b"stopped\n", "text/plain", head)
                    elif path in ("/", "/index.html"):
                        self._static("index.html", head)
                    elif path.startswith("/static/"):
                        self._static(path[len("/static/"):], head)
                    else:
                        self._send(404, b"not found\n", "text/plain", head)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                except Exception as e:  # noqa: BLE001 - one request never ends the server
                    log.warning("HTTP %s failed: %s: %s", self.path[:200], type(e).__name__, e)
                    try:
                        self._send(500, b"internal error\n", "text/plain", head)
                    except OSError:
                        pass

            def _static(self, name: str, head: bool) -> None:
                f = server._dashboard / name
                if not STATIC_NAME.match(name) or not f.is_file():
                    self._send(404, b"not found\n", "text/plain", head)
                    return
                ext = "." + name.rsplit(".", 1)[-1] if "." in name else ""
                self._send(200, f.read_bytes(), TYPES.get(ext, "application/octet-stream"), head)

        self.httpd = ThreadingHTTPServer((addr, port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, name="fedmq-http", daemon=True).start()
        bound = self.httpd.server_address[1]
        log.info("HTTP on http://%s:%d/ (dashboard, /api/status, /api/fleet, /metrics)", addr, bound)
        return bound

    def close(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
