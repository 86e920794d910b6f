"""The open round's journal (aggregator/journal.py): a restarted aggregator goes on with its round.

Unit tests of the file format (round trip, a torn tail cut, a corrupt record ends the replay), then the
real thing: Mosquitto, the aggregator process, and three plain paho clients posing as listed agents that
never re-send anything. Two updates get their receipts, the aggregator is SIGKILLed, the third update is
published while it is down (the broker PUBACKs it), the aggregator is started again. With the journal
the round closes with all three, the global equals the weighted mean of the three known deltas (numpy),
the round is not re-announced (same ``opened``: nobody is asked to re-send) and the third update gets its
receipt. The positive control is the same run with ``[service] journal = "off"``: the restarted process
opens the round afresh (a new ``opened``), holds none of the three, and the round is abandoned.
"""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pytest
from conftest import needs_mosquitto, wait_until
from test_faults import AllSeen, Plain, fleet, history, served_model  # noqa: F401 - the fleet fixture

from fedmq.aggregator.journal import MAGIC, RoundJournal
from fedmq.aggregator.state import Checkpoint
from fedmq.broker.contract import codec
from fedmq.broker.contract.messages import Update
from fedmq.broker.contract.topics import Topics


# -- the file ------------------------------------------------------------------------------------------
def _journal(tmp_path, mode="fsync") -> RoundJournal:
    j = RoundJournal(tmp_path / "round.journal", mode)
    j.begin({"run": "r1", "round": 3, "asked": ["a", "b"]})
    return j


def test_records_come_back_in_order_and_appends_go_on_after_them(tmp_path):
    j = _journal(tmp_path)
    bodies = [os.urandom(n) for n in (0, 1, 1000, 70_000)]
    for b in bodies:
        j.append(b"U", b)
    j.append(b"D", b"\xcb" + b"\0" * 8)
    assert j.sync() is True and j.sync() is False  # one fdatasync per batch; nothing new: none
    j.close()
    r = RoundJournal(tmp_path / "round.journal")
    header, off = r.read_header()
    assert header == {"run": "r1", "round": 3, "asked": ["a", "b"]}
    got = [(x.kind, x.body) for x in r.replay(off)]
    assert got == [(b"U", b) for b in bodies] + [(b"D", b"\xcb" + b"\0" * 8)]
    r.append(b"U", b"after")  # open for appending after the last record
    r.close()
    r2 = RoundJournal(tmp_path / "round.journal")
    assert [x.body for x in r2.replay(r2.read_header()[1])][-1] == b"after"


def test_a_torn_last_record_is_cut_and_the_rest_kept(tmp_path):
    j = _journal(tmp_path, mode="write")
    j.append(b"U", b"x" * 500)
    j.append(b"U", b"y" * 500)
    j.close()
    p = tmp_path / "round.journal"
    size = p.stat().st_size
    with open(p, "r+b") as f:  # the process died in the middle of the second record
        f.truncate(size - 100)
    r = RoundJournal(p)
    assert [x.body for x in r.replay(r.read_header()[1])] == [b"x" * 500]
    r.append(b"U", b"z" * 10)
    r.close()
    assert p.stat().st_size == size - 500 - 9 + 10 + 9  # the torn bytes are gone, the new record follows
    r2 = RoundJournal(p)
    assert [x.body for x in r2.replay(r2.read_header()[1])] == [b"x" * 500, b"z" * 10]


def test_a_corrupt_record_ends_the_replay(tmp_path):
    j = _journal(tmp_path)
    for c in b"abc":
        j.append(b"U", bytes([c]) * 100)
    j.close()
    p = tmp_path / "round.journal"
    data = bytearray(p.read_bytes())
    data[data.index(b"b" * 100) + 50] ^= 0xFF  # a flipped bit in the second body: its crc fails
    p.write_bytes(bytes(data))
    r = RoundJournal(p)
    assert [x.body for x in r.replay(r.read_header()[1])] == [b"a" * 100]


def test_no_or_foreign_file_has_no_header(tmp_path):
    assert RoundJournal(tmp_path / "none").read_header() is None
    (tmp_path / "junk").write_bytes(b"not a journal at all")
    assert RoundJournal(tmp_path / "junk").read_header() is None
    (tmp_path / "half").write_bytes(MAGIC + b"H\x05")
    assert RoundJournal(tmp_path / "half").read_header() is None


