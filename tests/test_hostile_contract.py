"""Hostile input against the wire contract and the receivers (issue 12): typed rejections, never a crash.

Payloads are built with plain msgpack (the project's encoder cannot produce most of them).
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fedmq.broker.contract import codec
from fedmq.broker.contract.chunking import split
from fedmq.broker.contract.messages import ARTIFACT_FORMAT, DecodeLimits, RoundAnnouncement, TrainConfig, Update
from fedmq.broker.contract.reasons import IGNORED, REASONS, is_known
from fedmq.broker.contract.tensors import Compression, decode_tensor, encode_tensor, topk_count, topk_indices
from fedmq.broker.contract.topics import Topics
from fedmq.broker.errors import DecodeError, TopicError
from fedmq.broker.transport.receiver import Receiver

ROOT = Path(__file__).resolve().parents[1]
MID = "ab" * 32
RUN = "0123456789abcdef"  # a run id (every message of a run carries one)
UID = "cd" * 16
T = Topics("f")


def _tensor(**kw):
    t = {"name": "w", "enc": "raw", "dtype": "float32", "shape": [2], "data": b"\0" * 8}
    t.update(kw)
    return t


def _update(**fields):
    d = {"v": 1, "kind": "update", "run": RUN, "round": 2, "base_round": 1, "agent": "a", "model_id": MID,
         "update_id": UID,
         "num_samples": 5, "metrics": {}, "created": 0.0, "tensors": [_tensor()]}
    d.update(fields)
    return {k: v for k, v in d.items() if v is not _DROP}


_DROP = object()


def pack(d) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


# -- every field's type checked before use --------------------------------------------------------
HOSTILE = [
    (_update(kind={"a": 1}), "bad_kind"),
    (_update(kind=["update"]), "bad_kind"),
    (_update(kind=None), "bad_kind"),
    (_update(kind="nope"), "bad_kind"),
    (_update(v=_DROP), "bad_version"),
    (_update(v=True), "bad_version"),
    (_update(v=1.0), "bad_version"),
    (_update(v=[1]), "bad_version"),
    (_update(tensors=[_tensor(dtype=["float32"])]), "bad_dtype"),
    (_update(tensors=[_tensor(dtype={"a": "float32"})]), "bad_dtype"),
    (_update(tensors=[_tensor(enc={"raw": 1})]), "bad_encoding"),
    (_update(tensors=[_tensor(enc=["raw"])]), "bad_encoding"),
    (_update(tensors=[_tensor(shape=[0, 2**40, 2**40], data=b"")]), "too_large"),
    (_update(tensors=[_tensor(shape=[0, 2**31, 2**31, 2**31], data=b"")]), "too_large"),
    (_update(tensors=[_tensor(shape=[0] + [65536] * 7, data=b"")]), "too_large"),
    (_update(tensors=[_tensor(shape=[True, True], data=b"\0" * 4)]), "bad_shape"),
    (_update(tensors=[_tensor(shape=[2.0])]), "bad_shape"),
    (_update(tensors=[_tensor(shape={"a": 2})]), "bad_shape"),
    (_update(tensors=[_tensor(shape=[[2]])]), "bad_shape"),
    (_update(tensors=[_tensor(shape=[1] * 9, data=b"\0" * 4)]), "bad_shape"),
    (_update(tensors=[_tensor(name=["w"])]), "schema"),
    (_update(tensors=[_tensor(name={"w": 1})]), "schema"),
    (_update(tensors=[_tensor(data=[1, 2])]), "schema"),
    (_update(tensors=[_tensor(enc="int8", data=b"\0\0", scale=float("inf"))]), "schema"),
    (_update(tensors=[_tensor(enc="int8", data=b"\0\0", scale=1e300)]), "schema"),
    (_update(tensors=[_tensor(enc="int8", data=b"\0\0", scale=True)]), "schema"),
    (_update(tensors=[_tensor(enc="int8", data=b"\0\0", scale=-1.0)]), "schema"),
    (_update(tensors=[_tensor(enc="topk", data=b"\0" * 4, idx=[1])]), "schema"),
    (_update(tensors={"w": _tensor()}), "schema"),
    (_update(tensors=[[1, 2]]), "schema"),
    (_update(round=True), "schema"),
    (_update(round=2.0), "schema"),
    (_update(round=-1), "schema"),
    (_update(round=0), "schema"),
    (_update(round="2"), "schema"),
    (_update(agent=["a"]), "schema"),
    (_update(agent={"a": 1}), "schema"),
    (_update(agent="a\n"), "schema"),
    (_update(agent="\u00b9"), "schema"),
    (_update(model_id=MID + "\n"), "schema"),
    (_update(model_id=b"ab" * 16), "schema"),
    (_update(update_id=None), "schema"),
    (_update(num_samples=True), "schema"),
    (_update(num_samples=5.0), "schema"),
    (_update(num_samples=0), "bad_samples"),
    (_update(num_samples=-3), "bad_samples"),
    (_update(num_samples=10**12), "bad_samples"),
    (_update(metrics=[1]), "schema"),
    (_update(metrics={"loss": "x"}), "schema"),
    (_update(metrics={"loss": [1.0]}), "schema"),
    (_update(metrics={"loss": True}), "schema"),
    (_update(metrics={1: 1.0}), "schema"),
    (_update(metrics={f"k{i}": 0.0 for i in range(65)}), "schema"),
    (_update(created=float("nan")), "schema"),
    (_update(created=float("inf")), "schema"),
    (_update(created=True), "schema"),
    (_update(created="now"), "schema"),
    (_update(base_round=_DROP), "schema"),
    (_update(base_round=2), "schema"),  # not below its round
    (_update(base_round=-1), "schema"),
    (_update(base_round=True), "schema"),
    ({"v": 1, "kind": "status", "agent": "a", "state": {"x": 1}, "ts": 0.0, "runtime": "", "interpreter": "",
      "num_samples": 0, "version": ""}, "schema"),
    ({"v": 1, "kind": "status", "agent": "a", "state": ["online"], "ts": 0.0, "runtime": "", "interpreter": "",
      "num_samples": 0, "version": ""}, "schema"),
    ({"v": 1, "kind": "status", "agent": "a", "state": "online", "ts": 0.0, "runtime": 1, "interpreter": "",
      "num_samples": 0, "version": ""}, "schema"),
    ({"v": 1, "kind": "chunk", "blob_id": "aa" * 8, "index": 0, "total": 2, "offset": 0, "size": True,
      "sha256": b"\0" * 32, "data": b"x"}, "schema"),
    ({"v": 1, "kind": "chunk", "blob_id": "aa" * 8, "index": 0, "total": 2, "offset": 5, "size": 5,
      "sha256": b"\0" * 32, "data": b"x"}, "schema"),
    ({"v": 1, "kind": "chunk", "blob_id": "aa" * 8, "index": 0, "total": 2**40, "offset": 0, "size": 5,
      "sha256": b"\0" * 32, "data": b"x"}, "schema"),
    ({"v": 1, "kind": "chunk", "blob_id": "aa" * 8, "index": [0], "total": 2, "offset": 0, "size": 5,
      "sha256": b"\0" * 32, "data": b"x"}, "schema"),
    ({"v": 1, "kind": "round", "run": RUN, "round": 1, "model_id": MID, "base_round": 0, "opened": 0.0, "deadline": 1.0,
      "config": {"epochs": 1, "batch_size": 1, "lr": 0.1, "mu": 0.0, "encoding": {"raw": 1},
                 "topk_fraction": 0.1, "seed": 0}, "agents": None, "quorum": 1}, "schema"),
    ({"v": 1, "kind": "round", "run": RUN, "round": 1, "model_id": MID, "base_round": 0, "opened": 0.0, "deadline": 1.0,
      "config": [], "agents": None, "quorum": 1}, "schema"),
    ({"v": 1, "kind": "round", "run": RUN, "round": 1, "model_id": MID, "base_round": 0, "opened": 0.0, "deadline": 1.0,
      "config": {"epochs": 1, "batch_size": 1, "lr": 0.1, "mu": 0.0, "encoding": "raw", "topk_fraction": 0.1,
                 "seed": 0}, "agents": [["a"]], "quorum": 1}, "schema"),
    ({"v": 1, "kind": "model", "run": RUN, "model_id": MID, "format": ARTIFACT_FORMAT, "artifact": b"x",
      "weights": [{"name": "w", "shape": [0, 2**40], "dtype": "float32"}], "inputs": [], "train_batch_size": 1,
      "created": 0.0, "extra": {}}, "schema"),
    ({"v": 1, "kind": "model", "run": RUN, "model_id": MID, "format": ARTIFACT_FORMAT, "artifact": b"x",
      "weights": [{"name": "w", "shape": [1], "dtype": ["float32"]}], "inputs": [], "train_batch_size": 1,
      "created": 0.0, "extra": {}}, "schema"),
    ({"v": 1, "kind": "metrics", "run": RUN, "round": 1, "ts": 0.0, "outcome": "aggregated", "participants": [{"a": 1}],
      "values": {}, "rejected": {}}, "schema"),
]


@pytest.mark.parametrize("wire, reason", HOSTILE)
def test_hostile_field_types_are_typed_rejections(wire, reason):
    with pytest.raises(DecodeError) as e:
        codec.decode(pack(wire))
    assert e.value.reason == reason, str(e.value)
    assert is_known(e.value.reason)


@pytest.mark.parametrize("wire, reason", HOSTILE)
def test_receiver_counts_hostile_payloads_and_never_raises(wire, reason):
    rx = Receiver(T)
    topic = {"update": T.update("a"), "status": T.status("a"), "chunk": T.update("a"), "round": T.round(),
             "model": T.model(), "metrics": T.metrics()}.get(wire.get("kind") if isinstance(wire.get("kind"), str)
                                                             else "update", T.update("a"))
    assert rx.feed(topic, pack(wire)) is None
    assert rx.rejected == {reason: 1}, rx.rejected


def test_valid_update_with_base_round_round_trips():
    out = codec.decode(pack(_update()))
    assert isinstance(out, Update) and out.base_round == 1 and out.num_samples == 5
    u = Update(3, "a", MID, UID, 4, {"w": np.ones(2, np.float32)}, {}, 0.0, base_round=1, run=RUN)
    assert codec.decode(codec.encode(u)).base_round == 1
    assert Update(3, "a", MID, UID, 4, {}, {}, 0.0, run=RUN).base_round == 2  # constructor default: round - 1


def test_unknown_fields_are_ignored():
    out = codec.decode(pack(_update(future_field={"x": [1, 2]}, another=b"z")))
    assert isinstance(out, Update) and out.round == 2


def test_max_samples_is_configurable():
    lim = DecodeLimits(max_samples=100)
    assert codec.decode(pack(_update(num_samples=100)), lim).num_samples == 100
    with pytest.raises(DecodeError) as e:
        codec.decode(pack(_update(num_samples=101)), lim)
    assert e.value.reason == "bad_samples"


def test_a_zero_dimension_with_bounded_others_is_still_fine():
    name, arr = decode_tensor(_tensor(shape=[0, 5, 7], data=b""), 1000)
    assert arr.shape == (0, 5, 7)


# -- topics: ASCII only ---------------------------------------------------------------------------
@pytest.mark.parametrize("topic", [
    "fedmq/f/global/chunk/\u00b9", "fedmq/f/global/chunk/\u0661", "fedmq/f/global/chunk/\uff11",
    "fedmq/f/global/chunk/1\n", "fedmq/f/agents/a\n/update", "fedmq/f/agents/\u00e9/update",
    "fedmq/f/global/chunk/1234567890", "fedmq/f/" + "a/" * 600 + "update",
])
def test_topic_parser_accepts_ascii_only(topic):
    assert "\u00b9".isdigit()  # the trap: str.isdigit is true, int() raises
    with pytest.raises(TopicError):
        T.parse(topic)
    rx = Receiver(T)
    assert rx.feed(topic, b"\x80") is None and rx.rejected == {"bad_topic": 1}


def test_topic_parser_still_accepts_the_layout():
    assert T.parse("fedmq/f/global/chunk/0").chunk == 0
    assert T.parse("fedmq/f/global/chunk/123456789").chunk == 123456789


# -- receiver: empty, cleared, wrong channel, chunk topic, internal --------------------------------
def test_empty_payloads_are_counted():
    rx = Receiver(T)
    assert rx.feed(T.update("a"), b"") is None
    assert rx.feed(T.metrics(), b"") is None
    assert rx.rejected == {"empty": 2}
    assert rx.feed(T.status("a"), b"", retained=True) is None  # a cleared retained status
    assert rx.feed(T.status("a"), b"") is None  # the same clear, seen live
    assert rx.feed(T.chunk(T.global_(), 3), b"") is None
    assert rx.ignored["cleared"] == 3 and sum(rx.rejected.values()) == 2


def test_wrong_channel_and_chunk_topic_index():
    rx = Receiver(T)
    status = {"v": 1, "kind": "status", "agent": "a", "state": "online", "ts": 0.0, "runtime": "",
              "interpreter": "", "num_samples": 0, "version": ""}
    assert rx.feed(T.update("a"), pack(status)) is None
    assert rx.rejected == {"wrong_channel": 1}
    assert rx.feed(T.status("a"), pack(status)) is not None  # positive control: right channel
    assert rx.feed(T.chunk(T.global_(), 0), pack(status)) is None
    assert rx.rejected["wrong_channel"] == 2
    ch = split(codec.encode(Update(2, "a", MID, UID, 3, {"w": np.ones(4, np.float32)}, {}, 0.0, run=RUN)), 50)
    assert rx.feed(T.chunk(T.global_(), 1), codec.encode(ch[0])) is None
    assert rx.rejected["chunk_inconsistent"] == 1
    # an update reassembled on the global channel is the wrong kind there
    rx2 = Receiver(T)
    outs = [rx2.feed(T.chunk(T.global_(), c.index), codec.encode(c)) for c in ch]
    assert outs == [None] * len(ch) and rx2.rejected == {"wrong_channel": 1}
    rx3 = Receiver(T)  # positive control: the same chunks on the agent's update topic
    outs = [rx3.feed(T.update("a"), codec.encode(c)) for c in ch]
    assert isinstance(outs[-1].message, Update) and not rx3.rejected


def test_an_unexpected_exception_is_an_internal_rejection_logged_once_per_cause(monkeypatch, caplog):
    rx = Receiver(T)
    good = codec.encode(Update(2, "a", MID, UID, 3, {"w": np.ones(4, np.float32)}, {}, 0.0, run=RUN))

    def boom(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(codec, "decode", boom)
    with caplog.at_level(logging.WARNING, logger="fedmq.broker.transport.receiver"):
        for _ in range(50):
            assert rx.feed(T.update("a"), good) is None
    assert rx.rejected == {"internal": 50}
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "RuntimeError" in tracebacks[0].getMessage()
    monkeypatch.undo()
    assert rx.feed(T.update("a"), good) is not None  # and it goes on


def test_on_reject_callback_failure_does_not_escape():
    def bad_callback(reason):
        raise KeyError(reason)

    rx = Receiver(T, on_reject=bad_callback)
    assert rx.feed(T.update("a"), b"\xc1") is None
    assert rx.rejected["malformed"] == 1


# -- bounded logging ------------------------------------------------------------------------------
class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_flood_of_10000_malformed_messages_logs_a_bounded_number_of_lines():
    h = _Count()
    lg = logging.getLogger("fedmq.broker.transport.receiver")
    lg.addHandler(h)
    old = lg.level
    lg.setLevel(logging.INFO)
    clock = _Clock()
    try:
        rx = Receiver(T, log_interval_s=10.0, clock=clock)
        for i in range(10_000):
            clock.t = 1000.0 + i * 0.003  # 30 s of flood: three intervals
            agent = f"a{i % 3}"
            rx.feed(T.update(agent), b"\xc1" if i % 2 else pack(_update(agent=agent, kind=[1])))
        rx.tick(clock.t + 10.0)
    finally:
        lg.removeHandler(h)
        lg.setLevel(old)
    assert sum(rx.rejected.values()) == 10_000
    assert rx.rejected == {"malformed": 5000, "bad_kind": 5000}
    # per interval: at most one line per (agent, reason) = 6, plus one summary; 4 intervals at most
    assert len(h.records) <= 4 * (6 + 1), len(h.records)
    summaries = [r.getMessage() for r in h.records if "messages rejected in the last" in r.getMessage()]
    assert summaries
    counted = sum(int(re.match(r"(\d+) messages rejected", s).group(1)) for s in summaries)
    singles = len(h.records) - len(summaries)
    assert counted == 10_000  # every rejection appears in some interval's summary
    assert singles >= 6  # the first of each key was logged on its own line


def test_many_distinct_sources_still_bounded_per_interval():
    h = _Count()
    lg = logging.getLogger("fedmq.broker.transport.receiver")
    lg.addHandler(h)
    try:
        rx = Receiver(T, log_interval_s=10.0, clock=_Clock())
        for i in range(5000):
            rx.feed(T.update(f"a{i}"), b"\xc1")
        rx.reject_log.flush(force=True)
    finally:
        lg.removeHandler(h)
    assert rx.rejected["malformed"] == 5000
    assert len(h.records) <= rx.reject_log.max_lines + 1


# -- round control: stale_base ---------------------------------------------------------------------
def test_round_controller_rejects_a_delta_against_another_base():
    from fedmq.aggregator.config import RoundsSection
    from fedmq.aggregator.rounds import RoundController
    from fedmq.aggregator.strategies import build_strategy

    c = RoundController(build_strategy({"name": "fedavg"}), RoundsSection(deadline_s=100, grace_s=5))
    ann = c.open(4, MID, 2, {"w": np.zeros(3, np.float32)}, ["a", "b"], TrainConfig(), now=0.0, run=RUN)
    assert isinstance(ann, RoundAnnouncement) and ann.base_round == 2
    w = {"w": np.ones(3, np.float32)}
    assert c.on_update(Update(4, "a", MID, "01" * 8, 5, w, {}, 0.0, base_round=3, run=RUN), 1, 1.0) == "stale_base"
    assert c.on_update(Update(4, "a", MID, "02" * 8, 5, w, {}, 0.0, base_round=2, run=RUN), 1, 1.0) is None


# -- one top-k selection ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_encoder_and_error_feedback_select_exactly_the_same_entries(seed, tmp_path):
    from fedmq.edge_agent.compress import ErrorFeedback, apply_error_feedback

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    # many ties: values from a small set, so argpartition-style selection could pick either side
    d = {"k": rng.choice(np.array([-2, -1, 0, 1, 2, 0.5], np.float32), size=(n,)).astype(np.float32),
         "b": rng.standard_normal(max(1, n // 7)).astype(np.float32)}
    comp = Compression("topk", float(rng.choice([0.01, 0.1, 0.33, 1.0])))
    ef = ErrorFeedback(tmp_path / "r.npz")
    corrected = apply_error_feedback(d, comp, ef)
    residual = ef.load(list(d), [d[k].shape for k in d])
    for name, v in corrected.items():
        _, sent = decode_tensor(encode_tensor(name, v, comp), 10**7)
        # what is sent + what is kept == the corrected delta, exactly; never both non-zero
        np.testing.assert_array_equal(sent + residual[name], v)
        assert not np.any((sent != 0) & (residual[name] != 0))
        idx = topk_indices(v.reshape(-1), topk_count(v.size, comp.topk_fraction))
        assert np.all(residual[name].reshape(-1)[idx] == 0)


def test_topk_indices_matches_a_reference_sort():
    rng = np.random.default_rng(7)
    for _ in range(50):
        x = rng.choice(np.array([0, 1, -1, 3, np.inf, -np.inf], np.float32), size=int(rng.integers(1, 200)))
        k = int(rng.integers(0, x.size + 1))
        # reference: stable sort by descending magnitude (ties: lower index first), then sorted
        ref = np.sort(np.array(sorted(range(x.size), key=lambda i: (-abs(float(x[i])), i))[:k], dtype=np.int64))
        np.testing.assert_array_equal(topk_indices(x, k), ref)


# -- one artifact format name; the reasons table ------------------------------------------------------
def test_artifact_format_has_one_home():
    from fedmq.aggregator import model_store

    assert model_store.FORMAT is ARTIFACT_FORMAT
    holders = [p for pkg in ("broker", "edge_agent", "aggregator") for p in (ROOT / pkg).rglob("*.py")
               if '"tflite-trainable-v2"' in p.read_text(errors="replace")]
    assert [p.relative_to(ROOT).as_posix() for p in holders] == ["broker/contract/messages.py"]


_REASON_PATTERNS = [
    r'reason="([a-z0-9_]+)"', r"reason='([a-z0-9_]+)'", r'reason=f"([a-z0-9_]+)\{',
    r'_reject\(\s*"([a-z0-9_]+)"', r'_count_reject\(\s*"([a-z0-9_]+)"', r'\.reject\(\s*"([a-z0-9_]+)"',
    r'return "([a-z0-9_]+)", f?"', r'WeightRejected\(\s*"([a-z0-9_]+)"', r'reason = "([a-z0-9_]+)"',
    r'"(late|stale|future)"',
]


def _reasons_in_code() -> dict[str, str]:
    found: dict[str, str] = {}
    for pkg in ("broker", "edge_agent", "aggregator"):
        for p in (ROOT / pkg).rglob("*.py"):
            if p.parent.name in ("commands", "ops"):  # command plumbing: exit reasons, not message rejections
                continue
            text = p.read_text(errors="replace")
            for pat in _REASON_PATTERNS:
                for m in re.finditer(pat, text):
                    found.setdefault(m.group(1), p.relative_to(ROOT).as_posix())
    return found


def test_every_reason_used_in_code_is_in_the_table():
    found = _reasons_in_code()
    assert {"bad_kind", "chunk_offset", "internal", "stale_base", "wrong_channel", "no_open_round"} <= set(found)
    error_classes = {"error", "bad_topic", "malformed", "encode", "chunk", "config", "mqtt", "connect", "auth",
                     "too_large", "rejected", "sub_rejected", "timeout", "model_refused"}  # FedmqError class defaults
    unknown = {r: where for r, where in found.items()
               if not is_known(r) and r not in IGNORED and r not in error_classes}
    assert not unknown, f"add these to fedmq.broker.contract.reasons.REASONS: {unknown}"


def test_every_reason_is_documented_in_protocol_md():
    doc = (ROOT / "docs" / "protocol.md").read_text()
    missing = [r for r in (*REASONS, *IGNORED) if f"`{r}" not in doc]
    assert not missing, missing



# -- the agent's receive path ----------------------------------------------------------------------
class _NoNetwork:
    """Stands in for the MQTT client in a unit test of the agent's receive path (nothing crosses a network)."""

    on_connected = None
    connected = False

    def publish(self, *a, **k):
        raise AssertionError("the receive path must not publish here")


