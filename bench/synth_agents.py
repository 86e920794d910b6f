"""Synthetic fedmq agents: thousands of MQTT clients per process speaking the wire protocol.

Written from docs/protocol.md alone, with plain paho-mqtt + msgpack (numpy only to lay out
float32 bytes): no fedmq import, so it is also an independent client of the documented protocol.
Where the documentation was not enough to write it, the gap is reported in bench/RESULTS.md
("Fleet scale").

What each synthetic agent does (docs/protocol.md, "Presence and access", "Round protocol"):

* connects with client id = username = its agent id (MQTT 5, clean start), with a last will on
  ``agents/<id>/status`` (retained, ``state = "offline"``), subscribes to ``round``, ``service`` and
  (if asked to use receipts) ``agents/<id>/receipt``, then publishes a retained ``online`` status;
* one agent per process (the "leader") also subscribes to ``model`` (+ ``model/chunk/+``, after the
  plain topic) and reassembles it when chunked: the weight names and shapes are all a synthetic
  agent needs (no training, so no TFLite and no global); the others share it, as devices share a
  cached model;
* for every announced round that asks it (``agents`` list, ``sample`` hash rule or nil = everyone
  online), it sends one ``update`` whose tensors are a *known delta* (``known_delta``): a seeded
  per-element basis ``b`` times a per-(agent, round) coefficient ``c``, with ``num_samples = n``,
  so the expected FedAvg global is computable by anyone (``expected_mean_delta``);
* an update above the broker's Maximum Packet Size (CONNACK) is cut into ``chunk`` messages on the
  update topic (payload limit = packet limit - 80 - len(topic); chunk data = payload limit - 256);
* it re-sends the same update (same ``update_id``) when the round is re-announced (a new
  ``opened``), and, with receipts on, until a receipt for its ``update_id`` arrives (or the round
  closes), every ``resend_s``;
* it reconnects after a broker outage with capped, jittered exponential backoff, and republishes
  its status.

All clients of a process share one ``selectors`` loop (paho's external-loop API: loop_read,
loop_write, loop_misc) instead of one thread per client. The process writes its counters to a
JSON file (atomically, about once a second and at exit) that the harness (bench/fleet.py) reads.

    python bench/synth_agents.py --spec spec.json     # spec: see ``Spec``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import resource
import selectors
import signal
import ssl
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

PUBLISH_OVERHEAD = 80  # docs/protocol.md, chunk: packet limit = payload limit + 80 + len(topic)
CHUNK_OVERHEAD = 256  # chunk data <= payload limit - 256
KEEP_ROUNDS = 12  # rounds kept in the stats file
SPIKE = 10.0  # the per-(agent, round) spike of a known delta


# -- the known deltas (shared with the harness, which computes the expected global) -------------

def known_coef(seed: int, agent: str, round_no: int) -> tuple[float, int]:
    """(c, n) of ``agent`` in ``round_no``: delta = c * basis, num_samples = n."""
    h = hashlib.sha256(f"{seed}/{agent}/{round_no}".encode()).digest()
    c = 0.05 + 0.1 * int.from_bytes(h[:4], "little") / 2**32  # [0.05, 0.15): norms within 3x
    n = 10 + h[4] % 90  # 10..99: never above the guard's 10 x median cap
    return c, n


def basis(seed: int, weights: list[tuple[str, list[int]]]) -> list[np.ndarray]:
    """The per-element pattern every delta is a multiple of (float32, one array per weight)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _, shape in weights]


