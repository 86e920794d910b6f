"""The compressed downlink (issue 14, point 5): the global as an int8/f16 delta, reconstructed exactly.

Unit level against an independent reference (the int8 formula of docs/protocol.md written out in
numpy): the reconstruction the devices compute is bit-identical to the aggregator's, within
scale/2 of the uncompressed global, refused (``bad_delta``) on the wrong base or when altered, and
about 4x smaller than the raw global. End to end on a real broker: with ``[train] downlink = "int8"``
the agents fetch the deltas, every round aggregates, and each agent's global is the same bits as the
aggregator's checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_mosquitto, wait_until
from fleet import watch_shards
from test_federation import aggregated, fleet, history  # noqa: F401 - the fleet fixture

from fedmq.broker.contract import codec
from fedmq.broker.contract.downlink import apply_delta, make_delta, weights_digest
from fedmq.broker.contract.messages import GlobalDelta, GlobalModel
from fedmq.broker.errors import DecodeError

MID = "ab" * 32
RUN = "0123456789abcdef"


def _globals(seed=0, shapes=((64, 128), (128,), (128, 10), (10,))):
    rng = np.random.default_rng(seed)
    prev = {f"w{i:03d}": rng.normal(0, 0.1, s).astype(np.float32) for i, s in enumerate(shapes)}
    new = {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in prev.items()}
    return GlobalModel(4, MID, prev, 0.0, RUN), new


def _int8_reference(d: np.ndarray) -> np.ndarray:
    """docs/protocol.md: scale = max|d|/127, q = clip(rint(d/scale), -127, 127), decoded q * scale (float32)."""
    scale = float(np.max(np.abs(d))) / 127.0
    q = np.clip(np.rint(d / np.float32(scale)), -127, 127).astype(np.int8)
    return q.astype(np.float32) * np.float32(scale)


@pytest.mark.parametrize("encoding", ["int8", "f16"])
def test_the_devices_reconstruction_is_the_aggregators_global(encoding):
    prev, new = _globals()
    delta, rec = make_delta(prev, new, 5, encoding)
    got = codec.decode(codec.encode(delta))  # what a device receives
    dev = apply_delta(prev, got)
    assert dev.round == 5 and dev.run == RUN
    for n in new:
        assert dev.tensors[n].tobytes() == rec[n].tobytes()  # the same bits
        d = new[n] - prev.tensors[n]
        ref = prev.tensors[n] + (_int8_reference(d) if encoding == "int8" else d.astype(np.float16).astype(np.float32))
        assert rec[n].tobytes() == ref.astype(np.float32).tobytes()  # the documented formula, independently
        if encoding == "int8":
            assert np.max(np.abs(rec[n] - new[n])) <= np.max(np.abs(d)) / 127 / 2 * 1.001 + 1e-7


def test_a_delta_applies_only_to_its_base_and_checks_its_result():
    prev, new = _globals()
    delta, _ = make_delta(prev, new, 5, "int8")
    wire = codec.decode(codec.encode(delta))
    other = GlobalModel(3, MID, prev.tensors, 0.0, RUN)  # another base round
    with pytest.raises(DecodeError) as e:
        apply_delta(other, wire)
    assert e.value.reason == "bad_delta"
    bent = {k: v.copy() for k, v in wire.tensors.items()}
    bent["w000"][0, 0] += 1e-3  # altered in transit (or a different quantiser on the sender)
    with pytest.raises(DecodeError) as e:
        apply_delta(prev, GlobalDelta(RUN, 5, 4, MID, 0.0, wire.result_sha256, bent))
    assert e.value.reason == "bad_delta"
    assert apply_delta(prev, wire).tensors["w000"].dtype == np.float32  # control: the genuine one applies


def test_int8_is_at_least_3_9_times_smaller_than_the_raw_global():
    prev, new = _globals(shapes=((3, 3, 1, 32), (32,), (3, 3, 32, 64), (64,), (3136, 512), (512,), (512, 10), (10,)))
    delta, rec = make_delta(prev, new, 5, "int8")
    raw = len(codec.encode(GlobalModel(5, MID, rec, 0.0, RUN)))
    small = len(codec.encode(delta))
    print(f"raw global {raw} bytes, int8 delta {small} bytes: {raw / small:.2f}x")
    assert raw / small >= 3.9
    assert weights_digest(rec) == bytes(delta.result_sha256)


@needs_mosquitto
@pytest.mark.network
def test_agents_fetch_deltas_and_hold_the_aggregators_exact_global(fleet, tmp_path):  # noqa: F811
    f = fleet()
    agents = ["agent-0", "agent-1"]
    shards = watch_shards(agents, tmp_path, per_agent=100)
    agg = f.start_aggregator(rounds={"rounds": 4, "min_agents": 2, "grace_s": 30, "deadline_s": 60},
                             train={"downlink": "int8"})
    procs = [f.start_agent(a, shards[a]) for a in agents]
    wait_until(lambda: not agg.alive(), 240, interval=0.2, what="four rounds with the int8 downlink")
    h = history(f)
    assert [r["outcome"] for r in h] == ["aggregated"] * 4 and all(sorted(r["participants_list"]) == agents for r in h)
    with np.load(f.tmp / "aggregator-state" / "checkpoint.npz") as z:
        final = {k[2:]: z[k] for k in z.files if k.startswith("g/")}
    for a, p in zip(agents, procs):
        cache = f.tmp / f"{a}-cache"
        g = codec.decode((cache / "global.msgpack").read_bytes())
        if not isinstance(g, GlobalModel):  # the keyframe (signed envelope or plain)
            g = codec.decode(g.body)
        assert g.round in (3, 4)  # the last global it fetched (rounds 2..4 by delta, or the keyframe)
        if g.round == 4:
            assert all(g.tensors[n].tobytes() == final[n].tobytes() for n in final), a  # the same bits
        assert (cache / "global.proof").exists(), f"{a} never applied a delta:\n{p.text()[-2000:]}"
