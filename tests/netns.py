"""Thin and broken links for tests: a network namespace joined to the host by a veth pair.

``with netns(rate="1mbit") as ns:`` makes a namespace with a unique name, a veth pair (host end
``ns.host_if`` at ``ns.host_ip``, namespace end ``ns.ns_if`` at ``ns.ns_ip``, a /30 of 10.201.0.0/16
not used on this host), an optional tbf rate limit on both ends (egress of each end: the upload and
the download), and tears it all down in a ``finally``. A process runs inside with ``ns.popen([...])``
(``ip netns exec NAME ...``); it reaches the host side, e.g. a broker listening on ``ns.host_ip``.

``ns.cut()`` / ``ns.restore()`` break and mend the link. ``side="host"`` (the default) downs the host
end: packets from inside leave into a dead cable and vanish without an error, as when a radio link or a
far router dies, so TCP notices only by its own timeouts (MQTT keepalive). ``side="ns"`` downs the inside
end: the namespace loses its route and sends fail at once (ENETUNREACH).

netem (delay, loss) is not available on these kernels; tbf is. ``unavailable()`` says why namespaces
cannot be made here (not root, no ``ip netns``), for ``pytest.skip``.

Run as a script inside a namespace, this file is a small paho probe speaking JSON lines on stdout
(``python tests/netns.py probe --host H --port P ...``): see ``probe_main``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

TBF_BURST = "10kb"
TBF_LATENCY = "400ms"


def _ip(*args: str, check: bool = True, netns: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["ip", *(("netns", "exec", netns, "ip") if netns else ()), *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    name = "fqchk-" + uuid.uuid4().hex[:8]
    try:
        r = _ip("netns", "add", name, check=False)
        if r.returncode != 0:
            return f"`ip netns add` failed: {r.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


def tbf_available() -> str | None:
    """Why a tbf qdisc cannot be used, or None."""
    if shutil.which("tc") is None:
        return "tc (iproute2) is not installed"
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 of 10.201.0.0/16 that no address on this host falls in (other test runs may hold some)."""
    used = _ip("-o", "-4", "addr", "show").stdout
    rng = random.Random(uuid.uuid4().int)
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.201.{rng.randrange(256)}.{rng.randrange(64) * 4}/30")
        hosts = [str(h) for h in net.hosts()]
        if not any(f" {h}/" in used for h in hosts):
            return net
    raise RuntimeError("no free /30 in 10.201.0.0/16")


