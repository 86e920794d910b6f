"""The federation on a provisioned broker (TLS + passwords + ACL), and a hostile agent with valid credentials."""

from __future__ import annotations

import json
import struct
import time
import uuid

import msgpack
import numpy as np
import pytest
from conftest import needs_mosquitto, wait_until
from fleet import Fleet, watch_shards
from test_federation import history

from fedmq.broker.contract import codec
from fedmq.broker.contract.messages import Chunk, RoundAnnouncement, Status, Update
from fedmq.broker.ops.launcher import LocalBroker, SecureFiles
from fedmq.broker.ops.provision import ProvisionSpec, provision
from fedmq.broker.transport.client import MqttClient, MqttConfig, TlsConfig
from fedmq.broker.transport.receiver import Receiver

pytestmark = [pytest.mark.network, needs_mosquitto]


@pytest.fixture
def secure(tmp_path, model_cache, request):
    prov = provision(ProvisionSpec("sec-" + uuid.uuid4().hex[:6], ["agent-a", "agent-b", "agent-c"],
                                   tmp_path / "prov", host="localhost"))
    b = prov.broker_dir
    (tmp_path / "sb").mkdir()
    lb = LocalBroker(SecureFiles(str(b / "passwd"), str(b / "acl"), str(b / "ca.crt"), str(b / "server.crt"),
                                 str(b / "server.key")), workdir=str(tmp_path / "sb"), max_packet_size=2_000_000).start()
    f = Fleet(tmp_path, {}, model_cache=model_cache)
    yield prov, lb, f
    f.stop_all()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f.dump_logs())
        print(lb.log()[-5000:])
    lb.cleanup()


def provisioned_config(prov, lb, who: str, extra: str) -> str:
    """The provisioned config of ``who`` with the test's tables merged in (tables the two share are merged)."""
    import tomllib

    from fedmq.broker.commands.config import write_toml

    d = prov.client_dir(who)
    name = "aggregator.toml" if who == "aggregator" else "agent.toml"
    base = tomllib.loads((d / name).read_text().replace("port = 8883", f"port = {lb.port}"))
    for table, values in tomllib.loads(extra).items():
        base.setdefault(table, {}).update(values)
    return str(write_toml(d / f"run-{name}", base))


def start_secure(prov, lb, f: Fleet, rounds: str, agents: list[str], shards, service: str = "") -> object:
    state = f.tmp / "aggregator-state"
    state.mkdir(exist_ok=True)
    (state / "models").symlink_to(f.model_cache)
    agg_cfg = provisioned_config(prov, lb, "aggregator", f"""
[service]
state_dir = "{state}"
export_final = false
{service}
[model]
source = "zoo:sensor1d"
batch_size = 16
verify_steps = 5
[rounds]
{rounds}
[train]
epochs = 1
lr = 0.05
""")
    agg = f.spawn("aggregator", "fedmq.aggregator.cli", agg_cfg)
    for a in agents:
        cfg = provisioned_config(prov, lb, a, f"""
[data]
source = "npz:{shards[a]}"
""")
        cfg = provisioned_config(prov, lb, a, f"""
[data]
source = "npz:{shards[a]}"
[agent]
cache_dir = "{f.tmp / (a + '-cache')}"
""")  # the provisioned id, credentials and trusted key stay
        f.spawn(a, "fedmq.edge_agent.cli", cfg)
    return agg


