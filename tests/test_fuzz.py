"""Property/fuzz tests over every entry point that parses network bytes (issue 12 point 2).

Seeded (``derandomize=True``) and bounded (about a minute in total on 2 cores). Entry points:
``codec.decode`` (raw bytes, mutated valid payloads, structure-aware msgpack maps with random field
types), each kind's ``from_wire``, the reassembler (random chunk sequences), the topic parser and
``Receiver.feed`` on the aggregator's and the agent's topics. Only the documented typed errors may
come out (DecodeError / ChunkError / TopicError; ``feed`` never raises), and ``decode`` may not
allocate more than ``DECODE_AMPLIFICATION * len(payload) + DECODE_OVERHEAD`` bytes plus the dense
result of topk tensors (fedmq.broker.contract.codec). bench/fuzz.py runs the same properties longer.
"""

from __future__ import annotations

import hashlib
import math
import tracemalloc
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.broker.contract import codec
from fedmq.broker.contract.chunking import PART_OVERHEAD, Reassembler, ReassemblyLimits, split
from fedmq.broker.contract.codec import DECODE_AMPLIFICATION, DECODE_OVERHEAD
from fedmq.broker.contract.messages import (
    KINDS,
    Chunk,
    ChunkSet,
    DecodeLimits,
    GlobalDelta,
    Message,
    Receipt,
    ServiceStatus,
    Signed,
)
from fedmq.broker.contract.reasons import IGNORED, REASONS
from fedmq.broker.contract.topics import ParsedTopic, Topics
from fedmq.broker.errors import ChunkError, DecodeError, TopicError
from fedmq.broker.transport.receiver import Receiver

FUZZ = settings(derandomize=True, deadline=None, database=None, max_examples=400,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MID = "ab" * 32
T = Topics("f")
LIM = DecodeLimits()

# -- generators --------------------------------------------------------------------------------------
ints = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, 1, -1, 2**31, 2**40, 2**63 - 1, 2**64 - 1]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e308, 5e-324]))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=20), st.binary(max_size=64))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                    st.dictionaries(st.text(max_size=8), c, max_size=4)),
                      max_leaves=12)


def _tensor(enc: str = "raw") -> dict[str, Any]:
    t: dict[str, Any] = {"name": "w", "enc": enc, "dtype": "float32", "shape": [2, 2]}
    if enc == "raw":
        t["data"] = b"\0" * 16
    elif enc == "f16":
        t["data"] = b"\0" * 8
    elif enc == "int8":
        t.update(data=b"\1" * 4, scale=0.5)
    else:
        t.update(idx=np.array([1, 3], "<u4").tobytes(), data=np.array([1, 2], "<f4").tobytes())
    return t


ART = b"artifact"
VALID: dict[str, dict[str, Any]] = {
    "update": {"round": 2, "base_round": 1, "agent": "a", "model_id": MID, "update_id": "cd" * 16,
               "num_samples": 5, "metrics": {"loss": 0.5}, "created": 0.0, "tensors": [_tensor()]},
    "global": {"round": 1, "model_id": MID, "created": 0.0, "tensors": [_tensor("raw")]},
    "round": {"round": 1, "model_id": MID, "base_round": 0, "opened": 0.0, "deadline": 9.0,
              "config": {"epochs": 1, "batch_size": 8, "lr": 0.1, "mu": 0.0, "encoding": "topk",
                         "topk_fraction": 0.1, "seed": 3}, "agents": ["a", "b"], "quorum": 1},
    "status": {"agent": "a", "state": "online", "ts": 1.0, "runtime": "py", "interpreter": "x", "num_samples": 3,
               "version": "1"},
    "metrics": {"round": 1, "ts": 1.0, "outcome": "aggregated", "participants": ["a"], "values": {"x": 1.0},
                "rejected": {}},
    "model": {"model_id": hashlib.sha256(ART).hexdigest(), "format": "tflite-trainable-v2", "artifact": ART,
              "weights": [{"name": "w", "shape": [2, 2], "dtype": "float32"}],
              "inputs": [{"name": "x", "shape": [8, 2], "dtype": "float32"}], "train_batch_size": 8,
              "created": 0.0, "extra": {}},
    "chunk": {"blob_id": "aa" * 8, "index": 0, "total": 2, "offset": 0, "size": 10, "sha256": b"\0" * 32,
              "data": b"x" * 5},
}
# the kinds added later: their own encoder's output (the base a fuzzed map starts from)
VALID.update({
    "chunked": ChunkSet("ab" * 8, 2, 100, b"\0" * 32).to_wire(),
    "receipt": Receipt("cd" * 8, 3, "a", "cd" * 16, False, "future", True).to_wire(),
    "service": ServiceStatus("aggregator", "online", 1.0, "cd" * 8, MID, 2, 3, "1").to_wire(),
    "global_delta": GlobalDelta("cd" * 8, 2, 1, MID, 0.0, b"\0" * 32,
                                {"w": np.ones(4, np.float32)}).to_wire(),
    "signed": Signed("k" * 16, b"\0" * 64, b"body").to_wire(),
})
TENSOR_FIELDS = ("name", "enc", "dtype", "shape", "data", "scale", "idx")


