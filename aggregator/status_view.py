"""``fedmq-aggregator status``: the fleet table and the round in progress, as text or JSON.

It asks the running service over HTTP (``[service] http_port``: /api/status and /api/fleet);
when none answers it reads what the last process left in the state dir (``fleet.json``, written
every 30 s and at shutdown, and the last ``history.jsonl`` row), and says so.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

COLUMNS = (("agent", 18), ("state", 8), ("interpreter", 14), ("last seen", 10), ("asked", 6), ("in", 6),
           ("streak", 6), ("last rejection", 16), ("excluded / error", 40))


def fetch(addr: str, port: int, state: str = "", q: str = "", limit: int = 100_000,
          timeout: float = 5.0) -> dict:
    """{"status": /api/status, "fleet": /api/fleet, "source": url} from a running service (raises OSError)."""
    host = "127.0.0.1" if addr in ("", "0.0.0.0") else ("[::1]" if addr == "::" else addr)
    base = f"http://{host}:{port}"
    qs = urllib.parse.urlencode({k: v for k, v in (("state", state), ("q", q), ("limit", limit)) if v})
    with urllib.request.urlopen(f"{base}/api/status", timeout=timeout) as r:
        status = json.load(r)
    with urllib.request.urlopen(f"{base}/api/fleet?{qs}", timeout=timeout) as r:
        fleet = json.load(r)
    return {"source": base, "status": status, "fleet": fleet}


def from_state_dir(state_dir: Path, state: str = "", q: str = "", limit: int = 100_000) -> dict | None:
    """The same document from fleet.json and history.jsonl of a stopped service; None if there is none."""
    from .http_api import filter_devices

    try:
        doc = json.loads((state_dir / "fleet.json").read_text())
    except (OSError, ValueError):
        return None
    last = None
    try:
        with open(state_dir / "history.jsonl", "rb") as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip()]
        if lines:
            last = json.loads(lines[-1])
    except (OSError, ValueError):
        pass
    rows = [r for r in doc.get("devices", []) if isinstance(r, dict)]
    for r in rows:  # a stopped service knows no one's presence
        r["online"] = False
    status = {"ts": doc.get("ts", 0.0), "service": {**doc.get("service", {}), "state": "stopped", "connected": False},
              "round": None, "fleet": {"known": len(rows), "online": 0,
                                       "excluded": sum(1 for r in rows if r.get("excluded"))},
              "rounds": [last] if last else []}
    return {"source": str(state_dir / "fleet.json"), "status": status, "fleet": filter_devices(rows, state, q, limit)}


def _clean(v: object) -> str:
    """Device-written text on an operator's terminal: no control characters (escape sequences)."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(v))


def _ago(ts: float, now: float) -> str:
    if not ts:
        return "-"
    s = max(0.0, now - ts)
    return f"{s:.0f}s" if s < 120 else (f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h")


def format_text(doc: dict) -> str:
    """A header (service, round), then one line per device."""
    st, fl = doc["status"], doc["fleet"]
    svc = st.get("service", {})
    now = time.time()
    out = [f"service {svc.get('id', '?')}: {svc.get('state', '?')}, run {svc.get('run', '?')}, "
           f"global round {svc.get('global_round', '?')} (from {doc['source']})"]
    r = st.get("round")
    if r:
        out.append(f"round {r['round']}: {r['received']}/{r['asked']} updates (quorum {r['quorum']}), "
                   f"{r['rejected']} rejected, {r['seconds_left']:.0f}s to the deadline")
    elif st.get("rounds"):
        last = st["rounds"][-1]
        out.append(f"no round open; last round {last.get('round')} {last.get('outcome')}")
    c = st.get("fleet", {})
    out.append(f"devices: {c.get('known', 0)} known, {c.get('online', 0)} online, {c.get('excluded', 0)} excluded"
               + (f"; showing {len(fl['devices'])} of {fl['matched']} matching" if fl["matched"] != fl["total"]
                  or len(fl["devices"]) < fl["matched"] else ""))
    out.append("  ".join(f"{name:<{w}}" for name, w in COLUMNS).rstrip())
    for d in fl["devices"]:
        note = d.get("excluded") or ""
        if d.get("last_error"):
            note = f"{note}: {d['last_error']}" if note else d["last_error"]
        cells = (d["agent"], d["state"], d.get("interpreter", ""), _ago(d.get("last_seen", 0), now),
                 str(d.get("rounds_asked", 0)), str(d.get("rounds_contributed", 0)), str(d.get("refused_streak", 0)),
                 d.get("last_rejection", "") or "-", note[:120] or "-")
        cells = tuple(_clean(v) for v in cells)
        out.append("  ".join(f"{v[:w] if i < len(COLUMNS) - 1 else v:<{w}}"
                             for i, (v, (_, w)) in enumerate(zip(cells, COLUMNS))).rstrip())
    return "\n".join(out)
