"""Chaos run (issue 13 point 7): SIGKILL the aggregator, the broker and agents at seeded random moments,
then check what must hold whatever the faults.

Real processes: a Mosquitto of its own, rendered from the project's config as shipped (LocalBroker's
defaults: persistence off, so a killed broker comes back empty and the aggregator republishes), one
aggregator process, N agent processes training the sensor1d model on small watch shards (tests/fleet.py
spawns them). A supervisor restarts whatever dies, as systemd's ``Restart=on-failure`` would; a process
that exits on its own is counted, not hidden. An observer (plain paho + the wire codec, reconnecting
within 0.2 s) records every global model, round announcement and metrics message it sees, retained or
not, and counts the updates on the bus (to aim a kill at the moment a round reaches its quorum).

Faults (``FAULTS``, drawn with ``random.Random(seed)``, exponential gaps): aggregator SIGKILL (at a
random moment; armed to fire 0-50 ms after the second update of a round, i.e. around aggregation and
checkpoint; armed to fire 0-200 ms after a new global, between global and metrics), aggregator SIGTERM,
broker SIGKILL with 0-4 s down and a longer 5-15 s outage, agent SIGKILL and SIGTERM.

The checks (``check_all``) are plain functions of a ``Record``, shared by tests/test_chaos.py:

* ``global_round_monotonic``: the rounds of the globals seen, in arrival order, never decrease;
* ``one_run``: every global, announcement, metrics message and history row names the same run
  (one state_dir throughout: a second run id would mean the aggregator lost its checkpoint);
* ``one_weight_set_per_round``: no round is published with two weight sets (sha256 of the tensors);
* ``metrics_only_for_published``: every aggregated round's metrics names a round whose global was seen
  and that history holds as aggregated with the same participants; a round's metrics, if repeated,
  say the same thing;
* ``history_each_round_once``: history.jsonl holds each round once, in order, no unreadable line, and
  agrees with the bus (every aggregated row's global was seen; every global seen after round 0 has an
  aggregated row);
* ``quorum_met``: every aggregated round (history and metrics) had at least its announced quorum, and no
  round was announced with a quorum below the configured one;
* ``bus_decodable``: every message the observer got decoded, was of the kind its topic carries, and no
  global came chunked (the observer checks only unchunked weight sets; the chaos model fits one packet);
* ``progress``: a round was aggregated before the faults began and another after they stopped;
* ``agents_back``: after the faults stopped, every agent sends an update again (seen on the bus: alive
  and training; whether the strategy then counts it is its business);
* ``no_stall``: while faults were injected, rounds kept closing (no gap longer than ``stall_s``
  between history rows: a wedged round loop, not a slow one);
* ``nothing_hung``: every process exited within a timeout of SIGTERM (at the end, and for the SIGTERM
  faults);
* ``no_unplanned_exit``: no process exited on its own during the run (the supervisor had to restart it).

    .venv/bin/python bench/chaos.py --minutes 30 [--seed 1] [--agents 4] [--keep] [--write-results]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # fleet: tests/fleet.py (bench/ has a fleet.py of its own)
sys.path.append(str(ROOT / "bench"))  # common

import paho.mqtt.client as mqtt  # noqa: E402
from fleet import Fleet, Proc, watch_shards  # noqa: E402

from fedmq.broker.contract import codec  # noqa: E402
from fedmq.broker.contract.messages import GlobalModel, RoundAnnouncement, RoundMetrics  # noqa: E402
from fedmq.broker.contract.topics import Topics  # noqa: E402
from fedmq.broker.errors import FedmqError  # noqa: E402
from fedmq.broker.ops.launcher import LocalBroker  # noqa: E402

QUORUM = 2


def tensors_sha(tensors: dict) -> str:
    """sha256 over names, dtypes, shapes and bytes of a weight set (independent of dict order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = tensors[name]
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B") if a.flags.c_contiguous else a.tobytes())
    return h.hexdigest()


# -- what the observer records -------------------------------------------------------------------------
@dataclass
class SeenGlobal:
    t: float
    round: int
    model_id: str
    sha: str
    retained: bool
    run: str = ""


@dataclass
class SeenMetrics:
    t: float
    round: int
    outcome: str
    participants: tuple[str, ...]
    run: str = ""


@dataclass
class SeenRound:
    t: float
    round: int
    quorum: int
    asked: int
    run: str = ""


@dataclass
class Record:
    """Everything a run leaves behind for the checks."""

    globals: list[SeenGlobal] = field(default_factory=list)
    metrics: list[SeenMetrics] = field(default_factory=list)
    rounds: list[SeenRound] = field(default_factory=list)
    undecodable: Counter = field(default_factory=Counter)  # (topic kind, reason) -> n
    unexpected: Counter = field(default_factory=Counter)  # (topic kind, message kind) -> n
    chunked: int = 0  # chunk pointers or chunks on the global topic (weight sets the observer cannot check)
    updates_seen: int = 0
    last_update: dict[str, float] = field(default_factory=dict)  # agent -> when (s) its last update was seen
    history: list[dict] = field(default_factory=list)
    history_torn: int = 0  # unreadable lines of history.jsonl (at the end, after a clean stop)
    agents: tuple[str, ...] = ()
    faults: Counter = field(default_factory=Counter)
    restarts: Counter = field(default_factory=Counter)  # process -> starts after the first
    unplanned_exits: list[tuple[str, int | None, float]] = field(default_factory=list)  # (name, rc, t)
    exit_logs: list[str] = field(default_factory=list)  # the log tail of each unplanned exit (evidence)
    broker_start_failures: int = 0
    started: bool | None = None  # a round was aggregated before the first fault
    progress_after_faults: bool | None = None
    back_after_faults: set[str] = field(default_factory=set)  # agents that sent an update after the faults
    window: tuple[float, float] | None = None  # wall-clock start and end of the faults (history ``ts``)
    stall_s: float = 90.0
    hung: list[str] = field(default_factory=list)
    min_quorum: int = QUORUM
    seconds: float = 0.0
    observer_connects: int = 0
    log_errors: Counter = field(default_factory=Counter)  # process -> ERROR lines in its log
    log_excerpts: list[str] = field(default_factory=list)


class Observer:
    """A plain paho subscriber to global, round and metrics (and update arrivals); decodes with the wire
    codec only. Runs in paho's thread; everything it appends is under ``lock``."""

    def __init__(self, host: str, port: int, topics: Topics, rec: Record, t0: float | None = None) -> None:
        self.topics, self.rec = topics, rec
        self.lock = threading.Lock()
        self.t0 = time.monotonic() if t0 is None else t0
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="chaos-obs-" + uuid.uuid4().hex[:6],
                             protocol=mqtt.MQTTv5)
        self.c.reconnect_delay_set(min_delay=0.05, max_delay=0.2)
        self.subscribed = threading.Event()  # the first SUBACK is in: from now on nothing is missed
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = self._on_message
        t = topics
        self.expect = {t.global_(): ("global", GlobalModel), t.round(): ("round", RoundAnnouncement),
                       t.metrics(): ("metrics", RoundMetrics)}
        self.c.connect_async(host, port, keepalive=10)
        self.c.loop_start()

    def _on_connect(self, c, ud, flags, rc, props=None) -> None:
        if rc.is_failure:
            return
        with self.lock:
            self.rec.observer_connects += 1
        t = self.topics
        c.subscribe([(t.global_(), 1), (t.global_() + "/chunk/+", 1), (t.round(), 1), (t.metrics(), 1),
                     (t.all_updates(), 0)])

    def _on_message(self, c, ud, m) -> None:
        try:
            self._record(m)
        except Exception as e:  # noqa: BLE001 - the observer must outlive anything on the bus; counted
            with self.lock:
                self.rec.undecodable[("observer", type(e).__name__)] += 1

    def _record(self, m) -> None:
        now = time.monotonic() - self.t0
        if m.topic.endswith("/update"):
            agent = m.topic.rsplit("/", 2)[-2]  # <base>/agents/<agent>/update (the broker matched the filter)
            with self.lock:  # not decoded: only its arrival matters (to aim a kill; to see an agent alive)
                self.rec.updates_seen += 1
                self.rec.last_update[agent[:64]] = now
            return
        if "/chunk/" in m.topic:
            # an empty payload clears a retained chunk topic; a non-numbered one is not a chunk (the
            # aggregator's start-up scan sends itself a marker on global/chunk/scan-<id>)
            if m.payload and m.topic.rsplit("/", 1)[1].isdigit():
                with self.lock:
                    self.rec.chunked += 1
            return
        if not m.payload:
            return  # a cleared retained message
        where, want = self.expect.get(m.topic, ("other", None))
        try:
            msg = codec.decode(m.payload)
        except Exception as e:  # noqa: BLE001 - counted (a DecodeError, or anything else the codec let out)
            with self.lock:
                self.rec.undecodable[(where, getattr(e, "reason", type(e).__name__))] += 1
            return
        run = str(getattr(msg, "run", ""))
        with self.lock:
            if want is not None and not isinstance(msg, want):
                if where == "global" and msg.KIND == "chunked":
                    self.rec.chunked += 1
                else:
                    self.rec.unexpected[(where, msg.KIND)] += 1
            elif isinstance(msg, GlobalModel):
                self.rec.globals.append(SeenGlobal(now, msg.round, msg.model_id, tensors_sha(msg.tensors),
                                                   bool(m.retain), run))
            elif isinstance(msg, RoundMetrics):
                self.rec.metrics.append(SeenMetrics(now, msg.round, msg.outcome, tuple(sorted(msg.participants)),
                                                    run))
            elif isinstance(msg, RoundAnnouncement):
                self.rec.rounds.append(SeenRound(now, msg.round, msg.quorum, len(msg.agents or []), run))

    def n_globals(self) -> int:
        with self.lock:
            return len(self.rec.globals)

    def n_updates(self) -> int:
        with self.lock:
            return self.rec.updates_seen

    def updated_since(self, t: float) -> set[str]:
        """Agents whose update was seen on the bus after ``t`` (seconds since the observer's t0)."""
        with self.lock:
            return {a for a, u in self.rec.last_update.items() if u > t}

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


