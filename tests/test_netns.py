"""Self-test of the network-namespace harness (tests/netns.py): a real Mosquitto on the host end of a
veth pair, a plain paho client inside the namespace; tbf makes the link thin, a cut breaks it."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from conftest import needs_mosquitto, wait_until
from netns import TBF_BURST, netns, probe_argv, tbf_available, unavailable

_why = unavailable()
pytestmark = [needs_mosquitto, pytest.mark.network,
              pytest.mark.skipif(_why is not None, reason=_why or "")]

MTU = 1500


class Probe:
    """The paho probe of tests/netns.py running inside a namespace: commands in, JSON events out."""

    def __init__(self, ns, host: str, port: int, *args: str) -> None:
        self.p = ns.popen(probe_argv(host, port, *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.events: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"ev": "output", "line": line.rstrip()})

    def send(self, **cmd) -> None:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()

    def wait(self, ev: str, timeout: float, **match) -> dict:
        """The next event named ``ev`` (whose fields equal ``match``); events before it are kept in seen."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {ev} {match} within {timeout}s; seen: {self.seen[-10:]}")
            try:
                e = self.events.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(e)
            if e.get("ev") == ev and all(e.get(k) == v for k, v in match.items()):
                return e

    def close(self) -> None:
        try:
            self.send(cmd="quit")
            self.p.wait(15)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.p.kill()
            self.p.wait(15)


def _host_client(host: str, port: int) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="host-" + uuid.uuid4().hex[:8],
                    protocol=mqtt.MQTTv5)
    c.connect(host, port)
    c.loop_start()
    wait_until(c.is_connected, 10, what="host-side client connected")
    return c


def _upload_seconds(probe: Probe, topic: str, n: int) -> float:
    probe.send(cmd="publish", topic=topic, bytes=n, qos=1)
    e = probe.wait("published", 120, topic=topic)
    assert e["bytes"] == n
    return e["seconds"]


def _download_seconds(probe: Probe, host: mqtt.Client, topic: str, n: int) -> float:
    probe.send(cmd="subscribe", topic=topic)
    probe.wait("subscribed", 30)
    t0 = time.perf_counter()
    host.publish(topic, bytes(n), qos=1)
    e = probe.wait("message", 120, topic=topic)
    assert e["bytes"] == n
    return time.perf_counter() - t0


@pytest.mark.skipif(tbf_available() is not None, reason=tbf_available() or "")
def test_tbf_makes_a_1mb_transfer_as_slow_as_its_rate_both_ways(own_broker):
    """1 MB through a 1 Mbit/s tbf cannot take less than (bytes - burst)/rate; unshaped it is much faster."""
    n, rate_bps = 1_000_000, 1_000_000 / 8  # tc's "1mbit" is 10^6 bit/s
    burst = int(TBF_BURST.removesuffix("kb")) * 1024
    floor = (n - burst - 2 * MTU) / rate_bps  # the most a token bucket can pass in T is burst + rate*T
    with netns() as ns:
        b = own_broker(host=ns.host_ip)
        probe = Probe(ns, ns.host_ip, b.port)
        host = _host_client(ns.host_ip, b.port)
        try:
            probe.wait("connected", 30)
            up_fast = _upload_seconds(probe, "t/up-fast", n)
            down_fast = _download_seconds(probe, host, "t/down-fast", n)
            ns.shape("1mbit")
            q = ns.qdisc()
            assert q.count("tbf") == 2 and "rate 1Mbit" in q, q
            up_slow = _upload_seconds(probe, "t/up-slow", n)
            down_slow = _download_seconds(probe, host, "t/down-slow", n)
            ns.unshape()
            up_again = _upload_seconds(probe, "t/up-again", n)
        finally:
            host.loop_stop()
            host.disconnect()
            probe.close()
    print(f"1 MB up/down: unshaped {up_fast:.3f}/{down_fast:.3f} s, 1 Mbit/s {up_slow:.2f}/{down_slow:.2f} s "
          f"(floor {floor:.2f} s), unshaped again {up_again:.3f} s")
    assert up_slow >= 0.95 * floor and down_slow >= 0.95 * floor
    assert up_slow > 3 * up_fast and down_slow > 3 * down_fast
    assert up_slow > 3 * up_again  # the shaping is gone after unshape()


@pytest.mark.parametrize("side", ["host", "ns"])
def test_link_cut_disconnects_and_restore_reconnects(own_broker, side):
    """A cut ends the MQTT connection (keepalive 2 s for a silent host-side cut, at once for the inside end);
    restoring the link reconnects the client, and a message crosses the mended link."""
    with netns() as ns:
        b = own_broker(host=ns.host_ip)
        probe = Probe(ns, ns.host_ip, b.port, "--keepalive", "2")
        host = _host_client(ns.host_ip, b.port)
        try:
            probe.wait("connected", 30)
            probe.send(cmd="subscribe", topic="t/x")
            probe.wait("subscribed", 30)
            host.publish("t/x", b"before", qos=1)
            probe.wait("message", 30, topic="t/x", bytes=6)  # positive control: the link works
            ns.cut(side)
            probe.send(cmd="publish", topic="t/during", bytes=10, qos=1)  # traffic into the cut link
            probe.wait("disconnected", 60)
            ns.restore()
            probe.wait("connected", 60)
            probe.send(cmd="subscribe", topic="t/y")
            probe.wait("subscribed", 30)
            host.publish("t/y", b"after!!", qos=1)
            probe.wait("message", 30, topic="t/y", bytes=7)
        finally:
            host.loop_stop()
            host.disconnect()
            probe.close()


def test_teardown_leaves_nothing_behind():
    with netns(rate="1mbit") as ns:
        name, hif = ns.name, ns.host_if
        assert name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", hif], capture_output=True).returncode != 0
    with pytest.raises(RuntimeError), netns() as ns:  # torn down after an exception too
        name = ns.name
        raise RuntimeError("boom")
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