# -- a restart in the middle of a round ------------------------------------------------------------------
AGENTS = ["ghost-a", "ghost-b", "ghost-c"]
SAMPLES = {"ghost-a": 10, "ghost-b": 30, "ghost-c": 20}
STEP = {"ghost-a": 0.01, "ghost-b": -0.02, "ghost-c": 0.04}


def _restart_round(f, model_cache, journal: str):
    t = Topics(f.broker["fleet"])
    served = served_model(model_cache)
    init = served.initial_weights()
    obs = AllSeen(f, receipts_of=tuple(AGENTS))
    p = Plain(f.broker["host"], f.broker["port"])
    rounds = {"rounds": 1, "select": "list", "agents": AGENTS, "quorum": 3, "grace_s": 60, "deadline_s": 25,
              "on_timeout": "abandon"}
    service = {"journal": journal}

    def update(agent: str, run: str) -> Update:
        delta = {n: np.full_like(w, STEP[agent], dtype=np.float32) for n, w in init.items()}
        return Update(1, agent, served.model_id, uuid.uuid4().hex, SAMPLES[agent], delta, {"loss": 1.0},
                      time.time(), base_round=0, run=run)

    def receipts(uid: str):
        obs.pump()
        return [r for r in obs.receipts if r.update_id == uid]

    try:
        agg = f.start_aggregator(rounds=rounds, service=service)
        obs.wait(lambda: any(r.round == 1 for r in obs.rounds), 60, "round 1 announced")
        ann = obs.rounds[-1]
        ups = {a: update(a, ann.run) for a in AGENTS}
        for a in AGENTS[:2]:
            p.publish(t.update(a), codec.encode(ups[a]))
        for a in AGENTS[:2]:
            wait_until(lambda: receipts(ups[a].update_id), 30, what=f"the receipt of {a}'s update")
            assert receipts(ups[a].update_id)[0].accepted
        agg.kill()
        agg.popen.wait(10)
        p.publish(t.update(AGENTS[2]), codec.encode(ups[AGENTS[2]]))  # PUBACKed by the broker: nobody read it
        seen = len(obs.rounds)
        agg2 = f.start_aggregator(rounds=rounds, service=service)
        wait_until(lambda: any(r["round"] == 1 for r in history(f)), 90, interval=0.2, what="round 1 to close")
        if journal == "off":  # the control: the restarted process announces round 1 afresh
            obs.wait(lambda: len(obs.rounds) > seen, 10, "the round's announcement from the restarted process")
        else:  # rounds = 1: done once round 1 is aggregated (its global is published before it exits)
            wait_until(lambda: not agg2.alive(), 30, interval=0.2, what="the restarted aggregator to exit")
        receipts("")  # everything that arrived until now
        return agg2, ann, obs.rounds[seen:], ups, receipts, init
    finally:
        p.close()
        obs.close()


@pytest.mark.network
@needs_mosquitto
def test_a_restarted_aggregator_goes_on_with_its_round_from_the_journal(fleet, model_cache):  # noqa: F811
    f = fleet()
    agg2, ann, later, ups, receipts, init = _restart_round(f, model_cache, "fsync")
    assert agg2.popen.returncode == 0, agg2.text()[-3000:]
    h = history(f)
    assert [(r["round"], r["outcome"], sorted(r["participants_list"])) for r in h] == [(1, "aggregated", AGENTS)], h
    assert "taken back from its journal: 2 of 3" in agg2.text()
    # no fresh announcement: agents that hold a receipt are not asked to re-send (the control sees one)
    assert {a.opened for a in later if a.round == 1} <= {ann.opened}, later
    # the update sent while the aggregator was down was delivered from its session, and answered
    (rc,) = receipts(ups[AGENTS[2]].update_id)
    assert rc.accepted and rc.reason == ""
    # a and b sent once: their receipts (one from each process: the restarted one answers again for what
    # it took back, since the last group's receipts may not have left the dead one) all say accepted
    for a in AGENTS[:2]:
        assert [(r.accepted, r.reason) for r in receipts(ups[a].update_id)] == [(True, "")] * 2
    # the global: the sample-weighted mean of the three known deltas on the initial weights (float64)
    ck = Checkpoint.load(f.tmp / "aggregator-state" / "checkpoint.npz")
    assert ck.global_round == 1 and ck.next_round == 2
    mean = sum(SAMPLES[a] * STEP[a] for a in AGENTS) / sum(SAMPLES.values())
    for n, w in init.items():
        np.testing.assert_allclose(ck.weights[n], w.astype(np.float64) + mean, rtol=0, atol=2e-7)
    assert not (f.tmp / "aggregator-state" / "round.journal").exists()  # the round counts: its journal is gone