# -- the checks (shared with tests/test_chaos.py) --------------------------------------------------------
@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def global_round_monotonic(rec: Record) -> Check:
    bad = [(a.round, b.round, round(b.t, 1), b.retained) for a, b in zip(rec.globals, rec.globals[1:])
           if b.round < a.round]
    return Check("global_round_monotonic", bool(rec.globals) and not bad,
                 f"{len(rec.globals)} globals seen; {len(bad)} decrease(s) (from, to, t, retained): {bad[:5]}")


def one_run(rec: Record) -> Check:
    runs = Counter(x.run for x in (*rec.globals, *rec.rounds, *rec.metrics))
    runs.update(str(r.get("run", "")) for r in rec.history)
    return Check("one_run", len(runs) == 1, f"run ids (messages + history rows): {dict(runs.most_common(5))}")


def one_weight_set_per_round(rec: Record) -> Check:
    shas: dict[int, set[str]] = {}
    for g in rec.globals:
        shas.setdefault(g.round, set()).add(g.sha)
    bad = sorted(r for r, s in shas.items() if len(s) > 1)
    return Check("one_weight_set_per_round", bool(shas) and not bad,
                 f"{len(shas)} rounds published; with two weight sets: {bad[:10]}")


def metrics_only_for_published(rec: Record) -> Check:
    published = {g.round for g in rec.globals}
    agg_rows = {r["round"]: tuple(sorted(r.get("participants_list", []))) for r in rec.history
                if r.get("outcome") == "aggregated"}
    agg = [m for m in rec.metrics if m.outcome == "aggregated"]
    unpublished = sorted({m.round for m in agg if m.round not in published})
    disagree = sorted({m.round for m in agg if agg_rows.get(m.round) != m.participants})
    per_round: dict[int, set] = {}
    for m in rec.metrics:
        per_round.setdefault(m.round, set()).add((m.outcome, m.participants))
    differing = sorted(r for r, s in per_round.items() if len(s) > 1)
    return Check("metrics_only_for_published", bool(agg) and not unpublished and not differing and not disagree,
                 f"{len(rec.metrics)} metrics messages ({len(agg)} aggregated); aggregated but global never seen: "
                 f"{unpublished[:10]}; not in history as aggregated with these participants: {disagree[:10]}; "
                 f"a round's metrics published twice, differently: {differing[:10]}")