@st.composite
def wire_maps(draw) -> dict[str, Any]:
    """A valid message map of a random kind with some fields replaced, dropped or added at random."""
    kind = draw(st.sampled_from(sorted(VALID)))
    m: dict[str, Any] = {"v": 1, "kind": kind, **{k: v for k, v in VALID[kind].items()}}
    if "tensors" in m:
        m["tensors"] = [_tensor(draw(st.sampled_from(["raw", "f16", "int8", "topk"])))]
        for _ in range(draw(st.integers(0, 3))):
            t = m["tensors"][0]
            f = draw(st.sampled_from(TENSOR_FIELDS))
            if draw(st.booleans()):
                t[f] = draw(values)
            else:
                t.pop(f, None)
    for _ in range(draw(st.integers(0, 3))):
        f = draw(st.sampled_from(sorted(m) + ["extra_field"]))
        action = draw(st.integers(0, 2))
        if action == 0:
            m[f] = draw(values)
        elif action == 1:
            m.pop(f, None)
        else:
            m[f] = draw(scalars)
    return m


def pack(m: Any) -> bytes:
    return msgpack.packb(m, use_bin_type=True)


def _valid_payloads() -> list[bytes]:
    return [pack({"v": 1, "kind": k, **v}) for k, v in VALID.items()]


@st.composite
def mutated(draw) -> bytes:
    """A valid payload, truncated, with flipped/inserted bytes."""
    b = bytearray(draw(st.sampled_from(_valid_payloads())))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 2))
        i = draw(st.integers(0, max(0, len(b) - 1)))
        if op == 0 and b:
            b[i] = draw(st.integers(0, 255))
        elif op == 1:
            b.insert(i, draw(st.integers(0, 255)))
        else:
            del b[i:]
    return bytes(b)


payloads = st.one_of(st.binary(max_size=512), mutated(), wire_maps().map(pack))


def _decode_only_typed(payload: bytes) -> Message | None:
    try:
        out = codec.decode(payload, LIM)
    except DecodeError as e:
        assert e.reason in REASONS, e.reason
        return None
    assert isinstance(out, Message)
    return out


# -- decode -------------------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=2048))
def test_decode_raw_bytes_raises_only_decode_error(payload):
    _decode_only_typed(payload)


@FUZZ
@given(mutated())
def test_decode_mutated_valid_payloads(payload):
    _decode_only_typed(payload)


@settings(FUZZ, max_examples=1000)
@given(wire_maps())
def test_decode_structure_aware_maps(m):
    out = _decode_only_typed(pack(m))
    if out is not None:  # what decodes is what was sent, typed
        assert out.KIND == m["kind"] and type(m.get("v")) is int


@settings(FUZZ, max_examples=250)
@given(st.sampled_from(sorted(KINDS)), st.dictionaries(st.text(max_size=12), values, max_size=10), st.data())
def test_each_kind_from_wire_raises_only_decode_error(kind, extra, data):
    m = dict(VALID[kind]) if data.draw(st.booleans()) else {}
    m.update(extra)
    try:
        KINDS[kind].from_wire(m, LIM)
    except DecodeError as e:
        assert e.reason in REASONS
    for junk in (None, [], 3, "x", b"y"):
        try:
            KINDS[kind].from_wire(junk, LIM)  # type: ignore[arg-type]
        except DecodeError:
            pass


def _topk_dense_bytes(m: Any) -> int:
    """4 bytes x declared elements of every topk tensor in a wire map (an upper bound computed here)."""
    total = 0
    tensors = m.get("tensors") if isinstance(m, dict) else None
    for t in tensors if isinstance(tensors, list) else []:
        shape = t.get("shape") if isinstance(t, dict) else None
        if isinstance(t, dict) and t.get("enc") == "topk" and isinstance(shape, list) \
                and all(type(d) is int and d >= 0 for d in shape):
            total += 4 * math.prod(shape)
    return total


@settings(FUZZ, max_examples=300)
@given(st.one_of(st.binary(max_size=4096).map(lambda b: (b, None)), wire_maps().map(lambda m: (pack(m), m)),
                 st.integers(1, 5000).map(lambda n: (pack({"v": 1, "kind": "update", "x": [{}] * n}), None)),
                 st.integers(1, 3000).map(lambda n: (pack({"v": 1, "kind": "status", "x": ["ab"] * n}), None))))
def test_decode_allocates_at_most_a_constant_times_the_payload(case):
    payload, m = case
    bound = DECODE_AMPLIFICATION * len(payload) + DECODE_OVERHEAD + (_topk_dense_bytes(m) if m else 0)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        out = None
        try:
            out = codec.decode(payload, LIM)
        except DecodeError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del out
    assert peak - base <= bound, (peak - base, len(payload))