def _agent(tmp_path):
    from fedmq.edge_agent.config import AgentConfig, AgentSection, DataSection
    from fedmq.edge_agent.service import AgentService

    np.savez(tmp_path / "d.npz", x=np.zeros((10, 4), np.float32), y=np.zeros(10, np.int32))
    cfg = AgentConfig(agent=AgentSection(id="a", cache_dir=str(tmp_path / "cache")),
                      data=DataSection(source=f"npz:{tmp_path / 'd.npz'}"))
    return AgentService(cfg, client=_NoNetwork())


def _model_wire(artifact: bytes, **kw):
    d = {"v": 1, "kind": "model", "run": RUN, "model_id": hashlib.sha256(artifact).hexdigest(), "format": ARTIFACT_FORMAT,
         "artifact": artifact, "weights": [{"name": "w000", "shape": [4, 2], "dtype": "float32"}],
         "inputs": [{"name": "x", "shape": [2, 4], "dtype": "float32"}], "train_batch_size": 2, "created": 0.0,
         "extra": {}}
    d.update(kw)
    return d


def test_agent_survives_hostile_model_global_round_and_chunks(tmp_path):
    ag = _agent(tmp_path)
    T = ag.topics
    rx = ag.receiver
    hostile = [
        (T.model(), pack(_model_wire(b"not a flatbuffer", model_id=MID))),  # hash differs: bad_model_id
        (T.model(), pack(_model_wire(b"not a flatbuffer"))),  # loads nothing: bad_model (or internal)
        (T.model(), pack(_model_wire(b"x", weights=[{"name": "w", "shape": [0, 2**40], "dtype": "f"}]))),
        (T.global_(), pack({"v": 1, "kind": "global", "run": RUN, "round": 0, "model_id": MID, "created": 0.0,
                            "tensors": [_tensor(dtype=["x"])]})),
        (T.global_(), pack({"v": 1, "kind": "global", "run": RUN, "round": {"r": 1}, "model_id": MID, "created": 0.0,
                            "tensors": []})),
        (T.round(), pack({"v": 1, "kind": "round", "run": RUN, "round": 1, "model_id": MID, "base_round": 0, "opened": 0.0,
                          "deadline": 1.0, "config": {"encoding": []}, "agents": None, "quorum": 1})),
        (T.chunk(T.global_(), 0), pack({"v": 1, "kind": "chunk", "blob_id": "aa" * 8, "index": 0, "total": 2,
                                        "offset": 0, "size": 256 << 20, "sha256": b"\0" * 32, "data": b"x"})),
        (T.global_() + "/chunk/\u00b9", b"\x80"),
        (T.global_(), b"\xc1"),
        (T.round(), b""),
    ]
    for topic, payload in hostile:
        ag._handle(topic, payload, True)
    assert ag.trainer is None and ag.global_msg is None and ag.announcement is None
    assert rx.rejected["bad_model_id"] == 1
    assert rx.rejected["bad_model"] + rx.rejected["internal"] == 1
    assert rx.rejected["schema"] == 3 and rx.rejected["bad_dtype"] == 1
    assert rx.rejected["bad_topic"] == 1 and rx.rejected["malformed"] == 1
    assert rx.reassembler.in_flight == 1 and rx.reassembler.reserved_bytes < 1024  # 256 MiB declared, 1 byte held
    assert rx.ignored["cleared"] == 1
    # positive control: a well-formed global and announcement are taken
    ok = {"v": 1, "kind": "global", "run": RUN, "round": 0, "model_id": MID, "created": 0.0,
          "tensors": [_tensor(name="w000", shape=[4, 2], data=b"\0" * 32)]}
    ag._handle(T.global_(), pack(ok), True)
    assert ag.global_msg is not None and ag.global_msg.round == 0


