"""Broker outages (issue 13 point 3): services started before their broker, and outages longer than
every timeout (the aggregator's publish timeout, the MQTT keepalive, a round's deadline).

Real Mosquitto with the project's own config (LocalBroker), real aggregator and agent processes
(tests/fleet.py). The references: the aggregator's history file (each round once, in order, with its
outcome), what an observer on the bus saw (each aggregated global is the strategy applied once per
participant), the processes' logs and exit codes. Outages are conditions too: the broker stays down
until the round in progress has been handled by its policy (an ``abandoned`` row in the history,
written while nobody could reach the broker) and the configured outage length has passed.
"""

from __future__ import annotations

import signal
import socket
import time
import uuid

import pytest
from conftest import needs_mosquitto, wait_until
from fleet import Fleet, watch_shards
from test_faults import AllSeen, fleet, history  # noqa: F401 - fleet is a fixture
from test_federation import assert_each_counted_once, same

from fedmq.broker.ops.launcher import LocalBroker, free_port

pytestmark = [pytest.mark.network, needs_mosquitto]

AGENTS = ["agent-0", "agent-1"]
PUBLISH_TIMEOUT_S = 3.0
KEEPALIVE_S = 5  # the smallest the config accepts


def round_problems(h: list[dict]) -> list[str]:
    """What is wrong with a history: rounds not strictly increasing, a round recorded (aggregated) twice,
    the global round moving backwards."""
    out = []
    rounds = [r["round"] for r in h]
    if any(b <= a for a, b in zip(rounds, rounds[1:])):
        out.append(f"rounds not strictly increasing: {rounds}")
    agg = [r["round"] for r in h if r["outcome"] == "aggregated"]
    if len(agg) != len(set(agg)):
        out.append(f"a round aggregated twice: {agg}")
    g = [r["global_round"] for r in h]
    if any(b < a for a, b in zip(g, g[1:])):
        out.append(f"global round moved backwards: {g}")
    return out


def test_round_problems_catches_each_fault():  # positive controls for the history checks below
    ok = [{"round": 1, "outcome": "abandoned", "global_round": 0},
          {"round": 2, "outcome": "aggregated", "global_round": 2},
          {"round": 3, "outcome": "aggregated", "global_round": 3}]
    assert round_problems(ok) == []
    assert round_problems([ok[1], ok[1]])  # the same round twice
    assert round_problems([ok[2], ok[1]])  # backwards
    assert round_problems([ok[0], ok[1], {**ok[2], "global_round": 1}])  # global regress


def refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return False
    except OSError:
        return True


# -- 3. services started before their broker ----------------------------------------------------------
def test_services_started_before_their_broker_connect_when_it_comes_up(tmp_path, model_cache, request):
    port = free_port()
    (tmp_path / "broker").mkdir()
    b = LocalBroker(port=port, workdir=str(tmp_path / "broker"))  # configured, not started
    f = Fleet(tmp_path, {"host": b.host, "port": port, "fleet": "f" + uuid.uuid4().hex[:8]}, model_cache=model_cache)
    shards = watch_shards(AGENTS, tmp_path, per_agent=100)
    try:
        assert refused(b.host, port)  # nobody listens yet
        agg = f.start_aggregator(rounds={"rounds": 50, "min_agents": 2, "grace_s": 2, "deadline_s": 30})
        procs = [agg] + [f.start_agent(a, shards[a]) for a in AGENTS]
        retrying = f"reconnect to {b.host}:{port} failed; retrying with backoff"
        for p in procs:  # each one is up, has tried, and keeps retrying
            wait_until(lambda p=p: p.text().count(retrying) >= 2 or not p.alive(), 60,
                       what=f"{p.name} retrying its connection")
        assert all(p.alive() for p in procs), f.dump_logs()
        assert refused(b.host, port) and history(f) == []
        b.start()
        wait_until(lambda: any(r["outcome"] == "aggregated" and sorted(r["participants_list"]) == AGENTS
                               for r in history(f)) or not all(p.alive() for p in procs), 90,
                   what="a round with both agents")
        assert all(p.alive() for p in procs), f.dump_logs()
        assert history(f)[0]["outcome"] == "aggregated"
        for p in procs:
            assert f"connecting to {b.host}:{port} in the background" in p.text()
    finally:
        f.stop_all()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f.dump_logs())
            print(b.log()[-4000:])
        b.cleanup()
    assert [p.popen.returncode for p in procs] == [0, 0, 0]  # SIGTERM: a clean stop


