"""The aggregator's live dashboard in a real headless browser, against a running fleet.

Real Mosquitto, a real aggregator process serving the page on ``[service] http_port`` and three real
agent processes (watch data); Debian's Chromium driven by Playwright (no browser download: the
machines are offline). Checks what an operator relies on: the page loads with no console or page
errors and no failed request, shows the fleet's online devices, advances when a round completes
(checked against the aggregator's history.jsonl), and its filters select the right rows. A screenshot
is kept in build/test-artifacts/dashboard.png.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import needs_mosquitto, wait_until
from fleet import ROOT, Fleet, watch_shards

from fedmq.broker.ops.launcher import free_port

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "build" / "test-artifacts"
AGENTS = ["agent-0", "agent-1", "agent-2"]
UI_TIMEOUT_MS = 30_000  # the page polls every 1-2 s; this is the bound on a loaded 2-core machine

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None

pytestmark = [
    pytest.mark.network, needs_mosquitto,
    pytest.mark.skipif(sync_playwright is None, reason="playwright not installed (pip install 'fedmq[dev]')"),
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"{CHROMIUM} missing (Debian: apt-get install chromium; `make chromium`)"),
]


def _history(state_dir: Path) -> list[dict]:
    p = state_dir / "history.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def fleet(own_broker, tmp_path, model_cache, request):
    b = own_broker()
    f = Fleet(tmp_path, {"host": b.host, "port": b.port, "fleet": "f" + uuid.uuid4().hex[:8]}, model_cache=model_cache)
    yield f
    f.stop_all()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f.dump_logs())


def test_dashboard_in_chromium_follows_a_running_fleet(fleet, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    state_dir = tmp_path / "aggregator-state"
    # many rounds: the run is still going (and the page still served) while the test looks at it
    agg = fleet.start_aggregator(rounds={"rounds": 1000, "min_agents": len(AGENTS), "grace_s": 1, "deadline_s": 60},
                                 service={"http_port": port})
    shards = watch_shards(AGENTS, tmp_path, per_agent=60)
    agents = {a: fleet.start_agent(a, shards[a]) for a in AGENTS}
    wait_until(lambda: _answers(base + "/api/status") or not agg.alive(), 90, 0.2, what="the aggregator's HTTP port")
    assert agg.alive(), agg.text()[-3000:]

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    problems: list[str] = []  # console errors, uncaught exceptions, failed or refused requests
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
            page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
            try:
                page.goto(base + "/", wait_until="load")
                expect(page.locator("#fleet-table")).to_have_attribute("data-loaded", "true", timeout=UI_TIMEOUT_MS)

                # every agent process is up and online: the page says so
                expect(page.locator("#online-count")).to_have_text(str(len(AGENTS)), timeout=90_000)
                expect(page.locator("#known-count")).to_have_text(str(len(AGENTS)), timeout=UI_TIMEOUT_MS)
                assert all(a.alive() for a in agents.values())

                # a round completes: the global round shown moves past the one first seen, and the value
                # shown is one the aggregator recorded (its history.jsonl, the independent reference)
                first = int(page.locator("#global-round").get_attribute("data-value") or 0)
                page.wait_for_function("(g) => Number(document.getElementById('global-round').dataset.value) > g",
                                       arg=first, timeout=120_000)
                shown = int(page.locator("#global-round").get_attribute("data-value"))
                recorded = [r["global_round"] for r in _history(state_dir)]
                assert shown in recorded and max(recorded) >= shown > first, (first, shown, recorded)
                expect(page.locator("#banner")).to_be_hidden()
                expect(page.locator("#chart-bytes svg")).to_have_count(1, timeout=UI_TIMEOUT_MS)  # a round closed
                page.screenshot(path=str(shot), full_page=True)

                # the id filter: one agent's id leaves its row alone; an id nobody has leaves none
                rows = page.locator("#fleet-table tbody tr")
                table = page.locator("#fleet-table")
                expect(rows).to_have_count(len(AGENTS), timeout=UI_TIMEOUT_MS)
                page.fill("#fleet-q", "agent-1")
                expect(table).to_have_attribute("data-q", "agent-1", timeout=UI_TIMEOUT_MS)
                expect(rows).to_have_count(1)
                assert rows.first.get_attribute("data-agent") == "agent-1"
                expect(page.locator("#fleet-empty")).to_be_hidden()
                page.fill("#fleet-q", "no-such-device")
                expect(table).to_have_attribute("data-q", "no-such-device", timeout=UI_TIMEOUT_MS)
                expect(rows).to_have_count(0)
                expect(page.locator("#fleet-empty")).to_be_visible()
                page.fill("#fleet-q", "")

                # the state filter, and the page following a device that goes away: no device offline at
                # first; then one agent is killed (its last will) and the page shows it, and only it, offline
                page.select_option("#fleet-state", "offline")
                expect(table).to_have_attribute("data-state", "offline", timeout=UI_TIMEOUT_MS)
                expect(table).to_have_attribute("data-q", "")
                expect(rows).to_have_count(0)
                agents["agent-2"].kill(signal.SIGKILL)
                expect(page.locator("#online-count")).to_have_text(str(len(AGENTS) - 1), timeout=60_000)
                expect(rows).to_have_count(1, timeout=UI_TIMEOUT_MS)
                assert rows.first.get_attribute("data-agent") == "agent-2"
                page.select_option("#fleet-state", "online")
                expect(table).to_have_attribute("data-state", "online", timeout=UI_TIMEOUT_MS)
                expect(rows).to_have_count(len(AGENTS) - 1)
                seen = list(problems)  # before the browser closes (closing aborts the page's open fetches)
                # positive control: the listeners do catch a console error and a missing file
                page.evaluate("() => { console.error('probe'); return fetch('/static/no-such-file.js'); }")
                wait_until(lambda: "console.error: probe" in problems and any(
                    x.startswith("HTTP 404:") and x.endswith("/static/no-such-file.js") for x in problems), 10,
                    what="the probe's console error and 404 to be caught")
            finally:
                try:
                    page.screenshot(path=str(ARTIFACTS / "dashboard-last.png"), full_page=True)
                except Exception:  # noqa: BLE001 - a failure's screenshot is best effort
                    pass
        finally:
            browser.close()
    print(f"dashboard screenshot: {shot}")
    assert agg.alive(), agg.text()[-3000:]
    assert seen == [], seen