def test_many_small_containers_are_refused_before_they_cost_memory():
    with_containers = pack({"v": 1, "kind": "update", "x": [{}] * 10_000})
    try:
        codec.decode(with_containers)
        raise AssertionError("10,000 maps in one payload must be refused")
    except DecodeError as e:
        assert e.reason == "too_large"


# -- reassembler ---------------------------------------------------------------------------------------
@st.composite
def chunk_streams(draw):
    """A mix of honest blobs (split, shuffled, duplicated) and random hostile chunks, on a few sources."""
    out = []
    honest = []
    for j in range(draw(st.integers(0, 3))):
        data = draw(st.binary(min_size=1, max_size=3000))
        honest.append(data)
        src = f"h{j}"
        out += [(c, src) for c in split(data, draw(st.integers(1, 700)), blob_id=f"{j:016x}")]
    for _ in range(draw(st.integers(0, 40))):
        size = draw(st.integers(1, 2**40))
        total = draw(st.integers(1, 2**24))
        out.append((Chunk(draw(st.sampled_from(["aa" * 8, "bb" * 8, "cc" * 8])), draw(st.integers(0, total - 1)),
                          total, draw(st.integers(0, size - 1)), size, draw(st.binary(min_size=32, max_size=32)),
                          draw(st.binary(max_size=300))), draw(st.sampled_from(["evil", "h0", "h1"]))))
    order = draw(st.permutations(out))
    dups = draw(st.lists(st.sampled_from(out), max_size=10)) if out else []
    return list(order) + dups, honest


@settings(FUZZ, max_examples=200)
@given(chunk_streams(), st.integers(0, 2))
def test_reassembler_random_chunk_sequences(stream, which):
    chunks, honest = stream
    lim = [ReassemblyLimits(), ReassemblyLimits.for_fleet(4000, 2),
           ReassemblyLimits(max_blob_bytes=2000, max_source_bytes=3000, max_total_bytes=5000, max_blobs=4,
                            max_blobs_per_source=2, max_chunks=50)][which]
    r = Reassembler(lim)
    got = []
    received = 0
    for c, src in chunks:
        received += memoryview(c.data).nbytes
        try:
            out = r.add(c, src)
        except ChunkError as e:
            assert e.reason in REASONS, e.reason
            continue
        if out is not None:
            assert hashlib.sha256(out).digest() == bytes(c.sha256) and len(out) == c.size
            got.append(out)
        # the budgets hold and memory is charged by bytes that arrived
        assert r.reserved_bytes <= lim.max_total_bytes
        assert r.reserved_bytes <= received + PART_OVERHEAD * len(chunks)
        for s in ("evil", "h0", "h1", "h2"):
            assert r.sender_bytes(s) <= lim.max_source_bytes
    assert all(g in honest for g in got)
    r.expire(now=1e12)
    assert r.reserved_bytes == 0 and r.in_flight == 0


# -- topics ---------------------------------------------------------------------------------------------
segment = st.one_of(st.sampled_from(["fedmq", "f", "agents", "a", "update", "status", "model", "global", "round",
                                     "metrics", "chunk", "0", "1", "01", "\u00b9", "+", "#", "", "a\n"]),
                    st.text(max_size=6))


@settings(FUZZ, max_examples=1000)
@given(st.one_of(st.text(max_size=80), st.lists(segment, max_size=7).map("/".join)))
def test_topic_parser_raises_only_topic_error(topic):
    try:
        p = T.parse(topic)
    except TopicError:
        return
    assert isinstance(p, ParsedTopic)
    assert topic.isascii()
    assert p.chunk is None or (0 <= p.chunk < 10**9)


# -- receiver on both sides ----------------------------------------------------------------------------
AGG_TOPICS = [T.update("a"), T.update("b"), T.status("a"), T.status("b"), T.update("a") + "/chunk/0"]
AGENT_TOPICS = [T.model(), T.global_(), T.round(), T.chunk(T.model(), 0), T.chunk(T.global_(), 1),
                T.chunk(T.global_(), 0)]


@settings(FUZZ, max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(AGG_TOPICS + AGENT_TOPICS + ["fedmq/f/x", "fedmq/f/global/chunk/\u00b9"]),
                          payloads, st.booleans()), min_size=1, max_size=12))
def test_receiver_feed_never_raises(msgs):
    for side in (AGG_TOPICS, AGENT_TOPICS):
        rx = Receiver(T, log_interval_s=3600)
        accepted = 0
        for topic, payload, retained in msgs:
            if topic not in side and not topic.startswith("fedmq/f/x") and "\u00b9" not in topic:
                continue
            out = rx.feed(topic, payload, retained)  # must not raise
            if out is not None:
                accepted += 1
                assert isinstance(out.message, Message)
        assert rx.accepted == accepted
        assert rx.rejected.get("internal", 0) == 0, rx.rejected  # no bug was hit
        assert set(rx.rejected) <= set(REASONS) and set(rx.ignored) <= set(IGNORED)
        rx.tick()
