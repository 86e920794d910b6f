"""Poison does not stick: the magnitude and sample-count guards (fedmq.aggregator.strategies.guards).

Unit tests against numpy references, then a real federation on watch data (Mosquitto, aggregator
and honest agents as processes) with two hostile agents written with plain paho + msgpack: one
sends 1e15-valued updates, one claims 10^12 samples. The final accuracy must match the clean
run's (same seed) within 2 points, and every round must aggregate.
"""

from __future__ import annotations

import threading
import time
import uuid

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from conftest import needs_mosquitto, wait_until
from fleet import Fleet, watch_shards
from test_federation import history

from fedmq.aggregator.strategies import ClientUpdate, build_strategy
from fedmq.broker.contract import codec
from fedmq.broker.contract.messages import GlobalModel, RoundAnnouncement, Status
from fedmq.broker.transport.receiver import Receiver

SHAPES = {"k": (4, 3), "b": (3,)}


def model() -> dict[str, np.ndarray]:
    return {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}


def delta(rng, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {n: (rng.normal(size=s) * scale).astype(np.float32) for n, s in SHAPES.items()}


def norm(d) -> float:
    return float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in d.values())))


def run_round(s, g, ups, rnd):
    s.begin_round(g, rnd)
    reasons = [s.add(u) for u in ups]
    return s.finish(), reasons


# -- unit: norm bound ---------------------------------------------------------------------------------
def test_norm_bound_is_k_times_the_median_of_accepted_norms_after_warmup():
    rng = np.random.default_rng(0)
    s = build_strategy({"name": "fedavg", "guard": {"norm_k": 3.0, "norm_warmup": 4, "max_norm": 1e4}})
    g = model()
    accepted_norms: list[float] = []
    # warm-up: only the absolute bound applies; a 1e15-valued update is refused even in round 1
    ups = [ClientUpdate(f"a{i}", 10, delta(rng, 1.0 + i)) for i in range(4)]
    bomb = ClientUpdate("evil", 10, {n: np.full(s_, 1e15, np.float32) for n, s_ in SHAPES.items()})
    r, reasons = run_round(s, g, [*ups, bomb], 1)
    assert reasons == [None] * 4 + ["norm_outlier"]
    assert r.outcome == "aggregated" and r.rejected == {"norm_outlier": 1}
    accepted_norms += [norm(u.delta) for u in ups]
    # round 2: bound = 3 x median of the accepted norms (numpy reference), whatever the order
    bound = 3.0 * float(np.median(accepted_norms))
    inside = ClientUpdate("a0", 10, {n: v * (0.99 * bound / norm(ups[0].delta)) for n, v in ups[0].delta.items()})
    outside = ClientUpdate("a1", 10, {n: v * (1.01 * bound / norm(ups[0].delta)) for n, v in ups[0].delta.items()})
    for order in ([inside, outside], [outside, inside]):
        s2 = build_strategy({"name": "fedavg", "guard": {"norm_k": 3.0, "norm_warmup": 4}})
        s2.load_state_dict(s.state_dict())  # the history is checkpointed
        r2, reasons2 = run_round(s2, r.weights, order, 2)
        assert dict(zip([u.agent for u in order], reasons2)) == {"a0": None, "a1": "norm_outlier"}
        assert r2.metrics["norm_bound"] == pytest.approx(bound, rel=1e-6)  # norms from float32 sums
        np.testing.assert_allclose(r2.weights["k"], r.weights["k"] + inside.delta["k"], rtol=1e-5, atol=1e-6)


def test_rejected_norms_never_enter_the_history():
    rng = np.random.default_rng(1)
    s = build_strategy({"name": "mean", "guard": {"norm_k": 2.0, "norm_warmup": 2, "max_norm": 0}})
    g = model()
    honest = [ClientUpdate(f"a{i}", 1, delta(rng)) for i in range(3)]
    run_round(s, g, honest, 1)  # warm-up, no absolute bound: everything counts
    ref = [norm(u.delta) for u in honest]
    for rnd in range(2, 6):  # a poisoner sending ever larger updates never moves the bound
        big = ClientUpdate("evil", 1, delta(rng, 10.0 ** rnd))
        _, reasons = run_round(s, g, [big], rnd)
        assert reasons == ["norm_outlier"]
        assert s.guard.bound == pytest.approx(2.0 * float(np.median(ref)))


# -- unit: samples --------------------------------------------------------------------------------------
def test_sample_count_maximum_and_cap_match_numpy_weighted_average():
    rng = np.random.default_rng(2)
    s = build_strategy({"name": "weighted", "guard": {"samples_k": 4.0, "norm_warmup": 3, "max_samples": 10**6}})
    g = model()
    first = [ClientUpdate(f"a{i}", n, delta(rng)) for i, n in enumerate([100, 200, 300])]
    run_round(s, g, first, 1)
    cap = int(4.0 * np.median([100, 200, 300]))  # 800
    ups = [ClientUpdate("a0", 100, delta(rng)), ClientUpdate("a1", 5000, delta(rng)),
           ClientUpdate("a2", 10**12, delta(rng))]
    g2 = {n: np.zeros_like(v) for n, v in g.items()}
    r, reasons = run_round(s, g2, ups, 2)
    assert reasons == [None, None, "bad_samples"]
    assert r.metrics["weight_capped"] == 1.0
    w = [100, min(5000, cap)]
    for n in SHAPES:
        ref = np.average(np.stack([ups[0].delta[n], ups[1].delta[n]]).astype(np.float64), axis=0, weights=w)
        np.testing.assert_allclose(r.weights[n], ref, rtol=1e-5, atol=1e-6)


