"""Codec: round trips (hypothesis), compression error bounds vs numpy, hostile inputs."""

import math
import struct
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmq.broker.contract import codec
from fedmq.broker.contract.messages import (
    Chunk,
    DecodeLimits,
    GlobalModel,
    ModelManifest,
    RoundAnnouncement,
    RoundMetrics,
    Status,
    TensorSpec,
    TrainConfig,
    Update,
)
from fedmq.broker.contract.msgview import FAST_MAX_BYTES, ReadLimits, read_payload, unpack
from fedmq.broker.contract.tensors import RAW_DTYPES, Compression, decode_tensor, encode_tensor, topk_count
from fedmq.broker.errors import DecodeError, EncodeError

MID = "ab" * 32
RUN = "0123456789abcdef"  # a run id (every message of a run carries one)
UID = "0123456789abcdef"

dtypes = st.sampled_from(list(RAW_DTYPES.values()))
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_raw_round_trip_bit_identical(data):
    dt = data.draw(dtypes)
    arr = data.draw(hnp.arrays(dt, data.draw(shapes)))
    msg = GlobalModel(3, MID, {"w": arr, "b": arr.reshape(-1)}, 1.5, run=RUN)
    out = codec.decode(codec.encode(msg))
    assert isinstance(out, GlobalModel) and out.round == 3
    for name in ("w", "b"):
        got = out.tensors[name]
        assert got.dtype == arr.dtype.newbyteorder("<") or got.dtype == arr.dtype
        assert got.shape == (arr.shape if name == "w" else (arr.size,))
        assert got.tobytes() == np.ascontiguousarray(arr).reshape(got.shape).tobytes()


def test_decoded_raw_tensors_are_zero_copy_views():
    """Above FAST_MAX_BYTES (where a copy costs memory) raw tensors are views of the payload."""
    arr = np.arange(FAST_MAX_BYTES // 4 + 1000, dtype=np.float32)
    payload = codec.encode(GlobalModel(1, MID, {"w": arr}, 0.0, run=RUN))
    assert len(payload) > FAST_MAX_BYTES
    out = codec.decode(payload)
    w = out.tensors["w"]
    assert not w.flags.owndata and not w.flags.writeable
    base = np.frombuffer(payload, dtype=np.uint8)
    assert np.shares_memory(w, base)
    assert np.array_equal(w, arr)


def test_small_payloads_decode_read_only_and_equal():
    """Below FAST_MAX_BYTES msgpack's C unpacker decodes (bins are copies): same values, still read-only."""
    arr = np.arange(1000, dtype=np.float32)
    payload = codec.encode(GlobalModel(1, MID, {"w": arr}, 0.0, run=RUN))
    w = codec.decode(payload).tensors["w"]
    assert not w.flags.writeable and np.array_equal(w, arr)


def test_big_endian_and_non_contiguous_inputs_are_normalised():
    a = np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2]
    assert a.dtype.byteorder == ">" and not a.flags.c_contiguous
    ref = np.array([[0, 2], [4, 6], [8, 10]], dtype="<f4")  # the values, written out
    # through the whole message codec...
    got = codec.decode(codec.encode(GlobalModel(1, MID, {"x": a}, 0.0, run=RUN))).tensors["x"]
    assert got.dtype == np.dtype("<f4") and got.shape == (3, 2)
    assert got.tobytes() == ref.tobytes()
    # ...and through the tensor encoding alone
    name, out = decode_tensor(encode_tensor("x", a), 10**6)
    assert name == "x" and out.dtype == np.dtype("<f4") and out.tobytes() == ref.tobytes()


floats = hnp.arrays(np.float32, shapes, elements=st.floats(-1e4, 1e4, width=32))


@settings(max_examples=150, deadline=None)
@given(floats)
def test_float16_error_bound(x):
    _, y = decode_tensor(encode_tensor("t", x, Compression("f16")), 10**6)
    ref = x.astype(np.float16).astype(np.float32)  # numpy's own round-to-nearest-even
    np.testing.assert_array_equal(y, ref)
    # half precision: relative error <= 2**-11 for normal numbers, absolute <= 2**-25 near zero
    assert np.all(np.abs(y - x) <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25))


