"""Chaos (issue 13 point 7): SIGKILL the aggregator, the broker and agents at seeded random moments.

``test_chaos_run_holds_every_check`` is the bounded run of bench/chaos.py (about 2 minutes, in the
default suite): a real Mosquitto with the project's config as shipped, a real aggregator and four
real agent processes, a supervisor restarting what it killed, an observer on the bus; then every
check of bench/chaos.py must hold. ``FEDMQ_CHAOS_SEED`` picks another seed; the 30-minute run is
``bench/chaos.py --minutes 30`` (figures in bench/RESULTS.md).

Every check can fail: the unit tests below break each one on a synthetic Record (positive controls),
and the observer, the supervisor's exit accounting and the hang detection are each shown catching a
real fault (a regressing / forked global published on a real broker, a process exiting on its own, a
process ignoring SIGTERM).
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from conftest import needs_mosquitto, wait_until
from fleet import Proc

sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))  # last: bench/ names never shadow
import chaos  # noqa: E402
from chaos import ChaosConfig, Record, SeenGlobal, SeenMetrics, SeenRound, check_all  # noqa: E402

from fedmq.broker.contract import codec  # noqa: E402
from fedmq.broker.contract.messages import GlobalModel, RoundAnnouncement, RoundMetrics, TrainConfig  # noqa: E402
from fedmq.broker.contract.topics import Topics  # noqa: E402

SEED = int(os.environ.get("FEDMQ_CHAOS_SEED", "13"))
RUN = "0123456789abcdef"
AGENTS = ("agent-0", "agent-1", "agent-2")


# -- the bounded chaos run -------------------------------------------------------------------------------
@needs_mosquitto
def test_chaos_run_holds_every_check(tmp_path, model_cache):
    # about 2 minutes: start-up (seconds), 90 s of faults, settling (seconds when all is well, at most 35 s)
    cfg = ChaosConfig(seconds=90, seed=SEED, agents=4, mean_gap_s=4.0, startup_s=30, settle_s=35)
    t = time.monotonic()
    try:
        rec, _ = chaos.run(cfg, tmp_path, model_cache)
    finally:
        keep = os.environ.get("FEDMQ_CHAOS_KEEP")  # a directory to copy the run (logs, state) to
        if keep:
            shutil.copytree(tmp_path, Path(keep) / f"seed{SEED}-{uuid.uuid4().hex[:6]}", symlinks=True)
    checks = check_all(rec)
    lines = chaos.summary(rec, checks)
    print(f"\nchaos seed {SEED}, {time.monotonic() - t:.0f} s wall\n" + "\n".join(lines))
    evidence = "\n".join(rec.exit_logs[:3] + rec.log_excerpts[:4])
    if evidence:
        print(evidence)
    hit = {k.split("_")[0] for k in rec.faults}
    assert hit >= {"aggregator", "broker", "agent"}, f"seed {SEED} did not fault every kind of process: {rec.faults}"
    failed = [c for c in checks if not c.ok]
    assert not failed, f"seed {SEED}: " + "; ".join(f"{c.name}: {c.detail}" for c in failed) + "\n" + evidence


# -- the checks on synthetic records (each must be able to fail) --------------------------------------------
def _g(t: float, rnd: int, sha: str | None = None, run: str = RUN) -> SeenGlobal:
    return SeenGlobal(t, rnd, "ab" * 8, sha or f"w{rnd}", False, run)


def good_record() -> Record:
    """Three aggregated rounds and one abandoned, published, recorded and seen as they should be."""
    rec = Record(agents=AGENTS, min_quorum=2, stall_s=30)
    rec.globals = [_g(0, 0), _g(1, 1), _g(2, 2), _g(2.5, 2), _g(4, 4)]
    rec.rounds = [SeenRound(r, r, 2, 0, RUN) for r in (1, 2, 3, 4)]
    parts = {1: AGENTS[:2], 2: AGENTS, 4: AGENTS[1:]}
    rec.metrics = [SeenMetrics(r + 0.1, r, "aggregated", parts[r], RUN) for r in (1, 2, 4)]
    rec.metrics.insert(2, SeenMetrics(3.1, 3, "abandoned", (), RUN))
    rec.history = [{"round": r, "run": RUN, "ts": 1000.0 + 10 * r, "outcome": "aggregated" if r in parts else
                    "abandoned", "participants": len(parts.get(r, ())), "participants_list": list(parts.get(r, ()))}
                   for r in (1, 2, 3, 4)]
    rec.window = (1000.0, 1045.0)
    rec.started = rec.progress_after_faults = True
    rec.back_after_faults = set(AGENTS)
    rec.faults.update(aggregator_kill=1, broker_kill=1, agent_kill=1)
    return rec


def test_a_good_record_passes_every_check():
    failed = [c for c in check_all(good_record()) if not c.ok]
    assert not failed, failed


def _hist(rec: Record, rnd: int) -> dict:
    return next(r for r in rec.history if r["round"] == rnd)


BREAKS = {
    "global_round_monotonic": lambda r: r.globals.append(_g(5, 2)),  # round 2 after round 4
    "one_run": lambda r: r.metrics.append(SeenMetrics(9, 4, "aggregated", AGENTS[1:], "fedcba9876543210")),
    "one_weight_set_per_round": lambda r: r.globals.insert(3, _g(2.2, 2, sha="other")),
    "metrics_only_for_published": lambda r: r.metrics.append(SeenMetrics(9, 3, "aggregated", AGENTS[:2], RUN)),
    "history_each_round_once": lambda r: r.history.insert(2, dict(_hist(r, 2))),  # round 2 twice
    "quorum_met": lambda r: _hist(r, 2).update(participants=1, participants_list=["agent-0"]),
    "bus_decodable": lambda r: r.undecodable.update({("global", "malformed"): 1}),
    "progress": lambda r: setattr(r, "progress_after_faults", False),
    "agents_back": lambda r: r.back_after_faults.discard("agent-2"),
    "no_stall": lambda r: setattr(r, "window", (1000.0, 1100.0)),  # 60 s after the last row
    "nothing_hung": lambda r: r.hung.append("agent-1 (no exit 30s after SIGTERM)"),
    "no_unplanned_exit": lambda r: r.unplanned_exits.append(("aggregator#3", 1, 12.0)),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_each_check_fails_on_its_violation(name):
    rec = good_record()
    BREAKS[name](rec)
    failed = {c.name for c in check_all(rec) if not c.ok}
    assert name in failed, f"{name} did not catch its violation"


MORE_BREAKS = [
    ("metrics_only_for_published", lambda r: r.metrics.append(SeenMetrics(9, 2, "aggregated", AGENTS[:2], RUN))),
    ("metrics_only_for_published", lambda r: r.metrics.append(SeenMetrics(9, 3, "abandoned", AGENTS[:1], RUN))),
    ("history_each_round_once", lambda r: r.history.reverse()),
    ("history_each_round_once", lambda r: setattr(r, "history_torn", 1)),
    ("history_each_round_once", lambda r: r.globals.append(_g(9, 5))),  # a global no history row backs
    ("history_each_round_once", lambda r: r.history.append({**_hist(r, 4), "round": 5})),  # never published
    ("quorum_met", lambda r: r.rounds.append(SeenRound(9, 5, 1, 0, RUN))),  # announced below the quorum
    ("quorum_met", lambda r: r.metrics.append(SeenMetrics(9, 4, "aggregated", ("agent-1",), RUN))),
    ("bus_decodable", lambda r: setattr(r, "chunked", 2)),
    ("bus_decodable", lambda r: r.unexpected.update({("metrics", "update"): 1})),
    ("progress", lambda r: setattr(r, "started", False)),
    ("no_stall", lambda r: setattr(r, "window", None)),
    ("one_run", lambda r: _hist(r, 1).update(run="fedcba9876543210")),
    ("global_round_monotonic", lambda r: r.globals.clear()),  # nothing seen proves nothing
]


@pytest.mark.parametrize("i", range(len(MORE_BREAKS)))
def test_more_violations_are_caught(i):
    name, brk = MORE_BREAKS[i]
    rec = copy.deepcopy(good_record())
    brk(rec)
    assert name in {c.name for c in check_all(rec) if not c.ok}


def test_read_history_counts_a_torn_line_only_at_the_end(tmp_path):
    p = tmp_path / "history.jsonl"
    p.write_text('{"round": 1}\n{"round": 2}\n{"rou')
    assert chaos.read_history(p) == ([{"round": 1}, {"round": 2}], 0)  # an append in progress
    assert chaos.read_history(p, final=True)[1] == 1
    p.write_text('{"round": 1}\nnot json\n')
    assert chaos.read_history(p) == ([{"round": 1}], 1)


# -- the machinery catches real faults ----------------------------------------------------------------------
@needs_mosquitto
def test_observer_sees_a_regressing_and_forked_global(own_broker):
    """Messages published on a real broker as a buggy aggregator would: the observer's record fails."""
    b = own_broker()
    topics = Topics("chaos-" + uuid.uuid4().hex[:8])
    rec = Record(agents=AGENTS, min_quorum=2)
    obs = chaos.Observer(b.host, b.port, topics, rec)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="chaos-pub-" + uuid.uuid4().hex[:6],
                      protocol=mqtt.MQTTv5)
    try:
        assert obs.subscribed.wait(15), "the observer never subscribed"
        pub.connect(b.host, b.port)
        pub.loop_start()
        mid = "ab" * 8

        def glob(rnd: int, v: float) -> bytes:
            return codec.encode(GlobalModel(rnd, mid, {"w": np.full(3, v, np.float32)}, 0.0, run=RUN))

        sent = [(topics.global_(), glob(1, 1.0)), (topics.global_(), glob(2, 2.0)),
                (topics.global_(), glob(2, 2.5)),  # round 2 with a second weight set
                (topics.global_(), glob(1, 1.0)),  # the round goes back
                (topics.round(), codec.encode(RoundAnnouncement(3, mid, 2, 0.0, 9.0, TrainConfig(), None, 1,
                                                                run=RUN))),
                (topics.metrics(), codec.encode(RoundMetrics(3, 0.0, "aggregated", ["agent-0"], {}, {}, run=RUN))),
                (topics.metrics(), b"\x93garbage"), (topics.update("agent-1"), b"not decoded")]
        for topic, payload in sent:
            pub.publish(topic, payload, qos=1).wait_for_publish(10)
        wait_until(lambda: len(rec.globals) == 4 and len(rec.metrics) == 1 and rec.undecodable and rec.rounds
                   and rec.updates_seen,
                   what="the observer to record every message")
    finally:
        pub.loop_stop()
        pub.disconnect()
        obs.close()
    assert [g.round for g in rec.globals] == [1, 2, 2, 1]
    assert set(rec.last_update) == {"agent-1"}
    failed = {c.name for c in check_all(rec) if not c.ok}
    assert {"global_round_monotonic", "one_weight_set_per_round", "metrics_only_for_published", "quorum_met",
            "bus_decodable"} <= failed
    assert "one_run" not in failed  # one run id throughout, as published