def history_each_round_once(rec: Record) -> Check:
    rounds = [r["round"] for r in rec.history]
    dup = sorted(r for r, n in Counter(rounds).items() if n > 1)
    ordered = all(a < b for a, b in zip(rounds, rounds[1:]))
    agg = {r["round"] for r in rec.history if r.get("outcome") == "aggregated"}
    published = {g.round for g in rec.globals if g.round > 0}
    not_published = sorted(agg - published)
    not_in_history = sorted(published - agg)
    ok = bool(agg) and not dup and ordered and not rec.history_torn and not not_published and not not_in_history
    return Check("history_each_round_once", ok,
                 f"{len(rounds)} rows ({len(agg)} aggregated); duplicates {dup[:10]}; in order {ordered}; "
                 f"unreadable lines {rec.history_torn}; aggregated but never seen published {not_published[:10]}; "
                 f"published but no aggregated row {not_in_history[:10]}")


def quorum_met(rec: Record) -> Check:
    announced: dict[int, int] = {}
    for s in rec.rounds:
        announced[s.round] = max(announced.get(s.round, 0), s.quorum)
    bad = []
    for r in rec.history:
        if r.get("outcome") != "aggregated":
            continue
        need = max(rec.min_quorum, announced.get(r["round"], 0))
        n = len(set(r.get("participants_list", [])))
        if n < need or r.get("participants", 0) < need:
            bad.append((r["round"], n, need))
    for m in rec.metrics:
        need = max(rec.min_quorum, announced.get(m.round, 0))
        if m.outcome == "aggregated" and len(set(m.participants)) < need:
            bad.append((m.round, len(m.participants), "metrics"))
    low_ann = sorted(r for r, q in announced.items() if q < rec.min_quorum)
    return Check("quorum_met", bool(announced) and not bad and not low_ann,
                 f"{len(announced)} rounds announced; below quorum (round, participants, needed): {bad[:10]}; "
                 f"announced below {rec.min_quorum}: {low_ann[:10]}")


