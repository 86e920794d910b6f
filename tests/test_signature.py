"""The agent's signature runner (edge_agent/signature.py) against each runtime's own runner.

It must be the same function as ``SignatureRunner.__call__`` (same outputs, bit for bit, on the
same runtime: train steps with the weights fed back, evaluations of changing batch sizes) while
resizing an input only when its shape changes: the 0-d ``lr`` never (LiteRT on aarch64 crashes
resizing it, see bench/RESULTS.md "aarch64 runtime self-test").
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from fedmq.edge_agent.runtime import load_interpreter
from fedmq.edge_agent.signature import Signature

pytest.importorskip("ai_edge_litert")
RUNTIMES = ["ai_edge_litert", pytest.param("tensorflow", marks=pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="no TensorFlow"))]


@pytest.fixture(scope="module")
def artifact(model_cache) -> bytes:
    return next(Path(model_cache).glob("*/model.tflite")).read_bytes()


class Counting:
    """An interpreter wrapper that counts the calls it forwards."""

    def __init__(self, w):
        self._w, self.calls = w, {}

    def __getattr__(self, name):
        fn = getattr(self._w, name)

        def call(*a):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*a)

        return call


def _pair(artifact, runtime, key):
    """The same signature on two fresh interpreters: the runtime's own runner, and ours."""
    a, _ = load_interpreter(artifact, runtime)
    b, _ = load_interpreter(artifact, runtime)
    return a, b, a.get_signature_runner(key), Signature(b.get_signature_runner(key))


def _weights(runner, rng) -> dict:
    """Random weights for a signature's weight inputs (the artifact is stateless: every call takes them)."""
    d = runner.get_input_details()
    return {n: rng.normal(0, 0.1, size=tuple(d[n]["shape"])).astype(np.float32) for n in d if n.startswith("w")}


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_train_steps_match_the_runtime_runner_bit_for_bit(artifact, runtime):
    a, b, own, ours = _pair(artifact, runtime, "train")
    rng = np.random.default_rng(7)
    w1 = _weights(own, rng)
    w2 = dict(w1)
    d = own.get_input_details()
    bsz, shape = int(d["x"]["shape"][0]), tuple(int(s) for s in d["x"]["shape"][1:])
    losses = []
    for step in range(4):
        feed = {"x": rng.normal(size=(bsz, *shape)).astype(np.float32),
                "y": rng.integers(0, 2, bsz).astype(np.int32),
                "mask": (np.arange(bsz) < bsz - step).astype(np.float32), "lr": np.float32(0.05 * (step + 1))}
        o1, o2 = own(**feed, **w1), ours(**feed, **w2)
        assert o1["loss"].tobytes() == o2["loss"].tobytes()
        losses.append(float(o1["loss"]))
        w1, w2 = {k: o1[k] for k in w1}, {k: o2[k] for k in w2}  # the updated weights, fed back
    assert len(set(losses)) == 4  # the steps did change the model (a positive control for the comparison)
    for k in w1:
        assert w1[k].tobytes() == w2[k].tobytes()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_changing_batch_sizes_resize_only_when_the_shape_changes(artifact, runtime):
    a, b, own, ours = _pair(artifact, runtime, "evaluate")
    rng = np.random.default_rng(3)
    w = _weights(own, rng)
    shape = tuple(int(s) for s in own.get_input_details()["x"]["shape"][1:])
    counting = ours._w = Counting(ours._w)
    initial = ours._shapes["x"][0]  # the tensor's shape before any call (1 for a None batch)
    sizes = [16, 16, 5, 5, 1, 16, 16]
    for n in sizes:
        x, y = rng.normal(size=(n, *shape)).astype(np.float32), rng.integers(0, 2, n).astype(np.int32)
        r1, r2 = own(x=x, y=y, **w), ours(x=x, y=y, **w)
        assert {k: v.tobytes() for k, v in r1.items()} == {k: v.tobytes() for k, v in r2.items()}
    changes = sum(1 for p, n in zip([initial] + sizes, sizes) if p != n)
    assert changes == 4
    # two inputs (x, y) per change of batch size; no resize for a repeated size
    assert counting.calls.get("ResizeInputTensor", 0) == 2 * changes
    assert counting.calls["Invoke"] == len(sizes)