@settings(max_examples=150, deadline=None)
@given(floats)
def test_int8_error_bound_and_reference(x):
    wire = encode_tensor("t", x, Compression("int8"))
    _, y = decode_tensor(wire, 10**6)
    amax = float(np.max(np.abs(x))) if x.size else 0.0
    scale = amax / 127.0
    assert wire["scale"] == pytest.approx(scale)
    s32 = np.float32(scale)
    ref = (np.clip(np.round(x / s32), -127, 127) * s32) if s32 > 0 else np.zeros_like(x)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6 * max(amax, 1))
    assert np.all(np.abs(y - x) <= scale / 2 + 1e-5 * max(amax, 1))


def test_int8_rounds_half_to_even():
    x = np.array([127.0, 0.5, 1.5, 2.5, -0.5], dtype=np.float32)  # scale = 1
    _, y = decode_tensor(encode_tensor("t", x, Compression("int8")), 100)
    np.testing.assert_array_equal(y, [127, 0, 2, 2, -0])


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, shapes, elements=st.floats(-100, 100, width=32)),
       st.floats(0.001, 1.0))
def test_topk_keeps_largest_magnitudes(x, frac):
    _, y = decode_tensor(encode_tensor("t", x, Compression("topk", frac)), 10**6)
    flat, yf = x.reshape(-1), y.reshape(-1)
    k = topk_count(flat.size, frac)
    kept = np.flatnonzero(yf != 0)
    assert kept.size <= k
    np.testing.assert_array_equal(yf[kept], flat[kept])
    if flat.size and k < flat.size:
        # every kept magnitude >= every dropped magnitude (reference: full sort)
        dropped = np.setdiff1d(np.arange(flat.size), np.argsort(-np.abs(flat), kind="stable")[:k])
        assert np.abs(flat[dropped]).max(initial=0) <= np.sort(np.abs(flat))[::-1][k - 1]


def test_topk_wire_size():
    x = np.random.default_rng(0).normal(size=100_000).astype(np.float32)
    wire = encode_tensor("t", x, Compression("topk", 0.01))
    assert len(wire["idx"]) == len(wire["data"]) == 1000 * 4


def test_lossy_encodings_refuse_bad_values():
    with pytest.raises(EncodeError, match="float16 range"):
        encode_tensor("t", np.array([1e6], np.float32), Compression("f16"))
    with pytest.raises(EncodeError, match="non-finite"):
        encode_tensor("t", np.array([np.inf], np.float32), Compression("int8"))
    with pytest.raises(EncodeError):
        encode_tensor("t", np.array([1], np.int32), Compression("int8"))
    with pytest.raises(EncodeError):
        Compression("zip")


def _all_messages():
    w = {"dense/kernel": np.ones((3, 2), np.float32), "dense/bias": np.zeros(2, np.float32)}
    return [
        ModelManifest(MID, b"\x00tflite", [TensorSpec("dense/kernel", (3, 2), "float32")],
                      [TensorSpec("x", (8, 3), "float32"), TensorSpec("y", (8,), "int32")], 8, 1.0, {"lr": 0.1}, run=RUN),
        GlobalModel(0, MID, w, 2.0, run=RUN),
        RoundAnnouncement(4, MID, 3, 10.0, 70.0, TrainConfig(2, 16, 0.05, 0.01, Compression("topk", 0.05), 7),
                          ["a", "b-2"], 2, run=RUN),
        RoundAnnouncement(1, MID, 0, 10.0, 70.0, TrainConfig(), None, 1, run=RUN),
        Update(4, "a", MID, UID, 120, w, {"loss": 0.3, "acc": 0.9}, 5.0, run=RUN),
        Status("a", "training", 3.0, "litert", "ai_edge_litert 2.3", 120, "0.1.0"),
        RoundMetrics(4, 9.0, "aggregated", ["a", "b-2"], {"loss": 0.2}, {"stale": 2}, run=RUN),
        Chunk(UID, 1, 3, 100, 250, b"\x01" * 32, b"abc"),
    ]


