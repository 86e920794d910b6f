"""The MQTT layer over a real broker: chunking under a packet limit, size checks, dedupe, reconnects."""

import os
import signal
import subprocess
import sys
import uuid

import numpy as np
import pytest
from conftest import needs_mosquitto, wait_until

from fedmq.broker.contract import codec
from fedmq.broker.contract.messages import GlobalModel, Status, Update
from fedmq.broker.contract.topics import Channel
from fedmq.broker.errors import ConnectError, PayloadTooLarge
from fedmq.broker.transport.client import MqttClient, MqttConfig, backoff_delays
from fedmq.broker.transport.publisher import Publisher
from fedmq.broker.transport.receiver import Receiver

MID = "ab" * 32
RUN = "0123456789abcdef"  # a run id (every message of a run carries one)
pytestmark = pytest.mark.network


def client(addr, name=None, **kw) -> MqttClient:
    cfg = MqttConfig(addr.host, addr.port, client_id=name or "c-" + uuid.uuid4().hex[:8],
                     protocol=getattr(addr, "protocol", "5"), **kw)
    c = MqttClient(cfg)
    c.connect()
    return c


def drain(c: MqttClient, rx: Receiver, want: int, timeout: float = 20.0):
    got = []

    def step():
        m = c.get(timeout=0.1)
        if m is not None:
            r = rx.feed(m.topic, m.payload, m.retain)
            if r is not None:
                got.append(r)
        return len(got) >= want

    wait_until(step, timeout, interval=0, what=f"{want} messages")
    return got


def test_backoff_is_capped_and_jittered():
    import random

    d = backoff_delays(0.5, 8.0, random.Random(1))
    xs = [next(d) for _ in range(50)]
    assert all(0.25 <= x <= 8.0 for x in xs)
    assert len(set(xs)) > 40  # jittered
    assert max(xs[:3]) <= 2.0  # starts small


@needs_mosquitto
def test_20mb_update_chunked_under_1mb_packet_limit(own_broker, topics):
    b = own_broker(max_packet_size=1_000_000)
    rng = np.random.default_rng(0)
    w = {f"l{i}": rng.normal(size=1_250_000).astype(np.float32) for i in range(4)}  # 20 MB
    with client(b) as sub, client(b, name="agent-x") as pub:
        assert pub.broker_max_packet == 1_000_000  # advertised in CONNACK (MQTT 5)
        sub.subscribe(topics.all_updates())
        n = Publisher(pub, topics).publish(topics.update("agent-x"),
                                           Update(1, "agent-x", MID, uuid.uuid4().hex, 10, w, {}, 0.0, run=RUN))
        assert n >= 21
        rx = Receiver(topics)
        (r,) = drain(sub, rx, 1, timeout=60)
        assert r.topic.channel is Channel.UPDATE and r.topic.agent == "agent-x"
        for k, v in w.items():
            assert r.message.tensors[k].tobytes() == v.tobytes()
        assert not rx.rejected and pub.reconnects == 0


@needs_mosquitto
def test_oversized_publish_refused_client_side_without_reconnect_loop(own_broker, topics):
    b = own_broker(max_packet_size=100_000)
    with client(b) as c:
        with pytest.raises(PayloadTooLarge, match="chunk it"):
            c.publish(topics.metrics(), b"x" * 200_000)
        # still connected, never disconnected, and an ordinary publish works
        assert c.connected and c.reconnects == 0
        c.publish(topics.metrics(), b"y" * 1000)


def test_configured_max_payload_applies_too(broker, topics):
    with client(broker, max_payload=5000) as c:
        with pytest.raises(PayloadTooLarge):
            c.publish(topics.metrics(), b"x" * 6000)
        c.publish(topics.metrics(), b"x" * 4000)