@pytest.mark.network
@needs_mosquitto
def test_control_without_the_journal_the_round_starts_over_and_is_abandoned(fleet, model_cache):  # noqa: F811
    f = fleet()
    agg2, ann, later, ups, receipts, init = _restart_round(f, model_cache, "off")
    h = history(f)
    assert [(r["round"], r["outcome"]) for r in h] == [(1, "abandoned")], h
    assert not h[0].get("participants_list"), h[0]  # it held none of the three
    fresh = [a for a in later if a.round == 1]
    assert fresh and all(a.opened != ann.opened for a in fresh)  # re-opened: every agent would have to re-send
    assert "taken back from its journal" not in agg2.text()
    assert not receipts(ups[AGENTS[2]].update_id)  # its update went with the clean session


# -- the service's use of it, without a network ------------------------------------------------------------
class CountingClient:
    """The service's client reduced to what these tests look at (no broker: nothing crosses a network)."""

    connected = True
    dropped = 0

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic, payload, qos=1, retain=False, wait=True, timeout=30.0, track=False):
        self.published.append((topic, payload))


def _service(tmp_path, served, journal="fsync"):
    from fedmq.aggregator.config import AggregatorConfig, RoundsSection, ServiceSection
    from fedmq.aggregator.service import AggregatorService

    cfg = AggregatorConfig(service=ServiceSection(state_dir=str(tmp_path / "state"), export_final=False,
                                                  journal=journal),
                           rounds=RoundsSection(select="list", agents=AGENTS, quorum=3, deadline_s=600))
    svc = AggregatorService(cfg, client=CountingClient(), served=served)
    svc._restore()
    svc.fleet.load(svc.fleet_path)
    return svc


def _open(svc):
    from fedmq.broker.contract.messages import TrainConfig

    now = time.time()
    ann = svc.controller.open(svc.next_round, svc.served.model_id, svc.global_round, svc.global_weights, AGENTS,
                              TrainConfig(), now, run=svc.run_id)
    svc._journal_begin(ann, list(AGENTS), 3, now)
    return ann


def _encoded(svc, agent: str) -> bytes:
    delta = {n: np.full_like(w, STEP[agent], dtype=np.float32) for n, w in svc.global_weights.items()}
    return codec.encode(Update(svc.next_round, agent, svc.served.model_id, uuid.uuid4().hex, SAMPLES[agent], delta,
                               {"loss": 1.0}, time.time(), base_round=svc.global_round, run=svc.run_id))


def test_the_service_takes_its_round_back_and_refuses_a_stale_journal(tmp_path, model_cache):
    served = served_model(model_cache)
    svc = _service(tmp_path, served)
    _open(svc)
    for a in AGENTS[:2]:
        svc._handle(svc.topics.update(a), _encoded(svc, a), False)
    assert not svc.client.published  # receipts wait for the group commit ...
    svc._commit()
    assert len(svc.client.published) == 2 and svc.journal.syncs == 1  # ... one fdatasync, then both receipts
    run = svc.run_id
    again = _service(tmp_path, served)  # the same state dir: a restart (the first round: no checkpoint yet)
    assert again._resume_round() is True
    assert again.run_id == run and sorted(again.controller.current.received) == AGENTS[:2]
    assert again.controller.current.ann.opened == svc.controller.current.ann.opened
    # another process's journal for a round the checkpoint does not expect next is stale: removed
    again.next_round = 7
    assert again._resume_round() is False and not (tmp_path / "state" / "round.journal").exists()


def test_a_journal_that_cannot_be_written_is_dropped_and_the_round_goes_on(tmp_path, model_cache, monkeypatch):
    import fedmq.aggregator.journal as jmod

    served = served_model(model_cache)
    svc = _service(tmp_path, served)
    _open(svc)
    svc._handle(svc.topics.update(AGENTS[0]), _encoded(svc, AGENTS[0]), False)
    path = tmp_path / "state" / "round.journal"
    assert path.exists() and svc.journal.records == 1

    def full(fd, parts):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jmod.os, "writev", full)
    svc._handle(svc.topics.update(AGENTS[1]), _encoded(svc, AGENTS[1]), False)
    svc._commit()
    assert svc.journal_errors == 1 and not path.exists()  # never taken back with an update missing
    assert sorted(svc.controller.current.received) == AGENTS[:2]  # both count
    assert len(svc.client.published) == 2
    assert svc.telemetry.journal_errors._value.get() == 1


