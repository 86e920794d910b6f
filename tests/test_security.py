"""A broker provisioned by `fedmq-broker provision`: TLS + passwords + ACL, enforced for real."""

import uuid

import numpy as np
import pytest

from fedmq.broker.contract import codec
from fedmq.broker.contract.messages import Update
from fedmq.broker.errors import AuthError, ConnectError, MqttError, PublishRejected, SubscribeRejected
from fedmq.broker.ops.certs import make_ca
from fedmq.broker.ops.provision import hash_password
from fedmq.broker.transport.client import MqttClient, MqttConfig, TlsConfig

pytestmark = pytest.mark.network
MID = "ab" * 32
RUN = "0123456789abcdef"  # a run id (every message of a run carries one)


def connect(prov, lb, user, *, password=None, ca=None, protocol="5", **kw):
    d = prov.client_dir(user) if user else prov.out_dir / "aggregator"
    tls = TlsConfig(str(ca or prov.ca_file), str(d / "client.crt"), str(d / "client.key"))
    cfg = MqttConfig("localhost", lb.port, client_id=(user or "anon") + "-" + uuid.uuid4().hex[:6],
                     username=user, password=password if password is not None else prov.passwords.get(user),
                     protocol=protocol, tls=tls, **kw)
    c = MqttClient(cfg)
    c.connect(timeout=10)
    return c


def update_bytes(agent):
    return codec.encode(Update(1, agent, MID, uuid.uuid4().hex, 3, {"w": np.ones(3, np.float32)}, {}, 0.0, run=RUN))


def until_marker(c: MqttClient, payload: bytes, timeout: float = 10.0) -> list:
    """Every message ``c`` receives up to and including the first with ``payload`` (the positive control of
    a negative check: Mosquitto delivers to one client in the order it routed, so anything that leaked
    before the marker was published comes before it)."""
    got = []
    while not got or got[-1].payload != payload:
        m = c.get(timeout=timeout)
        assert m is not None, f"the marker {payload!r} did not arrive (after {[g.topic for g in got]})"
        got.append(m)
    return got


def test_password_hash_matches_mosquitto_format():
    import base64
    import hashlib

    h = hash_password("secret", salt=b"0123456789ab")
    _, seven, it, salt, digest = h.split("$")
    assert seven == "7" and it == "101" and base64.b64decode(salt) == b"0123456789ab"
    assert base64.b64decode(digest) == hashlib.pbkdf2_hmac("sha512", b"secret", b"0123456789ab", 101)


def test_provisioned_files_and_permissions(secure_fleet):
    prov, _ = secure_fleet
    for p in [prov.broker_dir / "passwd", prov.broker_dir / "server.key", prov.out_dir / "ca/ca.key",
              prov.client_dir("agent-a") / "client.key", prov.client_dir("agent-a") / "agent.toml",
              prov.out_dir / "aggregator/aggregator.toml"]:
        assert p.stat().st_mode & 0o777 == 0o600, p
    acl = (prov.broker_dir / "acl").read_text()
    assert f"pattern write {prov.topics.base}/agents/%u/update" in acl
    assert prov.passwords["agent-a"] not in (prov.broker_dir / "passwd").read_text()


def test_anonymous_refused(secure_fleet):
    prov, lb = secure_fleet
    c = MqttClient(MqttConfig("localhost", lb.port, client_id="anon", tls=TlsConfig(str(prov.ca_file))))
    with pytest.raises(AuthError):
        c.connect(timeout=10)


def test_wrong_password_is_fatal_not_retried(secure_fleet):
    prov, lb = secure_fleet
    with pytest.raises(AuthError) as e:
        connect(prov, lb, "agent-a", password="wrong")
    assert "agent-a" in str(e.value) and "wrong" not in str(e.value)


