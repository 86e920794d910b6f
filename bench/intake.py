"""bench/intake: the aggregator's protocol-thread cost per update, without the network.

``AggregatorService._handle`` and ``_commit`` (topic parse, decode under the limits, schema, the round's checks, the
strategy's norm and fold, the fleet table, telemetry, the receipt's encoding, the round journal's record
and its fdatasync per group commit (JOURNAL_GROUP updates) with ``--journal fsync``, the default) over N valid encoded
updates of the sensor1d shapes, one open round asking all N agents; the client is a stub that only
counts publishes (so paho's own cost is not in the figure: see bench/fleet.py for the whole path).
Also the decode alone: msgpack's C unpacker without hooks (the floor), ``unpack_fast`` (the same
under fedmq's limits) and ``codec.decode`` (plus the schema).

``--mqtt``: the same updates through a real Mosquitto instead: they are queued in the broker for the
service's persistent session while it is away, then its own client (pumped on this thread, as in
the service) reconnects and the protocol path takes them in, receipts included (no load generators
on the cores: bench/fleet.py --scenarios drain is the whole system). ``--own-thread`` measures the
same with a paho network thread and the inbox between the threads (the design before the pumped client).

    .venv/bin/python bench/intake.py [--n 10000] [--repeat 3] [--mqtt [--own-thread]]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, now  # noqa: E402

SHAPES = [("w000", [8, 6, 16]), ("w001", [16]), ("w002", [3, 16, 16]), ("w003", [16]), ("w004", [16, 64]),
          ("w005", [64]), ("w006", [64, 6]), ("w007", [6])]


class CountingClient:
    """The service's client, reduced to counting what it would publish."""

    connected = True
    dropped = 0

    def __init__(self) -> None:
        self.published = 0

    def publish(self, topic, payload, qos=1, retain=False, wait=True, timeout=30.0, track=False):
        self.published += 1


def service(n: int, state_dir: str, journal: str = "fsync"):
    from fedmq.aggregator.config import load_config
    from fedmq.aggregator.service import AggregatorService
    from fedmq.broker.contract.messages import TrainConfig

    cfg = load_config(None, {"service": {"state_dir": state_dir, "journal": journal},
                             "rounds": {"min_agents": 1, "quorum": n, "deadline_s": 3600}})
    served = types.SimpleNamespace(model_id="a" * 64,
                                   initial_weights=lambda: {k: np.zeros(s, np.float32) for k, s in SHAPES})
    svc = AggregatorService(cfg, client=CountingClient(), served=served)
    svc._restore()
    svc.global_weights = served.initial_weights()
    agents = [f"agent-{i:05d}" for i in range(n)]
    ann = svc.controller.open(1, served.model_id, 0, svc.global_weights, agents, TrainConfig(), time.time(),
                              run=svc.run_id)
    svc._journal_begin(ann, agents, n, time.time())  # as _maybe_open does: accepted updates are journaled
    return svc, agents


def handle_batches(svc, items, batch: int = 0) -> None:
    """The service's step in batches: handle, then _commit (journal sync, acknowledgements, receipts)."""
    from fedmq.aggregator.service import JOURNAL_GROUP

    batch = batch or JOURNAL_GROUP
    for i, (tp, p) in enumerate(items, 1):
        svc._handle(tp, p, False)
        if i % batch == 0:
            svc._commit()
    svc._commit()


def payloads(svc, agents: list[str], seed: int = 0) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    for a in agents:
        tensors = [{"name": k, "enc": "raw", "dtype": "float32", "shape": s,
                    "data": rng.normal(size=s).astype("<f4").tobytes()} for k, s in SHAPES]
        out.append((svc.topics.update(a), msgpack.packb(
            {"v": 1, "kind": "update", "run": svc.run_id, "round": 1, "base_round": 0, "agent": a,
             "model_id": svc.served.model_id, "update_id": os.urandom(16).hex(), "num_samples": 100,
             "tensors": tensors, "metrics": {"loss": 1.0}, "created": time.time()}, use_bin_type=True)))
    return out