def test_qos1_duplicate_counts_once_in_the_round(broker, topics):
    """A redelivered update reaches the application again; the round controller counts it once.

    The receiver does not de-duplicate updates (a copy refused for a reason that can change must count
    when re-sent): the controller refuses a copy of an accepted update as ``duplicate``.
    """
    from fedmq.aggregator.config import RoundsSection
    from fedmq.aggregator.rounds import RoundController
    from fedmq.aggregator.strategies import build_strategy
    from fedmq.broker.contract.messages import TrainConfig

    upd = Update(2, "dup-agent", MID, uuid.uuid4().hex, 5, {"w": np.ones(4, np.float32)}, {}, 0.0, base_round=1,
                 run=RUN)
    payload = codec.encode(upd)
    other = Update(2, "dup-agent", MID, uuid.uuid4().hex, 5, {"w": np.zeros(4, np.float32)}, {}, 0.0,
                   base_round=1, run=RUN)
    c = RoundController(build_strategy({"name": "fedavg"}), RoundsSection(quorum=1))
    c.open(2, MID, 1, {"w": np.zeros(4, np.float32)}, ["dup-agent"], TrainConfig(), 0.0, run=RUN)
    with client(broker) as sub, client(broker) as pub:
        sub.subscribe(topics.all_updates())
        for p in (payload, payload, codec.encode(other)):  # the second is a redelivery
            pub.publish(topics.update("dup-agent"), p, qos=1)
        rx = Receiver(topics)
        got = drain(sub, rx, 3)
        assert [g.message.update_id for g in got] == [upd.update_id, upd.update_id, other.update_id]
        assert [c.on_update(g.message, g.nbytes, 1.0) for g in got] == [None, "duplicate", "duplicate"]
        r, result = c.close()
        assert list(r.received) == ["dup-agent"] and r.received["dup-agent"] == upd.update_id
        np.testing.assert_array_equal(result.weights["w"], np.ones(4, np.float32))  # the first one, once


def test_retained_chunked_global_model_reaches_late_subscriber(broker, topics):
    w = {"w": np.arange(300_000, dtype=np.float32)}
    with client(broker, max_payload=200_000) as pub:
        p = Publisher(pub, topics)
        assert p.publish(topics.global_(), GlobalModel(1, MID, w, 0.0, run=RUN), retain=True) > 1
        # a smaller version later replaces it, and leaves no stale chunk behind
        p.publish(topics.global_(), GlobalModel(2, MID, {"w": np.ones(10, np.float32)}, 0.0, run=RUN), retain=True)
        assert p.publish(topics.global_(), GlobalModel(3, MID, w, 0.0, run=RUN), retain=True) > 1
    with client(broker) as late:
        for f in topics.with_chunks(topics.global_()):
            late.subscribe(f)
        rx = Receiver(topics)
        (r,) = drain(late, rx, 1)
        assert r.message.round == 3
        np.testing.assert_array_equal(r.message.tensors["w"], w["w"])


def test_rejections_counted_and_receiver_keeps_serving(broker, topics):
    with client(broker) as sub, client(broker) as pub:
        sub.subscribe(topics.all_updates())
        good = codec.encode(Update(1, "ok", MID, uuid.uuid4().hex, 1, {"w": np.ones(2, np.float32)}, {}, 0.0, run=RUN))
        spoof = codec.encode(Update(1, "victim", MID, uuid.uuid4().hex, 1, {"w": np.ones(2, np.float32)}, {}, 0.0, run=RUN))
        pub.publish(topics.update("ok"), b"\xff garbage")
        pub.publish(topics.update("ok"), spoof)  # claims another agent's id
        pub.publish(topics.update("ok"), good)
        rx = Receiver(topics)
        (r,) = drain(sub, rx, 1)
        assert r.message.agent == "ok"
        assert rx.rejected == {"malformed": 1, "agent_mismatch": 1}


AGENT_SCRIPT = r"""
import signal, sys
sys.path.insert(0, {root!r})
from fedmq.broker.transport.client import MqttClient, MqttConfig, Will
from fedmq.broker.contract import codec
from fedmq.broker.contract.messages import Status
c = MqttClient(MqttConfig({host!r}, {port}, client_id="will-agent", protocol={proto!r},
               will=Will({topic!r}, codec.encode(Status("will-agent", "offline", 0.0)))))
c.connect()
c.publish({topic!r}, codec.encode(Status("will-agent", "online", 1.0)), retain=True)
print("ready", flush=True)
signal.pause()  # until the test kills it
"""