def known_delta(seed: int, agent: str, round_no: int, b: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """c * basis, plus a spike of +SPIKE at one element picked by (agent, round): every agent's share of
    the mean is visible (>= SPIKE * n_i / sum n), so a global missing (or mixing up) one agent's update
    fails the check."""
    c, n = known_coef(seed, agent, round_no)
    out = [(np.float32(c) * x).astype(np.float32) for x in b]
    h = hashlib.sha256(f"spike/{seed}/{agent}/{round_no}".encode()).digest()
    j = int.from_bytes(h[:8], "little") % max(1, sum(x.size for x in out))
    for x in out:
        if j < x.size:
            x.reshape(-1)[j] += np.float32(SPIKE)
            break
        j -= x.size
    return out, n


def expected_mean_delta(seed: int, round_no: int, agents: list[str], b: list[np.ndarray]) -> list[np.ndarray]:
    """sum(n_i d_i) / sum(n_i) over ``agents`` in float64, from the same float32 deltas they send."""
    acc = [np.zeros(x.shape, np.float64) for x in b]
    total = 0
    for a in agents:
        d, n = known_delta(seed, a, round_no, b)
        for s, x in zip(acc, d):
            s += n * x.astype(np.float64)
        total += n
    return [s / total for s in acc]


# -- wire helpers (docs/protocol.md, "Payload framing", "Messages") -----------------------------

def pack(kind: str, **fields: Any) -> bytes:
    return msgpack.packb({"v": 1, "kind": kind, **fields}, use_bin_type=True)


def unpack(payload: bytes) -> dict | None:
    """A fedmq map, or None for anything that is not one (every byte from the network is untrusted)."""
    if not payload or len(payload) > 64 * 2**20:
        return None
    try:
        m = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=64 * 2**20,
                            max_str_len=4096, max_array_len=200_000, max_map_len=200_000)
    except Exception:  # noqa: BLE001 - malformed input is just not a message
        return None
    if not isinstance(m, dict) or type(m.get("v")) is not int or m["v"] != 1 or not isinstance(m.get("kind"), str):
        return None
    return m


def unwrap(m: dict | None) -> dict | None:
    """The body of a ``signed`` envelope (not verified: a synthetic agent holds no trusted keys)."""
    if m is not None and m.get("kind") == "signed":
        body = m.get("body")
        return unpack(body) if isinstance(body, bytes) else None
    return m


#: docs: the re-send delay as fractions of presence_jitter_s: after the agent's own reconnect, and after a
#: (re)connected aggregator's live "online"
RECONNECT_SPREAD = (0.0, 0.1)
ONLINE_SPREAD = (0.5, 1.0)


def resend_wait(spec: Any, attempts: int) -> float:
    """docs: no receipt resend_s after a send (doubling up to 8 x): re-send."""
    return min(spec.resend_s * 2 ** max(0, attempts - 1), 8 * spec.resend_s)


def upload_window(ann: dict) -> float:
    cfg = ann.get("config")
    w = cfg.get("upload_window_s", 0.0) if isinstance(cfg, dict) else 0.0
    return float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w <= 86_400 else 0.0