def test_agent_acl(secure_fleet):
    prov, lb = secure_fleet
    t = prov.topics
    with connect(prov, lb, "agent-a") as a, connect(prov, lb, "aggregator") as agg:
        for f in (t.all_updates(), t.global_(), t.round(), t.model(), t.metrics()):
            agg.subscribe(f)
        # its own topics: accepted
        a.publish(t.update("agent-a"), update_bytes("agent-a"))
        m = agg.get(timeout=10)
        assert m is not None and m.topic == t.update("agent-a")
        # another agent's update, and the aggregator's topics: refused with reason code 0x87
        for topic in (t.update("agent-b"), t.global_(), t.round(), t.model(), t.metrics()):
            with pytest.raises(PublishRejected) as e:
                a.publish(topic, update_bytes("agent-b"))
            assert e.value.reason == "puback_0x87", topic
        # nothing leaked through: the next thing the aggregator sees is agent-a's next allowed update
        marker = update_bytes("agent-a")
        a.publish(t.update("agent-a"), marker)
        assert [m.topic for m in until_marker(agg, marker)] == [t.update("agent-a")]
        # shared model topics may be read
        for f in (t.global_(), t.round(), *t.with_chunks(t.model())):
            a.subscribe(f)
        # other agents' updates may not: Mosquitto 2.0 either refuses the SUBSCRIBE (newer
        # releases) or grants it and checks the read ACL per message; nothing may arrive
        for f in (t.update("agent-b"), t.all_updates(), t.base + "/#"):
            try:
                a.subscribe(f)
            except SubscribeRejected:
                pass
        with connect(prov, lb, "agent-b") as b:
            b.publish(t.update("agent-b"), update_bytes("agent-b"))
        m = agg.get(timeout=10)
        assert m is not None and m.topic == t.update("agent-b")  # the aggregator got it...
        # ...agent-a did not: a round announcement published after it was routed reaches agent-a (on its
        # round subscription and, where granted, the same "#" one that would carry the update) first
        agg.publish(t.round(), b"marker-round")
        assert {m.topic for m in until_marker(a, b"marker-round")} == {t.round()}


def test_aggregator_acl(secure_fleet):
    prov, lb = secure_fleet
    t = prov.topics
    with connect(prov, lb, "aggregator") as agg, connect(prov, lb, "agent-b") as b:
        b.subscribe(t.round())
        agg.publish(t.round(), b"round-1", retain=True)
        m = b.get(timeout=10)
        assert m is not None and m.payload == b"round-1"
        agg.publish(t.chunk(t.global_(), 3), b"part", retain=True)
        agg.publish(t.metrics(), b"m")
        with pytest.raises(PublishRejected):  # the aggregator cannot impersonate an agent
            agg.publish(t.update("agent-b"), update_bytes("agent-b"))


def test_mqtt311_acl_denied_publish_is_dropped_silently(secure_fleet):
    """Documented limitation of MQTT 3.1.1: no PUBACK reason codes, so denial is invisible."""
    prov, lb = secure_fleet
    t = prov.topics
    with connect(prov, lb, "agent-a", protocol="3.1.1") as a, connect(prov, lb, "aggregator") as agg:
        agg.subscribe(t.all_updates())
        a.publish(t.update("agent-b"), update_bytes("agent-b"))  # no error...
        a.publish(t.update("agent-a"), update_bytes("agent-a"))
        m = agg.get(timeout=10)
        assert m is not None and m.topic == t.update("agent-a")  # ...and the denied one did not arrive first
        marker = update_bytes("agent-a")
        a.publish(t.update("agent-a"), marker)
        assert [g.topic for g in until_marker(agg, marker)] == [t.update("agent-a")]  # nor after


def test_tls_fails_with_a_wrong_ca(secure_fleet, tmp_path):
    prov, lb = secure_fleet
    other = tmp_path / "other-ca.crt"
    other.write_bytes(make_ca("not ours").cert_pem)
    with pytest.raises(ConnectError):
        connect(prov, lb, "agent-a", ca=other)


def test_plain_tcp_to_tls_listener_fails(secure_fleet):
    prov, lb = secure_fleet
    c = MqttClient(MqttConfig("localhost", lb.port, client_id="plain", username="agent-a",
                              password=prov.passwords["agent-a"]))
    with pytest.raises(MqttError):
        c.connect(timeout=3)
    c.close()