def mqtt_drain_us(n: int, own_thread: bool, journal: str = "fsync") -> tuple[float, float, int, int]:
    """Wall and CPU µs per update of the service's intake from a backlog queued in a real broker."""
    import paho.mqtt.client as mqtt

    from fedmq.broker.ops.launcher import LocalBroker
    from fedmq.broker.transport.client import MqttClient

    with LocalBroker(fleet_size=n) as b, tempfile.TemporaryDirectory() as d:
        svc, agents = service(n, d, journal)
        sc = svc.cfg.service  # [service] read_batch / rcvbuf_bytes, as the service's own client has them
        mc = svc.cfg.broker.mqtt("aggregator", resume_session=True, read_batch=sc.read_batch, rcvbuf=sc.rcvbuf_bytes,
                                 manual_ack=True)
        mc.host, mc.port, mc.clean_start, mc.session_expiry = b.host, b.port, mqtt.MQTT_CLEAN_START_FIRST_ONLY, 600
        first = MqttClient(mc, own_thread=own_thread)
        first.connect()
        first.subscribe(svc.topics.all_updates(), qos=1)
        first.close()  # the session (and its subscription) stays: updates are queued for it
        pub = MqttClient(type(mc)(b.host, b.port, client_id="bench-pub"))
        pub.connect()
        infos = [pub.publish(t, p, qos=1, wait=False).info for t, p in payloads(svc, agents)]
        for i in infos:
            i.wait_for_publish(60)
        pub.close()
        mc.clean_start = False
        svc.client = MqttClient(mc, on_message=svc._admit, own_thread=own_thread)
        svc._admits = True
        svc.client.subscribe(svc.topics.all_updates(), qos=1)
        r = svc.controller.current
        t0, c0 = time.perf_counter(), time.process_time()
        svc.client.start()
        while len(r.received) < n:  # AggregatorService.step's loop
            m = svc.client.get(timeout=0)
            if m is None:  # nothing readable: answer what was handled (the broker's window may be smaller
                svc._commit()  # than a group), then wait
                m = svc.client.get(timeout=10)
            if m is None:
                break
            svc._handle(m.topic, m.payload, m.retain)
            svc._handled(m)
        svc._commit()
        t1, c1 = time.perf_counter(), time.process_time()
        got = len(r.received)
        svc.client.close()
        return (t1 - t0) / max(got, 1) * 1e6, (c1 - c0) / max(got, 1) * 1e6, got, svc.client.dropped


def per_call_us(fn, items) -> float:
    t0 = time.perf_counter()
    for x in items:
        fn(x)
    return (time.perf_counter() - t0) / len(items) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="updates (= agents asked) per repeat")
    ap.add_argument("--repeat", type=int, default=3, help="repeats; the table shows the best")
    ap.add_argument("--mqtt", action="store_true", help="through a real broker, from a queued backlog")
    ap.add_argument("--own-thread", action="store_true", help="--mqtt with paho's network thread and the inbox")
    ap.add_argument("--journal", choices=("fsync", "write", "off"), default="fsync",
                    help="[service] journal (default fsync, the product's)")
    args = ap.parse_args(argv)
    if args.mqtt:
        runs = [mqtt_drain_us(args.n, args.own_thread, args.journal) for _ in range(args.repeat)]
        wall, cpu, got, dropped = min(runs)
        print(f"## bench/intake --mqtt{' --own-thread' if args.own_thread else ''} --journal {args.journal} — {now()}"
              f"\n\nMachine: {machine()}\n")
        print(f"{args.n:,} updates queued in Mosquitto, then taken in; best of {args.repeat} (wall µs per update: "
              f"{', '.join(f'{r[0]:.0f}' for r in runs)}). Accepted {got:,}, inbox drops {dropped}.\n")
        print(f"| client | wall µs per update | updates/s | CPU µs per update |\n|---|---:|---:|---:|\n"
              f"| {'own thread' if args.own_thread else 'pumped'} | {wall:.1f} | {1e6 / wall:,.0f} | {cpu:.1f} |\n")
        return 0 if got == args.n and not dropped else 1
    from fedmq.broker.contract import codec
    from fedmq.broker.contract.msgview import ReadLimits, unpack_fast

    best: dict[str, float] = {}
    accepted = receipts = 0
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as d:
            svc, agents = service(args.n, d, args.journal)
            items = payloads(svc, agents)
            raw = [p for _, p in items]
            lim = ReadLimits()
            figures = {
                "msgpack.unpackb (no limits, no hooks)": per_call_us(msgpack.unpackb, raw),
                "unpack_fast (fedmq's limits)": per_call_us(lambda p: unpack_fast(p, lim), raw),
                "codec.decode (+ schema, tensor views)": per_call_us(codec.decode, raw),
                "AggregatorService._handle + _commit (whole protocol path)": per_call_us(
                    lambda b: handle_batches(svc, b), [items]) / len(items),
            }
            accepted, receipts = len(svc.controller.current.received), svc.client.published
            for k, v in figures.items():
                best[k] = min(best.get(k, float("inf")), v)
    print(f"## bench/intake --journal {args.journal} — {now()}\n\nMachine: {machine()}\n")
    print(f"{args.n:,} valid updates ({len(raw[0]):,} bytes each, sensor1d shapes), one open round; best of "
          f"{args.repeat}. Accepted {accepted:,}, receipts {receipts:,}.\n")
    print("| step | µs per update | updates/s |")
    print("|---|---:|---:|")
    for k, v in best.items():
        print(f"| {k} | {v:.1f} | {1e6 / v:,.0f} |")
    print()
    return 0 if accepted == args.n and receipts == args.n else 1


if __name__ == "__main__":
    sys.exit(main())
