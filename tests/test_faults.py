"""Faults a real deployment meets (issue 13 points 1-3): stale retained state, stale outboxes, revoked
credentials, a broker crash.

Everything is real: Mosquitto with the project's own config (persistence off, as provisioned), the
aggregator and agent processes (tests/fleet.py), TFLite training. Stale state from "an earlier
process" is planted with a plain paho client and the project's codec, as bytes on the wire. Each test
checks against a reference of its own (the aggregator's history file, what a plain subscriber got
from the broker, process exit codes), and each negative check has a positive control showing the
check would see the fault (the planted state is visible before the fix-up, the counter it reads does
count an injected fault, the collector does record old rounds, ...).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from conftest import needs_mosquitto, wait_until
from fleet import Fleet, watch_shards
from paho.mqtt.enums import CallbackAPIVersion
from test_federation import Observer, evaluate_offline
from test_federation_secure import start_secure

from fedmq.aggregator.config import ModelSection
from fedmq.aggregator.model_store import load_or_export
from fedmq.broker.cli import main as cli_main
from fedmq.broker.contract import codec
from fedmq.broker.contract.chunking import split
from fedmq.broker.contract.messages import ChunkSet, GlobalModel, Receipt, RoundAnnouncement, Update
from fedmq.broker.contract.topics import Topics
from fedmq.broker.ops.launcher import LocalBroker, SecureFiles
from fedmq.broker.ops.lifecycle import set_passwd_line
from fedmq.broker.ops.provision import ProvisionSpec, provision
from fedmq.broker.transport.receiver import Receiver

pytestmark = [pytest.mark.network, needs_mosquitto]

#: rejection reasons an agent's own traffic must never earn in a clean run (stale outbox, stale global)
STALE_REASONS = ("wrong_run", "wrong_model", "stale", "stale_base", "late", "future", "no_open_round")
FAST_ROUNDS = {"min_agents": 2, "grace_s": 2, "deadline_s": 30}


# -- harness -------------------------------------------------------------------------------------------
@pytest.fixture
def fleet(tmp_path, model_cache, request):
    """``make(**broker_table)`` -> a Fleet on a broker of this test's own (the project's default config:
    persistence off, unless ``persistence=True``), so the test may SIGKILL and restart it; everything is
    stopped at the end."""
    made: list[Fleet] = []

    def make(persistence: bool = False, **broker_table) -> Fleet:
        d = tmp_path / f"broker{len(made)}"
        d.mkdir()
        b = LocalBroker(workdir=str(d), persistence=persistence).start()
        f = Fleet(tmp_path, {"host": b.host, "port": b.port, "fleet": "f" + uuid.uuid4().hex[:8], **broker_table},
                  model_cache=model_cache)
        f.local_broker = b
        made.append(f)
        return f

    yield make
    for f in made:
        f.stop_all()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f.dump_logs())
            print(f"--- broker log ---\n{f.local_broker.log()[-6000:]}")
        f.local_broker.cleanup()


def history(f: Fleet, name: str = "aggregator") -> list[dict]:
    p = f.tmp / f"{name}-state" / "history.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def served_model(model_cache: Path, batch_size: int = 16):
    return load_or_export(ModelSection(source="zoo:sensor1d", batch_size=batch_size, verify_steps=5), model_cache)


class Plain:
    """A plain paho MQTT 5 client (no fedmq transport code): publishes what a test plants, and reads
    what the broker holds retained."""

    def __init__(self, host: str, port: int, **auth) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plain-" + uuid.uuid4().hex[:8],
                             protocol=mqtt.MQTTv5)
        if auth:
            self.c.username_pw_set(auth["username"], auth["password"])
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        self.subacks: set[int] = set()
        self.c.on_message = lambda c, u, m: self._add(m)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.add(mid)
        self.c.connect(host, port)
        self.c.loop_start()

    def _add(self, m) -> None:
        with self.lock:
            self.messages.append(m)

    def take(self) -> list:
        with self.lock:
            out, self.messages = self.messages, []
        return out

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), f"no PUBACK for {topic}"

    def subscribe(self, *filters: str) -> None:
        for f in filters:
            _, mid = self.c.subscribe(f, qos=1)
            wait_until(lambda: mid in self.subacks, 10, what=f"SUBACK for {f}")

    def retained(self, *filters: str) -> dict[str, bytes]:
        """Every retained message on ``filters`` now: subscribe, then a marker of our own; Mosquitto sends
        the retained messages of a subscription before its SUBACK's later traffic, so once the marker
        is back the scan is complete."""
        marker = f"fedmq-test/marker/{uuid.uuid4().hex}"
        self.subscribe(marker)
        self.take()
        self.subscribe(*filters)
        self.publish(marker, b"m")
        got: dict[str, bytes] = {}

        def done() -> bool:
            for m in self.take():
                if m.topic == marker:
                    return True
                if m.retain and m.payload:
                    got[m.topic] = bytes(m.payload)
            return False

        wait_until(done, 10, what="the scan marker")
        for f in filters:
            self.c.unsubscribe(f)
        return got

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def plant_chunked(p: Plain, topics: Topics, topic: str, payload: bytes, max_data: int) -> tuple[str, int]:
    """Leave ``payload`` retained as an earlier publisher would: its pointer on ``topic``, chunks on
    ``topic/chunk/i``. Returns (blob id, number of chunks)."""
    chunks = split(payload, max_data)
    first = chunks[0]
    p.publish(topic, codec.encode(ChunkSet(first.blob_id, first.total, first.size, first.sha256)), retain=True)
    for ch in chunks:
        p.publish(topics.chunk(topic, ch.index), codec.encode(ch), retain=True)
    return first.blob_id, len(chunks)


def chunk_state(retained: dict[str, bytes], topic: str) -> tuple[dict[int, str], ChunkSet | None]:
    """{chunk index: blob id} of the retained chunks of ``topic``, and the pointer on ``topic`` (if any)."""
    idx: dict[int, str] = {}
    for t, payload in retained.items():
        if t.startswith(topic + "/chunk/"):
            idx[int(t.rsplit("/", 1)[1])] = codec.decode(payload).blob_id
    ptr = retained.get(topic)
    msg = codec.decode(ptr) if ptr else None
    return idx, msg if isinstance(msg, ChunkSet) else None


class AllSeen(Observer):
    """The test federation's observer, also keeping every global and update in arrival order (a planted
    global of another run and the run's own may share a round number)."""

    def __init__(self, f: Fleet, receipts_of: tuple[str, ...] = (), **cfg) -> None:
        self.all_globals: list[GlobalModel] = []
        self.all_updates: list[Update] = []
        self.receipts: list[Receipt] = []
        super().__init__(f, **cfg)
        for a in receipts_of:  # the aggregator's answers to these agents' updates
            self.client.subscribe(self.topics.receipt(a))

    def pump(self) -> None:
        m = self.client.get(timeout=0.05)
        while m is not None:
            r = self.rx.feed(m.topic, m.payload, m.retain)
            if r is not None:
                msg = r.message
                if isinstance(msg, Update):
                    self.updates.setdefault(msg.round, []).append(msg)
                    self.all_updates.append(msg)
                elif isinstance(msg, GlobalModel):
                    self.globals[msg.round] = msg
                    self.all_globals.append(msg)
                elif isinstance(msg, RoundAnnouncement):
                    self.rounds.append(msg)
                elif isinstance(msg, Receipt):
                    self.receipts.append(msg)
            m = self.client.get(timeout=0)