@pytest.mark.parametrize("msg", _all_messages(), ids=lambda m: m.KIND)
def test_every_kind_round_trips(msg):
    out = codec.decode(codec.encode(msg))
    assert type(out) is type(msg)
    for k, v in vars(msg).items():
        got = getattr(out, k)
        if k == "tensors":
            assert list(got) == list(v)
            for n in v:
                np.testing.assert_array_equal(got[n], v[n])
        elif isinstance(v, (bytes, memoryview)):
            assert bytes(got) == bytes(v)
        elif k != "compression":
            assert got == v, k
    assert msgpack.unpackb(codec.encode(msg))["kind"] == msg.KIND  # stock msgpack reads it too


def test_encoder_reuses_its_buffer_and_matches_encode():
    enc = codec.Encoder()
    m1 = GlobalModel(1, MID, {"w": np.arange(10_000, dtype=np.float32)}, 0.0, run=RUN)
    m2 = GlobalModel(2, MID, {"w": np.ones(5, dtype=np.float32)}, 0.0, run=RUN)
    v1 = bytes(enc.encode(m1))
    assert v1 == codec.encode(m1)
    assert bytes(enc.encode(m2)) == codec.encode(m2)
    held = enc.encode(m1)[10:20]  # a caller keeping a slice must not break the next call
    assert bytes(enc.encode(m2)) == codec.encode(m2)
    assert len(bytes(held)) == 10