def test_happy_path_over_tls_passwords_and_acl(secure, tmp_path):
    prov, lb, f = secure
    agents = ["agent-a", "agent-b"]
    shards = watch_shards(agents, tmp_path, per_agent=100)
    agg = start_secure(prov, lb, f, "rounds = 3\nmin_agents = 2\ngrace_s = 3\ndeadline_s = 60", agents, shards)
    wait_until(lambda: not agg.alive(), 120, what="three rounds over TLS")
    h = history(f)
    assert [r["outcome"] for r in h] == ["aggregated"] * 3
    assert all(sorted(r["participants_list"]) == agents for r in h)
    assert "password" not in f.procs[0].text() or prov.passwords["aggregator"] not in f.procs[0].text()
    for p in f.procs:  # secrets never reach the logs
        for pw in prov.passwords.values():
            assert pw not in p.text()


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_hostile_agent_is_rejected_with_reasons_and_memory_stays_bounded(secure, tmp_path):
    prov, lb, f = secure
    agents = ["agent-a", "agent-b"]
    shards = watch_shards(agents, tmp_path, per_agent=100)
    d = prov.client_dir("agent-c")
    evil = MqttClient(MqttConfig("localhost", lb.port, client_id="agent-c", username="agent-c",
                                 password=prov.passwords["agent-c"],
                                 tls=TlsConfig(str(d / "ca.crt"), str(d / "client.crt"), str(d / "client.key"))))
    evil.connect()
    t = prov.topics
    evil.publish(t.status("agent-c"), codec.encode(Status("agent-c", "online", time.time())), retain=True)
    for topic in (t.round(), *t.with_chunks(t.global_())):
        evil.subscribe(topic)
    # quarantine off: this test follows every rejection of agent-c through the rounds (the quarantine of
    # a flooder is tests/test_attacks.py's)
    agg = start_secure(prov, lb, f, "rounds = 2\nmin_agents = 3\nquorum = 2\ngrace_s = 8\ndeadline_s = 90",
                       agents, shards, service="[limits]\nquarantine_msgs_per_s = 0")
    rx = Receiver(t)
    state = {}

    def see():
        m = evil.get(timeout=0.05)
        while m is not None:
            r = rx.feed(m.topic, m.payload, m.retain)
            if r is not None:
                state[type(r.message).__name__] = r.message
            m = evil.get(timeout=0)
        ann = state.get("RoundAnnouncement")
        return ann is not None and ann.round == 1 and "GlobalModel" in state

    wait_until(see, 90, what="round 1 as seen by the hostile agent")
    ann: RoundAnnouncement = state["RoundAnnouncement"]
    g = state["GlobalModel"].tensors
    good = {n: np.zeros_like(a) for n, a in g.items()}
    name0 = next(iter(g))
    upd = lambda **kw: Update(**{"round": 1, "agent": "agent-c", "model_id": ann.model_id,  # noqa: E731
                                "update_id": uuid.uuid4().hex, "num_samples": 10, "tensors": good,
                                "metrics": {}, "created": 0.0, "run": ann.run, **kw})
    me = t.update("agent-c")
    pid = agg.popen.pid
    rss_before = rss_mb(pid)
    attacks = [
        codec.encode(upd(round=7)),  # a future round
        codec.encode(upd(model_id="ee" * 32)),  # wrong model
        codec.encode(upd(tensors={**good, name0: np.zeros((3, 3), np.float32)})),  # wrong shape
        codec.encode(upd(tensors={**good, name0: np.full(g[name0].shape, np.nan, np.float32)})),  # NaN
        codec.encode(upd(agent="agent-a")),  # claims another agent's id
        b"\x00garbage\xff",
        b"\x82\xa1v\x01\xa4kind\xc6\xff\xff\xff\xff",  # bin32 declaring 4 GiB
        msgpack.packb({"v": 99, "kind": "update"}),  # unknown schema version
    ]
    for p in attacks:
        evil.publish(me, p)
    # floods: thousands of chunks of blobs that never complete, and garbage
    for i in range(1500):
        size = 1 << 30 if i % 2 else 50_000_000  # over the blob limit / within it, never completed
        c = Chunk(f"{i:032x}", 0, 1000, 0, size, b"\0" * 32, b"z" * 1000)
        evil.publish(me, codec.encode(c), wait=(i % 100 == 99))
    for i in range(1500):
        evil.publish(me, struct.pack(">I", i) * 200, wait=(i % 100 == 99))
    wait_until(lambda: len(history(f)) >= 1, 120, what="round 1 to close despite the attack")
    rss_after = rss_mb(pid)
    # round 2: a stale update for round 1
    def in_round_2():
        see()
        return state["RoundAnnouncement"].round == 2
    wait_until(in_round_2, 60, what="round 2")
    evil.publish(me, codec.encode(upd(round=1)))
    wait_until(lambda: not agg.alive(), 120, what="the run to finish")
    evil.close()
    h = history(f)
    assert [r["outcome"] for r in h] == ["aggregated", "aggregated"]
    assert all(sorted(r["participants_list"]) == agents for r in h)  # agent-c never counted
    rej = h[0]["rejected"]
    print(rej)
    for reason in ("future", "wrong_model", "bad_shape", "non_finite", "agent_mismatch", "malformed",
                   "truncated", "bad_version", "chunk_too_large"):
        assert rej.get(reason, 0) >= 1, (reason, rej)
    # the floods: Mosquitto may drop part of a flood queued for a busy aggregator, and the aggregator's
    # per-agent rate limit drops most of the rest before decoding; what arrived is counted, by reason
    flood = sum(rej.get(k, 0) for k in ("rate_limited", "chunk_too_large", "chunk_flood", "chunk_memory",
                                         "chunk_budget", "malformed", "truncated", "schema", "bad_kind"))
    assert 1 <= flood <= 3000 + len(attacks), rej
    assert rej.get("internal", 0) == 0, rej
    assert h[1]["rejected"].get("late", 0) + h[1]["rejected"].get("stale", 0) == 1
    assert rss_after < 1.5 * rss_before + 20, (rss_before, rss_after)  # bounded relative to its own level
    print(json.dumps({"rss_before_mb": rss_before, "rss_after_mb": rss_after, "rejected": rej}))
