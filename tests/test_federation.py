"""The federation end to end: real Mosquitto, real aggregator and agent processes, TFLite training.

Small real data (watch windows); the exported model is cached once per session so aggregator
processes start without TensorFlow export work.
"""

from __future__ import annotations

import itertools
import json
import signal
import uuid

import numpy as np
import pytest
from conftest import needs_mosquitto, wait_until
from fleet import Fleet, watch_shards

from fedmq.aggregator.strategies import ClientUpdate, build_strategy
from fedmq.broker.contract import codec
from fedmq.broker.contract.messages import GlobalModel, RoundAnnouncement, Update
from fedmq.broker.contract.topics import Topics
from fedmq.broker.ops.launcher import LocalBroker
from fedmq.broker.transport.client import MqttClient, MqttConfig
from fedmq.broker.transport.receiver import Receiver

pytestmark = [pytest.mark.network, needs_mosquitto]


@pytest.fixture
def fleet(tmp_path, model_cache, request):
    brokers = []

    def make(broker: LocalBroker | None = None, fleet_name: str | None = None) -> Fleet:
        b = broker or LocalBroker(workdir=str(tmp_path / "broker"))  # the shipped config: persistence off
        if broker is None:
            (tmp_path / "broker").mkdir(exist_ok=True)
            b.start()
        brokers.append(b)
        f = Fleet(tmp_path, {"host": b.host, "port": b.port, "fleet": fleet_name or "f" + uuid.uuid4().hex[:8]},
                  model_cache=model_cache)
        f.local_broker = b
        made.append(f)
        return f

    made: list[Fleet] = []
    yield make
    for f in made:
        f.stop_all()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f.dump_logs())
    for b in brokers:
        b.cleanup()


def history(f: Fleet, name="aggregator") -> list[dict]:
    p = f.tmp / f"{name}-state" / "history.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class Observer:
    """The test's own subscriber: records every update and global model on the bus."""

    def __init__(self, f: Fleet, **cfg) -> None:
        self.topics = Topics(f.broker["fleet"])
        self.client = MqttClient(MqttConfig(f.broker["host"], f.broker["port"], client_id="obs-" + uuid.uuid4().hex[:6],
                                            **cfg))
        self.client.connect()
        self.rx = Receiver(self.topics)
        self.updates: dict[int, list[Update]] = {}
        self.globals: dict[int, GlobalModel] = {}
        self.rounds: list[RoundAnnouncement] = []
        for t in (self.topics.all_updates(), *self.topics.with_chunks(self.topics.global_()), self.topics.round()):
            self.client.subscribe(t)

    def pump(self) -> None:
        m = self.client.get(timeout=0.05)
        while m is not None:
            r = self.rx.feed(m.topic, m.payload, m.retain)
            if r is not None:
                msg = r.message
                if isinstance(msg, Update):
                    self.updates.setdefault(msg.round, []).append(msg)
                elif isinstance(msg, GlobalModel):
                    self.globals[msg.round] = msg
                elif isinstance(msg, RoundAnnouncement):
                    self.rounds.append(msg)
            m = self.client.get(timeout=0)

    def wait(self, pred, timeout=120, what="condition"):
        def step():
            self.pump()
            return pred()
        return wait_until(step, timeout, interval=0.05, what=what)

    def close(self):
        self.client.close()


def aggregated(h):
    return [r for r in h if r["outcome"] == "aggregated"]


def offline_global(prev: dict, rnd: int, ups: list[Update]) -> dict:
    """The strategy applied offline (the reference): each update of ``ups`` folded in once."""
    strat = build_strategy({"name": "fedavg", "lanes": 1})
    strat.begin_round(prev, rnd)
    for u in ups:
        assert strat.add(ClientUpdate(u.agent, u.num_samples, u.tensors, u.metrics)) is None
    return strat.finish().weights


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.allclose(a[n], b[n], rtol=1e-5, atol=1e-6) for n in a)


