"""Signed models: agents train only on what the fleet's Ed25519 key signed (issue 15, point 1).

Unit level: the receiver of an agent holding the fleet's public key accepts a signed message (the
positive control) and refuses, with a counted reason and before decoding the body, an unsigned
one, one signed by another key, an altered one and one replayed on another channel; chunked
messages are verified after reassembly. On a real broker (TLS + passwords + ACL, provisioned with
a signing key): an admin client with write access to every topic publishes a forged global and a
forged model; no agent trains on them, the aggregator notices the foreign writes and puts its
state back, and the run completes with every agent in every round.
"""

from __future__ import annotations

import hashlib
import ssl
import uuid

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from conftest import needs_mosquitto, wait_until
from fleet import Fleet, watch_shards
from test_federation import history
from test_federation_secure import start_secure

from fedmq.broker.contract import codec, signing
from fedmq.broker.contract.chunking import split
from fedmq.broker.contract.messages import ChunkSet, GlobalModel, ModelManifest, RoundAnnouncement, Signed, TrainConfig
from fedmq.broker.contract.topics import Topics
from fedmq.broker.ops.launcher import LocalBroker, SecureFiles
from fedmq.broker.ops.provision import ProvisionSpec, hash_password, provision
from fedmq.broker.transport.receiver import Receiver

MID = "ab" * 32
RUN = "0123456789abcdef"
T = Topics("sig")


def _keys():
    pem, public = signing.generate()
    return signing.Signer(pem), signing.TrustedKeys.parse([public])


def _global(v: float = 0.5) -> GlobalModel:
    return GlobalModel(3, MID, {"w": np.full(8, v, np.float32)}, 1.0, run=RUN)


def test_signed_messages_verify_and_everything_else_is_refused_with_a_reason():
    signer, trust = _keys()
    other, _ = _keys()
    body = codec.encode(_global())
    rx = Receiver(T, trust=trust)
    got = rx.feed(T.global_(), signer.wrap("global", body), True)  # positive control
    assert isinstance(got.message, GlobalModel) and np.all(got.message.tensors["w"] == 0.5)
    env = codec.decode(signer.wrap("global", body))
    forged_body = codec.encode(_global(1e3))
    cases = {
        "unsigned": body,
        "unknown_key": other.wrap("global", forged_body),
        # the body altered after signing (a broker or a man in the middle)
        "bad_signature": codec.encode(Signed(env.key_id, env.sig, forged_body)),
    }
    for reason, payload in cases.items():
        assert rx.feed(T.global_(), payload, True) is None, reason
        assert rx.rejected[reason] == 1, (reason, dict(rx.rejected))
    # a genuine signature does not travel to another channel: a signed round replayed as a global
    ann = RoundAnnouncement(4, MID, 3, 0.0, 1e12, TrainConfig(), None, 1, run=RUN)
    replay = signer.wrap("round", codec.encode(ann))
    assert rx.feed(T.round(), replay, True) is not None  # where it was signed for: fine
    assert rx.feed(T.global_(), replay, True) is None and rx.rejected["bad_signature"] == 2
    # the aggregator's receiver (no trusted keys) accepts signed and unsigned alike
    plain = Receiver(T)
    assert plain.feed(T.global_(), body, True) is not None
    assert plain.feed(T.global_(), signer.wrap("global", body), True) is not None


def test_a_chunked_signed_global_is_verified_after_reassembly():
    signer, trust = _keys()
    other, _ = _keys()

    def chunked(payload: bytes):
        chunks = split(payload, 300)
        first = chunks[0]
        yield T.global_(), codec.encode(ChunkSet(first.blob_id, first.total, first.size, first.sha256))
        for c in chunks:
            yield T.chunk(T.global_(), c.index), codec.encode(c)

    big = GlobalModel(3, MID, {"w": np.arange(1000, dtype=np.float32)}, 1.0, run=RUN)
    rx = Receiver(T, trust=trust)
    out = [rx.feed(t, p, True) for t, p in chunked(signer.wrap("global", codec.encode(big)))]
    assert isinstance(out[-1].message, GlobalModel) and out[-1].message.tensors["w"][999] == 999  # control
    out = [rx.feed(t, p, True) for t, p in chunked(other.wrap("global", codec.encode(big)))]
    assert all(o is None for o in out) and rx.rejected["unknown_key"] == 1


def test_trusted_keys_config_is_checked():
    from fedmq.broker.errors import ConfigError
    from fedmq.edge_agent.config import AgentSection

    _, public = signing.generate()
    AgentSection(id="a", trusted_keys=[public]).validate("agent")  # control
    for bad in ("ed25519:AAAA", "rsa:" + public[8:], public[8:]):
        with pytest.raises(ConfigError):
            AgentSection(id="a", trusted_keys=[bad]).validate("agent")


# -- a real broker and a client with write access to everything -----------------------------------------