# -- 4. outages longer than every timeout ---------------------------------------------------------------
def outage(f: Fleet, tmp_path, outage_s: float, how: str) -> None:
    """Round 1 is open with one of its two updates in when the broker goes away; it stays away until the
    aggregator has abandoned round 1 (its deadline passed) and ``outage_s`` have passed; the second agent
    is started during the outage. Then: rounds resume and aggregate, nobody exited."""
    b = f.local_broker
    shards = watch_shards(AGENTS, tmp_path, per_agent=100)
    deadline_s = 8.0
    assert deadline_s > PUBLISH_TIMEOUT_S and deadline_s > 1.5 * KEEPALIVE_S and outage_s >= deadline_s
    obs = AllSeen(f, receipts_of=(AGENTS[0],), reconnect_min_s=0.05, reconnect_max_s=0.2)
    try:
        agg = f.start_aggregator(service={"publish_timeout_s": PUBLISH_TIMEOUT_S},
                                 rounds={"rounds": 3, "select": "list", "agents": AGENTS, "quorum": 2,
                                         "grace_s": 2, "deadline_s": deadline_s})
        a0 = f.start_agent(AGENTS[0], shards[AGENTS[0]])
        obs.wait(lambda: any(r.round == 1 and r.accepted for r in obs.receipts), 60,
                 "the aggregator's receipt for agent-0's round-1 update")
        assert history(f) == []  # round 1 is open: its quorum needs agent-1
        t0 = time.monotonic()
        if how == "sigkill":
            b.kill()
        else:  # frozen: TCP connections stay open, nothing is answered (PUBACKs, PINGRESPs, CONNACKs)
            b.proc.send_signal(signal.SIGSTOP)
        procs = [agg, a0]

        def down_long_enough() -> bool:
            assert all(p.alive() for p in procs), f.dump_logs()
            return time.monotonic() - t0 >= outage_s and any(r["round"] == 1 for r in history(f))

        procs.append(f.start_agent(AGENTS[1], shards[AGENTS[1]]))  # started while the broker is away
        wait_until(down_long_enough, outage_s + 120, interval=0.2, what="round 1 abandoned during the outage")
        (row,) = history(f)
        assert (row["round"], row["outcome"], row["participants"]) == (1, "abandoned", 1), row
        if how == "sigkill":
            b.start()
        else:
            b.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: not agg.alive(), 180, what="three aggregated rounds after the outage")
        assert agg.popen.returncode == 0, agg.text()[-4000:]
        assert "run complete: 3 rounds aggregated" in agg.text()
        assert all(p.alive() for p in procs[1:]), f.dump_logs()
        h = history(f)
        assert round_problems(h) == [], round_problems(h)
        # after the outage, rounds may still be abandoned while a client waits out its reconnect backoff
        # (capped at 30 s): what counts is that rounds resume and each aggregated one has both agents
        assert (h[0]["round"], h[0]["outcome"]) == (1, "abandoned")
        done = [r for r in h if r["outcome"] == "aggregated"]
        assert len(done) == 3 and all(sorted(r["participants_list"]) == AGENTS for r in done), h
        assert all(r["outcome"] == "abandoned" for r in h if r not in done)
        obs.wait(lambda: done[-1]["round"] in obs.globals, 30, "the last global")
        for r in done:
            assert_each_counted_once(obs, r)  # no round applied twice, nobody counted twice
        # every global on the bus (the broker lost them all, the aggregator republished): one weight set
        # per round, of rounds the history aggregated (the abandoned round 1 published none)
        run = h[0]["run"]
        assert {g.run for g in obs.all_globals} == {run} and set(obs.globals) == {0} | {r["round"] for r in done}
        for g in obs.all_globals:
            assert same(g.tensors, obs.globals[g.round].tensors), f"round {g.round} published with two weight sets"
        # the services saw the outage (positive control: it was one) and lived through it
        for p in procs[:2]:
            assert "disconnected from broker" in p.text() or "reconnect to" in p.text(), p.text()[-3000:]
            assert "Traceback" not in p.text(), p.text()[-3000:]
    finally:
        obs.close()
        if how == "sigstop" and b.proc is not None and b.proc.poll() is None:
            b.proc.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
def test_outage_longer_than_every_timeout(fleet, tmp_path, how):  # noqa: F811 - the fixture
    f = fleet(keepalive=KEEPALIVE_S)
    outage(f, tmp_path, 10.0, how)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the suite's 300 s per test is shorter than the outage
def test_ten_minute_outage(fleet, tmp_path):  # noqa: F811 - the fixture
    f = fleet(keepalive=KEEPALIVE_S)
    outage(f, tmp_path, 600.0, "sigkill")