def log_after(proc, offset: int) -> str:
    return proc.text()[offset:]


# -- 1. stale retained chunks of an earlier process ---------------------------------------------------
def test_stale_retained_chunks_of_an_earlier_run_are_inert_and_cleared(fleet, tmp_path, model_cache):
    # max_payload 4 KiB: the run's own model (~34 KB) and global (~13 KB) travel chunked too, in fewer
    # chunks than the planted ones (1-1.5 KB chunks), so some planted chunk topics are never overwritten
    f = fleet(max_payload=4096)
    t = Topics(f.broker["fleet"])
    served = served_model(model_cache)
    agents = ["agent-0", "agent-1"]
    shards = watch_shards(agents, tmp_path, per_agent=100)
    old_run = uuid.uuid4().hex[:16]
    # the earlier process's global: the same model id (the dangerous case: its weights fit), a round far
    # ahead, weights scaled x50 (an agent training from them reports a huge loss)
    planted = {n: (w * 50).astype(np.float32) for n, w in served.initial_weights().items()}
    p = Plain(f.broker["host"], f.broker["port"])
    obs = None
    try:
        g_blob, g_n = plant_chunked(p, t, t.global_(), codec.encode(GlobalModel(50, served.model_id, planted,
                                                                                time.time(), run=old_run)), 1000)
        m_blob, m_n = plant_chunked(p, t, t.model(), codec.encode(served.manifest(old_run)), 1500)
        # positive control: the planted state is on the broker, complete, and a receiver assembles it
        before = p.retained(f"{t.global_()}/chunk/+", f"{t.model()}/chunk/+", t.global_(), t.model())
        assert chunk_state(before, t.global_())[0] == {i: g_blob for i in range(g_n)}
        assert chunk_state(before, t.model())[0] == {i: m_blob for i in range(m_n)}
        obs = AllSeen(f)
        obs.wait(lambda: any(g.run == old_run for g in obs.all_globals), 20, "the planted global")
        # and it is what a model trained from would show: its loss on an agent's data is far above the
        # real initial global's
        d = np.load(shards["agent-0"])
        loss_planted, _ = evaluate_offline(served, planted, d["x"], d["y"])
        loss_init, _ = evaluate_offline(served, served.initial_weights(), d["x"], d["y"])
        assert loss_planted > 3 * loss_init, (loss_planted, loss_init)

        agg = f.start_aggregator(rounds={"rounds": 2, **FAST_ROUNDS})
        for a in agents:  # at once: the agents may see the planted pointer before the aggregator replaces it
            f.start_agent(a, shards[a])
        wait_until(lambda: not agg.alive(), 120, what="two rounds")
        assert agg.popen.returncode == 0, agg.text()[-3000:]
        obs.pump()
        h = history(f)
        run = h[0]["run"]
        assert run != old_run
        assert [(r["round"], r["outcome"], sorted(r["participants_list"])) for r in h] == \
            [(1, "aggregated", agents), (2, "aggregated", agents)]
        assert not any(r["rejected"].get(k) for r in h for k in STALE_REASONS), [r["rejected"] for r in h]

        # nobody trained on the planted weights: every update is of the new run against its own globals,
        # and its training loss is that of a start from the run's initial global, not from the planted one
        ups = obs.all_updates
        assert sorted((u.round, u.agent) for u in ups) == [(1, a) for a in agents] + [(2, a) for a in agents]
        assert all(u.run == run and u.base_round == u.round - 1 for u in ups)
        first = [u.metrics["loss"] for u in ups if u.round == 1]
        assert max(first) < (loss_init + loss_planted) / 2, (first, loss_init, loss_planted)
        ours = [g for g in obs.all_globals if g.run != old_run]
        assert ours and all(g.run == run for g in ours) and [g.round for g in ours] == sorted(g.round for g in ours)
        for a in agents:
            assert json.loads((tmp_path / f"{a}-cache" / "run.json").read_text())["run"] == run

        # the leftovers are gone: the only retained chunks are the ones the current pointers name
        after = p.retained(f"{t.global_()}/chunk/+", f"{t.model()}/chunk/+", t.global_(), t.model())
        for topic, blob in ((t.global_(), g_blob), (t.model(), m_blob)):
            idx, ptr = chunk_state(after, topic)
            assert ptr is not None and ptr.blob_id != blob, topic
            assert ptr.total < (g_n if topic == t.global_() else m_n)  # fewer chunks: the rest had to be cleared
            assert idx == {i: ptr.blob_id for i in range(ptr.total)}, (topic, sorted(idx.items()))
        assert f"'{t.global_()}': {g_n}" in agg.text() and f"'{t.model()}': {m_n}" in agg.text()
    finally:
        p.close()
        if obs is not None:
            obs.close()


