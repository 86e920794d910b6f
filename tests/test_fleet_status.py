"""The operator's fleet view (issue 16.2): the device table, exclusion, `status`, /api/* over HTTP.

Real Mosquitto, a real aggregator process with its HTTP port, two real agents on watch data, one
real agent whose data does not fit the model (it reports the error in its status), and one device
written here that answers every round with an update for another model (refused ``wrong_model``).
Checked against the aggregator's own history.jsonl (who was asked, who counted) and the agents'
known behaviour: the refusing device is excluded after ``exclude_after`` rounds and no longer
asked; the erroring device is excluded from the start; both are shown with why; the honest
agents' counts match the history; and (the positive control of "no longer asked") the refusing
device is asked again once it reconnects, as documented.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid

import numpy as np
import pytest
from conftest import needs_mosquitto, wait_until
from fleet import ROOT, watch_shards
from test_federation import aggregated, fleet, history  # noqa: F401 - the fleet fixture

from fedmq.aggregator.fleet import FleetTable
from fedmq.aggregator.http_api import filter_devices
from fedmq.broker.contract import codec
from fedmq.broker.contract.messages import RoundAnnouncement, Status, Update
from fedmq.broker.contract.topics import Topics
from fedmq.broker.ops.launcher import free_port
from fedmq.broker.transport.client import MqttClient, MqttConfig, Will

pytestmark = [pytest.mark.network, needs_mosquitto]

EXCLUDE_AFTER = 2


# -- the table's rules, without a network --------------------------------------------------------------
def test_table_excludes_after_refused_rounds_and_readmits_on_reconnect():
    t = FleetTable(exclude_after=2)
    t.on_status("d", "idle", "", "", "", 10, "", 1.0)
    for rnd in (1, 2):
        t.on_open(["d"])
        t.on_update("d", "late", 2.0)  # timing, not the device's update: never counts
        t.on_update("d", "stale_base", 2.0)
        assert t.on_close(rnd, ["d"], []) == []
    for rnd in (3, 4):
        t.on_open(["d"])
        t.on_update("d", "wrong_model", 2.0)
        excluded = t.on_close(rnd, ["d"], [])
    assert excluded == ["d"] and t.is_excluded("d")
    t.on_status("d", "idle", "", "", "", 10, "", 3.0)  # a presence re-sync: still excluded
    t.on_status("d", "idle", "", "", "", 10, "", 3.0, retained=True)
    assert t.is_excluded("d")
    t.on_status("d", "offline", "", "", "", 0, "", 4.0)
    t.on_status("d", "online", "", "", "", 10, "", 5.0)  # reconnected: asked again
    assert not t.is_excluded("d")
    t.on_status("d", "error", "", "", "", 10, "data does not fit", 6.0)
    assert t.is_excluded("d") and t.devices["d"].last_error == "data does not fit"
    t.on_status("d", "idle", "", "", "", 10, "", 7.0)  # the error is gone: ready
    assert not t.is_excluded("d")
    row = filter_devices(t.snapshot(), "", "d")["devices"][0]
    assert row["rejections"] == {"late": 2, "stale_base": 2, "wrong_model": 2} and row["rounds_asked"] == 4


def test_fleet_json_round_trips_row_by_row_and_reads_the_older_layout(tmp_path):
    """save writes one JSON document with one row per line; load reads it back row by row (a torn line
    costs that row only) and still reads a file of the older one-line layout whole."""
    t = FleetTable()
    for i in range(600):  # more than one write batch
        a = f"agent-{i:04d}"
        t.on_status(a, "online", "litert", "ai-edge-litert 2.3", "0.9", 10 + i, "", 100.0 + i)
        t.on_update(a, None if i % 3 else "late", 200.0 + i)
    p = tmp_path / "fleet.json"
    t.save(p, {"service": {"id": "agg"}})
    doc = json.loads(p.read_text())  # one JSON document (fedmq-aggregator status reads it whole)
    assert doc["service"] == {"id": "agg"} and [r["agent"] for r in doc["devices"]] == sorted(t.devices)
    lines = p.read_text().splitlines()
    assert len(lines) == 600 + 2  # head, a row per line, tail

    def restored(path):
        u = FleetTable()
        u.load(path)
        return {a: (d.num_samples, d.last_seen, dict(d.rejections), d.runtime, d.state) for a, d in u.devices.items()}

    want = {a: (d.num_samples, d.last_seen, dict(d.rejections), d.runtime, "unknown") for a, d in t.devices.items()}
    assert restored(p) == want
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc, separators=(",", ":")))  # the layout before: one line
    assert restored(old) == want
    torn = tmp_path / "torn.json"
    torn.write_text("\n".join(lines[:5] + [lines[5][:20]] + lines[6:]))
    assert set(restored(torn)) == set(want) - {doc["devices"][4]["agent"]}
    (tmp_path / "bad.json").write_text("{not json")
    assert restored(tmp_path / "bad.json") == {} and restored(tmp_path / "missing.json") == {}


def test_probation_readmits_after_exclude_s():
    t = FleetTable(exclude_after=1)
    t.on_status("d", "idle", "", "", "", 1, "", 0.0)
    t.on_open(["d"])
    t.on_update("d", "bad_tensors", 1.0)
    t.on_close(1, ["d"], [])
    assert t.is_excluded("d")
    t.readmit_expired(t.devices["d"].excluded_at + 10, 60)
    assert t.is_excluded("d")  # control: not yet
    t.readmit_expired(t.devices["d"].excluded_at + 61, 60)
    assert not t.is_excluded("d")


# -- the whole thing -----------------------------------------------------------------------------------
class WrongModelDevice:
    """A provisioned-looking device that answers every round it is asked with an update for another model."""

    def __init__(self, f, agent: str) -> None:
        self.agent, self.topics = agent, Topics(f.broker["fleet"])
        self.answered: list[int] = []
        self._connect(f)

    def _connect(self, f) -> None:
        self.client = MqttClient(MqttConfig(f.broker["host"], f.broker["port"], client_id=self.agent),
                                 on_message=self._on_message)
        self.client.set_will(Will(self.topics.status(self.agent),
                                  codec.encode(Status(self.agent, "offline", time.time()))))
        self.client.connect()
        self.client.subscribe(self.topics.round(), qos=1)
        self.client.publish(self.topics.status(self.agent), codec.encode(Status(self.agent, "idle", time.time(),
                                                                                num_samples=50)), retain=True)

    def _on_message(self, m) -> None:
        ann = codec.decode(m.payload)
        if not isinstance(ann, RoundAnnouncement) or ann.round in self.answered:
            return
        if not ann.asks(self.agent):  # a list, the hash rule, and the excluded devices it names
            return
        self.answered.append(ann.round)
        u = Update(ann.round, self.agent, "0" * 64, uuid.uuid4().hex, 50, {"w": np.zeros(3, np.float32)},
                   base_round=ann.base_round, run=ann.run, created=time.time())
        self.client.publish(self.topics.update(self.agent), codec.encode(u), wait=False)

    def reconnect(self, f) -> None:
        self.client.publish(self.topics.status(self.agent), codec.encode(Status(self.agent, "offline", time.time())),
                            retain=True)
        self.client.close()
        self._connect(f)

    def close(self) -> None:
        self.client.close()


def _get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.load(r)


def _device(port: int, agent: str) -> dict:
    rows = _get(port, f"/api/fleet?q={agent}")["devices"]
    return next((r for r in rows if r["agent"] == agent), {})  # {} until the device is known


def _status_cli(cfg, *args) -> dict:
    out = subprocess.run([sys.executable, "-m", "fedmq.aggregator.cli", "status", "--config", str(cfg), "--json",
                          *args], capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_fleet_table_exclusion_status_and_http(fleet, tmp_path):  # noqa: F811
    f = fleet()
    honest = ["agent-0", "agent-1"]
    shards = watch_shards(honest, tmp_path, per_agent=60)
    misfit = tmp_path / "misfit.npz"  # 7 features per example: the sensor model wants windows of another shape
    np.savez(misfit, x=np.zeros((40, 7), np.float32), y=np.zeros(40, np.int32))
    port = free_port()
    agg = f.start_aggregator(service={"http_port": port},
                             rounds={"rounds": 0, "min_agents": 2, "quorum": 2, "deadline_s": 60, "grace_s": 1,
                                     "exclude_after": EXCLUDE_AFTER, "exclude_s": 0})
    for a in honest:
        f.start_agent(a, shards[a])
    err = f.start_agent("agent-err", misfit)
    bad = WrongModelDevice(f, "agent-bad")
    try:
        wait_until(lambda: agg.alive() and _http_ok(port), 120, what="the aggregator's HTTP port")
        # the misfit agent says why it cannot train; it is excluded and never asked
        wait_until(lambda: _device(port, "agent-err").get("excluded") == "reported error", 120,
                   what="agent-err reported its data error")
        d = _device(port, "agent-err")
        assert d["state"] == "error" and "does not fit" in d["last_error"], d
        # the refusing device: asked until EXCLUDE_AFTER rounds refused, then not
        wait_until(lambda: _device(port, "agent-bad").get("excluded"), 240, interval=0.2,
                   what="agent-bad excluded")
        excluded_after = len(bad.answered)
        assert excluded_after >= EXCLUDE_AFTER
        n_rounds = len(history(f))
        wait_until(lambda: len(aggregated(history(f))) >= n_rounds + 2, 120, interval=0.2,
                   what="two more rounds")
        assert len(bad.answered) == excluded_after  # not asked any more
        d = _device(port, "agent-bad")
        assert d["refused_streak"] >= EXCLUDE_AFTER and d["rejections"].get("wrong_model", 0) >= EXCLUDE_AFTER, d
        assert "wrong_model" in d["excluded"]
        # the honest agents' rows agree with the history (the reference: participants per round)
        h = history(f)
        for a in honest:
            row = _device(port, a)
            assert row["online"] and not row["excluded"] and row["interpreter"], row
            counted = sum(1 for r in h if a in r["participants_list"])
            assert row["rounds_contributed"] >= counted  # the table may count a round whose row is on its way
            assert row["rounds_contributed"] <= counted + 1
        assert all("agent-err" not in r["participants_list"] and "agent-bad" not in r["participants_list"]
                   for r in h)
        st = _get(port, "/api/status")
        assert st["fleet"]["known"] == 4 and st["fleet"]["online"] == 4 and st["fleet"]["excluded"] == 2, st
        assert st["service"]["state"] == "online" and st["rounds"][-1]["round"] >= n_rounds
        assert st["rejected_total"].get("wrong_model", 0) >= EXCLUDE_AFTER
        # filters: by state, by id; the positive control matches, a made-up id matches nothing
        assert [r["agent"] for r in _get(port, "/api/fleet?state=excluded")["devices"]] == ["agent-bad", "agent-err"]
        assert _get(port, "/api/fleet?q=nobody")["matched"] == 0
        wait_until(lambda: "fedmq_devices_excluded 2.0" in _metrics(port), 30, what="the excluded gauge (set each second)")
        # `fedmq-aggregator status --json` asks the running service: the same table
        doc = _status_cli(f.tmp / "aggregator.toml", "--state", "excluded")
        assert [r["agent"] for r in doc["fleet"]["devices"]] == ["agent-bad", "agent-err"]
        # the positive control of "no longer asked": reconnected, it is asked again (and refused again)
        bad.reconnect(f)
        wait_until(lambda: len(bad.answered) > excluded_after, 120, interval=0.2, what="agent-bad asked again")
    finally:
        bad.close()
        f.stop_all()
    assert err.popen.returncode is not None
    # stopped: `status` shows what the service left in its state dir
    text = subprocess.run([sys.executable, "-m", "fedmq.aggregator.cli", "status", "--config",
                           str(f.tmp / "aggregator.toml")], capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert text.returncode == 0, text.stderr
    assert "showing the state the last service left" in text.stdout
    assert "agent-err" in text.stdout and "does not fit" in text.stdout


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _http_ok(port: int) -> bool:
    try:
        return _get(port, "/api/status")["service"]["connected"]
    except OSError:
        return False
