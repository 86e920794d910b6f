"""Fleet-scale benchmark (issue 14 point 6): thousands of synthetic agents, one aggregator, one Mosquitto.

Real components: Mosquitto rendered from the project's own config by ``LocalBroker`` (plain listener,
or the config ``fedmq-broker provision`` renders: TLS + passwords + ACL), the real aggregator as its
own process (tests/fleet.py writes its config and spawns it), and N synthetic agents in a few
processes (bench/synth_agents.py: plain paho + msgpack, written from docs/protocol.md). Every
agent sends a *known delta* (a seeded basis times a per-(agent, round) coefficient, with a seeded
sample count), so the global the aggregator must publish is computed here independently (FedAvg:
global + server lr 1 × Σ n_i d_i / Σ n_i) and compared with the one it publishes.

Scenarios, in one run per (N, mode): ``first`` (the first round), ``aggregator_restart`` (SIGKILL
the aggregator while the next round's uploads are arriving, start it again on the same state
directory: it must see all N agents online and aggregate a round with all of them), and
``broker_restart`` (SIGKILL Mosquitto during a round, start it again on the same port: every agent
reconnects and republishes its status, the aggregator republishes its state). Rounds use
``min_agents = N`` and a quorum of N, so a round aggregates only if every asked update counted.

Recorded per scenario (the round aggregated after the event): online as the aggregator sees it
(``fedmq_connected_agents``), asked, sent, PUBACKed, accepted (participants.jsonl / history),
rejected by reason (the history row), lost (PUBACKed by the broker, neither accepted nor rejected),
receipts (when the aggregator publishes them), last update PUBACK → global seen, updates/s, peak
RSS and CPU of the aggregator and the broker, and downlink/uplink application bytes of the agents
in the round (topic + payload of every PUBLISH; a real agent also downloads the global of
``base_round`` for each round it trains: ``global_bytes`` per asked agent).

    .venv/bin/python bench/fleet.py --n 1000 3000 10000 --modes plain chunked [--secure 1000] [--json out.json]

Intake capacity: ``--scenarios drain`` (the aggregator is stopped while the broker takes every update, then
resumed: the rate it takes in a ready backlog, without the generators competing for the cores) and ``--pin``
(the aggregator alone on one core, everything else on the others).
"""

from __future__ import annotations

import argparse
import http.client
import inspect
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # fleet: tests/fleet.py (this file is imported as bench_fleet by tests)
sys.path.append(str(ROOT / "bench"))  # synth_agents

import synth_agents as synth  # noqa: E402
from fleet import Fleet  # noqa: E402  (tests/fleet.py: aggregator config + process spawning)

from fedmq.broker.ops.launcher import LocalBroker, SecureFiles, free_port  # noqa: E402

log = logging.getLogger(__name__)

SCENARIOS = ("first", "aggregator_restart", "broker_restart")
#: not in the default run, and first when given: ``drain`` stops the aggregator (SIGSTOP) the moment the
#: observer sees the first round announced, lets every agent's update reach the broker (PUBACKed: queued
#: there for the aggregator), then resumes it: its intake is then the rate it takes a ready backlog in,
#: whatever the load generators can produce
EXTRA_SCENARIOS = ("drain",)
CHUNKED_PACKET = 4096  # broker max_packet_size in the chunked mode: every update (~13 KB) is ~4 chunks


@dataclass
class BenchSpec:
    n: int
    workdir: Path
    chunked: bool = False
    secure: bool = False
    per_proc: int = 2500  # synthetic agents per generator process
    seed: int = 1
    receipts: bool | None = None  # None: on when the product has receipt topics
    deadline_s: float = 120.0
    grace_s: float = 2.0
    phase_timeout_s: float = 240.0
    model_cache: Path | None = None
    scenarios: tuple[str, ...] = SCENARIOS
    upload_window_s: float = 0.0
    #: [rounds] upload_rate: None = the product's default (uploads paced to it, sized from the round); 0 = one burst
    upload_rate: float | None = None
    plots: bool = True  # [service] plots (the product's default)
    #: give the aggregator one core of its own (the others: broker, generators, this process), so that
    #: its intake is measured, not its share of a machine the load generators saturate
    pin: bool = False


def pin(pid: int, cpus: set[int]) -> None:
    """CPU affinity of every thread of ``pid`` (threads it starts later inherit it)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), cpus)
    except (OSError, ValueError):
        pass  # it exited


def pin_sets() -> tuple[set[int], set[int]]:
    """(the aggregator's core, everyone else's): the last core alone, the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    return {cpus[-1]}, set(cpus[:-1]) or {cpus[-1]}