# -- 2. a stale outbox cannot poison a new run -----------------------------------------------------------
@pytest.mark.parametrize("model_b", ["same-model", "other-model"])
def test_a_stale_outbox_cannot_poison_a_new_run(fleet, tmp_path, model_cache, model_b):
    f = fleet()
    t = Topics(f.broker["fleet"])
    agents = ["agent-0", "agent-1"]
    shards = watch_shards(agents, tmp_path, per_agent=100)
    rounds = {"rounds": 3, "select": "list", "agents": agents, "quorum": 2, "grace_s": 2, "deadline_s": 30}
    # run A: three rounds; the agents keep their round-3 updates in their outboxes (that round's
    # closing global is never fetched: the run ended), as a device would when its run is replaced
    agg_a = f.start_aggregator("agg-a", rounds=rounds)
    procs = [f.start_agent(a, shards[a]) for a in agents]
    wait_until(lambda: not agg_a.alive(), 120, what="run A")
    h_a = history(f, "agg-a")
    run_a = h_a[0]["run"]
    assert [r["outcome"] for r in h_a] == ["aggregated"] * 3
    f.stop_all()
    assert all(p.popen.returncode == 0 for p in procs), f.dump_logs()
    # positive control: the stale state exists: each agent's outbox holds run A's round-3 update
    stale: dict[str, bytes] = {}
    for a in agents:
        files = sorted((tmp_path / f"{a}-cache" / "outbox").glob("*.msgpack"))
        assert [fp.name.split("-")[0] for fp in files] == ["r00000003"] and run_a in files[0].name, files
        stale[a] = files[0].read_bytes()
        u = codec.decode(stale[a])
        assert (u.run, u.round, u.agent) == (run_a, 3, a)

    # run B: a fresh state_dir on the same fleet and the same agent cache dirs
    offsets = {p.name: len(p.text()) for p in procs}
    model = {"batch_size": 8} if model_b == "other-model" else {}
    obs = AllSeen(f)
    p = Plain(f.broker["host"], f.broker["port"])
    try:
        agg_b = f.start_aggregator("agg-b", rounds=rounds, model=model)
        obs.wait(lambda: any(r.run != run_a and r.round == 1 for r in obs.rounds), 90, "run B's round 1")
        run_b = next(r.run for r in obs.rounds if r.run != run_a)
        # positive control for the rejection counters read below: run A's update of agent-0, sent into
        # run B's open round as an old outbox would, is counted as wrong_run (and not as a participant)
        p.publish(t.update("agent-0"), stale["agent-0"])
        procs_b = {a: f.start_agent(a, shards[a]) for a in agents}
        wait_until(lambda: not agg_b.alive(), 120, what="run B")
        assert agg_b.popen.returncode == 0, agg_b.text()[-3000:]
        h_b = history(f, "agg-b")
        assert [(r["round"], r["run"], r["outcome"], sorted(r["participants_list"])) for r in h_b] == \
            [(n, run_b, "aggregated", agents) for n in (1, 2, 3)], h_b
        rejected = [{k: r["rejected"].get(k, 0) for k in STALE_REASONS if r["rejected"].get(k)} for r in h_b]
        assert rejected == [{"wrong_run": 1}, {}, {}], rejected  # only the injected one
        # what the bus carried in run B: each agent's update once per round, of run B, against run B's global
        obs.pump()
        ups_b = [u for u in obs.all_updates if u.run == run_b]
        assert sorted({(u.round, u.agent) for u in ups_b}) == [(n, a) for n in (1, 2, 3) for a in agents]
        assert [u.update_id for u in obs.all_updates if u.run != run_b] == [codec.decode(stale["agent-0"]).update_id]
        model_b_id = next(r.model_id for r in obs.rounds if r.run == run_b)
        assert all(u.model_id == model_b_id and u.base_round == u.round - 1 for u in ups_b)
        if model_b == "other-model":
            assert model_b_id != codec.decode(stale["agent-0"]).model_id
        for a in agents:
            text = log_after(procs_b[a], offsets[a])
            assert f"following new run {run_b} (was {run_a})" in text, text[-3000:]
            left = [fp.name for fp in (tmp_path / f"{a}-cache" / "outbox").glob("*.msgpack") if run_a in fp.name]
            assert left == [], left
    finally:
        p.close()
        obs.close()