def test_supervisor_counts_an_exit_it_did_not_cause(tmp_path):
    """A process that exits on its own (here: an aggregator with an invalid config) is counted and restarted."""
    rec = Record()
    sup = chaos.Supervisor(ChaosConfig(agents=1), tmp_path, None, rec)
    bad = tmp_path / "bad.toml"
    bad.write_text("[rounds]\nrounds = -1\nno_such_key = 1\n")
    sup.configs = {"aggregator": ("fedmq.aggregator.cli", bad)}
    sup.start("aggregator")
    try:
        wait_until(lambda: (sup.supervise(time.monotonic(), 0.0), len(rec.unplanned_exits) >= 2)[1], timeout=60,
                   interval=0.1, what="two exits on its own (start, restart)")
    finally:
        sup.stop_all()
    assert rec.unplanned_exits[0][0] == "aggregator#1" and rec.unplanned_exits[0][1] not in (0, None)
    assert rec.restarts["aggregator"] >= 1 and rec.exit_logs
    assert not chaos.no_unplanned_exit(rec).ok


def test_a_process_ignoring_sigterm_is_named_hung(tmp_path):
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); " \
           "time.sleep(120)"
    log = tmp_path / "stubborn.log"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    wait_until(lambda: log.read_text().startswith("ready"), what="the process to ignore SIGTERM")
    ok = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    hung = chaos.stop_procs({"stubborn": Proc("stubborn", p, log), "polite": Proc("polite", ok, log)}, timeout=2)
    assert hung == ["stubborn (no exit 2s after SIGTERM)"]
    assert p.poll() == -signal.SIGKILL and ok.poll() == -signal.SIGTERM
