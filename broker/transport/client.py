"""A small MQTT client over paho-mqtt 2.x that does the fiddly parts right.

* MQTT 5 by default (3.1.1 as an option); username/password; TLS with a CA and client cert.
* Persistent sessions done right: under MQTT 5 ``clean_start=False`` plus a Session Expiry Interval.
* Its own network thread reconnects with capped, jittered exponential backoff and stops for good
  when the broker rejects the credentials (retrying cannot help: ``fatal`` then holds the AuthError
  for the service loop to act on); subscriptions are re-made after every reconnect.
* ``start`` returns at once and connects in the background, retrying until the broker is up (a
  service started before its broker just waits); ``connect`` waits for the first CONNACK.
* ``publish`` checks the packet size against the broker's advertised Maximum Packet Size and the
  configured maximum *before* sending (paho does not: an oversized QoS 1 publish loops through
  disconnects), and reports broker rejections (PUBACK reason >= 0x80), not just "sent".
* Callbacks never block: incoming messages go to a bounded queue; overflow is dropped and counted.
* ``own_thread=False`` (the aggregator): no network thread. The caller's thread does the network
  work in ``pump`` (paho's external-loop API: ``loop_read``/``loop_write``/``loop_misc`` on
  ``select``), called by ``get`` when the inbox is empty and by every wait for an acknowledgement,
  and reconnects there with the same backoff. It reads at most ``read_batch`` messages ahead of
  what ``get`` has taken (outside a wait), so a backlog waits in the broker's queue for this
  client, not in the process, and no message crosses a thread.
"""

from __future__ import annotations

import logging
import queue
import random
import select
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, cast

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedmq.broker.errors import (
    AuthError,
    ConnectError,
    MqttError,
    MqttTimeout,
    PayloadTooLarge,
    PublishRejected,
    SubscribeRejected,
)

log = logging.getLogger(__name__)

#: bytes of a PUBLISH packet besides topic and payload: fixed header (<=5), topic length (2),
#: packet id (2), properties (we send at most a few, well under 64).
PUBLISH_OVERHEAD = 80
#: CONNACK/ reason codes (3.1.1 return codes map to these in paho 2) meaning "credentials wrong"
_AUTH_FAILURES = frozenset({0x86, 0x87, 0x8C})  # bad user name or password, not authorized, bad auth method


@dataclass
class TlsConfig:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False  # skip hostname verification (never in production)


@dataclass
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass
class MqttConfig:
    """Connection settings of one client (see docs/configuration.md, [broker] table)."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    protocol: str = "5"  # "5" or "3.1.1"
    tls: TlsConfig | None = None
    keepalive: int = 30
    clean_start: mqtt.CleanStartOption = True  # MQTT 5: True, False or paho's MQTT_CLEAN_START_FIRST_ONLY
    session_expiry: int = 0  # seconds; > 0 with clean_start=False keeps the session (MQTT 5)
    max_payload: int = 0  # 0 = no own limit; the broker's advertised maximum always applies
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    inbox_size: int = 10_000
    #: ``own_thread=False``: messages read ahead of ``get`` before reading pauses (the rest waits in the broker)
    read_batch: int = 64
    #: ``own_thread=False``: SO_RCVBUF in bytes (0 = the kernel's default; Linux caps it at net.core.rmem_max).
    #: While the caller works on a batch the kernel keeps receiving into this buffer, so the next batch is
    #: there at once instead of after a round trip to a broker that has to be scheduled first
    rcvbuf: int = 0
    will: Will | None = None
    #: acknowledge QoS 1 messages only when the caller says it holds them (``ack``), not as they are read:
    #: what was read but not yet handled when the process dies is redelivered from the session, and the
    #: broker's window of unacknowledged messages bounds what waits in this process
    manual_ack: bool = False

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return (f"MqttConfig(host={self.host!r}, port={self.port}, client_id={self.client_id!r}, "
                f"username={self.username!r}, password={'***' if self.password else None}, "
                f"protocol={self.protocol!r}, tls={self.tls is not None})")


@dataclass
class InMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    received: float = field(default_factory=time.monotonic)
    mid: int = 0  #: the packet id (QoS 1), for ``MqttClient.ack``
    conn: int = 0  #: the connection it arrived on: a mid means nothing on another one


class AckToken(NamedTuple):
    """What ``MqttClient.ack`` needs of a message (kept instead of the message: not its payload)."""

    mid: int
    qos: int
    conn: int

    @classmethod
    def of(cls, m: InMessage) -> "AckToken":
        return cls(m.mid, m.qos, m.conn)


@dataclass
class PublishResult:
    mid: int
    reason_code: int
    info: Any = None  # paho's MQTTMessageInfo (``is_published()``) for a publish nobody waited for
    #: ``track=True``: set (``.event``) when the broker's acknowledgement arrives, its ReasonCode in ``.value``
    waiter: Any = None


def backoff_delays(min_s: float, max_s: float, rng: random.Random | None = None):
    """Capped exponential backoff with full jitter: yields delays in [min_s/2, cap]."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        cap = min(max_s, min_s * (2 ** attempt))
        yield max(min_s / 2, rng.uniform(0, cap))
        attempt = min(attempt + 1, 30)


