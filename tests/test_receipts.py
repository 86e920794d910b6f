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


def test_an_update_without_receipt_is_re_sent_when_the_aggregator_announces_itself(fleet, tmp_path,  # noqa: F811
                                                                                     model_cache):
    """An update sent before the aggregator's subscriptions were back (a broker restart without
    persistence) reached nobody and gets no receipt. The test plays the aggregator (fedmq's own
    publisher: model, global, round, service) and never answers; the real agent, with ``resend_s`` an
    hour, re-sends the same bytes (same update_id) once a live ``service`` says ``online`` with a new
    ``ts`` (docs/protocol.md, Receipts): within ``presence_jitter_s``, not after resend_s."""
    import time
    import uuid

    from test_faults import served_model

    from fedmq.broker import __version__
    from fedmq.broker.contract import codec
    from fedmq.broker.contract.messages import GlobalModel, RoundAnnouncement, ServiceStatus, TrainConfig, Update
    from fedmq.broker.contract.topics import Topics
    from fedmq.broker.transport.client import MqttClient, MqttConfig
    from fedmq.broker.transport.publisher import Publisher

    f = fleet()
    t = Topics(f.broker["fleet"])
    served = served_model(model_cache)
    run = uuid.uuid4().hex[:16]
    c = MqttClient(MqttConfig(f.broker["host"], f.broker["port"], client_id="aggregator"))
    c.connect()
    try:
        c.subscribe(t.all_updates())
        pub = Publisher(c, t, None)
        now = time.time()
        pub.publish(t.model(), served.manifest(run), retain=True)
        pub.publish(t.global_(), GlobalModel(0, served.model_id, served.initial_weights(), now, run=run), retain=True)
        pub.publish(t.service(), ServiceStatus("aggregator", "online", now, run, served.model_id, 0, 1, __version__),
                    retain=True)
        pub.publish(t.round(), RoundAnnouncement(1, served.model_id, 0, now, now + 600,
                                                 TrainConfig(1, served.batch_size, 0.05), ["agent-0"], 1, run=run),
                    retain=True)
        shards = watch_shards(["agent-0"], tmp_path, per_agent=100)
        agent = f.start_agent("agent-0", shards["agent-0"], agent={"resend_s": 3600.0, "presence_jitter_s": 1.0})
        copies: list[tuple[float, Update]] = []

        def got(n: int) -> bool:
            m = c.get(timeout=0.1)
            while m is not None:
                u = codec.decode(m.payload)
                if isinstance(u, Update):
                    copies.append((time.monotonic(), u))
                m = c.get(timeout=0)
            return len(copies) >= n

        wait_until(lambda: got(1), 120, what="the agent's update")
        assert agent.alive(), agent.text()[-3000:]
        t_online = time.monotonic()
        pub.publish(t.service(), ServiceStatus("aggregator", "online", time.time(), run, served.model_id, 0, 1,
                                               __version__), retain=True)
        wait_until(lambda: got(2), 30, what="the re-sent update")
        (t1, u1), (t2, u2) = copies[:2]
        assert u2.update_id == u1.update_id and u2.round == 1  # the same bytes from the outbox
        assert t2 >= t_online  # caused by the announcement: resend_s is an hour
        assert "re-sending from the outbox" in agent.text()
    finally:
        c.close()