def sampled(seed: int, round_no: int, agent: str, fraction: float) -> bool:
    """The seeded hash rule of ``select = "fraction"`` (a ``sample`` map in the announcement)."""
    h = hashlib.sha256(f"{seed}/{round_no}/{agent}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < fraction


def asks(ann: dict, agent: str) -> bool:
    agents = ann.get("agents")
    if isinstance(agents, list):
        return agent in agents
    sample = ann.get("sample")
    if isinstance(sample, dict):
        try:
            return sampled(int(sample["seed"]), int(ann["round"]), agent, float(sample["fraction"]))
        except (KeyError, TypeError, ValueError):
            return False
    return True


def chunk_payloads(blob: bytes, chunk_data: int) -> list[bytes]:
    total = -(-len(blob) // chunk_data)
    blob_id, digest = os.urandom(8).hex(), hashlib.sha256(blob).digest()
    return [pack("chunk", blob_id=blob_id, index=i, total=total, offset=i * chunk_data, size=len(blob),
                 sha256=digest, data=blob[i * chunk_data:(i + 1) * chunk_data]) for i in range(total)]


class RetainedBlob:
    """Reassembles a chunked retained message (pointer on the plain topic, chunks on chunk/<i>)."""

    def __init__(self) -> None:
        self.pointer: dict | None = None
        self.parts: dict[int, bytes] = {}

    def on_pointer(self, m: dict) -> None:
        self.pointer, self.parts = m, {}

    def on_chunk(self, m: dict) -> bytes | None:
        p = self.pointer
        if p is None or m.get("blob_id") != p.get("blob_id"):
            return None  # stale chunk (or before the pointer: the retained pointer comes first)
        off, data = m.get("offset"), m.get("data")
        if type(off) is not int or not isinstance(data, bytes) or off < 0 or off + len(data) > p["size"]:
            return None
        self.parts[off] = data
        if sum(len(d) for d in self.parts.values()) < p["size"]:
            return None
        blob = b"".join(self.parts[o] for o in sorted(self.parts))
        self.parts = {}
        return blob if hashlib.sha256(blob).digest() == p.get("sha256") else None


# -- the process ---------------------------------------------------------------------------------

@dataclass
class Spec:
    """What one generator process runs (a JSON file written by the harness)."""

    host: str
    port: int
    base: str  # "<prefix>/<fleet>"
    agents: list[str]
    stats_path: str
    seed: int = 0
    passwords: dict[str, str] = field(default_factory=dict)  # agent -> password (empty: anonymous)
    ca_file: str | None = None  # TLS when set
    receipts: bool = False  # subscribe to agents/<id>/receipt and re-send until one arrives
    resend_s: float = 30.0  # docs: no receipt within resend_s (doubling up to 8x): re-send
    presence_jitter_s: float = 5.0
    rechunk_resends: bool = True  # False: re-send a chunked update's identical chunks (same blob_id)  # docs: republish the status within this after a live service online
    keepalive: int = 60
    connect_batch: int = 64  # connections started per loop turn (a storm in slices)
    backoff_max_s: float = 5.0


@dataclass
class Sent:
    update_id: str
    base_round: int
    opened: float
    payloads: list[bytes]
    n: int
    mids: set = field(default_factory=set)
    acked: bool = False  # every packet of its last send PUBACKed
    ever_acked: bool = False
    receipt: str | None = None  # "accepted" or the final rejection reason (for the current announcement)
    wait_reannounce: bool = False  # refused with retry: re-send when the round is (re-)announced
    counted: bool = False  # its first receipt went into the round's stats
    last_send: float = 0.0
    attempts: int = 0  # sends since the last announcement (the resend timer doubles up to 8 x)
    due: float = 0.0  # upload window: monotonic time of the first send
    whole: bytes = b""  # the encoded update (chunked or not)
    chunk_data: int = 0  # chunk data size when chunked


class Agent:
    def __init__(self, gen: "Generator", agent_id: str) -> None:
        self.gen, self.id = gen, agent_id
        self.connected = False
        self.status_acked = False
        self.status_mid: int | None = None
        self.next_connect = 0.0
        self.backoff = 0.5
        self.started = False
        self.max_packet: int | None = None
        self.rounds: dict[tuple[str, int], Sent] = {}
        self.ann: dict | None = None
        self.service_ts: Any = None
        self.presence_due = 0.0
        self.connected_at = self.online_at = 0.0  # monotonic: our last connect, the aggregator's last live online
        self.resend_due = 0.0  # a re-send soon (after a reconnect or the aggregator's online), on the timer set
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=agent_id, protocol=mqtt.MQTTv5)
        c.max_queued_messages_set(0)
        c.max_inflight_messages_set(20)
        spec = gen.spec
        if spec.passwords:
            c.username_pw_set(agent_id, spec.passwords[agent_id])
        if spec.ca_file:
            c.tls_set(ca_certs=spec.ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.will_set(f"{spec.base}/agents/{agent_id}/status", self.status("offline"), qos=1, retain=True)
        c.on_connect, c.on_disconnect, c.on_message, c.on_publish = (self.on_connect, self.on_disconnect,
                                                                      self.on_message, self.on_publish)
        c.on_socket_open, c.on_socket_close = gen.sock_open, gen.sock_close
        c.on_socket_register_write, c.on_socket_unregister_write = gen.sock_want_write, gen.sock_no_write
        self.c = c

    def status(self, state: str) -> bytes:
        return pack("status", agent=self.id, state=state, ts=time.time(), runtime="synthetic",
                    interpreter="none", num_samples=0, version="synth-1")

    # connection
    def connect(self) -> None:
        self.gen.stats["connect_attempts"] += 1
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        try:
            if not self.started:
                self.started = True
                self.c.connect(self.gen.spec.host, self.gen.spec.port, self.gen.spec.keepalive,
                               clean_start=True, properties=props)
            else:
                self.c.reconnect()
        except OSError as e:
            self.gen.stats["connect_errors"] += 1
            log.debug("%s: connect failed: %s", self.id, e)
            self.schedule_reconnect()

    def schedule_reconnect(self) -> None:
        self.next_connect = time.monotonic() + random.uniform(0.5, 1.0) * self.backoff
        self.backoff = min(self.backoff * 2, self.gen.spec.backoff_max_s)
        self.gen.pending.add(self)

    def on_connect(self, c, userdata, flags, reason, props) -> None:
        if reason.is_failure:
            self.gen.stats["connack_refused"] += 1
            self.gen.stats["connack_reasons"][str(reason)] = self.gen.stats["connack_reasons"].get(str(reason), 0) + 1
            return  # paho closes the socket: on_disconnect schedules the retry
        self.connected, self.backoff = True, 0.5
        self.connected_at = time.monotonic()
        self.max_packet = getattr(props, "MaximumPacketSize", None) if props is not None else None
        b = self.gen.spec.base
        subs = [(f"{b}/round", 1), (f"{b}/service", 1)]
        if self.gen.spec.receipts:
            subs.append((f"{b}/agents/{self.id}/receipt", 1))
        if self is self.gen.leader:  # the plain topic before its chunks: the retained pointer arrives first
            c.subscribe(f"{b}/model", 1)
            subs.append((f"{b}/model/chunk/+", 1))
        c.subscribe(subs)
        self.publish_status()
        self.resend_soon(RECONNECT_SPREAD)

    def resend_soon(self, spread: tuple[float, float]) -> None:
        """docs: after our reconnect or the aggregator's live "online", re-send what has no receipt after a
        seeded delay within ``spread`` × presence_jitter_s."""
        spec, now = self.gen.spec, time.monotonic()
        for key, s in self.rounds.items():
            if spec.receipts and s.receipt is None and s.last_send and not s.wait_reannounce:
                wait = resend_wait(spec, s.attempts)
                u = zlib.crc32(f"{self.id}/{key[1]}/resend".encode()) / 2**32
                jitter = spec.presence_jitter_s * (spread[0] + (spread[1] - spread[0]) * u)
                s.last_send = min(s.last_send, now + jitter - wait)
                self.resend_due = min(self.resend_due or float("inf"), now + jitter)
                self.gen.timers.add(self)  # on time (tick runs once a second)

    def publish_status(self) -> None:
        topic = f"{self.gen.spec.base}/agents/{self.id}/status"
        payload = self.status("online")
        info = self.c.publish(topic, payload, qos=1, retain=True)
        self.status_mid = info.mid  # status_acked: PUBACKed once on this connection (on_disconnect resets it)
        self.gen.count_out(topic, len(payload))
        self.gen.stats["status_published"] += 1

    def on_disconnect(self, c, userdata, flags, reason, props) -> None:
        if self.connected:
            self.gen.stats["disconnects"] += 1
        self.connected, self.status_acked = False, False  # paho re-sends unacked QoS 1 packets (same mids)
        if not self.gen.stopping:
            self.schedule_reconnect()

    def on_publish(self, c, userdata, mid, reason, props) -> None:
        if mid == self.status_mid:
            self.status_acked = True
            return
        for key, s in self.rounds.items():
            if mid in s.mids:
                s.mids.discard(mid)
                if not s.mids and not s.acked:
                    s.acked = True
                    if s.ever_acked:
                        return
                    s.ever_acked = True  # counted once per agent and round
                    r = self.gen.round_stats(key)
                    r["acked"] += 1
                    r["last_acked"] = time.time()
                    self.gen.acked_ids.setdefault(f"{key[0]}/{key[1]}", []).append(self.id)
                return

    # messages
    def on_message(self, c, userdata, msg) -> None:
        g = self.gen
        nbytes = len(msg.payload) + len(msg.topic)
        g.stats["bytes_in"] += nbytes
        g.stats["msgs_in"] += 1
        t = msg.topic[len(g.spec.base) + 1:]
        m = unwrap(unpack(msg.payload)) if not t.startswith("model") else None
        if t == "round" and m is not None and m.get("kind") == "round":
            self.on_round(m)
        elif t.endswith("/receipt") and m is not None and m.get("kind") == "receipt":
            self.on_receipt(m)
        elif t == "service" and m is not None and m.get("kind") == "service":
            g.service = m
            if not msg.retain and m.get("state") == "online" and m.get("ts") != self.service_ts:
                soon = self.connected_at > self.online_at  # docs: sent since our reconnect: maybe to nobody
                self.online_at = time.monotonic()
                # presence re-sync: an aggregator just (re)connected; republish after a seeded delay
                self.service_ts = m.get("ts")
                jitter = g.spec.presence_jitter_s * zlib.crc32(f"{self.id}/{m.get('ts')}".encode()) / 2**32
                self.presence_due = time.monotonic() + jitter
                g.timers.add(self)
                g.stats["presence_resyncs"] += 1
                self.resend_soon(RECONNECT_SPREAD if soon else ONLINE_SPREAD)  # docs: and an update without receipt
            elif msg.retain:
                self.service_ts = m.get("ts")
                if m.get("state") == "online":  # docs: the aggregator was there when we subscribed
                    self.online_at = time.monotonic()
        elif t == "model" or t.startswith("model/chunk/"):
            g.on_model_message(t, msg.payload)
        if self.ann is not None:  # downlink of the round this agent is in (its announcement included)
            g.round_stats((self.ann["run"], self.ann["round"]))["bytes_in"] += nbytes

    def on_round(self, m: dict) -> None:
        try:
            key = (str(m["run"]), int(m["round"]))
            base, opened = int(m["base_round"]), float(m["opened"])
        except (KeyError, TypeError, ValueError):
            return
        g = self.gen
        if key[1] < g.highest.get(key[0], 0):
            return  # never go back within a run (stale_global)
        g.highest[key[0]] = key[1]
        self.ann = {**m, "run": key[0], "round": key[1]}
        for k in [k for k in self.rounds if k != key]:  # a newer round: older outbox entries are done
            del self.rounds[k]
        if not asks(m, self.id):
            return
        if g.weights is None or m.get("model_id") != g.model_id:
            g.waiting.add(self)  # no manifest yet: send when it arrives
            return
        s = self.rounds.get(key)
        if s is None:
            g.round_stats(key)["asked"] += 1
            self.build(key, base, opened)
            window = upload_window(m)
            if window > 0:  # docs: window x crc32(f"{agent}/{round}") / 2**32 after training
                self.rounds[key].due = time.monotonic() + window * zlib.crc32(f"{self.id}/{key[1]}".encode()) / 2**32
                g.timers.add(self)
            else:
                self.send(key, first=True)
        elif s.opened != opened and s.due == 0.0:
            # re-announced (e.g. a restarted aggregator): re-send, even with a receipt from before
            s.opened, s.receipt, s.wait_reannounce, s.attempts = opened, None, False, 0
            self.send(key, first=False)

    def build(self, key: tuple[str, int], base: int, opened: float) -> None:
        g = self.gen
        deltas, n = known_delta(g.spec.seed, self.id, key[1], g.basis)
        tensors = [{"name": name, "enc": "raw", "dtype": "float32", "shape": list(shape),
                    "data": d.astype("<f4").tobytes()} for (name, shape), d in zip(g.weights, deltas)]
        uid = os.urandom(16).hex()
        payload = pack("update", run=key[0], round=key[1], base_round=base, agent=self.id, model_id=g.model_id,
                       update_id=uid, num_samples=n, tensors=tensors, metrics={"loss": 1.0}, created=time.time())
        topic = f"{g.spec.base}/agents/{self.id}/update"
        limit = (self.max_packet - PUBLISH_OVERHEAD - len(topic)) if self.max_packet else None
        chunk_data = limit - CHUNK_OVERHEAD if limit is not None and len(payload) > limit else 0
        payloads = chunk_payloads(payload, chunk_data) if chunk_data else [payload]
        self.rounds[key] = Sent(uid, base, opened, payloads, n, whole=payload, chunk_data=chunk_data)

    def send(self, key: tuple[str, int], first: bool) -> None:
        s = self.rounds[key]
        if not self.connected:
            return  # on_connect -> the retained round comes again -> re-sent then
        g = self.gen
        topic = f"{g.spec.base}/agents/{self.id}/update"
        s.mids = set()
        s.acked = False
        if not first and s.chunk_data and g.spec.rechunk_resends:
            # the same update, cut again under a new blob_id: the aggregator ignores chunks of a blob it
            # completed before (duplicate_delivery) without a receipt, so re-sent identical chunks of an
            # update whose receipt was lost would never be answered (bench/RESULTS.md, "Fleet scale")
            s.payloads = chunk_payloads(s.whole, s.chunk_data)
        for p in s.payloads:
            info = self.c.publish(topic, p, qos=1)
            s.mids.add(info.mid)
            g.count_out(topic, len(p))
        s.last_send = time.monotonic()
        s.attempts += 1
        r = g.round_stats(key)
        r["bytes_out"] += sum(len(p) + len(topic) for p in s.payloads)
        r["sent" if first else "resent"] += 1
        r["chunks"] += len(s.payloads)
        now = time.time()
        r["first_sent"] = r["first_sent"] or now
        r["last_sent"] = now

    def on_receipt(self, m: dict) -> None:
        try:
            key = (str(m["run"]), int(m["round"]))
        except (KeyError, TypeError, ValueError):
            return
        s = self.rounds.get(key)
        if s is None or m.get("update_id") != s.update_id or m.get("agent") != self.id:
            self.gen.stats["receipts_unmatched"] += 1
            return
        r = self.gen.round_stats(key)
        if m.get("accepted") is True:
            s.receipt = "accepted"
            if not s.counted:
                s.counted = True
                r["receipt_accepted"] += 1
                r["last_receipt"] = time.time()
        elif m.get("retry") is True:
            s.wait_reannounce = True  # may count when re-sent into its (re-)announced round
            r["receipt_retry"][str(m.get("reason"))[:64]] = r["receipt_retry"].get(str(m.get("reason"))[:64], 0) + 1
        else:
            reason = str(m.get("reason"))[:64]
            s.receipt = reason  # can never count: dropped from the outbox
            if not s.counted:
                s.counted = True
                r["receipt_rejected"][reason] = r["receipt_rejected"].get(reason, 0) + 1

    def tick(self, now: float) -> None:
        """Receipts on: no receipt resend_s after a send (doubling up to 8 x): re-send the same bytes
        while the announced round is open."""
        spec = self.gen.spec
        if not (spec.receipts and self.connected and self.ann is not None):
            return
        key = (self.ann["run"], self.ann["round"])
        s = self.rounds.get(key)
        if s is None or s.receipt is not None or s.wait_reannounce or s.due or s.mids:
            return
        deadline = self.ann.get("deadline")
        if isinstance(deadline, (int, float)) and time.time() > deadline:
            return
        if now - s.last_send >= resend_wait(spec, s.attempts):
            self.gen.round_stats(key)["timer_resent"] += 1
            self.send(key, first=False)

    def fire(self, now: float) -> bool:
        """Upload-window and presence timers; True while one is still pending."""
        pending = False
        for key, s in self.rounds.items():
            if s.due:
                if now >= s.due and not self.connected:
                    pending = True  # due while the broker is away: sent once connected again (not dropped)
                elif now >= s.due:
                    s.due = 0.0
                    self.send(key, first=True)
                else:
                    pending = True
        if self.presence_due:
            if now >= self.presence_due:
                self.presence_due = 0.0
                if self.connected:
                    self.publish_status()
            else:
                pending = True
        if self.resend_due:
            if now >= self.resend_due:
                self.resend_due = 0.0
                self.tick(now)  # re-sends what is still without a receipt
            else:
                pending = True
        return pending


class Generator:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self.stats: dict[str, Any] = {"pid": os.getpid(), "agents": len(spec.agents), "connect_attempts": 0,
                                      "connect_errors": 0, "connack_refused": 0, "connack_reasons": {},
                                      "disconnects": 0, "bytes_in": 0, "bytes_out": 0, "msgs_in": 0,
                                      "msgs_out": 0, "receipts_unmatched": 0, "status_published": 0,
                                      "presence_resyncs": 0, "rounds": {}}
        self.acked_ids: dict[str, list[str]] = {}
        self.service: dict | None = None
        self.highest: dict[str, int] = {}  # run -> highest round announced (shared: one device cache per process)
        self.weights: list[tuple[str, list[int]]] | None = None
        self.model_id: str | None = None
        self.basis: list[np.ndarray] = []
        self.model_blob = RetainedBlob()
        self.waiting: set[Agent] = set()
        self.timers: set[Agent] = set()  # agents with an upload-window or presence timer
        self.pending: set[Agent] = set()
        self.clients: dict[int, Agent] = {}  # fd -> agent
        self.agents = []
        self.leader: Agent | None = None
        self.agents = [Agent(self, a) for a in spec.agents]
        self.leader = self.agents[0] if self.agents else None
        self.pending = set(self.agents)

    # selector bookkeeping (paho's socket callbacks)
    def sock_open(self, client, userdata, sock) -> None:
        self.sel.register(sock, selectors.EVENT_READ, client)

    def sock_close(self, client, userdata, sock) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def sock_want_write(self, client, userdata, sock) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        except (KeyError, ValueError):
            pass

    def sock_no_write(self, client, userdata, sock) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    def count_out(self, topic: str, n: int) -> None:
        self.stats["bytes_out"] += n + len(topic)
        self.stats["msgs_out"] += 1

    def round_stats(self, key: tuple[str, int]) -> dict:
        k = f"{key[0]}/{key[1]}"
        r = self.stats["rounds"].get(k)
        if r is None:
            r = self.stats["rounds"][k] = {"asked": 0, "sent": 0, "resent": 0, "chunks": 0, "acked": 0,
                                           "receipt_accepted": 0, "receipt_rejected": {}, "first_sent": 0.0,
                                           "last_sent": 0.0, "last_acked": 0.0, "last_receipt": 0.0,
                                           "bytes_in": 0, "bytes_out": 0, "receipt_retry": {}, "timer_resent": 0}
            for old in list(self.stats["rounds"])[:-KEEP_ROUNDS]:  # bounded stats file
                del self.stats["rounds"][old]
                self.acked_ids.pop(old, None)
        return r

    def on_model_message(self, t: str, payload: bytes) -> None:
        m = unpack(payload)
        if m is None:
            return
        if t == "model":
            if m.get("kind") == "chunked":
                self.model_blob.on_pointer(m)
                return
            m = unwrap(m)
            if m is not None and m.get("kind") == "model":
                self.set_model(m)
            return
        if m.get("kind") == "chunk":
            blob = self.model_blob.on_chunk(m)
            mm = unwrap(unpack(blob)) if blob else None
            if mm is not None and mm.get("kind") == "model":
                self.set_model(mm)

    def set_model(self, m: dict) -> None:
        try:
            artifact = m["artifact"]
            if hashlib.sha256(artifact).hexdigest() != m["model_id"]:
                return  # docs: receivers verify model_id
            weights = [(str(w["name"]), [int(d) for d in w["shape"]]) for w in m["weights"]]
            if any(w["dtype"] != "float32" for w in m["weights"]):
                return
        except (KeyError, TypeError, ValueError):
            return
        if m["model_id"] == self.model_id:
            return
        self.weights, self.model_id = weights, m["model_id"]
        self.basis = basis(self.spec.seed, weights)
        self.stats["model_id"] = self.model_id
        self.stats["weights"] = weights
        waiting, self.waiting = self.waiting, set()
        for a in waiting:
            if a.ann is not None:
                a.on_round(a.ann)

    def write_stats(self) -> None:
        s = dict(self.stats)
        s["ts"] = time.time()
        s["connected"] = sum(a.connected for a in self.agents)
        s["status_acked"] = sum(a.status_acked for a in self.agents)
        s["acked_ids"] = self.acked_ids
        waiting: dict[str, list[str]] = {}  # PUBACKed, no receipt yet (receipts on)
        if self.spec.receipts:
            for a in self.agents:
                for key, x in a.rounds.items():
                    if x.ever_acked and not x.counted:
                        waiting.setdefault(f"{key[0]}/{key[1]}", []).append(a.id)
        s["no_receipt_ids"] = waiting
        s["rss_kb"] = _vm_hwm_kb()
        s["cpu_s"] = sum(os.times()[:2])
        tmp = self.spec.stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(s, f)
        os.replace(tmp, self.spec.stats_path)

    def run(self) -> None:
        last_misc = last_stats = 0.0
        while not self.stopping:
            now = time.monotonic()
            if self.pending:
                due = [a for a in self.pending if a.next_connect <= now][: self.spec.connect_batch]
                for a in due:
                    self.pending.discard(a)
                    a.connect()
            for key, _ in self.sel.select(timeout=0.05):
                c = key.data
                if key.events & selectors.EVENT_READ:
                    c.loop_read()
                if key.events & selectors.EVENT_WRITE and c.socket() is not None:
                    c.loop_write()
            now = time.monotonic()
            if self.timers:
                self.timers = {a for a in self.timers if a.fire(now)}
            if now - last_misc > 1.0:
                last_misc = now
                for a in self.agents:
                    if a.c.socket() is not None:
                        a.c.loop_misc()
                    a.tick(now)
            if now - last_stats > 0.25:
                last_stats = now
                self.write_stats()
        for a in self.agents:  # SIGTERM: a clean disconnect (no last will), as a stopped agent does
            if a.connected:
                a.c.disconnect()
                a.c.loop_write()
        self.write_stats()


def _vm_hwm_kb() -> int:
    """Peak resident set of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, need))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < need:
        raise SystemExit(f"need {need} file descriptors, the hard limit is {hard}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True, help="JSON file with the fields of Spec")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s synth %(levelname)s %(message)s")
    with open(args.spec) as f:
        spec = Spec(**json.load(f))
    raise_fd_limit(len(spec.agents) + 256)
    gen = Generator(spec)

    def stop(*_: object) -> None:
        gen.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    gen.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