# -- 5. revoked credentials -------------------------------------------------------------------------------
def test_revoked_agent_exits_3_and_the_rest_keeps_training(tmp_path, model_cache, request):
    prov = provision(ProvisionSpec("rv-" + uuid.uuid4().hex[:6], ["agent-a", "agent-b"], tmp_path / "prov",
                                   host="localhost"))
    b = prov.broker_dir
    (tmp_path / "sb").mkdir()
    lb = LocalBroker(SecureFiles(str(b / "passwd"), str(b / "acl"), str(b / "ca.crt"), str(b / "server.crt"),
                                 str(b / "server.key")), workdir=str(tmp_path / "sb")).start()
    f = Fleet(tmp_path, {}, model_cache=model_cache)
    agents = ["agent-a", "agent-b"]
    shards = watch_shards(agents, tmp_path, per_agent=100)
    try:
        agg = start_secure(prov, lb, f, "rounds = 50\nmin_agents = 1\ngrace_s = 2\ndeadline_s = 20", agents, shards)
        procs = {p.name: p for p in f.procs}
        # positive control: agent-b trains in this fleet before its revocation
        wait_until(lambda: any(sorted(r["participants_list"]) == agents for r in history(f)), 120,
                   what="a round with both agents")
        reloads = lb.log().count("Reloading config.")
        assert cli_main(["revoke", "--fleet-dir", str(prov.out_dir), "--agent", "agent-b",
                         "--pid", str(lb.proc.pid), "--broker", f"localhost:{lb.port}"]) == 0
        wait_until(lambda: lb.log().count("Reloading config.") > reloads, 10, what="the broker's reload")
        done = len(history(f))
        wait_until(lambda: not procs["agent-b"].alive(), 90, what="the revoked agent to stop")
        text_b = procs["agent-b"].text()
        assert procs["agent-b"].popen.returncode == 3, text_b[-3000:]
        assert "refused credentials for 'agent-b'" in text_b and "exit code 3" in text_b, text_b[-3000:]
        # the rest of the fleet keeps training: a later round aggregates with agent-a (and without agent-b)
        wait_until(lambda: any(r["participants_list"] == ["agent-a"] and r["outcome"] == "aggregated"
                               for r in history(f)[done:]), 90, what="a round after the revocation")
        assert agg.alive() and procs["agent-a"].alive()
        # the aggregator too: its password gone, the broker's next reload refuses it: exit 3
        reloads = lb.log().count("Reloading config.")
        set_passwd_line(b / "passwd", "aggregator", None)
        os.kill(lb.proc.pid, signal.SIGHUP)
        wait_until(lambda: lb.log().count("Reloading config.") > reloads, 10, what="the broker's reload")
        wait_until(lambda: not agg.alive(), 90, what="the aggregator to stop")
        assert agg.popen.returncode == 3, agg.text()[-3000:]
        assert "refused credentials for 'aggregator'" in agg.text(), agg.text()[-3000:]
        assert procs["agent-a"].alive()  # an agent whose credentials stand does not stop with it
    finally:
        f.stop_all()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f.dump_logs())
            print(lb.log()[-5000:])
        lb.cleanup()