def bus_decodable(rec: Record) -> Check:
    ok = not rec.undecodable and not rec.unexpected and not rec.chunked
    return Check("bus_decodable", ok,
                 f"undecodable (topic, reason): {dict(rec.undecodable)}; unexpected (topic, kind): "
                 f"{dict(rec.unexpected)}; chunked globals (not checked by the observer): {rec.chunked}")


def progress(rec: Record) -> Check:
    return Check("progress", bool(rec.started) and bool(rec.progress_after_faults),
                 f"a round aggregated before the faults: {bool(rec.started)}; "
                 f"a new round aggregated after they stopped: {bool(rec.progress_after_faults)}")


def agents_back(rec: Record) -> Check:
    missing = sorted(set(rec.agents) - rec.back_after_faults)
    return Check("agents_back", bool(rec.agents) and not missing,
                 f"agents that sent an update after the faults stopped: {sorted(rec.back_after_faults)}; "
                 f"none from: {missing}")


def longest_gap(rec: Record) -> tuple[float, float | None]:
    """The longest time (s) without a history row inside the fault window, and when (s into it) it began."""
    if rec.window is None:
        return float("inf"), None
    a, b = rec.window
    ts = sorted(float(r["ts"]) for r in rec.history if isinstance(r.get("ts"), (int, float)) and a <= r["ts"] <= b)
    marks = [a, *ts, b]
    gaps = [(y - x, x - a) for x, y in zip(marks, marks[1:])]
    return max(gaps)


def no_stall(rec: Record) -> Check:
    gap, at = longest_gap(rec)
    return Check("no_stall", gap <= rec.stall_s,
                 f"longest time without a round closing while faults ran: {gap:.1f} s"
                 + (f" (from {at:.0f} s into the faults)" if at is not None else "") + f"; limit {rec.stall_s:.0f} s")


def nothing_hung(rec: Record) -> Check:
    return Check("nothing_hung", not rec.hung, f"did not exit after SIGTERM: {rec.hung}")


def no_unplanned_exit(rec: Record) -> Check:
    by = Counter(f"{n.split('#')[0]} rc={rc}" for n, rc, _ in rec.unplanned_exits)
    return Check("no_unplanned_exit", not rec.unplanned_exits,
                 f"{len(rec.unplanned_exits)} exits on their own: {dict(by)}; broker start failures "
                 f"{rec.broker_start_failures}")


CHECKS = (global_round_monotonic, one_run, one_weight_set_per_round, metrics_only_for_published,
          history_each_round_once, quorum_met, bus_decodable, progress, agents_back, no_stall, nothing_hung,
          no_unplanned_exit)


def check_all(rec: Record) -> list[Check]:
    return [c(rec) for c in CHECKS]