def assert_each_counted_once(obs: Observer, row: dict) -> None:
    """The round's global model is the strategy applied to exactly one update of each participant (an
    agent folded in twice, a round applied twice on top of itself, or an update from outside the list
    all give another model). An agent that sent more than one update for the round (it retrained after a
    crash) may have had any one of them accepted: every choice is tried."""
    rnd = row["round"]
    assert rnd in obs.globals, f"round {rnd}: its global model was not seen on the bus"
    prev = obs.globals[max(k for k in obs.globals if k < rnd)].tensors
    got = obs.globals[rnd].tensors
    seen = obs.updates.get(rnd, [])
    choices = []
    for a in row["participants_list"]:
        mine = list({u.update_id: u for u in seen if u.agent == a}.values())
        assert mine, f"round {rnd}: no update of participant {a} was seen on the bus"
        choices.append(mine)
    assert any(same(got, offline_global(prev, rnd, list(pick))) for pick in itertools.product(*choices)), \
        f"round {rnd}: the global model is not one update per participant {row['participants_list']}"


def evaluate_offline(served, tensors: dict, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(cross-entropy, accuracy) of a global model, from its predicted probabilities in numpy (the
    aggregator uses the artifact's ``evaluate`` signature; this uses ``infer``)."""
    from fedmq.edge_agent.trainer import TFLiteTrainer

    t = TFLiteTrainer(served.artifact, served.model_id)
    t.set_weights([tensors[w.name] for w in served.weights])
    p = np.concatenate([t.predict(x[s : s + 256]) for s in range(0, len(y), 256)])
    loss = float(np.mean(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-30))))
    return loss, float(np.mean(np.argmax(p, axis=-1) == y))


def test_happy_path_matches_offline_strategy(fleet, tmp_path, model_cache):
    f = fleet()
    agents = [f"agent-{i}" for i in range(5)]
    shards = watch_shards(agents, tmp_path, per_agent=120)
    obs = Observer(f)
    try:
        # two fold lanes (worker threads), which this small model would not get by default: the
        # other service tests run the single-lane path
        agg = f.start_aggregator(rounds={"rounds": 3, "min_agents": 5, "grace_s": 5},
                                 eval={"dataset": "watch", "groups": [9, 10]},
                                 strategy={"name": "fedavg", "lanes": 2})
        for a in agents:
            f.start_agent(a, shards[a])
        obs.wait(lambda: 3 in obs.globals, 120, "global model of round 3")
        wait_until(lambda: not agg.alive(), 30, what="aggregator to finish")
        h = history(f)
        assert [r["round"] for r in h] == [1, 2, 3] and all(r["outcome"] == "aggregated" for r in h)
        assert all(r["participants"] == 5 for r in h)
        # the global model changes each round and equals the strategy applied offline to the same updates
        strat = build_strategy({"name": "fedavg", "lanes": 1})
        prev = obs.globals[0].tensors
        for rnd in (1, 2, 3):
            ups = obs.updates[rnd]
            assert sorted(u.agent for u in ups) == agents
            strat.begin_round(prev, rnd)
            for u in ups:
                assert strat.add(ClientUpdate(u.agent, u.num_samples, u.tensors, u.metrics)) is None
            ref = strat.finish().weights
            got = obs.globals[rnd].tensors
            assert any(not np.array_equal(got[n], prev[n]) for n in got)
            for n in got:
                np.testing.assert_allclose(got[n], ref[n], rtol=1e-5, atol=1e-6)
            prev = got
        # the aggregator's evaluation is of the global it published, on the held-out subjects 9-10: the
        # test's own evaluation of that model agrees (the loss moves with any change of the weights or
        # the data), and training helped: the first global model is worse on the same data
        from fedmq.aggregator.config import ModelSection
        from fedmq.aggregator.datasets import load_watch
        from fedmq.aggregator.model_store import load_or_export

        served = load_or_export(ModelSection(source="zoo:sensor1d", batch_size=16, verify_steps=5), model_cache)
        d = load_watch()
        test = d.subset(np.isin(d.groups, [9, 10]))
        loss, acc = evaluate_offline(served, obs.globals[3].tensors, test.x, test.y)
        assert abs(h[-1]["eval_loss"] - loss) <= 1e-3, (h[-1]["eval_loss"], loss)
        assert abs(h[-1]["eval_accuracy"] - acc) <= 2 / len(test.y), (h[-1]["eval_accuracy"], acc)  # near-ties
        loss0, _ = evaluate_offline(served, obs.globals[0].tensors, test.x, test.y)
        assert loss < loss0, (loss, loss0)
    finally:
        obs.close()