# -- 6. after a broker SIGKILL nobody is served an older global ---------------------------------------------
@dataclass
class Fresh:
    """A plain paho client connecting the moment the port accepts, decoding what it is served."""

    host: str
    port: int
    topics: Topics
    globals: list[GlobalModel] = field(default_factory=list)
    rounds: list[RoundAnnouncement] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rx = Receiver(self.topics)
        self.plain: Plain | None = None

    def connect_asap(self, timeout: float = 30) -> None:
        def up() -> bool:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until(up, timeout, interval=0.005, what="the broker's port")
        self.plain = Plain(self.host, self.port)
        t = self.topics
        self.plain.subscribe(t.global_(), f"{t.global_()}/chunk/+", t.round())

    def pump(self) -> None:
        for m in self.plain.take():
            r = self.rx.feed(m.topic, bytes(m.payload), m.retain)
            if r is not None and isinstance(r.message, GlobalModel):
                self.globals.append(r.message)
            elif r is not None and isinstance(r.message, RoundAnnouncement):
                self.rounds.append(r.message)

    def close(self) -> None:
        if self.plain is not None:
            self.plain.close()


def test_after_a_broker_sigkill_no_client_is_served_an_older_global(fleet, tmp_path):
    f = fleet()
    t = Topics(f.broker["fleet"])
    b = f.local_broker
    agents = ["agent-0", "agent-1"]
    shards = watch_shards(agents, tmp_path, per_agent=100)
    early = Fresh(b.host, b.port, t)  # the collector, connected from the start
    early.connect_asap()
    late = Fresh(b.host, b.port, t)
    try:
        agg = f.start_aggregator(rounds={"rounds": 50, **FAST_ROUNDS})
        procs = [f.start_agent(a, shards[a]) for a in agents]
        wait_until(lambda: sum(r["outcome"] == "aggregated" for r in history(f)) >= 3, 120, what="three rounds")
        b.kill()
        t_kill = time.time()
        early.close()
        h = history(f)
        run = h[0]["run"]
        last = int(max(r["global_round"] for r in h if r["ts"] < t_kill))
        assert last >= 3
        b.start()
        late.connect_asap()
        n = len(history(f))
        # until the fleet has aggregated a round after the restart, and that round's global was served
        wait_until(lambda: any(r["outcome"] == "aggregated" for r in history(f)[n:]), 90,
                   what="a round aggregated after the broker restart")
        new = int(max(r["global_round"] for r in history(f)))

        def served_new() -> bool:
            late.pump()
            return any(g.round >= new for g in late.globals)

        wait_until(served_new, 30, what="the newest global to reach the fresh client")
        got = [(g.run, g.round) for g in late.globals]
        assert got and all(r == run for r, _ in got), got
        assert all(rnd >= last for _, rnd in got), (last, got)
        assert all(a.run == run and a.base_round >= last for a in late.rounds), [(a.run, a.base_round)
                                                                               for a in late.rounds]
        # positive control: the same collector records globals older than ``last`` when it is served them
        early.pump()
        assert {g.round for g in early.globals if g.run == run} >= set(range(last)), [g.round for g in early.globals]
        assert agg.alive() and all(p.alive() for p in procs)
    finally:
        early.close()
        late.close()