def test_a_large_message_leaves_no_buffer_behind():
    """codec.encode packs a message with large tensors in a buffer of its own, sized once, so the shared
    buffer never grows (on a device it held 2x the update between rounds); a small message uses the
    shared one (the reuse it exists for); Encoder.shrink drops a buffer a large message grew."""
    big = GlobalModel(1, MID, {"w": np.arange(codec.KEEP_BUFFER_BYTES // 2, dtype=np.float32)}, 0.0, run=RUN)
    small = GlobalModel(2, MID, {"w": np.ones(5, dtype=np.float32)}, 0.0, run=RUN)
    assert codec.decode(codec.encode(small)).round == 2
    kept = codec._shared._packer
    assert codec._shared._view is not None  # positive control: a small message's buffer stays for the next call
    out = codec.encode(big)
    assert codec._shared._packer is kept and codec._shared._view.nbytes < codec.KEEP_BUFFER_BYTES
    assert out == bytes(codec.Encoder().encode(big))  # the same bytes either way
    assert np.array_equal(codec.decode(out).tensors["w"], big.tensors["w"])
    enc = codec.Encoder()
    enc.encode(big)
    enc.shrink()
    assert enc._view is None
    enc.encode(small)
    enc.shrink()
    assert enc._view is not None


# -- the zero-copy reader vs msgpack itself --------------------------------------------------------
json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=40) | st.binary(max_size=300),
    lambda c: st.lists(c, max_size=20) | st.dictionaries(st.text(max_size=10) | st.integers(-5, 300), c, max_size=20),
    max_leaves=60,
)


def _plain(o):
    if isinstance(o, memoryview):
        return bytes(o)
    if isinstance(o, list):
        return [_plain(x) for x in o]
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    return o


@settings(max_examples=400, deadline=None)
@given(json_like, st.booleans())
def test_reader_agrees_with_msgpack(obj, single_float):
    try:
        data = msgpack.packb(obj, use_bin_type=True, use_single_float=single_float)
    except OverflowError:  # a double beyond float32 range with use_single_float
        assume(False)
    assert _plain(unpack(data, ReadLimits(max_depth=64))) == msgpack.unpackb(data, strict_map_key=False)


def _canon(o):
    """A value as a comparable tree: types kept (True is not 1) and floats by their bits (NaN == NaN)."""
    o = _plain(o)
    if isinstance(o, list):
        return ("list", tuple(_canon(x) for x in o))
    if isinstance(o, dict):
        return ("dict", tuple((_canon(k), _canon(v)) for k, v in o.items()))
    if isinstance(o, float):
        return ("float", struct.pack("<d", o))
    return (type(o).__name__, o)


def _outcome(fn, data, lim):
    """What a decoder makes of ``data``: ("ok", canonical value) or ("error", reason)."""
    try:
        return "ok", _canon(fn(data, lim))
    except DecodeError as e:
        return "error", e.reason


@settings(max_examples=400, deadline=None)
@given(json_like, st.booleans(), st.data())
def test_fast_path_agrees_with_the_reader(obj, single_float, data):
    """The two decoders (msgpack's C unpacker with hooks, the zero-copy reader) are one function:
    same value for every valid payload, and for its truncations and single-byte corruptions the
    same verdict (accepted with the same value, or rejected)."""
    try:
        payload = msgpack.packb(obj, use_bin_type=True, use_single_float=single_float)
    except OverflowError:
        assume(False)
    lim = ReadLimits(max_depth=data.draw(st.integers(1, 12)), max_containers=data.draw(st.integers(1, 64)),
                     max_str=data.draw(st.integers(0, 64)), max_container=data.draw(st.integers(0, 64)))
    variants = [payload, payload[:data.draw(st.integers(0, len(payload)))]]
    i = data.draw(st.integers(0, len(payload) - 1))
    variants.append(payload[:i] + bytes([data.draw(st.integers(0, 255))]) + payload[i + 1:])
    for v in variants:
        fast, slow = _outcome(read_payload, v, lim), _outcome(unpack, v, lim)
        assert (fast[0], fast[1] if fast[0] == "ok" else None) == (slow[0], slow[1] if slow[0] == "ok" else None)


@pytest.mark.parametrize("payload", [
    b"\x91\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # [NaN] as a double (CI found it by corrupting [inf])
    b"\x91\xcb\xff\xf0\x00\x00\x00\x00\x00\x01",  # a signalling NaN with a payload
    b"\x91\xca\x7f\xc0\x00\x00",  # NaN as a float32
    b"\x81\xa1a\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # {"a": inf}
])
def test_both_decoders_read_nan_and_inf_alike(payload):
    """NaN != NaN, so the comparison is by bits: both decoders give the same double."""
    fast, slow = _outcome(read_payload, payload, ReadLimits()), _outcome(unpack, payload, ReadLimits())
    assert fast[0] == "ok" and fast == slow
    assert _canon(msgpack.unpackb(payload)) == fast[1]


@pytest.mark.parametrize("payload, reason", [
    (b"\x82\xa1a\x01\xa1a\x02", "malformed"),  # duplicate key
    (b"\x81\xc3\x01", "malformed"),  # bool key
    (b"\x81\xc4\x01a\x01", "malformed"),  # bin key
    (b"\x81\x91\x01\x01", "malformed"),  # array key
    (b"\x91\xd6\xff\x00\x00\x00\x01", "malformed"),  # a timestamp (ext -1) inside
    (b"\xd6\xff\x00\x00\x00\x01", "malformed"),  # a timestamp alone
    (b"\xd4\x01\x00", "malformed"),  # another ext
    (b"\x91" * 9 + b"\x90", "malformed"),  # nesting 10 > 8
    (b"\x91" * 3000 + b"\x90", "malformed"),  # deeper than msgpack's own stack
    (b"\xdc\x10\x00" + b"\x90" * 4096, "too_large"),  # 4097 containers
    (b"\xda\x20\x00" + b"a" * 8192, "too_large"),  # a string over max_str
    (b"\xa2\xff\xfe", "malformed"),  # invalid UTF-8
    (b"\x92\x01", "truncated"),
    (b"\xc6\xff\xff\xff\xffab", "truncated"),  # a bin declaring 4 GB
    (b"\x01\x02", "malformed"),  # trailing bytes
    (b"\xc1", "malformed"),  # the never-used type byte
])
def test_both_decoders_reject_hostile_payloads_alike(payload, reason):
    lim = ReadLimits(max_str=4096)
    assert _outcome(read_payload, payload, lim) == ("error", reason)
    assert _outcome(unpack, payload, lim) == ("error", reason)


@settings(max_examples=300, deadline=None)
@given(json_like, st.data())
def test_reader_rejects_every_truncation(obj, data):
    payload = msgpack.packb(obj, use_bin_type=True)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(DecodeError):
        unpack(payload[:cut], ReadLimits(max_depth=64))


# -- hostile payloads ------------------------------------------------------------------------------
def _env(**fields):
    d = {"v": 1, "kind": "update", "run": RUN, "round": 1, "base_round": 0, "agent": "a", "model_id": MID,
         "update_id": UID,
         "num_samples": 1,
         "metrics": {}, "created": 0.0,
         "tensors": [{"name": "w", "enc": "raw", "dtype": "float32", "shape": [2], "data": b"\0" * 8}]}
    d.update(fields)
    return msgpack.packb(d, use_bin_type=True)


def _tensor(**kw):
    t = {"name": "w", "enc": "raw", "dtype": "float32", "shape": [2], "data": b"\0" * 8}
    t.update(kw)
    return [t]


@pytest.mark.parametrize("payload, reason", [
    (b"", "malformed"),
    (b"\xc1", "malformed"),
    (msgpack.packb([1, 2]), "malformed"),
    (msgpack.packb({"kind": "update"}), "bad_version"),  # no schema version: nothing else is read
    (_env(v=2), "bad_version"),
    (_env(v="1"), "bad_version"),
    (_env(kind="pickle"), "bad_kind"),
    (_env(round="1"), "schema"),
    (_env(round=-1), "schema"),
    (_env(agent="A+"), "schema"),
    (_env(num_samples=1.5), "schema"),
    (_env(tensors=_tensor(shape=[3])), "bad_shape"),
    (_env(tensors=_tensor(shape=[-2])), "bad_shape"),
    (_env(tensors=_tensor(shape=[2**40, 2**40])), "too_large"),
    (_env(tensors=_tensor(dtype="object")), "bad_dtype"),
    (_env(tensors=_tensor(dtype="<f4")), "bad_dtype"),
    (_env(tensors=_tensor(enc="pickle")), "bad_encoding"),
    (_env(tensors=_tensor(data="text")), "schema"),
    (_env(tensors=_tensor(enc="int8", data=b"\0\0", scale=float("nan"))), "schema"),
    (_env(tensors=_tensor(enc="topk", idx=struct.pack("<2I", 5, 1), data=b"\0" * 8)), "bad_shape"),
    (_env(tensors=_tensor(enc="topk", idx=struct.pack("<1I", 2), data=b"\0" * 4)), "bad_shape"),
    (_env(tensors=_tensor() * 2), "schema"),
    (_env(metrics={"loss": "low"}), "schema"),
    (_env() + b"\x00", "malformed"),
    (b"\xc7\x01\x05x", "malformed"),  # ext
    (b"\x91" * 50 + b"\xc0", "malformed"),  # nesting bomb
])
def test_hostile_payloads_rejected_with_reason(payload, reason):
    with pytest.raises(DecodeError) as e:
        codec.decode(payload)
    assert e.value.reason == reason, str(e.value)
    assert str(e.value)


@pytest.mark.parametrize("header", [
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
    b"\xdd\xff\xff\xff\xff",  # array32 of 4G entries
    b"\xdf\xff\xff\xff\xff",  # map32 of 4G entries
])
def test_giant_declared_sizes_never_allocate(header):
    payload = b"\x82\xa1v\x01\xa4kind" + header + b"\x00" * 64
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as e:
            codec.decode(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.value.reason in ("truncated", "too_large")
    assert peak < 1_000_000


def test_size_limit_checked_before_parsing():
    limits = DecodeLimits(max_payload_bytes=100)
    with pytest.raises(DecodeError) as e:
        codec.decode(b"\xc0" * 101, limits)
    assert e.value.reason == "too_large"


def test_element_budget_spans_all_tensors():
    t = [{"name": f"w{i}", "enc": "raw", "dtype": "uint8", "shape": [60], "data": b"\0" * 60} for i in range(2)]
    with pytest.raises(DecodeError) as e:
        codec.decode(_env(tensors=t), DecodeLimits(max_elements=100))
    assert e.value.reason == "too_large"


def test_expect_kind():
    payload = codec.encode(_all_messages()[5])
    with pytest.raises(DecodeError) as e:
        codec.decode(payload, expect=Update)
    assert e.value.reason == "bad_kind"
    assert codec.peek_kind(payload) == "status"


def test_nan_metrics_survive_decoding_for_strategies_to_judge():
    out = codec.decode(_env(metrics={"acc": float("nan")}))
    assert math.isnan(out.metrics["acc"])