def test_receipts_leave_only_after_the_journal_is_synced(tmp_path, model_cache, monkeypatch):
    """The order in a group commit: fdatasync of the journal, then the receipts (and acknowledgements)."""
    import fedmq.aggregator.journal as jmod

    served = served_model(model_cache)
    svc = _service(tmp_path, served)
    _open(svc)
    events: list[str] = []
    real = jmod.os.fdatasync
    monkeypatch.setattr(jmod.os, "fdatasync", lambda fd: (events.append("sync"), real(fd))[1])
    publish = svc.client.publish
    svc.client.publish = lambda *a, **k: (events.append("receipt"), publish(*a, **k))[1]
    for a in AGENTS[:2]:
        svc._handle(svc.topics.update(a), _encoded(svc, a), False)
    svc._commit()
    assert events == ["sync", "receipt", "receipt"], events


@pytest.mark.network
@needs_mosquitto
def test_after_a_resumed_restart_the_next_round_asks_everyone_online(fleet, model_cache):  # noqa: F811
    """A restart that takes its round back resumes its MQTT session, whose status subscription gets no
    retained copies; before the next round picks agents it reads the retained statuses again. The plain
    clients here never republish their status (no presence re-sync): without that re-read the restarted
    aggregator would know nobody, and round 2 (min_agents = 3) would never open."""
    from fedmq.broker.contract.messages import Status

    f = fleet()
    t = Topics(f.broker["fleet"])
    served = served_model(model_cache)
    init = served.initial_weights()
    obs = AllSeen(f, receipts_of=tuple(AGENTS))
    p = Plain(f.broker["host"], f.broker["port"])
    rounds = {"rounds": 3, "select": "all", "min_agents": 3, "quorum": 3, "grace_s": 60, "deadline_s": 60}
    try:
        for a in AGENTS:
            p.publish(t.status(a), codec.encode(Status(a, "online", time.time())), retain=True)
        agg = f.start_aggregator(rounds=rounds)
        obs.wait(lambda: any(r.round == 1 for r in obs.rounds), 60, "round 1 announced")
        ann = obs.rounds[-1]

        def send(a: str) -> None:
            delta = {n: np.full_like(w, STEP[a], dtype=np.float32) for n, w in init.items()}
            p.publish(t.update(a), codec.encode(Update(1, a, served.model_id, uuid.uuid4().hex, SAMPLES[a], delta,
                                                       {"loss": 1.0}, time.time(), base_round=0, run=ann.run)))

        send(AGENTS[0])
        wait_until(lambda: (obs.pump(), len(obs.receipts) >= 1)[1], 30, what="the first receipt")
        agg.kill()
        agg.popen.wait(10)
        for a in AGENTS[1:]:
            send(a)  # queued in the aggregator's session
        agg2 = f.start_aggregator(rounds=rounds)
        wait_until(lambda: any(r["round"] == 1 for r in history(f)), 60, interval=0.2, what="round 1 to close")
        obs.wait(lambda: any(r.round == 2 for r in obs.rounds), 60, "round 2 announced")
        header, _ = RoundJournal(f.tmp / "aggregator-state" / "round.journal").read_header()
        assert header["round"] == 2 and sorted(header["asked"]) == AGENTS, header
        assert "who is online after the restart: 3 agents" in agg2.text()
        assert [(r["round"], sorted(r["participants_list"])) for r in history(f)] == [(1, AGENTS)]
    finally:
        p.close()
        obs.close()


def test_a_write_mode_journal_of_another_boot_is_not_taken_back(tmp_path, model_cache, monkeypatch):
    """``journal = "write"`` never fdatasyncs: after a host restart its records may be gone although their
    receipts went out, so a journal of another boot is refused (the round re-opens; agents re-send).
    The same journal on this boot is taken back (control)."""
    import fedmq.aggregator.service as smod

    served = served_model(model_cache)
    svc = _service(tmp_path, served, journal="write")
    _open(svc)
    svc._handle(svc.topics.update(AGENTS[0]), _encoded(svc, AGENTS[0]), False)
    svc._commit()
    svc.journal.close()
    assert _service(tmp_path, served, journal="write")._resume_round() is True  # this boot: taken back
    monkeypatch.setattr(smod, "boot_id", lambda: "another-boot")
    assert _service(tmp_path, served, journal="write")._resume_round() is False
    assert not (tmp_path / "state" / "round.journal").exists()
