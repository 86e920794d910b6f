"""Round control without transport: quorum, grace, deadline, and which updates count."""

import numpy as np

from fedmq.aggregator.config import RoundsSection
from fedmq.aggregator.rounds import RoundController, quorum_for, select_agents
from fedmq.aggregator.strategies import build_strategy
from fedmq.broker.contract.messages import TrainConfig, Update

MID = "ab" * 32
RUN = "0123456789abcdef"  # a run id (every message of a run carries one)
G = {"w": np.zeros(3, np.float32)}


def upd(agent, rnd=1, model=MID, uid=None):
    return Update(rnd, agent, model, uid or f"{abs(hash((agent, rnd, model))):016x}", 10,
                  {"w": np.ones(3, np.float32)}, {}, 0.0, run=RUN)


def controller(**kw):
    cfg = RoundsSection(**{"deadline_s": 100, "grace_s": 5, **kw})
    return RoundController(build_strategy({"name": "fedavg"}), cfg), cfg


def test_selection_and_quorum():
    online = [f"a{i}" for i in range(10)]
    assert select_agents(online, RoundsSection(), 1) == sorted(online)
    frac = RoundsSection(select="fraction", fraction=0.3, seed=4)
    s1, s2 = select_agents(online, frac, 1), select_agents(online, frac, 2)
    assert s1 == select_agents(online, frac, 1) and s1 != s2  # seeded, varies by round
    assert select_agents(online, RoundsSection(select="list", agents=["x", "a1"]), 1) == ["a1", "x"]
    assert quorum_for(10, RoundsSection(quorum_fraction=0.6)) == 6
    assert quorum_for(4, RoundsSection(quorum=6)) == 4


def test_closes_after_grace_once_quorum_is_reached():
    c, _ = controller(quorum=2)
    c.open(1, MID, 0, G, ["a", "b", "c"], TrainConfig(), now=0.0, run=RUN)
    assert c.on_update(upd("a"), 100, 1.0) is None
    assert c.poll(2.0) == "open"
    assert c.on_update(upd("b"), 100, 3.0) is None  # quorum at t=3
    assert c.poll(7.9) == "open" and c.poll(8.1) == "close"  # grace 5 s
    r, result = c.close()
    assert list(r.received) == ["a", "b"] and result.outcome == "aggregated"
    np.testing.assert_allclose(result.weights["w"], np.ones(3))


def test_closes_at_once_when_everyone_reported():
    c, _ = controller(quorum=1)
    c.open(1, MID, 0, G, ["a", "b"], TrainConfig(), now=0.0, run=RUN)
    c.on_update(upd("a"), 1, 1.0)
    assert c.poll(1.5) == "open"
    c.on_update(upd("b"), 1, 2.0)
    assert c.poll(2.0) == "close"


def test_deadline_without_quorum_abandons_or_extends():
    c, _ = controller(quorum=2)
    c.open(1, MID, 0, G, ["a", "b"], TrainConfig(), now=0.0, run=RUN)
    c.on_update(upd("a"), 1, 1.0)
    assert c.poll(99.0) == "open" and c.poll(100.1) == "timeout"
    assert c.extend(100.1) is None  # policy abandon
    r = c.abandon()
    assert list(r.received) == ["a"] and c.current is None
    assert c.on_update(upd("b"), 1, 101.0) == "no_open_round"
    c2, _ = controller(quorum=2, on_timeout="extend", max_extensions=1)
    c2.open(1, MID, 0, G, ["a", "b"], TrainConfig(), now=0.0, run=RUN)
    ann = c2.extend(100.0)
    assert ann is not None and ann.deadline == 200.0
    assert c2.extend(200.0) is None


def test_which_updates_count():
    c, _ = controller(quorum=5)
    c.open(3, MID, 2, G, ["a", "b", "c"], TrainConfig(), now=0.0, run=RUN)
    c.closed_rounds.add(2)
    assert c.on_update(upd("a", rnd=2), 1, 1) == "late"
    assert c.on_update(upd("a", rnd=1), 1, 1) == "stale"
    assert c.on_update(upd("a", rnd=4), 1, 1) == "future"
    assert c.on_update(upd("a", rnd=3, model="cd" * 32), 1, 1) == "wrong_model"
    assert c.on_update(upd("zz", rnd=3), 1, 1) == "not_asked"
    assert c.on_update(upd("a", rnd=3), 1, 1) is None
    assert c.on_update(upd("a", rnd=3, uid="f" * 16), 1, 1) == "duplicate"
    nan = upd("b", rnd=3)
    nan.tensors = {"w": np.full(3, np.nan, np.float32)}
    assert c.on_update(nan, 1, 1) == "non_finite"
    assert c.rejected == {"late": 1, "stale": 1, "future": 1, "wrong_model": 1, "not_asked": 1, "duplicate": 1,
                          "non_finite": 1}


def test_an_update_refused_for_a_reason_that_can_change_counts_when_re_sent():
    """Issue 13: refused as no_open_round / future, the same update (same update_id) counts in its round."""
    c, _ = controller(quorum=2)
    u = upd("a", rnd=2)
    u.base_round = 1
    assert c.on_update(u, 100, 0.0) == "no_open_round"  # sent before the (restarted) aggregator opened it
    c.open(1, MID, 0, G, ["a", "b"], TrainConfig(), now=0.0, run=RUN)
    assert c.on_update(u, 100, 0.5) == "future"  # round 1 is still open
    assert c.on_update(upd("a"), 100, 1.0) is None and c.on_update(upd("b"), 100, 1.0) is None
    c.close()
    c.open(2, MID, 1, G, ["a", "b"], TrainConfig(), now=2.0, run=RUN)
    assert c.on_update(u, 100, 2.5) is None  # the outbox re-send: accepted, not a "duplicate"
    assert c.on_update(u, 100, 2.6) == "duplicate"  # only now is a copy a duplicate