def read_history(path: Path, final: bool = False) -> tuple[list[dict], int]:
    """The rows of history.jsonl and the number of unreadable lines.

    While the run goes on, a line without its newline is an append in progress (or one a kill tore,
    which the next start drops) and is skipped; at the end (``final``), after a clean stop, it counts.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return [], 0
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with a newline
    rows, bad = [], int(final and torn != "")
    for line in lines:
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("round"), int):
                raise ValueError(line[:80])
            rows.append(row)
        except ValueError:
            bad += 1
    return rows, bad


def stop_procs(procs: dict[str, Proc], timeout: float) -> list[str]:
    """SIGTERM every live process, wait up to ``timeout`` for all; SIGKILL and name those that did not exit."""
    for p in procs.values():
        if p.alive():
            p.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    hung = []
    for name, p in procs.items():
        try:
            p.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung.append(f"{name} (no exit {timeout:g}s after SIGTERM)")
            p.popen.kill()
            p.popen.wait(10)
    return hung


ERROR_RE = re.compile(r" (ERROR|CRITICAL) |^Traceback", re.M)
#: ERROR lines a broker kill causes by design (paho's own logger on a reset connection): not counted
EXPECTED_RE = re.compile(r"transport\.client\.paho: failed to receive on socket")


def scan_logs(logs: dict[str, Path], rec: Record, excerpt_lines: int = 12) -> None:
    """Count ERROR lines and tracebacks per process log; keep the first of each process as evidence."""
    for name, path in logs.items():
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            continue
        hits = []
        for h in ERROR_RE.finditer(text):
            start = text.rfind("\n", 0, h.start()) + 1
            if not EXPECTED_RE.search(text, start, text.find("\n", h.start()) % (len(text) + 1)):
                hits.append(start)
        if not hits:
            continue
        rec.log_errors[name] = len(hits)
        rec.log_excerpts.append(f"--- {name} ({len(hits)} ERROR/Traceback lines) ---\n"
                                + "\n".join(line[:300] for line in text[hits[0]:].split("\n")[:excerpt_lines]))


# -- the run -------------------------------------------------------------------------------------------------
FAULTS = {"aggregator_kill": 0.14, "aggregator_kill_at_quorum": 0.10, "aggregator_kill_after_global": 0.10,
          "aggregator_stop": 0.05, "broker_kill": 0.18, "broker_outage": 0.05, "agent_kill": 0.26,
          "agent_stop": 0.12}


@dataclass
class ChaosConfig:
    seconds: float = 90.0  # how long faults are injected
    seed: int = 1
    agents: int = 4
    per_agent: int = 60  # watch windows per agent: rounds of a fraction of a second
    mean_gap_s: float = 4.0  # mean time between faults
    deadline_s: float = 20.0  # a round's deadline
    startup_s: float = 60.0  # how long the fleet may take to aggregate its first round
    settle_s: float = 60.0  # how long, once the faults stop, for a round and every agent to be back
    stall_s: float = 90.0  # the longest tolerated time without a round closing while faults run
    exit_timeout_s: float = 30.0


class Supervisor:
    """Starts the processes, restarts what dies (counting exits it did not cause), injects faults."""

    def __init__(self, cfg: ChaosConfig, tmp: Path, model_cache: Path | None, rec: Record) -> None:
        self.cfg, self.tmp, self.rec = cfg, tmp, rec
        self.rng = random.Random(cfg.seed)
        (tmp / "broker").mkdir(parents=True, exist_ok=True)
        self.broker = LocalBroker(workdir=str(tmp / "broker"))  # the project's config as shipped
        self.fleet_name = "chaos-" + uuid.uuid4().hex[:8]
        self.fleet = Fleet(tmp, {"host": self.broker.host, "port": self.broker.port, "fleet": self.fleet_name},
                           model_cache=model_cache)
        self.agents = [f"agent-{i}" for i in range(cfg.agents)]
        rec.agents = tuple(self.agents)
        self.shards = watch_shards(self.agents, tmp, per_agent=cfg.per_agent)
        self.configs: dict[str, tuple[str, Path]] = {
            "aggregator": ("fedmq.aggregator.cli", self.fleet.aggregator_config(
                rounds={"rounds": 0, "min_agents": QUORUM, "quorum": QUORUM, "deadline_s": cfg.deadline_s,
                        "grace_s": 1}))}
        for a in self.agents:
            self.configs[a] = ("fedmq.edge_agent.cli", self.fleet.agent_config(a, self.shards[a]))
        self.procs: dict[str, Proc] = {}
        self.down_until: dict[str, float] = {}  # name -> when the supervisor may start it again
        self.planned: set[str] = set()  # processes the supervisor itself killed or stopped
        self.broker_down_until: float | None = None
        self.starts: Counter = Counter()
        #: an armed aggregator kill: (what to count, count to reach, give up at, delay, down time)
        self.armed: tuple[str, int, float, float, float] | None = None
        self.fire_at: tuple[float, float] | None = None  # (when, down time)
        self.observer: Observer | None = None

    @property
    def history_path(self) -> Path:
        return self.fleet.tmp / "aggregator-state" / "history.jsonl"

    # -- processes ---------------------------------------------------------------------------------------
    def start(self, name: str) -> None:
        module, config = self.configs[name]
        if self.starts[name]:
            self.rec.restarts[name.split("-")[0]] += 1
        self.starts[name] += 1
        self.procs[name] = self.fleet.spawn(name, module, config)
        self.planned.discard(name)

    def kill(self, name: str, sig=signal.SIGKILL, down_s: float = 0.0) -> None:
        p = self.procs.get(name)
        if p is not None and p.alive():
            self.planned.add(name)
            p.popen.send_signal(sig)
            try:
                p.popen.wait(self.cfg.exit_timeout_s)
            except subprocess.TimeoutExpired:
                self.rec.hung.append(f"{name} (ignored {signal.Signals(sig).name} for {self.cfg.exit_timeout_s}s)")
                p.popen.kill()
                p.popen.wait(10)
        self.down_until[name] = time.monotonic() + down_s

    def start_broker(self) -> bool:
        try:
            self.broker.start()
            return True
        except FedmqError as e:  # e.g. the port not yet free: counted, retried by supervise()
            self.rec.broker_start_failures += 1
            print(f"broker start failed ({str(e)[:200]}); retrying", file=sys.stderr)
            return False

    def supervise(self, now: float, t_run: float) -> None:
        if self.broker_down_until is not None and now >= self.broker_down_until:
            if self.start_broker():
                self.broker_down_until = None
                self.rec.restarts["broker"] += 1
            else:
                self.broker_down_until = now + 0.5
        elif self.broker_down_until is None and self.broker.proc is not None and self.broker.proc.poll() is not None:
            self.rec.unplanned_exits.append(("broker", self.broker.proc.returncode, t_run))
            self.rec.exit_logs.append("--- broker ---\n" + self.broker.log()[-3000:])
            self.broker.proc = None
            self.broker_down_until = now + 1.0
        for name in self.configs:
            p = self.procs.get(name)
            if p is not None and not p.alive():
                if name not in self.planned:
                    self.rec.unplanned_exits.append((f"{name}#{self.starts[name]}", p.popen.returncode, t_run))
                    tail = "\n".join(line[:300] for line in p.text()[-4000:].split("\n")[-30:])
                    self.rec.exit_logs.append(f"--- {name} (start {self.starts[name]}, rc "
                                              f"{p.popen.returncode}, {t_run:.1f} s) ---\n{tail}")
                    self.planned.add(name)
                    self.down_until[name] = now + 1.0  # systemd's RestartSec
                if now >= self.down_until.get(name, 0):
                    self.start(name)

    def poll_armed(self, now: float) -> None:
        """An armed aggregator kill fires ``delay`` after the observer's count (updates or globals) passes
        its mark; it gives up after 30 s. (Every random draw is made when the fault is drawn, so a seed
        gives the same sequence of faults whatever the timing.)"""
        obs = self.observer
        if self.armed is not None and obs is not None:
            what, mark, give_up, delay, down = self.armed
            count = obs.n_updates() if what == "updates" else obs.n_globals()
            if count >= mark:
                self.fire_at, self.armed = (now + delay, down), None
            elif now > give_up:
                self.armed = None
        if self.fire_at is not None and now >= self.fire_at[0]:
            down = self.fire_at[1]
            self.fire_at = None
            self.kill("aggregator", down_s=down)

    def fault(self, kind: str, now: float) -> None:
        self.rec.faults[kind] += 1
        r, obs = self.rng, self.observer
        if kind == "aggregator_kill":
            self.kill("aggregator", down_s=r.uniform(0, 3))
        elif kind == "aggregator_kill_at_quorum" and obs is not None:  # ~ the second update of a round
            self.armed = ("updates", obs.n_updates() + 2, now + 30, r.uniform(0, 0.05), r.uniform(0, 2))
        elif kind == "aggregator_kill_after_global" and obs is not None:  # between global and metrics
            self.armed = ("globals", obs.n_globals() + 1, now + 30, r.uniform(0, 0.2), r.uniform(0, 2))
        elif kind == "aggregator_stop":
            self.kill("aggregator", sig=signal.SIGTERM, down_s=r.uniform(0, 2))
        elif kind in ("broker_kill", "broker_outage"):
            self.broker.kill()
            self.broker_down_until = now + (r.uniform(0, 4) if kind == "broker_kill" else r.uniform(5, 15))
        elif kind == "agent_kill":
            self.kill(r.choice(self.agents), down_s=r.uniform(0, 3))
        elif kind == "agent_stop":
            self.kill(r.choice(self.agents), sig=signal.SIGTERM, down_s=r.uniform(0, 3))

    def stop_all(self) -> None:
        self.rec.hung += stop_procs(self.procs, self.cfg.exit_timeout_s)


def _aggregated(rows: list[dict], after: int = 0) -> list[dict]:
    return [r for r in rows if r.get("outcome") == "aggregated" and r["round"] > after]


def run(cfg: ChaosConfig, tmp: Path, model_cache: Path | None = None, log=print) -> tuple[Record, Supervisor]:
    """One chaos run in ``tmp``: start-up, ``cfg.seconds`` of faults, settling, a clean stop; the Record."""
    rec = Record(min_quorum=QUORUM, stall_s=cfg.stall_s)
    sup = Supervisor(cfg, tmp, model_cache, rec)
    t0 = time.monotonic()
    t_faults = t0
    if not sup.start_broker():
        sup.broker_down_until = time.monotonic() + 0.5
    sup.observer = obs = Observer(sup.broker.host, sup.broker.port, Topics(sup.fleet_name), rec, t0)
    hist = sup.history_path

    def tick(interval: float) -> None:
        sup.supervise(time.monotonic(), time.monotonic() - t0)
        time.sleep(interval)  # the supervisor's polling period, not a wait for an outcome

    try:
        for name in sup.configs:
            sup.start(name)
        # faults start once the fleet has aggregated a first round (else they only test start-up)
        until = t0 + cfg.startup_s
        while time.monotonic() < until and not _aggregated(read_history(hist)[0]):
            tick(0.1)
        rec.started = bool(_aggregated(read_history(hist)[0]))
        log(f"[{time.monotonic() - t0:7.1f}s] first round aggregated: {rec.started}; faults for {cfg.seconds:g} s")
        t_faults = time.monotonic()
        wall0 = time.time()
        end = t_faults + cfg.seconds
        next_fault = t_faults + sup.rng.expovariate(1 / cfg.mean_gap_s)
        kinds, weights = list(FAULTS), list(FAULTS.values())
        while (now := time.monotonic()) < end:
            sup.supervise(now, now - t0)
            sup.poll_armed(now)
            if now >= next_fault:
                kind = sup.rng.choices(kinds, weights)[0]
                log(f"[{now - t0:7.1f}s] fault: {kind}")
                sup.fault(kind, now)
                next_fault = time.monotonic() + sup.rng.expovariate(1 / cfg.mean_gap_s)
            time.sleep(0.01)
        rec.window = (wall0, time.time())
        t_quiet = time.monotonic() - t0
        sup.armed = sup.fire_at = None
        # faults over: everything back up, then a new aggregated round, and every agent counted again
        before = max((r["round"] for r in _aggregated(read_history(hist)[0])), default=0)
        until = time.monotonic() + cfg.settle_s
        rec.progress_after_faults = False
        while time.monotonic() < until:
            tick(0.2)
            new = _aggregated(read_history(hist)[0], before)
            rec.progress_after_faults = bool(new)
            rec.back_after_faults = obs.updated_since(t_quiet)
            if rec.progress_after_faults and rec.back_after_faults >= set(sup.agents):
                break
        log(f"[{time.monotonic() - t0:7.1f}s] settled: new round {rec.progress_after_faults}, agents back "
            f"{sorted(rec.back_after_faults)}; stopping")
        sup.stop_all()
    finally:
        for p in sup.procs.values():
            if p.alive():
                p.kill()
        obs.close()
        sup.broker.cleanup()
    rec.history, rec.history_torn = read_history(hist, final=True)
    rec.seconds = cfg.seconds
    scan_logs({p: sup.fleet.tmp / f"{p}.log" for p in sup.configs}, rec)
    return rec, sup


def summary(rec: Record, checks: list[Check]) -> list[str]:
    agg = sum(1 for r in rec.history if r.get("outcome") == "aggregated")
    other = Counter(r.get("outcome") for r in rec.history if r.get("outcome") != "aggregated")
    gap, _ = longest_gap(rec)
    out = [f"- faults over {rec.seconds:.0f} s: {sum(rec.faults.values())} "
           f"({', '.join(f'{k} {v}' for k, v in sorted(rec.faults.items()))})",
           f"- restarts: {dict(sorted(rec.restarts.items()))}; observer (re)connects {rec.observer_connects}",
           f"- rounds in history: {len(rec.history)} ({agg} aggregated, {dict(other) or 'no other outcome'}); "
           f"{len(rec.globals)} globals, {len(rec.rounds)} announcements, {len(rec.metrics)} metrics, "
           f"{rec.updates_seen} updates seen on the bus; longest time without a round closing {gap:.1f} s",
           f"- ERROR/Traceback lines in the logs (not a check): {dict(rec.log_errors) or 'none'}",
           "", "| check | result | detail |", "|---|---|---|"]
    out += [f"| {c.name} | {'ok' if c.ok else 'FAILED'} | {c.detail.replace('|', '/')} |" for c in checks]
    return out


def machine_line() -> str:
    """``lscpu``'s model name and CPU count (falls back to /proc/cpuinfo), plus memory and OS."""
    from common import machine

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        rest = machine().split(", ", 2)[2]
        return f"{info['Model name'].strip()}, {info['CPU(s)'].strip()} cores, {rest}"
    except (OSError, KeyError, IndexError, subprocess.SubprocessError):
        return machine()