def test_with_persistence_on_a_restored_stale_global_is_served_but_never_trained_on(fleet, tmp_path):
    """The documented fallback (docs/protocol.md, broker restarts): with persistence on, a crash restores
    a snapshot, so a fresh client IS served an older global (the check of the test above catches it
    here: its positive control on a real broker); agents that had a newer global never train on it."""
    f = fleet(persistence=True)
    t = Topics(f.broker["fleet"])
    b = f.local_broker
    agents = ["agent-0", "agent-1"]
    shards = watch_shards(agents, tmp_path, per_agent=100)
    obs = AllSeen(f, reconnect_min_s=0.05, reconnect_max_s=0.2)
    late = Fresh(b.host, b.port, t)
    try:
        agg = f.start_aggregator(rounds={"rounds": 50, **FAST_ROUNDS})
        procs = [f.start_agent(a, shards[a]) for a in agents]
        wait_until(lambda: sum(r["outcome"] == "aggregated" for r in history(f)) >= 2, 120, what="two rounds")
        b.stop()  # a clean stop: Mosquitto writes its snapshot (the global of about round 2)
        b.start()
        n = len(history(f))
        wait_until(lambda: sum(r["outcome"] == "aggregated" for r in history(f)[n:]) >= 2, 90,
                   what="two rounds after the clean restart")
        b.kill()  # well within autosave_interval (60 s) of the snapshot: the restore is stale
        t_kill = time.time()
        h = history(f)
        run = h[0]["run"]
        last = int(max(r["global_round"] for r in h if r["ts"] < t_kill))
        b.start()
        late.connect_asap()
        wait_until(lambda: late.pump() or late.globals, 30, what="the first global after the crash")
        stale = late.globals[0]
        assert stale.run == run and stale.round < last, (stale.round, last)  # served an older global
        n = len(history(f))
        wait_until(lambda: sum(r["outcome"] == "aggregated" for r in history(f)[n:]) >= 2, 90,
                   what="two rounds after the crash")
        obs.pump()
        # nobody trained on it: no update after the crash is computed against a global older than ``last``,
        # and the aggregator refused nothing as stale; every round since counts both agents
        after = [r for r in history(f) if r["ts"] > t_kill]
        assert after and all(r["outcome"] == "aggregated" and sorted(r["participants_list"]) == agents
                             for r in after), after
        assert not any(r["rejected"].get(k) for r in after for k in STALE_REASONS), [r["rejected"] for r in after]
        ups = [u for u in obs.all_updates if u.created > t_kill]
        assert ups and all(u.run == run and u.base_round >= last for u in ups), \
            sorted((u.agent, u.round, u.base_round) for u in ups)
        assert agg.alive() and all(p.alive() for p in procs)
    finally:
        late.close()
        obs.close()


