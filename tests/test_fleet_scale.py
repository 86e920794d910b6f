"""Fleet scale in the suite (issue 14 point 6): 1,000 synthetic agents, the real aggregator, Mosquitto.

The bounded version of bench/fleet.py: N = 1,000 agents of bench/synth_agents.py (an independent client
written from docs/protocol.md: paho + msgpack, no fedmq import) in two processes, one aggregator process
(tests/fleet.py), one Mosquitto from the project's config (plain listener; chunked with a 4 KiB max packet;
and the provisioned TLS + passwords + ACL config). Scenarios in each run: the first round, the round after
an aggregator SIGKILL + restart (killed while the next round's uploads arrive), the round after a broker
SIGKILL + restart. Rounds need all N (``min_agents = quorum = N``).

Asserted per scenario, against counts the agents keep themselves and the aggregator's own files
(history.jsonl, participants.jsonl) and /metrics: every agent seen online, asked, sent, PUBACKed and
accepted; nothing lost (PUBACKed but neither accepted nor rejected; with receipts: no PUBACK without a
receipt in the first round, and after a fault only for updates that counted: a QoS 0 receipt lost in the
fault, the round closed before the agent's re-send); the published global equals the FedAvg of the known deltas (computed here in float64).
Positive controls: the same global check fails for the participant set minus one agent; the lost count
finds an update dropped from the participant set; the aggregator's online gauge was 0 before the agents
started. Figures at 3,000 and 10,000 agents: bench/RESULTS.md ("Fleet scale").
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import needs_mosquitto

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.append(str(BENCH))  # last: bench/ names never shadow tests/ ones (both have a fleet.py)
_spec = importlib.util.spec_from_file_location("bench_fleet", BENCH / "fleet.py")
bench_fleet = importlib.util.module_from_spec(_spec)
sys.modules["bench_fleet"] = bench_fleet  # dataclasses look their module up
_spec.loader.exec_module(bench_fleet)

N = 1000


def test_lost_count_finds_a_dropped_update():
    """The lost accounting itself: an update PUBACKed but absent from participants and rejections counts."""
    acked = {f"a{i}" for i in range(10)}
    assert bench_fleet.lost_count(acked, sorted(acked), 0) == 0
    assert bench_fleet.lost_count(acked, sorted(acked)[1:], 0) == 1  # positive control
    assert bench_fleet.lost_count(acked, sorted(acked)[1:], 1) == 0  # ... unless it was rejected


@needs_mosquitto
@pytest.mark.parametrize("mode", ["plain", "chunked", "secure"])
def test_fleet_1000_agents(mode, model_cache, tmp_path):
    spec = bench_fleet.BenchSpec(N, tmp_path / "bench", chunked=mode == "chunked", secure=mode == "secure",
                                 model_cache=model_cache, deadline_s=60.0, phase_timeout_s=90.0)
    res = bench_fleet.Bench(spec).run()
    assert not res["errors"], res
    assert res["online_before_agents"] == 0  # positive control of "all seen": the gauge starts at 0
    recs = {r["scenario"]: r for r in res["records"]}
    assert set(recs) == set(bench_fleet.SCENARIOS), res
    for name, r in recs.items():
        ctx = f"{mode}/{name}: {r}\n--- aggregator log ---\n{res['agg_log_tail']}"
        assert r["error"] == "" and r["outcome"] == "aggregated", ctx
        assert r["online_seen"] == N and r["statuses_acked"] == N, ctx
        assert r["asked"] == N and r["sent"] == N and r["acked"] == N, ctx
        assert r["accepted"] == N and r["acked_not_accepted"] == 0 and r["lost"] == 0, ctx
        if res["receipts"]:  # no update without a receipt that did not count; in the first round, none at all
            assert r["receipts_accepted"] + r["no_receipt"] == N and r["no_receipt_uncounted"] == 0, ctx
            assert name != "first" or r["no_receipt"] == 0, ctx
        assert r["global_ok"] is True, ctx
        assert r["control_global_err"] > r["global_tol"], ctx  # one agent fewer: the check would fail
    assert recs["broker_restart"]["reconnect_s"] is not None
