"""The aggregator's HTTP endpoint (aggregator.http_api): routes, filters, hostile requests.

A real server on a free port, driven by urllib; the status and fleet callables are stand-ins for
the service (the end-to-end path with a real fleet is tests/test_fleet_status.py).
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

import pytest

from fedmq.aggregator.http_api import StatusServer
from fedmq.aggregator.telemetry import Telemetry

DEVICES = [{"agent": f"dev-{i}", "state": s, "online": s != "offline", "excluded": "x" if i == 2 else ""}
           for i, s in enumerate(["idle", "training", "error", "offline"])]


@pytest.fixture
def server():
    t = Telemetry()
    calls = {"status": 0}

    def status():
        calls["status"] += 1
        if calls["status"] == 2:
            raise RuntimeError("a bug in one request")
        return {"service": {"id": "aggregator"}, "round": None}

    s = StatusServer(t.registry, status, lambda: DEVICES, lambda: True)
    port = s.start(0)
    yield t, port
    s.close()


def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path)
    r = c.getresponse()
    return r.status, r.read(), dict(r.getheaders())


def test_metrics_status_fleet_and_dashboard(server):
    t, port = server
    t.rejected.labels("non_finite").inc(3)
    t.rounds.labels("aggregated").inc()
    t.agents.set(7)
    code, body, _ = get(port, "/metrics")
    text = body.decode()
    assert code == 200 and 'fedmq_updates_rejected_total{reason="non_finite"} 3.0' in text
    assert 'fedmq_rounds_total{outcome="aggregated"} 1.0' in text and "fedmq_connected_agents 7.0" in text
    code, body, hdr = get(port, "/api/status")
    assert code == 200 and json.loads(body)["service"]["id"] == "aggregator"
    assert hdr["Content-Type"] == "application/json" and hdr["Cache-Control"] == "no-store"
    # one failing request answers 500 and the server goes on
    assert get(port, "/api/status")[0] == 500
    assert get(port, "/api/status")[0] == 200
    fleet = lambda q: json.loads(get(port, "/api/fleet" + q)[1])  # noqa: E731
    assert [d["agent"] for d in fleet("")["devices"]] == ["dev-0", "dev-1", "dev-2", "dev-3"]
    assert [d["agent"] for d in fleet("?state=online")["devices"]] == ["dev-0", "dev-1", "dev-2"]
    assert [d["agent"] for d in fleet("?state=excluded")["devices"]] == ["dev-2"]
    assert [d["agent"] for d in fleet("?state=offline")["devices"]] == ["dev-3"]
    assert fleet("?q=dev-1")["matched"] == 1 and fleet("?q=nobody")["matched"] == 0
    doc = fleet("?limit=2")
    assert len(doc["devices"]) == 2 and doc["matched"] == 4 and doc["total"] == 4
    code, body, hdr = get(port, "/")
    assert code == 200 and hdr["Content-Type"].startswith("text/html") and b"<html" in body.lower()
    code, body, _ = get(port, "/healthz")
    assert code == 200 and get(port, "/healthz", "HEAD")[1] == b""


@pytest.mark.parametrize("path", ["/static/../http_api.py", "/static/%2e%2e/http_api.py", "/static/..%2fcli.py",
                                  "/static/", "/static/.hidden", "/etc/passwd", "/static/" + "a" * 5000,
                                  "/api/fleet?state=bogus", "/api/fleet?limit=x"])
def test_hostile_requests_are_refused(server, path):
    _, port = server
    code, _, _ = get(port, path)
    assert code in (400, 404)
    assert get(port, "/metrics")[0] == 200  # and the server still serves


def test_only_get_and_head(server):
    _, port = server
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/status", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 501
