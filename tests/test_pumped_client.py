"""The pumped MQTT client (``MqttClient(own_thread=False)``, the aggregator's) over a real broker.

No network thread: ``get``, the waits for acknowledgements and ``pump`` do the network work on the
caller's thread. It reads a batch ahead and leaves the rest in the broker, loses nothing it reads
while it waits for a PUBACK, and reconnects (with resubscriptions) after a broker restart.
"""

import threading
import uuid

import pytest
from conftest import needs_mosquitto, wait_until

from fedmq.broker.transport.client import MqttClient, MqttConfig, _BufferedReads

pytestmark = pytest.mark.network


def pumped(addr, name=None, **kw) -> MqttClient:
    cfg = MqttConfig(addr.host, addr.port, client_id=name or "p-" + uuid.uuid4().hex[:8],
                     protocol=getattr(addr, "protocol", "5"), **kw)
    c = MqttClient(cfg, own_thread=False)
    c.connect()
    return c


def threaded(addr, **kw) -> MqttClient:
    c = MqttClient(MqttConfig(addr.host, addr.port, client_id="t-" + uuid.uuid4().hex[:8],
                              protocol=getattr(addr, "protocol", "5"), **kw))
    c.connect()
    return c


def pump_until(c: MqttClient, pred, what: str, timeout: float = 20.0):
    def step():
        c.pump(0.05)
        return pred()

    return wait_until(step, timeout, interval=0, what=what)


def test_one_thread_and_nothing_lost_while_waiting_for_a_puback(broker, topics):
    """A publish that waits for its PUBACK pumps the network; what arrives meanwhile waits in the inbox."""
    with pumped(broker) as sub, threaded(broker) as pub:
        assert not [t for t in threading.enumerate() if t.name == f"paho-mqtt-client-{sub.cfg.client_id}"]
        sub.subscribe(topics.all_updates(), qos=1)  # waits for its SUBACK by pumping
        for i in range(200):
            pub.publish(topics.update(f"a{i}"), b"x" * 500, qos=1, wait=False)
        pub.publish(topics.update("a199"), b"x", qos=1)  # QoS 1 in order: the 200 before it are PUBACKed
        assert sub.publish(topics.metrics(), b"m", qos=1, timeout=10).reason_code < 0x80  # pumps meanwhile
        got = []
        while len(got) < 200:
            m = sub.get(timeout=10)
            assert m is not None, f"{len(got)} of 200"
            got.append(m.topic)
        assert got == [topics.update(f"a{i}") for i in range(200)] and sub.dropped == 0
        assert sub.get(timeout=10).payload == b"x"


@needs_mosquitto
def test_reads_a_batch_ahead_and_leaves_the_rest_in_the_broker(own_broker, topics):
    b = own_broker()
    kw = dict(clean_start=False, session_expiry=300, read_batch=10)
    sub = pumped(b, name="batch-1", **kw)
    sub.subscribe(topics.all_updates(), qos=1)
    sub.close()
    size, n = 2000, 300
    with threaded(b) as pub:
        for i in range(n):
            pub.publish(topics.update(f"a{i}"), bytes([i % 256]) * size, qos=1, wait=False)
        pub.publish(topics.metrics(), b"done", qos=1)  # QoS 1 in order: the others are PUBACKed too
    sub = pumped(b, name="batch-1", **kw)
    try:
        pump_until(sub, lambda: len(sub.inbox) >= 10, "a batch")
        for _ in range(20):
            sub.pump(0.02)
        # a batch, plus what one 64 KiB read of the buffered socket held: never the whole backlog
        assert len(sub.inbox) <= 10 + _BufferedReads.CHUNK // size + 1 < n
        got = []
        while len(got) < n:
            m = sub.get(timeout=10)
            assert m is not None, f"{len(got)} of {n}"
            got.append(m)
        assert [m.topic for m in got] == [topics.update(f"a{i}") for i in range(n)]
        assert all(m.payload == bytes([i % 256]) * size for i, m in enumerate(got)) and sub.dropped == 0
    finally:
        sub.close()
    assert sub._c.socket() is None