def test_the_scalar_learning_rate_is_never_resized(artifact):
    a, b, own, ours = _pair(artifact, "ai_edge_litert", "train")
    counting = ours._w = Counting(ours._w)
    d = own.get_input_details()
    assert tuple(d["lr"]["shape"]) == ()  # the 0-d input LiteRT on aarch64 crashes resizing
    bsz, shape = int(d["x"]["shape"][0]), tuple(int(s) for s in d["x"]["shape"][1:])
    feed = {"x": np.zeros((bsz, *shape), np.float32), "y": np.zeros(bsz, np.int32),
            "mask": np.ones(bsz, np.float32), "lr": np.float32(0.1), **_weights(own, np.random.default_rng(0))}
    for _ in range(3):
        ours(**feed)
    assert counting.calls.get("ResizeInputTensor", 0) == 0
    assert counting.calls["AllocateTensors"] == 1 and counting.calls["Invoke"] == 3


def test_bad_feeds_are_refused_like_the_runtime_does(artifact):
    _, _, own, ours = _pair(artifact, "ai_edge_litert", "evaluate")
    w = _weights(own, np.random.default_rng(0))
    with pytest.raises(ValueError, match="inputs"):
        ours(x=np.zeros((1, 1), np.float32))
    with pytest.raises(ValueError, match="invalid input name"):
        ours(x=np.zeros((1, 1), np.float32), z=np.zeros(1, np.int32), **w)
    with pytest.raises(ValueError):  # the runtime's own check: a dtype SetTensor refuses
        shape = tuple(int(s) for s in own.get_input_details()["x"]["shape"][1:])
        ours(x=np.zeros((2, *shape), np.float32), y=np.zeros(2, np.float32), **w)


def _error(fn, **kw) -> str:
    try:
        fn(**kw)
    except Exception as e:  # noqa: BLE001 - the runtime's own error, whatever its type
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_call_that_failed_leaves_no_half_planned_state(artifact, runtime):
    """A shape the graph refuses fails its AllocateTensors: the same call again fails the same way as with
    the runtime's runner (planned again, not "unallocated"), and good calls after it give its results."""
    a, b, own, ours = _pair(artifact, runtime, "evaluate")
    rng = np.random.default_rng(5)
    w = _weights(own, rng)
    shape = tuple(int(s) for s in own.get_input_details()["x"]["shape"][1:])
    x16, y16 = rng.normal(size=(16, *shape)).astype(np.float32), rng.integers(0, 2, 16).astype(np.int32)
    bad = np.zeros((16, *shape[:-1], shape[-1] + 1), np.float32)  # one feature too many
    for fn in (own, ours):
        fn(x=x16, y=y16, **w)
    for _ in range(2):
        got, want = _error(ours, x=bad, y=y16, **w), _error(own, x=bad, y=y16, **w)
        assert got == want and got != "no error"
    with pytest.raises(ValueError, match="invalid input name"):
        ours(x=x16[:5], z=y16[:5], **w)
    for x, y in ((x16[:5], y16[:5]), (x16, y16), (x16[:5], y16[:5])):
        r1, r2 = own(x=x, y=y, **w), ours(x=x, y=y, **w)
        assert {k: v.tobytes() for k, v in r1.items()} == {k: v.tobytes() for k, v in r2.items()}


def test_a_runner_without_the_expected_internals_uses_its_own_call():
    class Plain:
        def get_input_details(self):
            return {}

        def __call__(self, **kw):
            return {"called": kw}

    s = Signature(Plain())
    assert s(a=1) == {"called": {"a": 1}}