def test_last_will_marks_killed_agent_offline(broker, topics):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    topic = topics.status("will-agent")
    proc = subprocess.Popen([sys.executable, "-c", AGENT_SCRIPT.format(root=root, host=broker.host, port=broker.port,
                            proto=broker.protocol, topic=topic)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with client(broker) as sub:
            sub.subscribe(topics.all_statuses())
            rx = Receiver(topics)
            (first,) = drain(sub, rx, 1)
            assert first.message.state == "online" and first.retained
            proc.send_signal(signal.SIGKILL)
            (second,) = drain(sub, rx, 1)
            assert isinstance(second.message, Status) and second.message.state == "offline"
    finally:
        proc.kill()
        proc.wait()


@needs_mosquitto
def test_reconnects_and_resubscribes_after_broker_restart(own_broker, topics):
    b = own_broker(persistence=False)
    with client(b, reconnect_min_s=0.05, reconnect_max_s=0.5) as sub, \
            client(b, reconnect_min_s=0.05, reconnect_max_s=0.5) as pub:
        sub.subscribe(topics.metrics())
        b.kill()
        wait_until(lambda: not sub.connected and not pub.connected, what="disconnect")
        b.start()
        wait_until(lambda: sub.connected and pub.connected, timeout=20, what="reconnect")

        # the re-sent SUBSCRIBE and the other client's PUBLISH race at the broker: publish until one
        # arrives (it can only arrive through the re-made subscription: the broker kept no session)
        def delivered() -> bool:
            pub.publish(topics.metrics(), b"after-restart")
            m = sub.get(timeout=0.5)
            return m is not None and m.payload == b"after-restart"

        wait_until(delivered, 20, interval=0, what="a message through the re-made subscription")
        assert sub.reconnects >= 1 and pub.reconnects >= 1


def test_connect_to_closed_port_fails_fast():
    from fedmq.broker.ops.launcher import free_port

    c = MqttClient(MqttConfig("127.0.0.1", free_port(), client_id="x"))
    with pytest.raises(ConnectError):
        c.connect(timeout=3)


@needs_mosquitto
def test_persistent_session_keeps_qos1_messages_while_offline(own_broker, topics):
    b = own_broker()
    cfg = dict(clean_start=False, session_expiry=300)
    sub = client(b, name="persist-1", **cfg)
    sub.subscribe(topics.metrics(), qos=1)
    sub.close()
    with client(b) as pub:
        pub.publish(topics.metrics(), b"while-away", qos=1)
    sub2 = client(b, name="persist-1", **cfg)
    try:
        m = sub2.get(timeout=10)
        assert m is not None and m.payload == b"while-away"
    finally:
        sub2.close()


# -- the buffered socket paho reads through (broker/transport/client.py, _BufferedReads) ----------------
def test_buffered_reads_return_the_stream_exactly_in_any_read_sizes():
    """Reads of paho's sizes (1 byte, the length bytes, a body) and odd ones return the byte stream
    exactly; pending() counts what is buffered; an empty non-blocking socket still raises, EOF is b""."""
    import random
    import socket

    from fedmq.broker.transport.client import _BufferedReads

    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        r = _BufferedReads(b)
        with pytest.raises(BlockingIOError):  # nothing there: as the socket itself
            r.recv(1)
        stream = os.urandom(300_000)
        a.sendall(stream[:100_000])
        rng = random.Random(3)
        got = bytearray()
        while len(got) < 100_000:
            try:
                got += r.recv(rng.choice([1, 1, 2, 5, 13, 4096, 70_000]))
            except BlockingIOError:
                continue
        assert bytes(got) == stream[:100_000]
        assert r.pending() == 0
        a.sendall(stream[100_000:])
        got = bytearray(r.recv(1))  # one byte asked, a 64 KiB chunk read: the rest is pending, not lost
        assert r.pending() > 0 and r.pending() + 1 <= _BufferedReads.CHUNK
        while len(got) < 200_000:
            try:
                got += r.recv(rng.choice([1, 3, 777, 100_000]))
            except BlockingIOError:
                continue
        assert bytes(got) == stream[100_000:]
        assert r.fileno() == b.fileno()  # select() and everything else: the wrapped socket
        a.close()
        assert r.recv(10) == b""  # EOF passes through
    finally:
        a.close()
        b.close()