@needs_mosquitto
def test_reconnects_and_resubscribes_after_broker_restart(own_broker, topics):
    b = own_broker(persistence=False)
    sub = pumped(b, reconnect_min_s=0.05, reconnect_max_s=0.5)
    pub = threaded(b, reconnect_min_s=0.05, reconnect_max_s=0.5)
    try:
        sub.subscribe(topics.metrics())
        b.kill()
        pump_until(sub, lambda: not sub.connected, "disconnect")
        assert sub.get(timeout=0.2) is None  # pumping while the broker is down: retries, never raises
        b.start()
        pump_until(sub, lambda: sub.connected, "reconnect")
        wait_until(lambda: pub.connected, timeout=20, what="the publisher back")

        def delivered() -> bool:  # the re-sent SUBSCRIBE races the PUBLISH: until one arrives
            pub.publish(topics.metrics(), b"after-restart")
            m = sub.get(timeout=0.5)
            return m is not None and m.payload == b"after-restart"

        wait_until(delivered, 20, interval=0, what="a message through the re-made subscription")
        assert sub.reconnects >= 1
    finally:
        sub.close()
        pub.close()


def test_coalesced_writes_reach_the_peer_exactly_and_in_order():
    """The pumped client's writes: gathered and handed over in few sends, the byte stream exact, also
    when the peer does not read for a while (the kernel buffer fills: flush keeps the rest, never blocks)."""
    import os
    import socket

    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        w = _BufferedReads(b, coalesce=True)
        stream = os.urandom(3_000_000)
        pos, sent, got, refused = 0, 0, bytearray(), 0
        while len(got) < len(stream):
            full = False
            if pos < len(stream):
                n = min(len(stream) - pos, 1 + (pos * 7919) % 3000)  # packets of odd sizes, as paho's
                try:
                    assert w.send(stream[pos:pos + n]) == n  # taken whole, or refused whole
                    pos += n
                    sent += 1
                except BlockingIOError:  # OUT_MAX gathered and the peer is not reading: paho keeps the packet
                    assert w.unsent >= _BufferedReads.OUT_MAX
                    full, refused = True, refused + 1
            if full or sent % 50 == 0 or pos >= len(stream):  # a pump pass: flush, then the peer reads some
                w.flush()
                a.settimeout(0.5)
                try:
                    got += a.recv(16384)  # slower than 50 sends add: the buffers fill
                except TimeoutError:
                    pass
        assert bytes(got) == stream and w.unsent == 0
        assert refused > 0  # the full-buffer path was taken
        plain = _BufferedReads(b)  # not coalescing (the threaded client): send is the socket's
        assert plain.send(b"xyz") == 3 and a.recv(3) == b"xyz" and plain.unsent == 0
    finally:
        a.close()
        b.close()


def test_publishes_nobody_waits_for_leave_nothing_behind(broker, topics):
    """QoS 0 and wait=False publishes (the receipts): their acknowledgements are dropped, not kept for a
    waiter that never comes (paho's ReasonCode is ~2.4 KB: 10,000 receipts held 24 MB); a waited publish
    after them is still acknowledged, and every message arrives."""
    with pumped(broker) as c, threaded(broker) as sub:
        sub.subscribe(topics.base + "/agents/+/receipt", qos=1)
        for i in range(3000):
            c.publish(topics.receipt(f"a{i % 50}"), b"r", qos=i % 2, wait=False)
        assert c.publish(topics.metrics(), b"m", qos=1, timeout=10).reason_code < 0x80  # pumps: acks come in
        pump_until(c, lambda: not c._unwaited, "the QoS 1 acknowledgements nobody waits for")
        assert not c._early and not c._pending
        got = []
        wait_until(lambda: (got.extend(iter(lambda: sub.get(timeout=0), None)), len(got) >= 3000)[1], 20,
                   what="all 3,000 publishes delivered")
        assert len(got) == 3000


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_qos0_packets_framed_without_paho_arrive_exactly(broker, topics, protocol):
    """The pumped client frames QoS 0 PUBLISHes itself (the receipts); the broker parses them as paho's:
    every payload size across the remaining-length encodings (1, 2 and 3 bytes) arrives exactly, in
    order among themselves and with paho's QoS 1 publishes interleaved; MQTT 5 and 3.1.1."""
    import os

    sizes = [0, 1, 100, 127, 128, 300, 16_255, 16_256, 16_383, 16_384, 70_000, 200_000]
    addr = type("A", (), {"host": broker.host, "port": broker.port, "protocol": protocol})
    with pumped(addr) as c, threaded(broker) as sub:
        sub.subscribe(topics.base + "/agents/+/receipt", qos=1)
        sent = []
        for i in range(240):
            body = os.urandom(sizes[i % len(sizes)])
            qos = 1 if i % 5 == 0 else 0
            c.publish(topics.receipt(f"a{i % 7}"), body, qos=qos, wait=False)
            sent.append((topics.receipt(f"a{i % 7}"), body, qos))
            if i % 16 == 0:
                c.pump(0)
        assert c.direct_writes == sum(1 for *_, q in sent if q == 0) > 0  # the QoS 0 ones: framed here
        got = []
        pump_until(c, lambda: (got.extend(iter(lambda: sub.get(timeout=0), None)), len(got) >= len(sent))[1],
                   "every publish delivered")
        for q in (0, 1):  # MQTT orders messages of one QoS from one client
            want = [(t, b) for t, b, qq in sent if qq == q]
            assert [(m.topic, m.payload) for m in got if m.qos == q] == want
        assert c.connected  # a malformed packet would have made the broker close the connection


