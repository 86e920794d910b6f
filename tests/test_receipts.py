"""Receipts, not PUBACKs: an update the broker accepted but the aggregator never got is re-sent and counts.

Real Mosquitto, real aggregator and agent processes. The loss is made real and deterministic with
the aggregator's own per-agent rate limit: a burst of 2 messages and 0.2 messages/s, so the agent's
statuses use up its budget and its first update is dropped before decoding (counted
``rate_limited``; the broker had acknowledged it, and no receipt is sent). Without receipts that
update is gone and the round waits for its deadline; with them the agent re-sends from its outbox
(same ``update_id``) and the round aggregates with it, once.
"""

from __future__ import annotations

import pytest
from conftest import needs_mosquitto, wait_until
from fleet import watch_shards
from test_federation import aggregated, fleet, history  # noqa: F401 - the fleet fixture

pytestmark = [pytest.mark.network, needs_mosquitto]


def test_a_dropped_update_is_re_sent_until_the_aggregator_holds_it(fleet, tmp_path):  # noqa: F811
    f = fleet()
    agents = ["agent-0", "agent-1"]
    shards = watch_shards(agents, tmp_path, per_agent=100)
    agg = f.start_aggregator(rounds={"rounds": 2, "min_agents": 2, "deadline_s": 120, "grace_s": 60},
                             limits={"msgs_per_s": 0.2, "msgs_burst": 2, "quarantine_msgs_per_s": 0})
    procs = [f.start_agent(a, shards[a], agent={"resend_s": 1.0}) for a in agents]
    wait_until(lambda: len(aggregated(history(f))) >= 2 or not agg.alive(), 240, interval=0.2,
               what="two aggregated rounds")
    h = history(f)
    assert agg.alive() or agg.popen.returncode == 0, f.dump_logs()
    assert [r["round"] for r in aggregated(h)][:2] == [1, 2]
    for r in aggregated(h)[:2]:
        assert sorted(r["participants_list"]) == agents  # nobody lost ...
        assert len(set(r["participants_list"])) == len(r["participants_list"])  # ... nobody twice
    # the loss was real: updates were dropped after the broker's PUBACK ...
    dropped = sum(r["rejected"].get("rate_limited", 0) for r in h)
    assert dropped >= 1, h
    # ... and it was the receipt that recovered them: agents re-sent from their outbox
    logs = "".join(p.text() for p in procs)
    assert "no receipt" in logs and "re-sending from the outbox" in logs
    # every round still closed by quorum, not by its deadline (which would mean an update was lost)
    assert all(r["duration_s"] < 120 for r in aggregated(h)[:2])
    # `run` draws the plots of the run into its state dir after each round (issue 16)
    plots = f.tmp / "aggregator-state" / "plots"
    wait_until(lambda: all((plots / n).exists() for n in ("accuracy_loss.png", "bytes.png", "participants.png")),
               60, what="the run's plots")


def test_control_without_re_sends_the_dropped_update_is_lost(fleet, tmp_path):  # noqa: F811
    """The positive control: the same loss with re-sends pushed beyond the deadline loses the round."""
    f = fleet()
    agents = ["agent-0", "agent-1"]
    shards = watch_shards(agents, tmp_path, per_agent=100)
    f.start_aggregator(rounds={"rounds": 1, "min_agents": 2, "deadline_s": 15, "grace_s": 60},
                       limits={"msgs_per_s": 0.2, "msgs_burst": 2, "quarantine_msgs_per_s": 0})
    for a in agents:
        f.start_agent(a, shards[a], agent={"resend_s": 3600.0})
    wait_until(lambda: any(r["round"] == 1 for r in history(f)), 120, interval=0.2, what="round 1 closed")
    r1 = next(r for r in history(f) if r["round"] == 1)
    assert r1["rejected"].get("rate_limited", 0) >= 1
    assert r1["outcome"] == "abandoned" and len(r1["participants_list"]) < 2  # the update never arrived