def test_quorum_closes_after_grace_and_abandons_without_quorum(fleet, tmp_path):
    f = fleet()
    asked = [f"agent-{i}" for i in range(5)]
    shards = watch_shards(asked, tmp_path, per_agent=60)
    obs = Observer(f)
    try:
        agg = f.start_aggregator(rounds={"rounds": 1, "select": "list", "agents": asked, "quorum": 3,
                                         "grace_s": 3, "deadline_s": 60})
        for a in asked[:3]:  # two of the five asked never show up
            f.start_agent(a, shards[a])
        wait_until(lambda: not agg.alive(), 90, what="round to close")
        (row,) = history(f)
        assert row["outcome"] == "aggregated" and row["participants"] == 3 and row["asked"] == 5
        assert row["duration_s"] >= 3.0  # waited for the grace window after the quorum
        f.stop_all()
        # now only 2 agents for a quorum of 3: the deadline passes, the round is abandoned
        f2 = fleet(f.local_broker)
        obs2 = Observer(f2)
        agg2 = f2.start_aggregator(name="agg2", rounds={"rounds": 1, "select": "list", "agents": asked,
                                                          "quorum": 3, "deadline_s": 6})
        for a in asked[:2]:
            f2.start_agent(a, shards[a])
        wait_until(lambda: len(history(f2, "agg2")) >= 2, 60, what="two abandoned rounds")
        agg2.kill(signal.SIGTERM)
        assert agg2.popen.returncode == 0  # graceful shutdown on SIGTERM
        h = history(f2, "agg2")
        assert all(r["outcome"] == "abandoned" for r in h)
        assert all(r["global_round"] == 0 for r in h)  # the global model never changed
        obs2.pump()
        assert set(obs2.globals) == {0}
        obs2.close()
    finally:
        obs.close()


def test_agents_killed_mid_run_rounds_still_complete(fleet, tmp_path):
    f = fleet()
    agents = [f"agent-{i}" for i in range(5)]
    shards = watch_shards(agents, tmp_path, per_agent=400)
    agg = f.start_aggregator(rounds={"rounds": 4, "min_agents": 3, "quorum_fraction": 0.6, "grace_s": 2,
                                     "deadline_s": 20}, train={"epochs": 2})
    procs = {a: f.start_agent(a, shards[a]) for a in agents}
    wait_until(lambda: len(history(f)) >= 1, 90, what="first round")
    for a in agents[:2]:  # 40% of the fleet dies without a goodbye
        procs[a].kill(signal.SIGKILL)
    wait_until(lambda: not agg.alive(), 150, what="all rounds")
    h = aggregated(history(f))
    assert len(h) == 4
    assert all(r["participants"] >= 3 for r in h)


def test_broker_restart_mid_round_loses_and_doubles_nothing(fleet, tmp_path):
    f = fleet()
    b = f.local_broker
    agents = [f"agent-{i}" for i in range(3)]
    shards = watch_shards(agents, tmp_path, per_agent=200)
    agg = f.start_aggregator(rounds={"rounds": 3, "min_agents": 3, "grace_s": 30, "deadline_s": 90})
    for a in agents:
        f.start_agent(a, shards[a])
    obs = Observer(f, reconnect_min_s=0.05, reconnect_max_s=0.2)  # back before the services are
    try:
        obs.wait(lambda: any(r.round == 1 for r in obs.rounds), 90, "round 1 announced")
        b.kill()  # SIGKILL Mosquitto mid-round
        b.start()
        wait_until(lambda: not agg.alive(), 150, what="all rounds after the broker restart")
        obs.wait(lambda: 3 in obs.globals, 30, "the last global model")
        h = history(f)
        assert [r["round"] for r in aggregated(h)] == [1, 2, 3]
        for r in aggregated(h):
            assert sorted(r["participants_list"]) == agents  # nobody lost
            assert_each_counted_once(obs, r)  # nobody twice
    finally:
        obs.close()