def test_a_late_acknowledgement_after_a_timeout_is_not_handed_to_a_reused_mid():
    """A waited publish that timed out: its acknowledgement, when it comes, is dropped, not kept for the next
    publish that draws the same mid (which would then report the old answer); a fresh wait still gets its own."""
    from fedmq.broker.errors import MqttTimeout
    from fedmq.broker.transport.client import _Waiter

    c = MqttClient(MqttConfig("127.0.0.1", 1, client_id="p-unit"), own_thread=False)  # never connected
    with pytest.raises(MqttTimeout):
        c._wait(7, _Waiter(), 0.01, "publish to x")
    c._resolve(7, "late")  # the timed-out publish's PUBACK
    assert 7 not in c._early and 7 not in c._unwaited
    w = _Waiter()
    with c._lock:
        c._pending[7] = w  # a later publish with mid 7 waits
    c._resolve(7, "fresh")
    assert w.event.is_set() and w.value == "fresh"


def test_a_tracked_publish_returns_at_once_and_its_answer_comes_with_a_later_pump(broker, topics):
    """track=True (the aggregator's retained state): no wait, no read-ahead while waiting; the broker's
    PUBACK sets the waiter when a later pump reads it; forget() drops an answer nobody wants any more."""
    with pumped(broker) as c:
        r = c.publish(topics.metrics(), b"m", qos=1, wait=False, track=True)
        assert r.waiter is not None and r.mid in c._pending
        pump_until(c, lambda: r.waiter.event.is_set(), "the tracked publish's PUBACK")
        assert r.waiter.value.value < 0x80 and r.mid not in c._pending
        r2 = c.publish(topics.metrics(), b"n", qos=1, wait=False, track=True)
        c.forget(r2.mid)
        assert r2.mid not in c._pending and r2.mid in c._unwaited
        pump_until(c, lambda: r2.mid not in c._unwaited, "the forgotten publish's PUBACK, dropped")
        assert not c._early and not r2.waiter.event.is_set()


def test_manual_ack_what_was_not_acknowledged_comes_again_and_only_that(broker, topics):
    """``manual_ack`` (the aggregator's): a QoS 1 message is acknowledged only by ``ack``; after the
    connection is lost the broker redelivers the unacknowledged ones to the resumed session (what was
    read but not handled), not the acknowledged ones. A token of the lost connection is not sent (its
    packet id may name another message on the new one). The marker published after the reconnect is
    the positive control: the broker redelivers a session's in-flight messages before anything new."""
    import paho.mqtt.client as paho

    from fedmq.broker.transport.client import AckToken

    with threaded(broker) as pub, pumped(broker, manual_ack=True, session_expiry=600,
                                         clean_start=paho.MQTT_CLEAN_START_FIRST_ONLY, reconnect_min_s=0.1,
                                         reconnect_max_s=0.2) as sub:
        sub.subscribe(topics.all_updates(), qos=1)
        for i in range(3):
            pub.publish(topics.update(f"a{i}"), f"m{i}".encode(), qos=1)
        got = [sub.get(timeout=10) for _ in range(3)]
        assert [m.payload for m in got] == [b"m0", b"m1", b"m2"]
        sub.ack(got[0])
        sub.ack(AckToken.of(got[2]))
        sub.pump(0.1)  # the acknowledgements go out with the next pump
        sub._c._sock_close()  # paho private: the connection is lost (no DISCONNECT)
        pump_until(sub, lambda: sub.reconnects >= 1 and sub.connected, "the reconnect")
        assert sub.session_present is True
        pub.publish(topics.update("marker"), b"marker", qos=1)
        seen = []
        while not seen or seen[-1].payload != b"marker":
            m = sub.get(timeout=10)
            assert m is not None, [x.payload for x in seen]
            seen.append(m)
        assert [m.payload for m in seen] == [b"m1", b"marker"]  # m0 and m2 were acknowledged
        sub.ack(got[1])  # of the lost connection: not sent, counted
        assert sub.acks_dropped == 1
        for m in seen:
            sub.ack(m)
        assert sub.acks_dropped == 1