def test_another_runs_update_never_counts():
    c, _ = controller(quorum=1)
    c.open(1, MID, 0, G, ["a"], TrainConfig(), now=0.0, run=RUN)
    stale = upd("a")
    stale.run = "fedcba9876543210"  # an old outbox after a state reset: same model, same round numbers
    assert c.on_update(stale, 100, 1.0) == "wrong_run"
    assert c.on_update(upd("a"), 100, 1.0) is None  # positive control: this run's update counts


def _rule(seed, rnd, agent, fraction):  # the hash rule as docs/protocol.md states it (independent of the code)
    import hashlib

    h = hashlib.sha256(f"{seed}/{rnd}/{agent}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def test_fraction_selection_is_a_hash_rule_every_agent_evaluates():
    """select = fraction: the announcement carries the rule (O(1) in the fleet), agents agree with the aggregator."""
    from fedmq.broker.contract import codec

    online = [f"agent-{i:05d}" for i in range(10_000)]
    cfg = RoundsSection(select="fraction", fraction=0.1, seed=7, deadline_s=100)
    c = RoundController(build_strategy({"name": "fedavg"}), cfg)
    ann = c.open(3, MID, 2, G, online, TrainConfig(), now=0.0, run=RUN)
    expected = sorted(a for a in online if _rule(7, 3, a, 0.1))
    assert c.current.asked == expected and abs(len(expected) - 1000) < 100  # ~ fraction x fleet
    assert ann.agents is None and ann.sample is not None
    wire = codec.decode(codec.encode(ann))
    assert [a for a in online if wire.asks(a)] == expected  # each agent decides for itself, the same way
    small = codec.encode(c.open(4, MID, 3, G, online[:10], TrainConfig(), now=0.0, run=RUN))
    assert len(codec.encode(ann)) <= len(small) + 16  # the announcement does not grow with the fleet
    # nobody online hashes in: one agent is picked and listed, so the round can still run
    lone = RoundsSection(select="fraction", fraction=1e-9, seed=7)
    c2 = RoundController(build_strategy({"name": "fedavg"}), lone)
    ann2 = c2.open(1, MID, 0, G, ["a", "b"], TrainConfig(), now=0.0, run=RUN)
    assert len(c2.current.asked) == 1 and ann2.agents == c2.current.asked and ann2.asks(ann2.agents[0])


def test_a_copy_of_an_update_the_last_round_counted_is_told_it_counted():
    """Issue 14.1: a receipt lost (a broker restart) and the round closed meanwhile: the agent's re-send
    learns its update counted (duplicate, held), in the gap and in the next round; another update does not."""
    c, _ = controller(quorum=2)
    c.open(1, MID, 0, G, ["a", "b"], TrainConfig(), now=0.0, run=RUN)
    ua, ub = upd("a"), upd("b")
    assert c.on_update(ua, 100, 1.0) is None and c.on_update(ub, 100, 1.0) is None
    c.close()
    assert c.on_update(ua, 100, 2.0) == "duplicate" and c.holds(ua)  # between rounds
    other = upd("a", uid="0123456789abcdef")  # a different update for the same round never counted
    assert c.on_update(other, 100, 2.0) == "no_open_round" and not c.holds(other)  # control
    c.open(2, MID, 1, G, ["a", "b"], TrainConfig(), now=3.0, run=RUN)
    assert c.on_update(ub, 100, 3.5) == "duplicate" and c.holds(ub)  # while the next round is open
    assert c.on_update(other, 100, 3.5) == "late" and not c.holds(other)


def test_upload_window_is_paced_by_the_number_asked():
    """The announced window spreads the asked agents' uploads to at most ``upload_rate`` per second,
    never shorter than the configured window, at most half the deadline for the paced part."""
    many = [f"a{i:05d}" for i in range(10_000)]
    c, _ = controller(upload_rate=2000.0)
    assert c.open(1, MID, 0, G, many, TrainConfig(), now=0.0, run=RUN).config.upload_window_s == 5.0  # 10,000 / 2,000
    c, _ = controller(upload_rate=2000.0, select="fraction", fraction=0.1, seed=3)
    ann = c.open(1, MID, 0, G, many, TrainConfig(), now=0.0, run=RUN)
    assert ann.config.upload_window_s == round(len(c.current.asked) / 2000.0, 3) < 1.0  # the asked, not the online
    c, _ = controller(upload_rate=2000.0)
    assert c.open(1, MID, 0, G, many, TrainConfig(upload_window_s=30.0), now=0.0, run=RUN).config.upload_window_s == 30.0
    c, _ = controller(upload_rate=10.0, deadline_s=100)  # 1,000 s paced: capped at half the deadline
    assert c.open(1, MID, 0, G, many, TrainConfig(), now=0.0, run=RUN).config.upload_window_s == 50.0
    c, _ = controller(upload_rate=0.0)  # off: the configured window alone
    assert c.open(1, MID, 0, G, many, TrainConfig(), now=0.0, run=RUN).config.upload_window_s == 0.0
    c, _ = controller(upload_rate=0.001, deadline_s=10**7)  # never more than agents accept (86,400 s)
    assert c.open(1, MID, 0, G, many, TrainConfig(), now=0.0, run=RUN).config.upload_window_s == 86_400.0
    import pytest

    from fedmq.broker.errors import ConfigError
    with pytest.raises(ConfigError):
        RoundsSection(upload_window_s=90_000).validate("rounds")
    with pytest.raises(ConfigError):
        RoundsSection(upload_rate=-1).validate("rounds")