@pytest.fixture
def secure_with_admin(tmp_path, model_cache, request):
    prov = provision(ProvisionSpec("sig-" + uuid.uuid4().hex[:6], ["agent-a", "agent-b"], tmp_path / "prov",
                                   host="localhost"))
    b = prov.broker_dir
    admin_pw = uuid.uuid4().hex
    with open(b / "passwd", "a") as fh:  # an admin user added for the test: it may write every topic
        fh.write(f"admin:{hash_password(admin_pw)}\n")
    acl = (b / "acl").read_text()
    (b / "acl").write_text("user admin\ntopic readwrite #\n\n" + acl)
    (tmp_path / "sb").mkdir()
    lb = LocalBroker(SecureFiles(str(b / "passwd"), str(b / "acl"), str(b / "ca.crt"), str(b / "server.crt"),
                                 str(b / "server.key")), workdir=str(tmp_path / "sb"), max_packet_size=2_000_000).start()
    f = Fleet(tmp_path, {}, model_cache=model_cache)
    yield prov, lb, f, admin_pw
    f.stop_all()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f.dump_logs())
    lb.cleanup()


def _admin(prov, lb, pw):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="admin", protocol=mqtt.MQTTv5)
    c.username_pw_set("admin", pw)
    c.tls_set(ca_certs=str(prov.broker_dir / "ca.crt"), cert_reqs=ssl.CERT_REQUIRED)
    c.connect("localhost", lb.port)
    c.loop_start()
    return c


@needs_mosquitto
@pytest.mark.network
def test_forged_global_and_model_are_refused_and_the_honest_run_continues(secure_with_admin, tmp_path):
    prov, lb, f, admin_pw = secure_with_admin
    agents = ["agent-a", "agent-b"]
    shards = watch_shards(agents, tmp_path, per_agent=100)
    agg = start_secure(prov, lb, f, "rounds = 4\nmin_agents = 2\ngrace_s = 30\ndeadline_s = 60", agents, shards)
    topics = Topics(prov.topics.fleet)
    wait_until(lambda: len(history(f)) >= 1, 120, interval=0.2, what="round 1 (honest)")
    # what the honest model looks like (weight names and shapes), from the model cache's manifest
    adm = _admin(prov, lb, admin_pw)
    seen: dict = {}
    adm.on_message = lambda c, u, m: seen.setdefault(m.topic, m.payload)
    adm.subscribe(topics.round(), 1)
    wait_until(lambda: topics.round() in seen, 30, what="the retained round (admin)")
    env = codec.decode(seen[topics.round()])
    assert isinstance(env, Signed)  # the aggregator signs what it publishes
    ann = codec.decode(env.body)
    # forged: weights of 1e3 for the base round the agents will train on, unsigned and with a foreign key
    names = [w.name for w in _manifest_weights(f)]
    shapes = {w.name: tuple(w.shape) for w in _manifest_weights(f)}
    forged = GlobalModel(ann.base_round, ann.model_id, {n: np.full(shapes[n], 1e3, np.float32) for n in names}, 0.0,
                         run=ann.run)
    other, _ = _keys()
    fake_model = ModelManifest(hashlib.sha256(b"evil").hexdigest(), b"evil", [], [], 1, 0.0, run=ann.run)
    for payload in (codec.encode(forged), other.wrap("global", codec.encode(forged))):
        adm.publish(topics.global_(), payload, qos=1, retain=True).wait_for_publish(10)
    for payload in (codec.encode(fake_model), other.wrap("model", codec.encode(fake_model))):
        adm.publish(topics.model(), payload, qos=1, retain=True).wait_for_publish(10)
    wait_until(lambda: not agg.alive(), 240, interval=0.2, what="the run to finish despite the forgeries")
    adm.loop_stop()
    h = history(f)
    assert [r["outcome"] for r in h] == ["aggregated"] * 4, [(r["round"], r["outcome"]) for r in h]
    assert all(sorted(r["participants_list"]) == agents for r in h)
    # nobody trained on 1e3 weights: the agents' reported training loss stays that of the honest model
    assert all(np.isfinite(r.get("train_loss", 0.0)) and r.get("train_loss", 0.0) < 10 for r in h), h
    logs = {p.name: p.text() for p in f.procs}
    assert "someone else wrote" in logs["aggregator"]  # it noticed, and put its state back
    refused = "".join(logs[a] for a in agents)
    assert "unsigned" in refused or "unknown_key" in refused, refused[-3000:]
    # what each agent kept as its latest global verifies with the fleet's key
    trust = signing.TrustedKeys.parse([(prov.out_dir / "aggregator" / "signing.pub").read_text().strip()])
    for a in agents:
        raw = (f.tmp / f"{a}-cache" / "global.msgpack").read_bytes()
        got = Receiver(topics, trust=trust).feed(topics.global_(), raw, True)
        assert got is not None and got.message.run == ann.run


def _manifest_weights(f: Fleet):
    """The sensor1d model's weight specs, from the model cache the aggregator serves."""
    from fedmq.aggregator.config import ModelSection
    from fedmq.aggregator.model_store import load_or_export

    served = load_or_export(ModelSection(source="zoo:sensor1d", batch_size=16, verify_steps=5), f.model_cache)
    return served.weights