class _QuietDisconnect(logging.Filter):
    """paho 2.2 logs "Client is not connected" at ERROR when its loop runs once after a clean
    disconnect; real connection losses are reported by our own on_disconnect instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_PAHO_LOG = logging.getLogger(__name__ + ".paho")
_PAHO_LOG.addFilter(_QuietDisconnect())


class _Waiter:
    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.value: Any = None


_NONE = object()  # "no entry" (acknowledgement values may be anything)


class _BufferedReads:
    """paho's socket, read through a 64 KiB buffer.

    paho reads each packet with three to five ``recv`` calls (the type byte, the remaining length
    one byte at a time, the body): every one a system call that lets another thread take the GIL.
    For the aggregator, which receives thousands of updates per second while its protocol thread
    decodes them, that per-packet ping-pong costs more than the packets' own parsing (bench/RESULTS.md,
    "intake"). One ``recv`` of up to 64 KiB serves several packets; ``pending`` tells paho's loop
    that buffered bytes are there (it does not wait in select() while they are, as for TLS).
    Everything else is the wrapped socket's. Installed on the network thread, after each CONNACK,
    before paho has read anything past it.

    ``coalesce`` (the pumped client): writes are gathered too. paho sends every packet with its own
    ``send`` (a PUBACK per update received, a receipt per update answered: two system calls per
    update); here they go to a buffer that ``flush`` hands to the kernel in one call at the end of
    each pump pass. Up to ``OUT_MAX`` bytes are gathered; past that, a ``send`` that cannot flush
    raises BlockingIOError and paho keeps the packet queued, as for a full kernel buffer. ``close``
    flushes what it can first (a DISCONNECT paho closes the socket right after).
    """

    __slots__ = ("_sock", "_buf", "_pos", "hold", "coalesce", "_out")
    CHUNK = 65536
    OUT_MAX = 1 << 20

    def __init__(self, sock: Any, hold: Callable[[], bool] | None = None, coalesce: bool = False) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0
        #: when it returns True, reads that would need the socket act as if nothing had arrived yet
        #: (paho stops reading; what the broker sends meanwhile stays in the kernel's buffer and its queue)
        self.hold = hold
        self.coalesce = coalesce
        self._out = bytearray()

    def send(self, data: bytes | bytearray | memoryview) -> int:
        if not self.coalesce:
            return int(self._sock.send(data))
        if len(self._out) >= self.OUT_MAX:
            self.flush()
            if len(self._out) >= self.OUT_MAX:
                raise BlockingIOError("write buffer full")
        self._out += data
        return len(data)

    def gather(self, *parts: bytes | bytearray) -> bool:
        """Add one whole packet (in parts) to the gathered writes; False (nothing added) when full."""
        if not self.coalesce or len(self._out) >= self.OUT_MAX:
            return False
        for p in parts:
            self._out += p
        return True

    @property
    def unsent(self) -> int:
        """Bytes gathered and not yet taken by the kernel."""
        return len(self._out)

    def flush(self) -> None:
        """Hand the gathered bytes to the kernel, as many as it takes now (never blocks)."""
        while self._out:
            try:
                n = self._sock.send(self._out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError, InterruptedError):
                return
            except OSError:  # the connection is gone: paho's next read reports it
                self._out.clear()
                return
            if n <= 0:
                return
            del self._out[:n]

    def close(self) -> None:
        end = time.monotonic() + 1.0
        self.flush()
        while self._out and time.monotonic() < end:
            try:
                select.select([], [self._sock], [], max(0.0, end - time.monotonic()))
            except (OSError, ValueError):
                break
            self.flush()
        self._out.clear()
        self._sock.close()

    def recv(self, n: int) -> bytes:
        avail = len(self._buf) - self._pos
        if avail <= 0:
            if self.hold is not None and self.hold():
                raise BlockingIOError("read paused: the inbox holds a batch")
            data = self._sock.recv(max(n, self.CHUNK))  # BlockingIOError / SSLWantReadError / b"" pass through
            if len(data) <= n:
                return data
            self._buf, self._pos = data, n
            return data[:n]
        end = self._pos + min(n, avail)
        out = self._buf[self._pos:end]
        if end >= len(self._buf):
            self._buf, self._pos = b"", 0
        else:
            self._pos = end
        return out

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return len(self._buf) - self._pos + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Inbox(deque):
    """The pumped client's inbox: one thread puts and takes, so a deque without locks, bounded like a Queue."""

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize

    def put_nowait(self, m: InMessage) -> None:
        if len(self) >= self.maxsize:
            raise queue.Full
        self.append(m)

    def qsize(self) -> int:
        return len(self)


