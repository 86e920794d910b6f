"""bench/round: wall time of a federated round, fedmq over Mosquitto vs Flower's legacy gRPC server.

Both run the same identity round: 10 clients x 1M float32 parameters (4 layers), training replaced
by identity (clients return what they got: fedmq agents send a zero delta). fedmq: real Mosquitto,
the real AggregatorService (FedAvg), agents in separate processes. Flower: ``flwr.server.start_server``
with FedAvg and ``start_client`` NumPyClients in separate processes (flwr only in .bench-venv).
Also: 100 agents x 1M params, time from the last update of the quorum to the new global model
arriving at a subscriber; and bytes per update for each compression.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, now  # noqa: E402

SIZES = lambda p: [p // 2, p // 4, p // 8, p - p // 2 - p // 4 - p // 8]  # noqa: E731


# -- fedmq ------------------------------------------------------------------------------------------
def fedmq_agent(host: str, port: int, fleet: str, agent: str) -> None:
    from fedmq.broker.contract import codec
    from fedmq.broker.contract.messages import GlobalModel, RoundAnnouncement, Status, Update
    from fedmq.broker.contract.topics import Topics
    from fedmq.broker.transport.client import MqttClient, MqttConfig
    from fedmq.broker.transport.publisher import Publisher
    from fedmq.broker.transport.receiver import Receiver

    t = Topics(fleet)
    c = MqttClient(MqttConfig(host, port, client_id=agent, max_payload=64 << 20))
    c.connect()
    for f in (*t.with_chunks(t.global_()), t.round()):
        c.subscribe(f)
    c.publish(t.status(agent), codec.encode(Status(agent, "online", time.time())), retain=True)
    pub, rx = Publisher(c, t), Receiver(t)
    g, ann, done = None, None, set()
    while True:
        m = c.get(timeout=1)
        if m is None:
            continue
        r = rx.feed(m.topic, m.payload, m.retain)
        if r is None:
            continue
        if isinstance(r.message, GlobalModel):
            g = r.message
        elif isinstance(r.message, RoundAnnouncement):
            ann = r.message
        if ann is None or g is None or g.round != ann.base_round or ann.round in done:
            continue
        zeros = {n: np.zeros_like(a) for n, a in g.tensors.items()}  # identity: the weights we got
        pub.publish(t.update(agent), Update(ann.round, agent, ann.model_id, uuid.uuid4().hex, 100, zeros, {}, 0.0))
        done.add(ann.round)


def run_fedmq(n_agents: int, params: int, rounds: int) -> list[float]:
    from fedmq.aggregator.config import load_config
    from fedmq.aggregator.model_store import ServedModel
    from fedmq.aggregator.service import AggregatorService
    from fedmq.broker.contract.messages import TensorSpec
    from fedmq.broker.ops.launcher import LocalBroker

    fleet = "bench" + uuid.uuid4().hex[:6]
    weights = [np.zeros(s, np.float32) for s in SIZES(params)]
    specs = [TensorSpec(f"w{i:03d}", (s,), "float32") for i, s in enumerate(SIZES(params))]
    art = b"identity-benchmark"
    import hashlib

    served = ServedModel(art, hashlib.sha256(art).hexdigest(), [s.name for s in specs], specs,
                         [TensorSpec("x", (1, 1), "float32")], 1, weights)
    with LocalBroker() as b:
        procs = [subprocess.Popen([sys.executable, __file__, "--agent", f"{b.host}:{b.port}:{fleet}:a{i:03d}"],
                                  cwd=str(ROOT)) for i in range(n_agents)]
        try:
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                cfg = load_config(None, {"broker": {"host": b.host, "port": b.port, "fleet": fleet,
                                                    "max_payload": 64 << 20},
                                         "service": {"state_dir": d, "export_final": False},
                                         "rounds": {"rounds": rounds, "min_agents": n_agents, "grace_s": 0,
                                                    "deadline_s": 120}})
                svc = AggregatorService(cfg, served=served)
                summary = svc.run(max_seconds=600)
        finally:
            for p in procs:
                p.kill()
    ts = [h["ts"] for h in summary.history]
    return [b - a for a, b in zip(ts, ts[1:])]


# -- Flower -----------------------------------------------------------------------------------------
def flower_client(address: str, params: int) -> None:
    import flwr as fl
    from flwr.compat.client.app import start_client

    class Identity(fl.client.NumPyClient):
        def get_parameters(self, config):
            return [np.zeros(s, np.float32) for s in SIZES(params)]

        def fit(self, parameters, config):
            return parameters, 100, {}

        def evaluate(self, parameters, config):
            return 0.0, 1, {}

    start_client(server_address=address, client=Identity().to_client(), insecure=True)


def run_flower(n_agents: int, params: int, rounds: int) -> list[float]:
    import flwr as fl
    from flwr.server.strategy import FedAvg

    from fedmq.broker.ops.launcher import free_port

    stamps: list[float] = []

    class Timed(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            stamps.append(time.time())
            return out

    port = free_port()
    init = fl.common.ndarrays_to_parameters([np.zeros(s, np.float32) for s in SIZES(params)])
    strat = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n_agents, min_available_clients=n_agents,
                  initial_parameters=init)
    procs = [subprocess.Popen([sys.executable, __file__, "--flower-client", f"127.0.0.1:{port}", "--params",
                               str(params)], cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(n_agents)]
    try:
        fl.server.start_server(server_address=f"127.0.0.1:{port}", config=fl.server.ServerConfig(num_rounds=rounds),
                               strategy=strat)
    finally:
        for p in procs:
            p.kill()
    return [b - a for a, b in zip(stamps, stamps[1:])]


# -- quorum -> global with 100 agents ----------------------------------------------------------------
def quorum_to_global(n_agents: int, params: int, repeats: int) -> list[float]:
    """n in-process MQTT clients answer each round at once; the aggregator measures quorum -> published."""
    import hashlib
    import tempfile

    from fedmq.aggregator.config import load_config
    from fedmq.aggregator.model_store import ServedModel
    from fedmq.aggregator.service import AggregatorService
    from fedmq.broker.contract import codec
    from fedmq.broker.contract.messages import GlobalModel, RoundAnnouncement, Status, TensorSpec, Update
    from fedmq.broker.contract.topics import Topics
    from fedmq.broker.ops.launcher import LocalBroker
    from fedmq.broker.transport.client import MqttClient, MqttConfig
    from fedmq.broker.transport.receiver import Receiver

    fleet = "q" + uuid.uuid4().hex[:6]
    t = Topics(fleet)
    sizes = SIZES(params)
    weights = [np.zeros(s, np.float32) for s in sizes]
    specs = [TensorSpec(f"w{i:03d}", (s,), "float32") for i, s in enumerate(sizes)]
    art = b"identity-benchmark-100"
    served = ServedModel(art, hashlib.sha256(art).hexdigest(), [s.name for s in specs], specs,
                         [TensorSpec("x", (1, 1), "float32")], 1, weights)
    zeros = {s.name: np.zeros(s.shape, np.float32) for s in specs}
    results: list[float] = []
    with LocalBroker() as b:
        mk = lambda cid: MqttClient(MqttConfig(b.host, b.port, client_id=cid, max_payload=64 << 20))  # noqa: E731
        agents = [mk(f"a{i:03d}") for i in range(n_agents)]
        for i, c in enumerate(agents):
            c.connect()
            c.publish(t.status(f"a{i:03d}"), codec.encode(Status(f"a{i:03d}", "online", time.time())), retain=True)
        obs = mk("observer")
        obs.connect()
        for f in (*t.with_chunks(t.global_()), t.round()):
            obs.subscribe(f)
        with tempfile.TemporaryDirectory() as d:
            cfg = load_config(None, {"broker": {"host": b.host, "port": b.port, "fleet": fleet, "max_payload": 64 << 20},
                                     "service": {"state_dir": d, "export_final": False},
                                     "rounds": {"rounds": repeats, "min_agents": n_agents, "grace_s": 0,
                                                "deadline_s": 300}})
            svc = AggregatorService(cfg, served=served)
            th = threading.Thread(target=svc.run, kwargs={"max_seconds": 900}, daemon=True)
            th.start()
            rx = Receiver(t)
            seen_rounds = 0
            while len(results) < repeats and th.is_alive():
                m = obs.get(timeout=1)
                r = rx.feed(m.topic, m.payload, m.retain) if m else None
                if r is None:
                    continue
                if isinstance(r.message, GlobalModel) and r.message.round > seen_rounds:
                    seen_rounds = r.message.round
                    deadline = time.monotonic() + 30  # the publish call returns once the broker acknowledged
                    while (svc.quorum_to_publish or (0, 0))[0] < seen_rounds and time.monotonic() < deadline:
                        time.sleep(0.001)
                    results.append(svc.quorum_to_publish[1])  # measured inside the aggregator
                if not isinstance(r.message, RoundAnnouncement):
                    continue
                ann = r.message
                for i, c in enumerate(agents):
                    c.publish(t.update(f"a{i:03d}"), codec.encode(Update(ann.round, f"a{i:03d}", ann.model_id,
                                                                         uuid.uuid4().hex, 100, zeros, {}, 0.0)),
                              wait=False)
            svc.stop()
            th.join(60)
        for c in agents + [obs]:
            c.close()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agent", help=argparse.SUPPRESS)
    ap.add_argument("--flower-client", help=argparse.SUPPRESS)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--agents", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--skip-100", action="store_true")
    args = ap.parse_args()
    if args.agent:
        host, port, fleet, agent = args.agent.split(":")
        fedmq_agent(host, int(port), fleet, agent)
        return 0
    if args.flower_client:
        flower_client(args.flower_client, args.params)
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING)
    fm = run_fedmq(args.agents, args.params, args.rounds)
    fl = run_flower(args.agents, args.params, args.rounds)
    print(f"## bench/round — {now()}\n\nMachine: {machine()}\n")
    print(f"{args.agents} clients × {args.params:,} float32 params, identity training, {args.rounds} rounds "
          "(first round excluded: connection set-up).\n")
    print("| system | median round s | min | max |")
    print("|---|---:|---:|---:|")
    for name, xs in (("fedmq (Mosquitto, MQTT 5, QoS 1)", fm), ("Flower legacy gRPC (start_server)", fl)):
        print(f"| {name} | {statistics.median(xs):.3f} | {min(xs):.3f} | {max(xs):.3f} |")
    print(f"\nfedmq / Flower median round time: {statistics.median(fm) / statistics.median(fl):.2f}")
    if not args.skip_100:
        q = quorum_to_global(100, args.params, 5)
        print(f"\n100 agents × {args.params:,} params: quorum reached → new global model published (acknowledged "
              f"by the broker): median {statistics.median(q):.3f} s (min {min(q):.3f}, max {max(q):.3f}; "
              "target ≤ 0.5 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