def code_state() -> str:
    """The commit the run used, and whether product files differed from it."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "broker", "aggregator",
                                "edge_agent"], capture_output=True, text=True, timeout=10).stdout.split("\n")
        n = sum(1 for line in dirty if line.strip())
        return f"commit {head}" + (f" + {n} uncommitted product file(s)" if n else "")
    except (OSError, subprocess.SubprocessError):
        return "code of unknown commit"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="how long faults are injected")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--mean-gap", type=float, default=4.0, help="mean seconds between faults")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (logs, state)")
    ap.add_argument("--write-results", action="store_true", help="append a section to bench/RESULTS.md")
    ap.add_argument("--code", default="", help="what code ran (default: git HEAD and whether the tree was dirty)")
    a = ap.parse_args()
    from common import now

    cfg = ChaosConfig(seconds=a.minutes * 60, seed=a.seed, agents=a.agents, mean_gap_s=a.mean_gap)
    tmp = Path(tempfile.mkdtemp(prefix="fedmq-chaos-"))
    from fedmq.aggregator.config import ModelSection
    from fedmq.aggregator.model_store import load_or_export

    load_or_export(ModelSection(source="zoo:sensor1d", batch_size=16, verify_steps=5), tmp / "model-cache")
    started = now()
    t = time.monotonic()
    load0 = os.getloadavg()[1]
    rec, _ = run(cfg, tmp, tmp / "model-cache")
    wall = time.monotonic() - t
    load = f"load average (5 min) {load0:.1f} at the start, {os.getloadavg()[1]:.1f} at the end"
    checks = check_all(rec)
    lines = [f"## Chaos (issue 13): {a.minutes:g} minutes of faults — {started}", "",
             f"Machine: {machine_line()}. `bench/chaos.py --minutes {a.minutes:g} --seed {a.seed} --agents {a.agents} "
             f"--mean-gap {a.mean_gap:g}` ({wall / 60:.1f} min wall) on {a.code or code_state()}: SIGKILL/SIGTERM at "
             "seeded random moments (aggregator, Mosquitto as shipped, agents), supervisor restarts, observer on "
             f"the bus; {load}.", "",
             *summary(rec, checks), ""]
    print("\n".join(lines))
    for text in rec.exit_logs[:5] + rec.log_excerpts[:5]:
        print(text)
    if a.keep:
        (tmp / "summary.md").write_text("\n".join(lines + rec.exit_logs + rec.log_excerpts) + "\n")
    print(f"run directory: {tmp}" + ("" if a.keep else " (removed)"))
    if a.write_results:
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a") as f:
            f.write("\n" + "\n".join(lines))
    if not a.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