class MqttClient:
    """Thread-safe wrapper; use as a context manager or call ``connect``/``close``.

    ``own_thread=False``: not thread-safe; one thread calls everything and drives the network
    through ``get``, the waits and ``pump`` (see the module docstring).
    """

    def __init__(self, config: MqttConfig, on_message: Callable[[InMessage], None] | None = None, *,
                 own_thread: bool = True) -> None:
        self.cfg = config
        self.own_thread = own_thread
        v5 = config.protocol == "5"
        if config.protocol not in ("5", "3.1.1"):
            raise ValueError("protocol must be '5' or '3.1.1'")
        self._v5 = v5
        self._c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else bool(config.clean_start),  # 3.1.1: first-only is clean
            manual_ack=config.manual_ack,
        )
        self._c.enable_logger(_PAHO_LOG)
        if config.username is not None:
            self._c.username_pw_set(config.username, config.password)
        if config.tls is not None:
            t = config.tls
            self._c.tls_set(ca_certs=t.ca_file, certfile=t.cert_file, keyfile=t.key_file,
                            cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            self._c.tls_insecure_set(t.insecure)
        if config.will is not None:
            w = config.will
            self._c.will_set(w.topic, w.payload, qos=w.qos, retain=w.retain)
        self._c.on_connect = self._on_connect
        self._c.on_disconnect = self._on_disconnect
        self._c.on_publish = self._on_publish
        self._c.on_subscribe = self._on_subscribe
        self._c.on_message = self._on_message
        self._c.on_connect_fail = self._on_connect_fail
        self._lock = threading.Lock()
        self._pending: dict[int, _Waiter] = {}
        self._early: dict[int, Any] = {}  # acknowledgements that came before their waiter registered
        #: mids of publishes nobody waits for (QoS 0, wait=False): their acknowledgements are dropped, not
        #: kept in _early (a paho ReasonCode is ~2.4 KB: 10,000 receipts held 24 MB there)
        self._unwaited: dict[int, None] = {}
        self._subs: dict[str, tuple[int, bool, int]] = {}  # topic -> (qos, no_local, retain_handling)
        self._resub: dict[int, str] = {}  # mid -> topic of re-subscriptions made on (re)connect
        self._connected = threading.Event()
        self._first = _Waiter()
        self._fatal: MqttError | None = None
        self._closing = threading.Event()
        self._started = False
        self._delays: Iterator[float] | None = None
        self.broker_max_packet: int | None = None
        self.inbox: queue.Queue[InMessage] | _Inbox = (queue.Queue(config.inbox_size) if own_thread
                                                       else _Inbox(config.inbox_size))
        self._waiting = 0  # pumped: waits for an acknowledgement under way (reading never pauses in one)
        self._in_pump = False
        self._pumps = 0  # pumps so far; _lost_in: the pump that last reported a lost connection
        self._lost_in = -1
        self._retry_at = 0.0  # pumped: when the next (re)connect attempt is due (monotonic)
        self._delay = 0.0  # pumped: the current backoff delay
        self._handler = on_message
        #: called (on the network thread, or in a pump; must not block) after every successful (re)connect
        self.on_connected: Callable[[bool], None] | None = None
        self.dropped = 0
        self.reconnects = 0
        self.direct_writes = 0  # QoS 0 publishes framed by _write_qos0 instead of paho
        self.conn = 0  #: connections made so far (InMessage.conn)
        #: the broker's answer to the last CONNECT: it still held our session (MQTT 5; None before one)
        self.session_present: bool | None = None
        self.acks_dropped = 0  #: manual_ack: acknowledgements for an earlier connection, not sent

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> "MqttClient":
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def set_will(self, will: Will) -> None:
        """Set (or replace) the last will; takes effect at the next connection (call before ``start``)."""
        self.cfg.will = will
        self._c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    @property
    def fatal(self) -> MqttError | None:
        """The error that ended the connection for good (the broker refused the credentials), or None."""
        return self._fatal

    def _connect_props(self) -> Properties | None:
        props = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            if self.cfg.session_expiry > 0:
                props.SessionExpiryInterval = self.cfg.session_expiry
        return props

    def start(self) -> None:
        """Start connecting in the background and return at once (idempotent).

        paho's thread retries the first connection like any reconnect (capped, jittered backoff), so
        a service may start before its broker; ``connected`` and ``on_connected`` say when it is up,
        and ``fatal`` is set if the broker refuses the credentials.
        """
        if self._started:
            return
        self._next_delay()
        self._c.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive,
                              clean_start=self.cfg.clean_start if self._v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                              properties=self._connect_props())
        if self.own_thread:
            self._c.loop_start()
        self._retry_at = 0.0  # pumped: the first pump connects
        self._started = True
        log.info("connecting to %s:%s in the background", self.cfg.host, self.cfg.port)

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and start paho's network thread; raise ConnectError/AuthError on failure."""
        if self._started:
            return
        props = self._connect_props()
        self._next_delay()
        try:
            self._c.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive,
                            clean_start=self.cfg.clean_start if self._v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                            properties=props)
        except (OSError, ssl.SSLError) as e:
            raise ConnectError(f"cannot reach broker {self.cfg.host}:{self.cfg.port}: {e}") from e
        # paho's own thread: with it, publishes from other threads are queued, never written concurrently.
        if self.own_thread:
            self._c.loop_start()
        self._started = True
        if not self._pump_until(self._first.event, timeout):
            self.close()
            raise MqttTimeout(f"no CONNACK from {self.cfg.host}:{self.cfg.port} within {timeout}s")
        if self._first.value is not None:
            self.close()
            raise self._first.value

    def close(self) -> None:
        """Disconnect cleanly (no last will is sent) and stop the network thread."""
        self._closing.set()
        if self._connected.is_set():
            try:
                self._c.disconnect()
            except Exception:  # noqa: BLE001 - closing must not raise
                pass
        if self._started and self.own_thread:
            self._c.loop_stop()
        elif self._started:  # pumped: flush the DISCONNECT (paho closes the socket once it is written)
            end = time.monotonic() + 1.0
            while self._c.socket() is not None and time.monotonic() < end:
                self._pump(0.05)
            if self._c.socket() is not None:
                self._c._sock_close()  # paho private: the broker did not take the DISCONNECT in time
        self._started = False
        self._connected.clear()

    def _next_delay(self, reset: bool = False) -> None:
        """Arm paho's reconnect wait with our next capped, jittered delay."""
        if reset or self._delays is None:
            self._delays = backoff_delays(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)
        d = self._delay = next(self._delays)
        self._c.reconnect_delay_set(d, d)  # type: ignore[arg-type]  # annotated int; paho uses float seconds

    # -- callbacks (network thread; never block) ------------------------------------------------
    def _on_connect(self, c: mqtt.Client, ud: Any, flags: Any, rc: ReasonCode, props: Properties | None) -> None:
        if rc.is_failure:
            value = rc.value
            if value in _AUTH_FAILURES:
                err: MqttError = AuthError(f"broker refused credentials for {self.cfg.username!r}: {rc}")
                self._fatal = err
                log.error("%s; not retrying", err)
                c.disconnect()  # ends paho's reconnect loop: retrying cannot help
            else:
                err = ConnectError(f"broker refused the connection: {rc}")
            if self._first.value is None and not self._first.event.is_set():
                self._first.value = err
                self._first.event.set()
            return
        sock = getattr(c, "_sock", None)
        if sock is not None and not isinstance(sock, _BufferedReads) and hasattr(sock, "recv"):
            # paho private: see _BufferedReads (nothing is read past CONNACK yet)
            if not self.own_thread and self.cfg.rcvbuf:  # the read-ahead a pumped client leaves to the kernel
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.cfg.rcvbuf)
                except OSError as e:
                    log.warning("socket receive buffer of %d bytes not set: %s", self.cfg.rcvbuf, e)
            c._sock = _BufferedReads(sock, None if self.own_thread else self._hold, coalesce=not self.own_thread)
        self.broker_max_packet = None
        if props is not None and hasattr(props, "MaximumPacketSize"):
            self.broker_max_packet = int(props.MaximumPacketSize)
        self.conn += 1
        self.session_present = bool(getattr(flags, "session_present", False))
        self._connected.set()  # first: a subscribe() from now on is sent by its caller (a double is harmless)
        with self._lock:
            subs = list(self._subs.items())
        for topic, (qos, no_local, rh) in subs:  # re-subscribe, in the order first made: the session may be gone
            rc_, mid = c.subscribe(topic, **self._sub_args(qos, no_local, rh))
            if mid is not None:
                with self._lock:
                    self._resub[mid] = topic
        self._next_delay(reset=True)
        if self.on_connected is not None:
            try:
                self.on_connected(self._first.event.is_set())
            except Exception:  # noqa: BLE001
                log.exception("on_connected hook failed")
        if not self._first.event.is_set():
            self._first.event.set()
        else:
            self.reconnects += 1
            log.info("reconnected to %s:%s (session present: %s)", self.cfg.host, self.cfg.port,
                     getattr(flags, "session_present", None))

    def _on_disconnect(self, c: mqtt.Client, ud: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        self._connected.clear()
        if not self.own_thread:  # a PUBACK write that fails inside a read reports the loss, then the read again
            if self._lost_in == self._pumps:
                return
            self._lost_in = self._pumps
        if not self._closing.is_set() and self._fatal is None:
            self._next_delay()
            log.warning("disconnected from broker: %s; reconnecting with backoff", rc)

    def _on_connect_fail(self, c: mqtt.Client, ud: Any) -> None:
        self._next_delay()
        log.info("reconnect to %s:%s failed; retrying with backoff", self.cfg.host, self.cfg.port)

    def _resolve(self, mid: int, value: Any) -> None:
        with self._lock:
            w = self._pending.pop(mid, None)
            if w is None:
                if self._unwaited.pop(mid, _NONE) is not _NONE:
                    return
                self._early[mid] = value
                if len(self._early) > 1000:  # bounded whatever happens (a waiter registers within one call)
                    self._early.pop(next(iter(self._early)))
                return
        w.value = value
        w.event.set()

    def _on_publish(self, c: mqtt.Client, ud: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        self._resolve(mid, rc)

    def _on_subscribe(self, c: mqtt.Client, ud: Any, mid: int, rcs: list[ReasonCode], props: Any) -> None:
        with self._lock:
            topic = self._resub.pop(mid, None)
        if topic is not None:  # a re-subscription nobody waits for: a refusal is logged, not lost
            if rcs and rcs[0].is_failure:
                log.error("broker refused subscription to %s: %s (check the ACL)", topic, rcs[0])
            return
        self._resolve(mid, rcs)

    def _on_message(self, c: mqtt.Client, ud: Any, msg: mqtt.MQTTMessage) -> None:
        payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)  # paho gives bytes
        m = InMessage(msg.topic, payload, msg.qos, bool(msg.retain), mid=msg.mid, conn=self.conn)
        if self._handler is not None:
            try:
                self._handler(m)
            except Exception:  # noqa: BLE001 - a handler bug must not kill the network thread
                log.exception("message handler failed for %s", msg.topic)
                self.ack(m)  # not held in the broker's window for good
            return
        try:
            self.inbox.put_nowait(m)
        except queue.Full:
            self.dropped += 1
            self.ack(m)  # dropped for good (counted): an unacknowledged one would hold a place in the window
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("inbox full (%d): dropped %d messages so far", self.cfg.inbox_size, self.dropped)

    def ack(self, m: InMessage | AckToken) -> None:
        """``manual_ack``: tell the broker we hold ``m`` (QoS 1). A message of an earlier connection is
        not acknowledged (its packet id may name another message now; the broker redelivers it)."""
        if not self.cfg.manual_ack or m.qos != 1:
            return
        if m.conn != self.conn or not self._connected.is_set():
            self.acks_dropped += 1
            return
        try:
            self._c.ack(m.mid, 1)
        except Exception as e:  # noqa: BLE001 - a lost connection: the broker redelivers it
            log.debug("acknowledging message %d failed: %s", m.mid, e)

    # -- the pumped network loop (own_thread=False) ---------------------------------------------
    def _hold(self) -> bool:
        """Pause reading: a batch is in the inbox and nobody waits for an acknowledgement."""
        return not self._waiting and self.inbox.qsize() >= self.cfg.read_batch

    def pump(self, timeout: float = 0.0) -> None:
        """One pass of network work on this thread: wait up to ``timeout`` for the socket, read, write,
        keep alive; (re)connect when due. Only with ``own_thread=False``; re-entry from a callback is a no-op."""
        if self.own_thread or self._in_pump:
            return
        self._in_pump = True
        self._pumps += 1
        try:
            self._pump(timeout)
        finally:
            self._in_pump = False

    def _pump(self, timeout: float) -> None:
        c = self._c
        sock = c.socket()
        if sock is None:
            if not self._started or self._closing.is_set() or self._fatal is not None:
                self._closing.wait(timeout)  # nothing to do (closed: returns at once)
                return
            now = time.monotonic()
            if now < self._retry_at:
                self._closing.wait(min(timeout, self._retry_at - now))
                return
            try:
                c.reconnect()  # paho: TCP (and TLS) connect, then CONNECT; the CONNACK is read below
            except Exception as e:  # noqa: BLE001 - refused, unreachable, TLS: retried with backoff
                log.debug("connect to %s:%s failed: %s", self.cfg.host, self.cfg.port, e)
                self._on_connect_fail(c, None)
                self._retry_at = time.monotonic() + self._delay
                return
            sock = c.socket()
            if sock is None:
                return
        buffered = sock if isinstance(sock, _BufferedReads) else None
        if buffered is not None:
            buffered.flush()  # what was published since the last pass (receipts), in one send
        pending = sock.pending() if hasattr(sock, "pending") else 0
        readable = pending > 0
        if not readable:
            try:
                w = c.want_write() or (buffered is not None and buffered.unsent > 0)
                r, _, _ = select.select([sock], [sock] if w else [], [], timeout)
                readable = bool(r)
            except (OSError, ValueError, TypeError):
                readable = True  # a closed socket: the read reports the loss
        rc = c.loop_read() if readable else mqtt.MQTT_ERR_SUCCESS
        if rc == mqtt.MQTT_ERR_SUCCESS and c.socket() is not None and c.want_write():
            rc = c.loop_write()
        if rc == mqtt.MQTT_ERR_SUCCESS and c.socket() is not None:
            c.loop_misc()
        now_sock = c.socket()  # (a new connection's wrapper is installed by this pass's CONNACK)
        if isinstance(now_sock, _BufferedReads):
            now_sock.flush()  # the PUBACKs (and re-subscriptions) this pass queued, in one send
        if c.socket() is None:  # lost (paho called on_disconnect): the next attempt after the backoff
            self._retry_at = time.monotonic() + self._delay

    def _pump_until(self, event: threading.Event, timeout: float) -> bool:
        """Wait for ``event``: pumping (own_thread=False; reading never pauses meanwhile) or blocking.

        A wait from inside a pump (a callback) cannot pump: it blocks, and times out unless set elsewhere."""
        if self.own_thread or self._in_pump:
            return event.wait(timeout)
        end = time.monotonic() + timeout
        self._waiting += 1
        try:
            while not event.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.pump(min(left, 0.05))
        finally:
            self._waiting -= 1
        return True

    # -- operations ---------------------------------------------------------------------------
    def _wait(self, mid: int, w: _Waiter, timeout: float, what: str) -> Any:
        with self._lock:
            self._unwaited.pop(mid, None)  # a reused mid: this one is waited for
            if mid in self._early:
                return self._early.pop(mid)
            self._pending[mid] = w
        if not self._pump_until(w.event, timeout):
            with self._lock:
                if self._pending.pop(mid, None) is not None:  # its late acknowledgement: dropped, not kept
                    self._unwaited[mid] = None                # for a later publish that reuses the mid
            raise MqttTimeout(f"{what} not acknowledged within {timeout}s")
        return w.value

    def max_payload(self, topic: str) -> int:
        """Largest payload that may be published on ``topic`` right now."""
        limits = [x for x in (self.broker_max_packet, self.cfg.max_payload and
                              self.cfg.max_payload + PUBLISH_OVERHEAD + len(topic.encode())) if x]
        if not limits:
            return 268_435_455 - PUBLISH_OVERHEAD - len(topic.encode())
        return min(limits) - PUBLISH_OVERHEAD - len(topic.encode())

    def publish(self, topic: str, payload: bytes | bytearray | memoryview, qos: int = 1, retain: bool = False,
                timeout: float = 30.0, wait: bool = True, track: bool = False) -> PublishResult:
        """Publish and (QoS > 0, ``wait``) wait for the broker's acknowledgement.

        ``track`` (QoS > 0, no ``wait``): return at once with ``waiter``, which the acknowledgement sets
        when it comes (read by a later pump); ``forget(mid)`` when no longer interested.

        Raises PayloadTooLarge before sending, PublishRejected on a failure reason code,
        MqttTimeout when not acknowledged in time (paho keeps it queued and retries).
        """
        if self._fatal is not None:
            raise self._fatal
        data = payload if isinstance(payload, (bytes, bytearray)) else bytes(payload)
        limit = self.max_payload(topic)
        if len(data) > limit:
            raise PayloadTooLarge(
                f"payload of {len(data)} bytes exceeds the maximum of {limit} for {topic} "
                f"(broker max packet {self.broker_max_packet}, configured {self.cfg.max_payload or 'none'}): chunk it")
        if qos == 0 and not retain and self._write_qos0(topic, data):
            return PublishResult(0, 0)
        info = self._c.publish(topic, data, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN, mqtt.MQTT_ERR_QUEUE_SIZE):
            raise MqttError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise MqttError(f"publish to {topic} refused: client queue full")
        if track and qos > 0 and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            w = _Waiter()  # NO_CONN: paho keeps it and sends it after the reconnect
            with self._lock:
                self._unwaited.pop(info.mid, None)
                early = self._early.pop(info.mid, _NONE)
                if early is _NONE:
                    self._pending[info.mid] = w
                else:
                    w.value = early
                    w.event.set()
            return PublishResult(info.mid, 0, info, waiter=w)
        if qos == 0 or not wait:
            with self._lock:  # nobody waits: drop its acknowledgement (already here, or when it comes)
                if info.rc == mqtt.MQTT_ERR_SUCCESS and self._early.pop(info.mid, _NONE) is _NONE:
                    self._unwaited[info.mid] = None
                    if len(self._unwaited) > 65_535:  # more than paho's mids: the oldest were never acknowledged
                        self._unwaited.pop(next(iter(self._unwaited)))
            return PublishResult(info.mid, 0, info)
        rc = self._wait(info.mid, _Waiter(), timeout, f"publish to {topic}")
        if rc.is_failure:
            raise PublishRejected(f"broker rejected publish to {topic}: {rc} (0x{rc.value:02x})",
                                  reason=f"puback_0x{rc.value:02x}")
        return PublishResult(info.mid, rc.value)

    def forget(self, mid: int) -> None:
        """Stop tracking ``mid`` (a ``track``ed publish given up on): its acknowledgement, if it still comes,
        is dropped."""
        with self._lock:
            if self._pending.pop(mid, None) is not None:
                self._unwaited[mid] = None

    def _write_qos0(self, topic: str, data: bytes | bytearray) -> bool:
        """A QoS 0 PUBLISH framed here and added to the gathered writes (pumped client only): False when
        paho must send it instead (threaded, not connected, paho has packets queued: order is kept).

        The aggregator sends one receipt per update; through paho each costs a message object, a
        packet queue entry and an ``on_publish`` callback that builds a Properties and a ReasonCode
        (~18 % of the whole intake per update at 10,000 agents). A QoS 0 packet has no state to keep:
        fixed header, remaining length, topic, (MQTT 5) an empty property length, payload
        (MQTT 5.0 section 3.3; tests/test_pumped_client.py sends every remaining-length size through
        Mosquitto, MQTT 5 and 3.1.1, interleaved with paho's own publishes)."""
        c = self._c
        sock = c._sock  # paho private: the socket (our wrapper) and its queue of unsent packets
        if (self.own_thread or not isinstance(sock, _BufferedReads) or not sock.coalesce or c._out_packet
                or not self._connected.is_set()):
            return False
        t = topic.encode()
        if not t or len(t) > 65_535 or "+" in topic or "#" in topic or "\0" in topic:
            return False  # paho refuses it with its own error
        props = b"\x00" if self._v5 else b""
        n = 2 + len(t) + len(props) + len(data)
        head = bytearray(b"\x30")  # PUBLISH, QoS 0, no DUP, no RETAIN
        while True:  # remaining length: 7 bits per byte, least significant first
            n, digit = divmod(n, 128)
            head.append(digit | 0x80 if n else digit)
            if not n:
                break
        head += len(t).to_bytes(2, "big")
        if not sock.gather(head, t, props, data):
            return False
        self.direct_writes += 1
        return True

    def _sub_args(self, qos: int, no_local: bool, retain_handling: int = 0) -> dict[str, Any]:
        if self._v5:
            from paho.mqtt.subscribeoptions import SubscribeOptions

            return {"options": SubscribeOptions(qos=qos, noLocal=no_local, retainHandling=retain_handling)}
        return {"qos": qos}  # 3.1.1 has no No Local: the caller sees its own messages too

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0, no_local: bool = False,
                  wait: bool = True, retain_handling: int = 0) -> int:
        """Subscribe (remembered for reconnects); return the granted QoS or raise SubscribeRejected.

        ``no_local`` (MQTT 5): the broker does not send us back what we publish on it ourselves.
        ``retain_handling`` (MQTT 5): 0 = the retained messages on every subscribe, 1 = only when the
        subscription is new (a resumed session, whose queue holds the changes, gets no second copy).
        """
        with self._lock:
            self._subs[topic] = (qos, no_local, retain_handling)
        if not self._connected.is_set():
            return qos  # remembered: made (and its SUBACK checked) when the connection is up
        rc, mid = self._c.subscribe(topic, **self._sub_args(qos, no_local, retain_handling))
        if rc == mqtt.MQTT_ERR_NO_CONN:
            return qos  # the connection just went: re-made on reconnect
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise MqttError(f"subscribe to {topic} failed: {mqtt.error_string(rc)}")
        if not wait:  # the SUBACK is checked (and a refusal logged) by the network thread
            with self._lock:
                self._resub[mid] = topic
            return qos
        rcs = self._wait(mid, _Waiter(), timeout, f"subscribe to {topic}")
        code = rcs[0]
        if code.is_failure:
            with self._lock:
                self._subs.pop(topic, None)
            raise SubscribeRejected(f"broker refused subscription to {topic}: {code} (0x{code.value:02x})")
        return code.value

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._subs.pop(topic, None)
        self._c.unsubscribe(topic)

    def get(self, timeout: float | None = None) -> InMessage | None:
        """Next incoming message from the bounded inbox, or None after ``timeout``.

        ``own_thread=False``: pumps the network while the inbox is empty (``timeout=None``: until a message)."""
        if self.own_thread:
            try:
                return cast("queue.Queue[InMessage]", self.inbox).get(timeout=timeout)
            except queue.Empty:
                return None
        box = cast(_Inbox, self.inbox)
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            if box:
                return box.popleft()
            if self._closing.is_set():
                return None
            left = 1.0 if end is None else end - time.monotonic()
            self.pump(max(0.0, min(left, 1.0)))
            if box:
                return box.popleft()
            if end is not None and time.monotonic() >= end:
                return None