@dataclass
class RoundRecord:
    scenario: str
    round: int = 0
    outcome: str = "none"  # aggregated / abandoned / ... / "none" (no round closed in time)
    error: str = ""
    online_seen: int = 0  # fedmq_connected_agents when the round opened (max over the round)
    statuses_acked: int = 0  # agents whose current status publish the broker PUBACKed
    asked: int = 0
    sent: int = 0
    resent: int = 0
    acked: int = 0
    accepted: int = 0
    rejected: dict = field(default_factory=dict)
    acked_not_accepted: int = 0
    lost: int = 0
    receipts_accepted: int = 0
    receipts_rejected: dict = field(default_factory=dict)
    global_ok: bool | None = None
    global_max_err: float = 0.0
    control_global_err: float = 0.0  # the same check against the participants minus one
    global_tol: float = 0.0
    last_update_to_global_s: float | None = None
    first_update_to_global_s: float | None = None
    updates_per_s: float | None = None
    intake_per_s: float | None = None  # from the aggregator's accepted counter (0.1 s samples)
    agg_peak_rss_mb: float = 0.0
    agg_cpu_pct: float = 0.0
    broker_peak_rss_mb: float = 0.0
    broker_cpu_pct: float = 0.0
    downlink_bytes: int = 0
    uplink_bytes: int = 0
    global_bytes: int = 0
    round_s: float | None = None  # announcement seen -> global seen
    broker_dropped: int = 0  # fedmq_broker_dropped_messages ($SYS) growth over the scenario
    timer_resent: int = 0  # re-sends because no receipt came within resend_s
    no_receipt_ids: list = field(default_factory=list)  # the first 20
    no_receipt: int = 0  # with receipts: agents whose update got a PUBACK and never a receipt
    #: ... of those, the ones whose update did not count (a loss the agent was not told of: must be 0). One
    #: that counted had its receipt lost (QoS 0, e.g. in a broker crash) and the round closed before its re-send
    no_receipt_uncounted: int = 0
    reconnect_s: float | None = None  # broker restart: until every agent's status is PUBACKed again
    seen_after_restart_s: float | None = None  # until the aggregator reports N online again
    stopped_s: float | None = None  # drain: how long the aggregator was stopped while the backlog formed
    window_s: float | None = None  # the upload window the round's announcement carried
    agg_rss_at_open_mb: float | None = None  # the aggregator's RSS when the round was announced


def lost_count(acked: set[str], participants: list[str], rejected: int) -> int:
    """Updates the broker PUBACKed that the aggregator neither accepted nor counted as rejected."""
    return max(0, len(acked - set(participants)) - rejected)


def global_error(got: list[np.ndarray], base: list[np.ndarray], mean: list[np.ndarray]) -> tuple[float, float]:
    """(max |(got - base) - mean|, tolerance): FedAvg with server lr 1 moves base by the weighted mean delta.

    Tolerance: the project's (the streaming float32 WeightedMean agrees with np.average to rtol 1e-4,
    aggregator/strategies/reducers.py) of the largest mean delta, plus a few float32 ulps of the weights
    (the published global is float32). One agent's spike (synth_agents.SPIKE * n_i / sum n) is above it
    for the heaviest agent up to a few hundred thousand agents.
    """
    err = max(float(np.max(np.abs((x - x0) - m))) for x, x0, m in zip(got, base, mean))
    scale = max(float(np.max(np.abs(m))) for m in mean)
    gmax = max(float(np.max(np.abs(x))) for x in got)
    return err, 1e-4 * scale + 4 * float(np.finfo(np.float32).eps) * gmax


