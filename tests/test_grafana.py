"""docs/grafana/fedmq-dashboard.json: a valid Grafana dashboard whose every query names a real metric.

The reference is the aggregator's own Prometheus exposition (every metric of ``Telemetry`` with
each labelled family touched), so a renamed metric fails here instead of in a blank panel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest

from fedmq.aggregator.telemetry import Telemetry

DASH = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "fedmq-dashboard.json"
NAME = re.compile(r"\bfedmq_[a-z_]+")


def exported() -> set[str]:
    t = Telemetry()
    t.rounds.labels("aggregated").inc()
    t.rejected.labels("schema").inc()
    text = generate_latest(t.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_query_names_an_exported_metric():
    doc = json.loads(DASH.read_text())
    names = exported()
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    used = {n for e in exprs for n in NAME.findall(e)}
    assert used and used <= names, used - names
    # the control: a made-up name is caught by the same check
    assert not {"fedmq_no_such_metric"} <= names
    # every gauge and counter family of the aggregator is on the dashboard
    families = {n.removesuffix("_total").removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
                for n in names if not n.endswith("_created")}
    shown = {n.removesuffix("_total").removesuffix("_bucket") for n in used}
    assert families <= shown, families - shown


def test_dashboard_is_importable():
    doc = json.loads(DASH.read_text())
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 36
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    # no data source is hard-wired: the importer picks one for the variable
    for p in doc["panels"]:
        assert p["datasource"]["uid"] == "${datasource}"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
    assert {v["name"] for v in doc["templating"]["list"]} == {"datasource", "instance"}