def test_guard_is_on_by_default_and_can_be_turned_off():
    for name in ("fedavg", "mean", "median", "krum", "fedadam"):
        assert build_strategy({"name": name}).guard is not None
    s = build_strategy({"name": "fedavg", "guard": {"off": True}})
    assert s.guard is None
    s.begin_round(model(), 1)
    assert s.add(ClientUpdate("a", 10, {n: np.full(v, 1e15, np.float32) for n, v in SHAPES.items()})) is None


# -- real: a federation with two poisoners --------------------------------------------------------------
HONEST = ["agent-a", "agent-b", "agent-c"]


class Poisoner:
    """A hostile agent in plain paho + msgpack: online status, then one crafted update per round."""

    def __init__(self, broker: dict, topics, agent: str, mode: str) -> None:
        self.topics, self.agent, self.mode = topics, agent, mode
        self.rx = Receiver(topics)
        self.global_: GlobalModel | None = None
        self.sent: list[int] = []
        self.lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=agent, protocol=mqtt.MQTTv5)
        c.on_message = self._on_message
        c.connect(broker["host"], broker["port"])
        for f in (topics.round(), *topics.with_chunks(topics.global_())):
            c.subscribe(f, qos=1)
        c.publish(topics.status(agent), codec.encode(Status(agent, "online", time.time())), qos=1, retain=True)
        c.loop_start()
        self.c = c

    def _on_message(self, client, userdata, m) -> None:
        with self.lock:
            got = self.rx.feed(m.topic, m.payload, m.retain)
            if got is None:
                return
            msg = got.message
            if isinstance(msg, GlobalModel):
                self.global_ = msg
            elif isinstance(msg, RoundAnnouncement) and self.global_ is not None and msg.round not in self.sent:
                self.sent.append(msg.round)
                client.publish(self.topics.update(self.agent), self.update(msg), qos=1)

    def update(self, ann: RoundAnnouncement) -> bytes:
        rng = np.random.default_rng(ann.round)
        tensors = []
        for name, a in self.global_.tensors.items():
            if self.mode == "huge":
                v = np.full(a.shape, 1e15, np.float32)
            else:  # plausible magnitude, wrong direction: harmless only if its weight stays bounded
                v = (rng.normal(size=a.shape) * 0.05).astype(np.float32)
            tensors.append({"name": name, "enc": "raw", "dtype": "float32", "shape": list(a.shape),
                            "data": v.tobytes()})
        return msgpack.packb({"v": 1, "kind": "update", "run": ann.run, "round": ann.round,
                              "base_round": ann.base_round,
                              "agent": self.agent, "model_id": ann.model_id, "update_id": uuid.uuid4().hex,
                              "num_samples": 10**12 if self.mode == "samples" else 100, "metrics": {},
                              "created": time.time(), "tensors": tensors}, use_bin_type=True)

    def close(self) -> None:
        self.c.publish(self.topics.status(self.agent), b"", qos=1, retain=True).wait_for_publish(10)
        self.c.disconnect()
        self.c.loop_stop()


def _run(tmp_path, model_cache, broker, poisoners: bool) -> list[dict]:
    from fedmq.broker.contract.topics import Topics

    name = "poison" if poisoners else "clean"
    d = tmp_path / name
    d.mkdir()
    fleet_name = "p" + uuid.uuid4().hex[:8]
    f = Fleet(d, {"host": broker.host, "port": broker.port, "fleet": fleet_name}, model_cache=model_cache)
    topics = Topics(fleet_name)
    bad = []
    try:
        if poisoners:
            bad = [Poisoner(f.broker, topics, "evil-huge", "huge"), Poisoner(f.broker, topics, "evil-samples", "samples")]
        shards = watch_shards(HONEST, d, per_agent=200)
        # exclude_after = 0: the guards must hold in every round a poisoner reaches (exclusion of devices
        # refused round after round is tests/test_fleet_status.py)
        agg = f.start_aggregator(rounds={"rounds": 10, "min_agents": 3 + len(bad), "quorum": 3, "grace_s": 1,
                                         "deadline_s": 60, "exclude_after": 0},
                                 eval={"dataset": "watch", "groups": [9, 10], "max_examples": 2000})
        for a in HONEST:
            f.start_agent(a, shards[a])
        try:
            wait_until(lambda: not agg.alive(), 300, interval=0.2, what=f"10 rounds ({name})")
        except AssertionError:
            print(f.dump_logs())
            raise
        h = history(f)
        if poisoners:
            assert all(p.sent for p in bad), "the poisoners took part"
        return h
    finally:
        for p in bad:
            p.close()
        f.stop_all()


@needs_mosquitto
@pytest.mark.network
def test_poisoners_do_not_stick(tmp_path, model_cache, broker):
    clean = _run(tmp_path, model_cache, broker, poisoners=False)
    poisoned = _run(tmp_path, model_cache, broker, poisoners=True)
    assert [r["outcome"] for r in clean] == ["aggregated"] * 10
    assert [r["outcome"] for r in poisoned] == ["aggregated"] * 10  # the fleet never stops aggregating
    assert all(sorted(r["participants_list"]) == HONEST for r in poisoned)
    rejected = {}
    for r in poisoned:
        for k, v in r["rejected"].items():
            rejected[k] = rejected.get(k, 0) + v
    print("poisoned run rejections", rejected, "acc clean", clean[-1]["eval_accuracy"],
          "poisoned", poisoned[-1]["eval_accuracy"])
    assert rejected.get("norm_outlier", 0) >= 9  # the 1e15 agent, every round it reached
    assert rejected.get("bad_samples", 0) >= 9  # the 10^12 claim
    assert abs(poisoned[-1]["eval_accuracy"] - clean[-1]["eval_accuracy"]) <= 0.02
    assert clean[-1]["eval_accuracy"] > clean[0]["eval_accuracy"]  # the clean run learned something