# -- issue 13.1: refused for now, counted when re-sent in its round -------------------------------------
def test_an_update_refused_for_now_counts_when_resent_in_its_round(fleet, tmp_path, model_cache):
    """An update refused for a reason that can change (``future``: its round is not open yet) is accepted
    when the same bytes (same update_id) are re-sent in its round; only a copy of an *accepted* update
    is refused as ``duplicate``. The sender is a plain client posing as listed agent ``ghost``."""
    f = fleet()
    t = Topics(f.broker["fleet"])
    served = served_model(model_cache)
    shards = watch_shards(["agent-0"], tmp_path, per_agent=100)
    obs = AllSeen(f, receipts_of=("ghost",))
    p = Plain(f.broker["host"], f.broker["port"])

    def update(rnd: int, run: str) -> bytes:
        zeros = {n: np.zeros_like(w, dtype=np.float32) for n, w in served.initial_weights().items()}
        return codec.encode(Update(rnd, "ghost", served.model_id, uuid.uuid4().hex, 50, zeros, {"loss": 1.0},
                                   time.time(), base_round=rnd - 1, run=run))

    def receipts(uid: str) -> list[Receipt]:
        obs.pump()
        return [r for r in obs.receipts if r.update_id == uid]

    try:
        agg = f.start_aggregator(rounds={"rounds": 2, "select": "list", "agents": ["agent-0", "ghost"], "quorum": 2,
                                         "grace_s": 2, "deadline_s": 60})
        obs.wait(lambda: any(r.round == 1 for r in obs.rounds), 60, "round 1 announced")
        run = obs.rounds[-1].run
        u2 = update(2, run)  # for round 2, while round 1 is open: "future"
        uid2 = codec.decode(u2).update_id
        p.publish(t.update("ghost"), u2)
        wait_until(lambda: receipts(uid2), 20, what="the receipt of the early round-2 update")
        (r,) = receipts(uid2)
        assert (r.accepted, r.reason, r.retry) == (False, "future", True), r
        u1 = update(1, run)
        uid1 = codec.decode(u1).update_id
        p.publish(t.update("ghost"), u1)
        p.publish(t.update("ghost"), u1)  # a copy of an accepted update: refused as duplicate, counted once
        wait_until(lambda: len(receipts(uid1)) == 2, 20, what="both receipts of the round-1 update")
        assert [(r.accepted, r.reason) for r in receipts(uid1)] == [(True, ""), (True, "duplicate")]
        f.start_agent("agent-0", shards["agent-0"])  # completes round 1; round 2 opens
        obs.wait(lambda: any(r.round == 2 for r in obs.rounds), 60, "round 2 announced")
        p.publish(t.update("ghost"), u2)  # the same bytes, now in their round
        wait_until(lambda: not agg.alive(), 60, what="round 2 to close")
        assert agg.popen.returncode == 0, agg.text()[-3000:]
        h = history(f)
        assert [(r["round"], r["outcome"], sorted(r["participants_list"])) for r in h] == \
            [(1, "aggregated", ["agent-0", "ghost"]), (2, "aggregated", ["agent-0", "ghost"])], h
        assert (h[0]["rejected"].get("future"), h[0]["rejected"].get("duplicate")) == (1, 1), h[0]["rejected"]
        assert not h[1]["rejected"], h[1]["rejected"]
        wait_until(lambda: len(receipts(uid2)) == 2, 20, what="the receipt of the re-sent update")
        assert receipts(uid2)[1].accepted and receipts(uid2)[1].round == 2
    finally:
        p.close()
        obs.close()
