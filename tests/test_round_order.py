"""When a round closes the aggregator checkpoints, then publishes the global model, then the
round's metrics (docs/protocol.md): a metrics message exists only for a round that is already
checkpointed and published. Real Mosquitto, a real aggregator process, real agents training."""

from __future__ import annotations

import threading
import uuid

import pytest
from conftest import needs_mosquitto, wait_until
from fleet import Fleet, watch_shards

from fedmq.aggregator.state import Checkpoint
from fedmq.broker.contract.messages import GlobalModel, RoundMetrics
from fedmq.broker.contract.topics import Topics
from fedmq.broker.ops.launcher import LocalBroker
from fedmq.broker.transport.client import InMessage, MqttClient, MqttConfig
from fedmq.broker.transport.receiver import Receiver

pytestmark = [pytest.mark.network, needs_mosquitto]


class OrderObserver:
    """One client subscribed to global (with its chunks) and metrics: records what arrives, in order.

    On each metrics message it reads the aggregator's checkpoint at once, on the network thread, so
    what it sees on disk is what was there when the metrics message was delivered.
    """

    def __init__(self, broker: dict, checkpoint) -> None:
        self.topics = Topics(broker["fleet"])
        self.checkpoint = checkpoint
        self.rx = Receiver(self.topics)
        self.events: list[tuple] = []  # ("global", round) | ("metrics", round, outcome, ck_global, ck_next)
        self.lock = threading.Lock()
        self.client = MqttClient(MqttConfig(broker["host"], broker["port"], client_id="order-" + uuid.uuid4().hex[:6]),
                                 on_message=self._on_message)
        self.client.connect()
        for t in (*self.topics.with_chunks(self.topics.global_()), self.topics.metrics()):
            self.client.subscribe(t, qos=1)

    def _on_message(self, m: InMessage) -> None:
        got = self.rx.feed(m.topic, m.payload, m.retain)
        if got is None:
            return
        msg = got.message
        if isinstance(msg, RoundMetrics):
            ck = Checkpoint.load(self.checkpoint)
            ev = ("metrics", msg.round, msg.outcome, None if ck is None else ck.global_round,
                  None if ck is None else ck.next_round)
        elif isinstance(msg, GlobalModel):
            ev = ("global", msg.round)
        else:
            return
        with self.lock:
            self.events.append(ev)

    def snapshot(self) -> list[tuple]:
        with self.lock:
            return list(self.events)


def check_order(events: list[tuple]) -> list[str]:
    """Every metrics message of round r: checkpoint on disk already past round r; when aggregated,
    the global model of round r arrived before it on the same subscription."""
    problems = []
    for i, ev in enumerate(events):
        if ev[0] != "metrics":
            continue
        _, r, outcome, ck_global, ck_next = ev
        if ck_next is None or ck_next <= r:
            problems.append(f"metrics of round {r} delivered while the checkpoint held next round {ck_next}")
        if outcome == "aggregated":
            if ck_global is None or ck_global < r:
                problems.append(f"metrics of round {r} delivered while the checkpoint held global round {ck_global}")
            if ("global", r) not in events[:i]:
                problems.append(f"metrics of round {r} arrived before the global model of round {r}")
    return problems


def test_check_order_catches_each_wrong_order():
    """The checker itself: each order the aggregator must not produce is reported."""
    good = [("global", 0), ("global", 1), ("metrics", 1, "aggregated", 1, 2)]
    assert check_order(good) == []
    assert check_order([("global", 0), ("metrics", 1, "aggregated", 1, 2), ("global", 1)])  # metrics before global
    assert check_order([("global", 0), ("global", 1), ("metrics", 1, "aggregated", 0, 1)])  # before the checkpoint
    assert check_order([("metrics", 1, "abandoned", None, None)])  # no checkpoint at all
    assert check_order([("global", 0), ("metrics", 2, "abandoned", 0, 3)]) == []


def test_metrics_only_for_a_checkpointed_and_published_round(tmp_path, model_cache, request):
    (tmp_path / "broker").mkdir()
    b = LocalBroker(workdir=str(tmp_path / "broker")).start()
    f = Fleet(tmp_path, {"host": b.host, "port": b.port, "fleet": "f" + uuid.uuid4().hex[:8]},
              model_cache=model_cache)
    obs = None
    try:
        rounds = 3
        cfg = f.aggregator_config(rounds={"rounds": rounds, "min_agents": 2, "deadline_s": 120, "grace_s": 5})
        obs = OrderObserver(f.broker, tmp_path / "aggregator-state" / "checkpoint.npz")
        agg = f.spawn("aggregator", "fedmq.aggregator.cli", cfg)
        for a, p in watch_shards(["agent-1", "agent-2"], tmp_path, per_agent=48).items():
            f.start_agent(a, p)
        wait_until(lambda: sum(e[0] == "metrics" for e in obs.snapshot()) >= rounds or not agg.alive(), timeout=300,
                   interval=0.1, what=f"metrics of {rounds} rounds")
        events = obs.snapshot()
        metrics = [e for e in events if e[0] == "metrics"]
        # not vacuous: every round aggregated, each with its metrics message
        assert [e[1] for e in metrics] == list(range(1, rounds + 1)), (events, f.dump_logs())
        assert all(e[2] == "aggregated" for e in metrics), events
        assert check_order(events) == [], events
    finally:
        if obs is not None:
            obs.client.close()
        f.stop_all()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f.dump_logs())
        b.cleanup()