def test_agent_counts_an_unexpected_exception_and_goes_on(tmp_path, monkeypatch):
    ag = _agent(tmp_path)
    T = ag.topics
    ok = {"v": 1, "kind": "global", "run": RUN, "round": 0, "model_id": MID, "created": 0.0,
          "tensors": [_tensor(name="w000", shape=[4, 2], data=b"\0" * 32)]}

    def boom(*a, **k):
        raise ZeroDivisionError("bug in the handler")

    monkeypatch.setattr(ag, "_global_misfit", boom)
    for _ in range(3):
        ag._handle(T.global_(), pack(ok), True)  # does not raise
    assert ag.receiver.rejected["internal"] == 3
    monkeypatch.undo()
    ag._handle(T.global_(), pack(ok), True)
    assert ag.global_msg is not None


# -- over a real provisioned broker: a hostile agent with its own valid credentials ----------------
@pytest.mark.network
def test_hostile_agent_over_a_real_broker_cannot_crash_or_starve_the_receiver(secure_fleet):
    """Plain paho + msgpack as agent-a (TLS, password, ACL); agent-b uploads a chunked update meanwhile.

    The crash payloads of issue 12 are published retained on agent-a's own status topic, so a new
    subscriber (an aggregator restart) receives them again; the receiver must count and survive both times.
    """
    import uuid as _uuid

    import paho.mqtt.client as mqtt
    from conftest import wait_until

    from fedmq.broker.transport.client import MqttClient, MqttConfig, TlsConfig
    from fedmq.broker.transport.publisher import Publisher

    prov, lb = secure_fleet
    t = prov.topics

    def fedmq_client(user):
        d = prov.client_dir(user) if user != "aggregator" else prov.out_dir / "aggregator"
        tls = TlsConfig(str(prov.ca_file), str(d / "client.crt"), str(d / "client.key"))
        c = MqttClient(MqttConfig("localhost", lb.port, client_id=user, username=user,
                                  password=prov.passwords[user], tls=tls, max_payload=20_000))
        c.connect(timeout=10)
        return c

    def feed_until(c, rx, pred, what):
        def step():
            m = c.get(timeout=0.1)
            if m is not None:
                got.append(rx.feed(m.topic, m.payload, m.retain))
            return pred()
        got: list = []
        wait_until(step, 60, interval=0, what=what)
        return got

    d = prov.client_dir("agent-a")
    evil = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="agent-a", protocol=mqtt.MQTTv5)
    evil.tls_set(ca_certs=str(prov.ca_file), certfile=str(d / "client.crt"), keyfile=str(d / "client.key"))
    evil.username_pw_set("agent-a", prov.passwords["agent-a"])
    evil.connect("localhost", lb.port)
    evil.loop_start()
    agg = fedmq_client("aggregator")
    honest = fedmq_client("agent-b")
    try:
        for f in (t.all_updates(), t.all_statuses()):
            agg.subscribe(f, qos=1)
        rx = Receiver(t)
        crash = [pack(_update(agent="agent-a", kind={"a": 1})),
                 pack(_update(agent="agent-a", tensors=[_tensor(dtype=["float32"])])),
                 pack(_update(agent="agent-a", tensors=[_tensor(shape=[0, 2**40, 2**40], data=b"")]))]
        evil.publish(t.status("agent-a"), crash[0], qos=1, retain=True).wait_for_publish(10)
        for i in range(600):  # malformed + chunks declaring 256 MiB, new ids (below any broker queue limit)
            p = crash[i % 3] if i % 2 else pack({"v": 1, "kind": "chunk", "blob_id": f"{i:016x}", "index": 0,
                                                  "total": 2, "offset": 0, "size": 256 << 20,
                                                  "sha256": b"\0" * 32, "data": b"z" * 100})
            evil.publish(t.update("agent-a"), p, qos=0)
        marker = pack(_update(agent="agent-a", num_samples=0))  # the last one: counted as bad_samples
        evil.publish(t.update("agent-a"), marker, qos=1).wait_for_publish(10)
        w = {"w": np.arange(30_000, dtype=np.float32)}  # 120 KB: chunked under the 20 KB packet limit
        sent = Update(2, "agent-b", MID, _uuid.uuid4().hex, 7, w, {}, 0.0, base_round=1, run=RUN)
        assert Publisher(honest, t).publish(t.update("agent-b"), sent) > 1
        got = feed_until(agg, rx, lambda: rx.rejected["bad_samples"] >= 1 and rx.accepted >= 1, "marker + update")
        ups = [g for g in got if g is not None and isinstance(g.message, Update)]
        assert len(ups) == 1 and ups[0].message.agent == "agent-b"
        np.testing.assert_array_equal(ups[0].message.tensors["w"], w["w"])
        assert rx.rejected["internal"] == 0 and rx.rejected["bad_kind"] >= 1
        assert rx.reassembler.sender_bytes("agent-a") <= 4 * (100 + 128)
        # "restart": a new subscriber gets the retained crash payload again and survives it
        agg2 = fedmq_client("aggregator")
        try:
            rx2 = Receiver(t)
            agg2.subscribe(t.all_statuses(), qos=1)
            feed_until(agg2, rx2, lambda: rx2.rejected["bad_kind"] >= 1, "the retained crash payload")
            assert rx2.rejected == {"bad_kind": 1}
        finally:
            agg2.close()
    finally:
        evil.publish(t.status("agent-a"), b"", qos=1, retain=True).wait_for_publish(10)
        evil.loop_stop()
        evil.disconnect()
        honest.close()
        agg.close()