@dataclass
class NetNs:
    name: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str
    rate: str | None = None

    # -- running things inside -------------------------------------------------------------------
    def argv(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        """Start ``cmd`` inside the namespace (same arguments as subprocess.Popen)."""
        return subprocess.Popen(self.argv(cmd), **kw)

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("timeout", 60)
        return subprocess.run(self.argv(cmd), **kw)

    # -- shaping -------------------------------------------------------------------------------------
    def shape(self, rate: str, burst: str = TBF_BURST, latency: str = TBF_LATENCY) -> None:
        """A tbf rate limit on the egress of both ends (replacing any earlier one)."""
        subprocess.run(["tc", "qdisc", "replace", "dev", self.host_if, "root", "tbf", "rate", rate, "burst", burst,
                        "latency", latency], check=True, capture_output=True, timeout=30)
        self.run(["tc", "qdisc", "replace", "dev", self.ns_if, "root", "tbf", "rate", rate, "burst", burst,
                  "latency", latency], check=True, capture_output=True)
        self.rate = rate

    def unshape(self) -> None:
        subprocess.run(["tc", "qdisc", "del", "dev", self.host_if, "root"], capture_output=True, timeout=30)
        self.run(["tc", "qdisc", "del", "dev", self.ns_if, "root"], capture_output=True)
        self.rate = None

    def qdisc(self) -> str:
        """``tc qdisc show`` of both ends (for assertions and failure messages)."""
        h = subprocess.run(["tc", "qdisc", "show", "dev", self.host_if], capture_output=True, text=True).stdout
        n = self.run(["tc", "qdisc", "show", "dev", self.ns_if], capture_output=True, text=True).stdout
        return h + n

    # -- breaking the link ---------------------------------------------------------------------------
    def cut(self, side: str = "host") -> None:
        """Break the link: ``host`` downs the host end (silent loss), ``ns`` the inside end (sends fail)."""
        if side == "host":
            _ip("link", "set", self.host_if, "down")
        elif side == "ns":
            _ip("link", "set", self.ns_if, "down", netns=self.name)
        else:
            raise ValueError(f"side must be 'host' or 'ns', not {side!r}")

    def restore(self) -> None:
        """Mend the link (both ends up; the addresses and qdiscs stay)."""
        _ip("link", "set", self.host_if, "up")
        _ip("link", "set", self.ns_if, "up", netns=self.name)


@contextlib.contextmanager
def netns(rate: str | None = None, prefix: str = "fq") -> Iterator[NetNs]:
    """A namespace + veth pair with unique names, shaped to ``rate`` (tbf) if given; always torn down."""
    tag = uuid.uuid4().hex[:6]
    net = _free_subnet()
    host_ip, ns_ip = (str(h) for h in net.hosts())
    ns = NetNs(f"{prefix}-{tag}", f"{prefix}{tag}h", f"{prefix}{tag}d", host_ip, ns_ip)
    try:
        _ip("netns", "add", ns.name)
        _ip("link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if)
        _ip("link", "set", ns.ns_if, "netns", ns.name)
        _ip("addr", "add", f"{host_ip}/30", "dev", ns.host_if)
        _ip("link", "set", ns.host_if, "up")
        _ip("addr", "add", f"{ns_ip}/30", "dev", ns.ns_if, netns=ns.name)
        _ip("link", "set", ns.ns_if, "up", netns=ns.name)
        _ip("link", "set", "lo", "up", netns=ns.name)
        if rate:
            ns.shape(rate)
        yield ns
    finally:
        _ip("link", "del", ns.host_if, check=False)  # deletes both ends
        _ip("netns", "del", ns.name, check=False)


# -- a probe client for the inside of a namespace ------------------------------------------------------
PROBE = Path(__file__).resolve()


def probe_argv(host: str, port: int, *args: str) -> list[str]:
    """The command line of the probe (run it with ``ns.popen(probe_argv(...), stdout=PIPE, text=True)``)."""
    return [sys.executable, str(PROBE), "probe", "--host", host, "--port", str(port), *args]


def probe_main(argv: list[str]) -> int:
    """A plain paho client that prints one JSON object per event on stdout and reads commands on stdin.

    Events: ``{"ev": "connected"}``, ``{"ev": "disconnected", "rc": ...}``, ``{"ev": "message", "topic": ...,
    "bytes": N, "sha": ...}``, ``{"ev": "published", "topic": ..., "bytes": N, "seconds": S}`` (PUBACK
    received), ``{"ev": "subscribed"}``. Commands (one JSON object a line): ``{"cmd": "publish", "topic": T,
    "bytes": N, "qos": 1}``, ``{"cmd": "subscribe", "topic": T}``, ``{"cmd": "quit"}``.
    """
    import argparse
    import hashlib
    import json
    import threading
    import time

    import paho.mqtt.client as mqtt

    ap = argparse.ArgumentParser(prog="netns probe")
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--keepalive", type=int, default=60)
    ap.add_argument("--id", default="probe-" + uuid.uuid4().hex[:8])
    a = ap.parse_args(argv)
    out_lock = threading.Lock()

    def emit(**ev) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(ev) + "\n")
            sys.stdout.flush()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=a.id, protocol=mqtt.MQTTv5)
    c.reconnect_delay_set(min_delay=1, max_delay=2)
    lk = threading.Lock()  # held briefly only (never across a paho call)
    pending: dict[int, tuple[str, int, float]] = {}  # mid -> (topic, bytes, start) while waiting for the PUBACK
    acked: dict[int, float] = {}  # mid -> when, for a PUBACK that beat publish() returning its mid
    c.on_connect = lambda cl, ud, flags, rc, props=None: emit(ev="connected", rc=str(rc))
    c.on_disconnect = lambda cl, ud, flags, rc, props=None: emit(ev="disconnected", rc=str(rc))
    c.on_subscribe = lambda cl, ud, mid, rcs, props=None: emit(ev="subscribed")
    c.on_message = lambda cl, ud, m: emit(ev="message", topic=m.topic, bytes=len(m.payload),
                                          sha=hashlib.sha256(m.payload).hexdigest()[:16])

    def on_publish(cl, ud, mid, rc, props=None):
        t = time.perf_counter()
        with lk:
            if mid not in pending:
                acked[mid] = t
                return
            topic, n, t0 = pending.pop(mid)
        emit(ev="published", topic=topic, bytes=n, seconds=t - t0)

    c.on_publish = on_publish
    c.connect_async(a.host, a.port, keepalive=a.keepalive)
    c.loop_start()
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                break
            if cmd["cmd"] == "subscribe":
                c.subscribe(cmd["topic"], qos=cmd.get("qos", 1))
            elif cmd["cmd"] == "publish":
                payload = random.Random(cmd.get("seed", 0)).randbytes(int(cmd["bytes"]))
                t0 = time.perf_counter()
                info = c.publish(cmd["topic"], payload, qos=cmd.get("qos", 1))
                with lk:
                    t = acked.pop(info.mid, None)
                    if t is None:
                        pending[info.mid] = (cmd["topic"], len(payload), t0)
                if t is not None:
                    emit(ev="published", topic=cmd["topic"], bytes=len(payload), seconds=t - t0)
    finally:
        c.disconnect()
        c.loop_stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        sys.exit(probe_main(sys.argv[2:]))
    print(__doc__)