def parse_prom(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        k, _, v = line.rpartition(" ")
        try:
            out[k] = float(v)
        except ValueError:
            pass
    return out


class Observer:
    """Watches global (+ chunks), round and service, as an agent that never publishes a status would."""

    def __init__(self, host: str, port: int, base: str, user: str | None, password: str | None,
                 ca: str | None) -> None:
        self.base = base
        self.globals: list[tuple[float, dict]] = []  # (arrival time, decoded global)
        self.rounds: list[tuple[float, dict]] = []
        self.blob = synth.RetainedBlob()
        self.lock = threading.Lock()
        #: drain: the aggregator's pid, stopped (SIGSTOP) at the first round announcement seen
        self.stop_on_announce: int | None = None
        self.stopped_at: float | None = None
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user or f"obs-{uuid.uuid4().hex[:8]}",
                        protocol=mqtt.MQTTv5)
        if user:
            c.username_pw_set(user, password)
        if ca:
            c.tls_set(ca_certs=ca)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.reconnect_delay_set(0.2, 1)
        self.c = c
        c.connect_async(host, port, 60)
        c.loop_start()

    def _on_connect(self, c, u, f, reason, p) -> None:
        if not reason.is_failure:
            c.subscribe(f"{self.base}/global", 1)
            c.subscribe([(f"{self.base}/global/chunk/+", 1), (f"{self.base}/round", 1)])

    def _on_message(self, c, u, msg) -> None:
        t = msg.topic[len(self.base) + 1:]
        m = synth.unpack(msg.payload)
        if m is not None and m.get("kind") == "signed":
            m = synth.unwrap(m)
        if m is None:
            return
        now = time.time()
        if t == "round" and m.get("kind") == "round":
            pid = self.stop_on_announce
            if pid is not None and not msg.retain:
                self.stop_on_announce = None
                os.kill(pid, signal.SIGSTOP)
                self.stopped_at = time.monotonic()
            with self.lock:
                self.rounds.append((now, m))
        elif t == "global":
            if m.get("kind") == "chunked":
                self.blob.on_pointer(m)
            elif m.get("kind") == "global":
                self._add_global(now, m, len(msg.payload))
        elif t.startswith("global/chunk/") and m.get("kind") == "chunk":
            blob = self.blob.on_chunk(m)
            g = synth.unwrap(synth.unpack(blob)) if blob else None
            if g is not None and g.get("kind") == "global":
                self._add_global(now, g, len(blob))

    def _add_global(self, now: float, m: dict, size: int) -> None:
        tensors = [np.frombuffer(t["data"], "<f4").reshape(t["shape"]).astype(np.float64) for t in m["tensors"]]
        with self.lock:
            self.globals.append((now, {"run": m["run"], "round": m["round"], "tensors": tensors, "bytes": size}))

    def global_of(self, round_no: int, run: str | None = None) -> tuple[float, dict] | None:
        with self.lock:
            for t, g in self.globals:
                if g["round"] == round_no and (run is None or g["run"] == run):
                    return t, g
        return None

    def latest_global(self) -> tuple[float, dict] | None:
        with self.lock:
            return max(self.globals, key=lambda x: x[1]["round"]) if self.globals else None

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Bench:
    def __init__(self, spec: BenchSpec) -> None:
        self.spec = spec
        self.wd = spec.workdir
        self.wd.mkdir(parents=True, exist_ok=True)
        self.fleet_name = "f" + uuid.uuid4().hex[:8]
        self.base = f"fedmq/{self.fleet_name}"
        self.agents = [f"syn-{i:05d}" for i in range(spec.n)]
        self.gens: list[subprocess.Popen] = []
        self.gen_stats_paths: list[Path] = []
        self.samples: list[dict] = []  # poller samples
        self._stop = threading.Event()
        self.prom_port = free_port()
        self.passwords: dict[str, str] = {}
        self.ca: str | None = None
        if spec.receipts is None:
            from fedmq.broker.contract.topics import Topics
            spec.receipts = hasattr(Topics, "receipt")

    # -- setup ---------------------------------------------------------------------------------
    def start_broker(self) -> None:
        kw: dict[str, Any] = {"workdir": str(self.wd / "broker"), "max_packet_size": CHUNKED_PACKET if
                              self.spec.chunked else 0}
        (self.wd / "broker").mkdir(exist_ok=True)
        if "fleet_size" in inspect.signature(LocalBroker).parameters:  # per-client limits as provision sizes them
            kw["fleet_size"] = self.spec.n
        if self.spec.secure:
            from fedmq.broker.ops.provision import ProvisionSpec, provision
            t0 = time.monotonic()
            prov = provision(ProvisionSpec(self.fleet_name, self.agents + ["observer"], self.wd / "prov",
                                           host="localhost"))
            self.provision_s = time.monotonic() - t0
            b = prov.broker_dir
            files = SecureFiles(str(b / "passwd"), str(b / "acl"), str(b / "ca.crt"), str(b / "server.crt"),
                                str(b / "server.key"))
            self.passwords, self.ca = prov.passwords, str(prov.ca_file)
            self.broker = LocalBroker(files, **kw)
        else:
            self.broker = LocalBroker(**kw)
        self.broker.start(timeout=60)
        self._pin_others(self.broker.proc.pid)

    def _pin_others(self, pid: int) -> None:
        if self.spec.pin:
            pin(pid, pin_sets()[1])

    def broker_table(self) -> dict:
        t = {"host": "localhost" if self.spec.secure else "127.0.0.1", "port": self.broker.port,
             "fleet": self.fleet_name, "prefix": "fedmq", "protocol": "5"}
        if self.spec.secure:
            t.update(username="aggregator", password=self.passwords["aggregator"], ca_file=self.ca)
        return t

    def start_aggregator(self) -> None:
        s = self.spec
        self.fleet = getattr(self, "fleet", None) or Fleet(self.wd, self.broker_table(), model_cache=s.model_cache)
        rounds = {"rounds": 0, "min_agents": s.n, "quorum": s.n, "deadline_s": s.deadline_s, "grace_s": s.grace_s}
        if s.upload_window_s:
            rounds["upload_window_s"] = s.upload_window_s
        if s.upload_rate is not None:
            rounds["upload_rate"] = s.upload_rate
        self.agg = self.fleet.start_aggregator(service={"prometheus_port": self.prom_port, "plots": s.plots}, rounds=rounds)
        if s.pin:
            pin(self.agg.popen.pid, pin_sets()[0])

    def start_generators(self) -> None:
        s = self.spec
        procs = max(1, math.ceil(s.n / s.per_proc))
        if s.n >= 1000:
            procs = max(procs, 2)
        per = math.ceil(s.n / procs)
        for k in range(procs):
            ids = self.agents[k * per:(k + 1) * per]
            stats = self.wd / f"gen{k}.json"
            spec = synth.Spec(host="localhost" if s.secure else "127.0.0.1", port=self.broker.port, base=self.base,
                              agents=ids, stats_path=str(stats), seed=s.seed,
                              passwords={a: self.passwords[a] for a in ids} if s.secure else {},
                              ca_file=self.ca, receipts=bool(s.receipts))
            p = self.wd / f"gen{k}.spec.json"
            p.write_text(json.dumps(asdict(spec)))
            logf = open(self.wd / f"gen{k}.log", "ab")
            self.gens.append(subprocess.Popen([sys.executable, str(ROOT / "bench" / "synth_agents.py"), "--spec",
                                               str(p)], stdout=logf, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            self._pin_others(self.gens[-1].pid)
            self.gen_stats_paths.append(stats)

    def start_observer(self) -> None:
        user = "observer" if self.spec.secure else None
        self.obs = Observer("localhost" if self.spec.secure else "127.0.0.1", self.broker.port, self.base, user,
                            self.passwords.get("observer"), self.ca)

    # -- sampling ------------------------------------------------------------------------------
    def gen_stats(self) -> list[dict]:
        out = []
        for p in self.gen_stats_paths:
            try:
                out.append(json.loads(p.read_text()))
            except (FileNotFoundError, json.JSONDecodeError):
                pass
        return out

    def prom(self) -> dict[str, float]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.prom_port}/metrics", timeout=2) as r:
                return parse_prom(r.read().decode())
        except (OSError, http.client.HTTPException, ValueError):  # e.g. IncompleteRead: killed mid-response
            return {}

    def _proc_sample(self, pid: int | None) -> tuple[float, float]:
        """(RSS bytes, CPU seconds) of a live process, or (0, 0)."""
        if pid is None:
            return 0.0, 0.0
        try:
            p = psutil.Process(pid)
            t = p.cpu_times()
            return float(p.memory_info().rss), t.user + t.system
        except psutil.Error:
            return 0.0, 0.0

    def poll(self) -> None:
        while not self._stop.is_set():
            try:
                self._poll_once()
            except Exception:  # noqa: BLE001 - the sampler must outlive any one failed sample
                log.exception("sampling failed (continuing)")
            self._stop.wait(0.1)

    def _poll_once(self) -> None:
        """One sample: the aggregator's metrics, RSS and CPU of the aggregator and the broker."""
        agg_pid = self.agg.popen.pid if getattr(self, "agg", None) and self.agg.alive() else None
        bp = self.broker.proc.pid if self.broker.proc is not None and self.broker.proc.poll() is None else None
        m = self.prom() if agg_pid else {}
        ar, ac = self._proc_sample(agg_pid)
        br, bc = self._proc_sample(bp)
        self.samples.append({"t": time.time(), "agg_pid": agg_pid, "agg_rss": ar, "agg_cpu": ac, "broker_pid": bp,
                             "broker_rss": br, "broker_cpu": bc,
                             "online": m.get("fedmq_connected_agents"),
                             "accepted": m.get("fedmq_updates_accepted_total"),
                             "broker_dropped": m.get("fedmq_broker_dropped_messages"),
                             "inbox_dropped": m.get("fedmq_inbox_dropped")})

    # -- waiting -------------------------------------------------------------------------------
    def wait(self, pred, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            for g in self.gens:
                if g.poll() is not None:
                    raise RuntimeError(f"generator {g.pid} exited with {g.returncode}")
            time.sleep(0.1)

    def statuses_acked(self) -> int:
        return sum(s.get("status_acked", 0) for s in self.gen_stats())

    def fresh_stats(self, after: float, timeout: float = 30.0) -> list[dict]:
        """Every generator's stats, written after ``after`` (unix time)."""
        def ok():
            st = self.gen_stats()
            return st if len(st) == len(self.gens) and all(x.get("ts", 0) > after for x in st) else None
        return self.wait(ok, timeout, "fresh generator stats")

    def online(self) -> float:
        m = self.prom()
        return m.get("fedmq_connected_agents", -1)

    def history(self) -> list[dict]:
        p = self.fleet.tmp / "aggregator-state" / "history.jsonl"
        rows = []
        if p.exists():
            for line in p.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return rows

    def participants(self, run: str, round_no: int, row: dict) -> list[str]:
        p = self.fleet.tmp / "aggregator-state" / "participants.jsonl"
        found = None
        if p.exists():
            for line in p.read_text().splitlines():
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if d.get("round") == round_no and d.get("run") == run:
                    found = d["participants"]
        return found if found is not None else list(row.get("participants_list", []))

    def closed_after(self, after_round: int, t0: float) -> dict | None:
        """The first history row of a round > after_round (any outcome) written after t0."""
        for r in self.history():
            if r["round"] > after_round and r.get("ts", 0) >= t0 - 1:
                return r
        return None

    def aggregated_after(self, after_round: int, t0: float = 0.0) -> dict | None:
        """The first aggregated round > after_round whose history row was written after t0."""
        for r in self.history():
            if r["round"] > after_round and r["outcome"] == "aggregated" and r.get("ts", 0) >= t0:
                return r
        return None

    def announced_after(self, after_round: int) -> str | None:
        """The "run/round" key of the last announced round > after_round, or None."""
        with self.obs.lock:
            anns = [m for _, m in self.obs.rounds if m.get("round", 0) > after_round]
        return f"{anns[-1]['run']}/{anns[-1]['round']}" if anns else None

    def acked(self, key: str) -> int:
        """Updates of round ``key`` ("run/round") the broker PUBACKed, over every generator."""
        return sum(st["rounds"].get(key, {}).get("acked", 0) for st in self.gen_stats())

    def uploads_under_way(self, after_round: int) -> bool:
        """A round > after_round is announced and a quarter of the fleet's uploads were PUBACKed."""
        key = self.announced_after(after_round)
        return key is not None and self.acked(key) >= self.spec.n // 4

    # -- one scenario's record -----------------------------------------------------------------
    def record(self, scenario: str, row: dict | None, t_start: float, error: str = "") -> RoundRecord:
        rec = RoundRecord(scenario, error=error)
        try:
            stats = self.fresh_stats(time.time() + 0.3)
        except (TimeoutError, RuntimeError):
            stats = self.gen_stats()
        rec.statuses_acked = sum(s.get("status_acked", 0) for s in stats)
        win = [s for s in self.samples if s["t"] >= t_start]
        onl = [s["online"] for s in win if s["online"] is not None]
        rec.online_seen = int(max(onl)) if onl else 0
        if row is None:
            return rec
        run, r = row["run"], row["round"]
        rec.round, rec.outcome = r, row["outcome"]
        key = f"{run}/{r}"
        rs = [s["rounds"].get(key, {}) for s in stats]
        rec.asked = sum(x.get("asked", 0) for x in rs)
        rec.sent = sum(x.get("sent", 0) for x in rs)
        rec.resent = sum(x.get("resent", 0) for x in rs)
        rec.acked = sum(x.get("acked", 0) for x in rs)
        rec.receipts_accepted = sum(x.get("receipt_accepted", 0) for x in rs)
        for x in rs:
            for k, v in x.get("receipt_rejected", {}).items():
                rec.receipts_rejected[k] = rec.receipts_rejected.get(k, 0) + v
        rec.rejected = dict(row.get("rejected", {}))
        parts = self.participants(run, r, row)
        rec.accepted = len(parts)
        acked_ids = set()
        for s in stats:
            acked_ids.update(s.get("acked_ids", {}).get(key, []))
        rec.acked_not_accepted = len(acked_ids - set(parts))
        rec.lost = lost_count(acked_ids, parts, int(sum(rec.rejected.values())))
        rec.downlink_bytes = sum(x.get("bytes_in", 0) for x in rs)
        rec.uplink_bytes = sum(x.get("bytes_out", 0) for x in rs)
        if self.spec.receipts:  # PUBACKed by the broker, no receipt from the aggregator at the end of the round
            rec.no_receipt = max(0, rec.acked - rec.receipts_accepted - int(sum(rec.receipts_rejected.values())))
            waiting = {i for st in stats for i in st.get("no_receipt_ids", {}).get(key, [])}
            rec.no_receipt_ids = sorted(waiting)[:20]
            rec.no_receipt_uncounted = len(waiting - set(parts))
        # the global: aggregator's vs expected (fedavg, server lr 1) from the base round's global
        got = self.wait_global(run, r)
        base = self._base_global(run, r)
        if got is not None and base is not None and parts:
            t_glob, g = got
            b = synth.basis(self.spec.seed, self.weights())
            mean = synth.expected_mean_delta(self.spec.seed, r, parts, b)
            rec.global_max_err, rec.global_tol = global_error(g["tensors"], base["tensors"], mean)
            rec.global_ok = rec.global_max_err <= rec.global_tol
            if len(parts) > 1:  # positive control: one participant fewer (the heaviest) must fail the same check
                heavy = max(parts, key=lambda a: synth.known_coef(self.spec.seed, a, r)[1])
                fewer = [a for a in parts if a != heavy]
                rec.control_global_err = global_error(g["tensors"], base["tensors"],
                                                      synth.expected_mean_delta(self.spec.seed, r, fewer, b))[0]
            rec.global_bytes = g["bytes"]
            last = max((x.get("last_acked", 0.0) for x in rs), default=0.0)
            first = min((x.get("first_sent", 0.0) for x in rs if x.get("first_sent")), default=0.0)
            if last:
                rec.last_update_to_global_s = t_glob - last
            if first:
                rec.first_update_to_global_s = t_glob - first
                rec.updates_per_s = rec.accepted / max(1e-6, t_glob - first)
            acc = [(s["t"], s["accepted"]) for s in win if s["accepted"] is not None and s["t"] <= t_glob]
            if acc:
                a_end = acc[-1][1]
                a_start = next((a for t, a in acc if a < a_end), a_end)
                rising = [t for t, a in acc if a_start < a]
                if len(rising) >= 2 and a_end - a_start > 0:
                    t_a = next(t for t, a in acc if a > a_start)
                    t_b = next(t for t, a in acc if a >= a_end)
                    if t_b > t_a:
                        rec.intake_per_s = (a_end - a_start) / (t_b - t_a)
        # resources: peak RSS since the scenario began, CPU from the round's announcement to its global
        drops = [s["broker_dropped"] for s in win if s["broker_dropped"] is not None]
        rec.broker_dropped = int(max(drops) - min(drops)) if drops else 0
        rec.timer_resent = sum(x.get("timer_resent", 0) for x in rs)
        rec.agg_peak_rss_mb = max((s["agg_rss"] for s in win), default=0) / 2**20
        rec.broker_peak_rss_mb = max((s["broker_rss"] for s in win), default=0) / 2**20
        with self.obs.lock:
            t_open = min((t for t, m in self.obs.rounds if m.get("run") == run and m.get("round") == r), default=None)
            anns = [m for _, m in self.obs.rounds if m.get("run") == run and m.get("round") == r]
        cfg = anns[0].get("config") if anns else None
        if isinstance(cfg, dict):
            rec.window_s = cfg.get("upload_window_s", 0.0)
        if t_open is not None:  # what the fleet's statuses and the previous rounds left, before this round's uploads
            before = [s["agg_rss"] for s in win if s["t"] <= t_open and s["agg_rss"]]
            rec.agg_rss_at_open_mb = before[-1] / 2**20 if before else None
        if got is not None and t_open is not None:
            cw = [s for s in self.samples if t_open - 0.15 <= s["t"] <= got[0] + 0.15]
            rec.agg_cpu_pct = self._cpu_pct(cw, "agg")
            rec.broker_cpu_pct = self._cpu_pct(cw, "broker")
            rec.round_s = got[0] - t_open
        return rec

    def _cpu_pct(self, win: list[dict], who: str) -> float:
        """CPU seconds per wall second of the process over the window (last pid seen in it)."""
        w = [s for s in win if s[f"{who}_pid"] is not None]
        if len(w) < 2:
            return 0.0
        pid = w[-1][f"{who}_pid"]
        w = [s for s in w if s[f"{who}_pid"] == pid]
        if len(w) < 2 or w[-1]["t"] <= w[0]["t"]:
            return 0.0
        return 100 * (w[-1][f"{who}_cpu"] - w[0][f"{who}_cpu"]) / (w[-1]["t"] - w[0]["t"])

    def weights(self) -> list[tuple[str, list[int]]]:
        for s in self.gen_stats():
            if s.get("weights"):
                return [(n, list(sh)) for n, sh in s["weights"]]
        raise RuntimeError("no generator has the model manifest")

    def _base_global(self, run: str, round_no: int) -> dict | None:
        with self.obs.lock:
            older = [g for _, g in self.obs.globals if g["run"] == run and g["round"] < round_no]
        return max(older, key=lambda g: g["round"]) if older else None

    def wait_global(self, run: str, round_no: int, timeout: float = 30.0):
        try:
            return self.wait(lambda: self.obs.global_of(round_no, run), timeout, f"global {round_no}")
        except TimeoutError:
            return None

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> dict:
        s = self.spec
        out: dict[str, Any] = {"n": s.n, "chunked": s.chunked, "secure": s.secure, "receipts": s.receipts,
                               "upload_window_s": s.upload_window_s, "upload_rate": s.upload_rate, "plots": s.plots,
                               "records": [], "errors": []}
        poller = threading.Thread(target=self.poll, daemon=True)
        try:
            self.start_broker()
            out["provision_s"] = getattr(self, "provision_s", None)
            self.start_observer()
            self.start_aggregator()
            poller.start()
            m = self.wait(lambda: self.prom().get("fedmq_connected_agents") is not None and self.prom(), 120,
                          "the aggregator's /metrics")
            out["online_before_agents"] = m["fedmq_connected_agents"]
            t0 = time.monotonic()
            if s.scenarios and s.scenarios[0] == "drain":
                self.obs.stop_on_announce = self.agg.popen.pid
            self.start_generators()
            self.wait(lambda: self.statuses_acked() >= s.n, s.phase_timeout_s, f"{s.n} statuses PUBACKed")
            out["connect_s"] = time.monotonic() - t0
            last_round = 0
            for sc in s.scenarios:
                rec = self.scenario(sc, last_round)
                out["records"].append(asdict(rec))
                log.info("%s", json.dumps(asdict(rec)))
                if rec.round:
                    last_round = rec.round
                if rec.outcome != "aggregated":
                    continue
        except Exception as e:  # noqa: BLE001 - a failure is a finding: record it, stop cleanly
            log.exception("bench failed")
            out["errors"].append(f"{type(e).__name__}: {e}")
        finally:
            out["gen_rss_mb"] = [st.get("rss_kb", 0) / 1024 for st in self.gen_stats()]
            out["gen_stats"] = [{k: v for k, v in st.items() if k not in ("acked_ids", "rounds", "weights")}
                                for st in self.gen_stats()]
            self._stop.set()
            self.shutdown()
            out["agg_log_tail"] = self.fleet.procs[-1].text()[-3000:] if getattr(self, "fleet", None) and \
                self.fleet.procs else ""
            out["broker_log_drops"] = len(re.findall("dropped", self.broker.log())) if hasattr(self, "broker") else 0
        return out

    def scenario(self, name: str, last_round: int) -> RoundRecord:
        s = self.spec
        t_start = time.time()
        extra: dict[str, Any] = {}
        try:
            if name == "drain":  # first in the run: the observer stopped the aggregator at the announcement
                if last_round or s.scenarios[0] != "drain":
                    raise RuntimeError("drain must be the first scenario")
                self.wait(lambda: self.obs.stopped_at is not None, s.phase_timeout_s, "the stopped aggregator")
                try:
                    key = self.announced_after(last_round)
                    self.wait(lambda: self.acked(key) >= s.n, s.phase_timeout_s,
                              "every update PUBACKed while the aggregator is stopped")
                    extra["stopped_s"] = time.monotonic() - self.obs.stopped_at
                finally:
                    os.kill(self.agg.popen.pid, signal.SIGCONT)
                t_start = 0.0
            elif name != "first":
                # the next round is open and uploads are arriving: kill then
                self.wait(lambda: self.uploads_under_way(last_round), s.phase_timeout_s, "the next round's uploads")
                t_kill0 = time.time()  # the round under way is the one measured (it may close before all are seen)
                if name == "aggregator_restart":
                    self.agg.kill(signal.SIGKILL)
                    self.start_aggregator()
                    t_k = time.monotonic()
                    self.wait(lambda: self.online() >= s.n, s.phase_timeout_s, f"the restarted aggregator to see {s.n}")
                    extra["seen_after_restart_s"] = time.monotonic() - t_k
                elif name == "broker_restart":
                    self.broker.kill()
                    t_k, t_kill = time.monotonic(), time.time()
                    self.broker.start(timeout=60)
                    self._pin_others(self.broker.proc.pid)
                    self.wait(lambda: sum(x.get("status_acked", 0) for x in self.fresh_stats(t_kill)) >= s.n,
                              s.phase_timeout_s, "every agent's status again")
                    extra["reconnect_s"] = time.monotonic() - t_k
                    self.wait(lambda: self.online() >= s.n, s.phase_timeout_s, f"the aggregator to see {s.n}")
                    extra["seen_after_restart_s"] = time.monotonic() - t_k
                t_start = t_kill0
            if name == "first":
                t_start = 0.0
            row = self.wait(lambda: self.aggregated_after(last_round, t_start) or
                            self._abandoned_after(last_round, t_start), s.deadline_s + s.phase_timeout_s,
                            "a closed round")
            if row.get("outcome") != "aggregated":
                row2 = None
                try:
                    row2 = self.wait(lambda: self.aggregated_after(row["round"], t_start), s.deadline_s + 60,
                                     "an aggregated round after the abandoned one")
                except TimeoutError:
                    pass
                rec0 = self.record(name, row, t_start, "abandoned round")
                if row2 is None:
                    return rec0
                row = row2
            self.wait_global(row["run"], row["round"])
            rec = self.record(name, row, t_start)
        except (TimeoutError, RuntimeError) as e:
            rec = self.record(name, self.closed_after(last_round, t_start), t_start, str(e))
        for k, v in extra.items():
            setattr(rec, k, v)
        return rec

    def _abandoned_after(self, last_round: int, t0: float) -> dict | None:
        r = self.closed_after(last_round, t0)
        return r if r is not None and r["outcome"] != "aggregated" else None

    def shutdown(self) -> None:
        for g in self.gens:
            if g.poll() is None:
                g.send_signal(signal.SIGTERM)
        for g in self.gens:
            try:
                g.wait(30)
            except subprocess.TimeoutExpired:
                g.kill()
        if getattr(self, "obs", None):
            self.obs.stop()
        if getattr(self, "fleet", None):
            self.fleet.stop_all()
        if hasattr(self, "broker"):
            self.broker.stop()


def export_model(cache: Path) -> Path:
    """The sensor1d artifact exported once (shared by aggregator processes, as tests/conftest.py does)."""
    from fedmq.aggregator.config import ModelSection
    from fedmq.aggregator.model_store import load_or_export

    cache.mkdir(parents=True, exist_ok=True)
    load_or_export(ModelSection(source="zoo:sensor1d", batch_size=16, verify_steps=5), cache)
    return cache


COLS = ("scenario", "round", "outcome", "online_seen", "asked", "sent", "acked", "accepted", "rejected", "lost",
        "no_receipt", "broker_dropped", "timer_resent", "global_ok", "round_s", "window_s", "last_update_to_global_s", "updates_per_s", "intake_per_s", "agg_rss_at_open_mb", "agg_peak_rss_mb", "agg_cpu_pct",
        "broker_peak_rss_mb", "broker_cpu_pct", "downlink_bytes", "uplink_bytes", "error")


def table(results: list[dict]) -> str:
    lines = ["| N | mode | " + " | ".join(COLS) + " |", "|" + "---|" * (len(COLS) + 2)]
    for res in results:
        mode = ("chunked" if res["chunked"] else "plain") + ("+TLS/ACL" if res["secure"] else "") + \
            (f" window {res['upload_window_s']:g}s" if res.get("upload_window_s") else "") + \
            ("" if res.get("upload_rate") is None else
             " burst" if res["upload_rate"] == 0 else f" paced {res['upload_rate']:g}/s") + \
            ("" if res.get("plots", True) else " no plots")
        for r in res["records"]:
            cells = []
            for c in COLS:
                v = r[c]
                if isinstance(v, float):
                    v = f"{v:.3g}"
                elif isinstance(v, dict):
                    v = ", ".join(f"{k} {n}" for k, n in v.items()) or "0"
                cells.append(str(v).replace("|", "/")[:120])
            lines.append(f"| {res['n']} | {mode} | " + " | ".join(cells) + " |")
        for e in res["errors"]:
            lines.append(f"| {res['n']} | {mode} | error: {e[:200]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 3000, 10000])
    ap.add_argument("--modes", nargs="*", default=["plain", "chunked"], choices=["plain", "chunked"])
    ap.add_argument("--secure", type=int, nargs="*", default=[], help="also run these N with TLS + passwords + ACL")
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS + EXTRA_SCENARIOS)
    ap.add_argument("--deadline", type=float, default=120.0)
    ap.add_argument("--upload-window", type=float, default=0.0, help="[rounds] upload_window_s")
    ap.add_argument("--upload-rate", type=float, default=None,
                    help="[rounds] upload_rate (default: the product's, pacing sized from the round; 0 = one burst)")
    ap.add_argument("--no-plots", action="store_true", help="[service] plots = false")
    ap.add_argument("--workdir", default="/tmp/fedmq-fleet-bench")
    ap.add_argument("--json", default="")
    ap.add_argument("--pin", action="store_true", help="the aggregator on a core of its own (the last one); the broker, "
                    "the generators and this process on the others (intake capacity rather than a share of the machine)")
    args = ap.parse_args(argv)
    if "drain" in args.scenarios[1:]:
        ap.error("drain must be the first scenario (the aggregator is stopped at the first round's announcement)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    wd = Path(args.workdir)
    cache = export_model(wd / "model-cache")
    if args.pin:
        os.sched_setaffinity(0, pin_sets()[1])
    runs = [(n, m == "chunked", False) for n in args.n for m in args.modes] + [(n, False, True) for n in args.secure]
    results = []
    for n, chunked, secure in runs:
        d = wd / f"n{n}-{'chunked' if chunked else 'plain'}{'-secure' if secure else ''}-{uuid.uuid4().hex[:6]}"
        log.info("=== N=%d chunked=%s secure=%s (%s)", n, chunked, secure, d)
        res = Bench(BenchSpec(n, d, chunked=chunked, secure=secure, model_cache=cache, deadline_s=args.deadline,
                              scenarios=tuple(args.scenarios), upload_window_s=args.upload_window,
                              upload_rate=args.upload_rate, plots=not args.no_plots,
                              pin=args.pin)).run()
        results.append(res)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