def test_aggregator_sigkill_resumes_without_regress_or_double_apply(fleet, tmp_path):
    f = fleet()
    agents = [f"agent-{i}" for i in range(3)]
    shards = watch_shards(agents, tmp_path, per_agent=120)
    obs = Observer(f)
    try:
        rounds = {"rounds": 4, "min_agents": 3, "grace_s": 3, "deadline_s": 60}
        agg = f.start_aggregator(rounds=rounds)
        for a in agents:
            f.start_agent(a, shards[a])
        # kill between rounds: right after round 2 is checkpointed
        wait_until(lambda: len(history(f)) >= 2, 120, what="two rounds")
        agg.kill(signal.SIGKILL)
        ck_rounds = [r["round"] for r in history(f)]
        agg = f.start_aggregator(rounds=rounds)
        # kill mid-round: during the grace window of the next round
        obs.wait(lambda: any(r.round == ck_rounds[-1] + 1 for r in obs.rounds[-3:]), 60, "next round announced")
        obs.wait(lambda: len(obs.updates.get(ck_rounds[-1] + 1, [])) >= 1, 60, "an update of the open round")
        agg.kill(signal.SIGKILL)
        agg = f.start_aggregator(rounds=rounds)
        wait_until(lambda: not agg.alive(), 150, what="the run to finish after two crashes")
        obs.pump()
        h = history(f)
        assert [r["round"] for r in h] == sorted({r["round"] for r in h})  # each round recorded once
        agg_rounds = [r["global_round"] for r in aggregated(h)]
        assert agg_rounds == sorted(agg_rounds) and len(aggregated(h)) == 4
        # globals on the bus only move forward
        seen = sorted(obs.globals)
        assert seen == sorted(set(seen)) and max(seen) == h[-1]["global_round"]
        for r in aggregated(h):  # no round applied twice, nobody counted twice
            assert_each_counted_once(obs, r)
    finally:
        obs.close()


def test_duplicate_updates_count_once(fleet, tmp_path):
    f = fleet()
    agents = ["agent-0", "agent-1"]
    shards = watch_shards(agents, tmp_path, per_agent=80)
    obs = Observer(f)
    try:
        from fedmq.broker.ops.launcher import free_port

        port = free_port()
        agg = f.start_aggregator(rounds={"rounds": 1, "select": "list", "agents": agents, "quorum": 2,
                                         "grace_s": 1, "deadline_s": 60}, service={"prometheus_port": port})
        f.start_agent("agent-0", shards["agent-0"])
        obs.wait(lambda: len(obs.updates.get(1, [])) >= 1, 90, "agent-0's update")
        u = obs.updates[1][0]
        pub = MqttClient(MqttConfig(f.broker["host"], f.broker["port"], client_id="dup"))
        pub.connect()
        t = obs.topics
        pub.publish(t.update("agent-0"), codec.encode(u))  # a QoS 1 / outbox redelivery (same update id)
        u2 = Update(u.round, u.agent, u.model_id, uuid.uuid4().hex, u.num_samples, u.tensors, u.metrics, u.created)
        pub.publish(t.update("agent-0"), codec.encode(u2))  # a second, different update for the same round
        pub.close()

        def scraped():
            import urllib.request

            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            return 'fedmq_updates_rejected_total{reason="duplicate"} 1.0' in body and \
                "fedmq_updates_accepted_total 1.0" in body

        wait_until(scraped, 30, what="the duplicate to show on /metrics")
        f.start_agent("agent-1", shards["agent-1"])  # its update completes the quorum after the duplicates
        wait_until(lambda: not agg.alive(), 90, what="round to end")
        (row,) = history(f)
        assert row["participants_list"].count("agent-0") == 1
        assert row["rejected"].get("duplicate", 0) == 1
    finally:
        obs.close()
