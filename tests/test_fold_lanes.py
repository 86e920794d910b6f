"""The weighted mean folded in two lanes (worker threads): same mean, exact exclusion, clean resets."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from fedmq.aggregator.strategies import ClientUpdate, build_strategy
from fedmq.aggregator.strategies.reducers import PARALLEL_MIN, WeightedMean, default_lanes


def average(xs, w):
    return np.average(np.stack(xs).astype(np.float64), axis=0, weights=w)


def test_lanes_exclude_non_finite_updates_exactly():
    """A NaN/Inf update is refused synchronously and never reaches an accumulator."""
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(40, 25)).astype(np.float32) for _ in range(6)]
    bad = xs[2].copy()
    bad[39, 24] = np.nan  # the last element: a fold before the full check would already be done
    inf = xs[3].copy()
    inf[0, 0] = np.inf
    m = WeightedMean([np.empty((40, 25), np.float32)], block=64, lanes=2)
    verdicts = []
    for i, x in enumerate(xs):
        verdicts.append(np.isfinite(m.add([x], 1.0 + i)))
        if i == 1:
            verdicts.append(np.isfinite(m.add([bad], 5.0)))
            verdicts.append(np.isfinite(m.add([inf], 5.0)))
    assert verdicts == [True, True, False, False, True, True, True, True]
    assert m.count == 6 and m.total_weight == sum(1.0 + i for i in range(6))
    np.testing.assert_allclose(m.result()[0], average(xs, [1.0 + i for i in range(6)]), rtol=1e-5, atol=1e-6)


def test_lanes_are_deterministic_and_match_one_lane_to_rounding():
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=5000).astype(np.float32) for _ in range(20)]
    w = rng.integers(1, 1000, size=20).astype(float)

    def run(lanes):
        m = WeightedMean([np.empty(5000, np.float32)], block=512, lanes=lanes)
        for x, wi in zip(xs, w):
            m.add([x], wi)
        return m.result()[0].copy()

    a, b, one = run(2), run(2), run(1)
    np.testing.assert_array_equal(a, b)  # lane i always gets the same updates, in order
    np.testing.assert_allclose(a, one, rtol=1e-5, atol=1e-6)


def test_reset_waits_for_pending_folds_and_starts_from_zero():
    """A round abandoned mid-fold: reset() must not let a late fold leak into the next round."""
    size = 1 << 19
    big = [np.full(size, 1e3, np.float32) for _ in range(6)]
    m = WeightedMean([np.empty(size, np.float32)], lanes=2)
    for x in big:
        m.add([x], 1.0)
    m.reset()  # folds of the last updates may still be running here
    assert m.result() is None
    x1, x2 = np.full(size, 2.0, np.float32), np.full(size, 4.0, np.float32)
    m.add([x1], 1.0)
    m.add([x2], 3.0)
    np.testing.assert_array_equal(m.result()[0], 3.5)


def test_result_merges_lanes_idempotently_and_more_updates_still_count():
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=100).astype(np.float32) for _ in range(5)]
    w = [1.0, 2.0, 3.0, 4.0, 5.0]
    m = WeightedMean([np.empty(100, np.float32)], block=16, lanes=2)
    for x, wi in zip(xs[:3], w[:3]):
        m.add([x], wi)
    first = m.result()[0].copy()
    np.testing.assert_array_equal(m.result()[0], first)
    np.testing.assert_allclose(first, average(xs[:3], w[:3]), rtol=1e-5, atol=1e-6)
    for x, wi in zip(xs[3:], w[3:]):
        m.add([x], wi)
    np.testing.assert_allclose(m.result()[0], average(xs, w), rtol=1e-5, atol=1e-6)


def test_a_failing_fold_raises_in_the_callers_thread_and_the_reducer_recovers():
    m = WeightedMean([np.empty(10, np.float32)], block=4, lanes=2)
    m.add([np.ones(10, np.float32)], 1.0)
    with pytest.raises(ValueError):  # a delta that bypassed validation: 7 elements for 10
        m.add([np.ones(7, np.float32)], 1.0)
        m.result()
    # the two lane workers survive a job's error (any other thread of the process does not count)
    lanes = {t.name for t in threading.enumerate() if t.name.startswith("fedmq-fold-") and t.is_alive()}
    assert {"fedmq-fold-0", "fedmq-fold-1"} <= lanes, lanes
    m.reset()
    m.add([np.full(10, 2.0, np.float32)], 1.0)
    m.add([np.full(10, 4.0, np.float32)], 1.0)
    np.testing.assert_array_equal(m.result()[0], 3.0)


def test_default_lanes_follow_model_size_and_cores():
    cpus = len(os.sched_getaffinity(0))
    assert default_lanes(PARALLEL_MIN - 1) == 1
    assert default_lanes(PARALLEL_MIN) == (2 if cpus >= 2 else 1)
    assert WeightedMean([np.empty(10, np.float32)], lanes=3).lanes == 3


def test_strategy_on_a_large_model_uses_lanes_and_equals_np_average():
    """Through the whole strategy (validation, weighting, server step) with the config key."""
    rng = np.random.default_rng(4)
    g = {"k": np.zeros((512, 1100), np.float32), "b": np.zeros(1100, np.float32)}
    ups = [ClientUpdate(f"a{i}", int(rng.integers(1, 500)),
                        {n: rng.normal(size=a.shape).astype(np.float32) for n, a in g.items()}) for i in range(12)]
    ups.insert(5, ClientUpdate("nan", 100, {"k": np.full((512, 1100), np.nan, np.float32), "b": g["b"]}))
    for lanes in (0, 2):
        s = build_strategy({"name": "fedavg", "lanes": lanes})
        s.begin_round(g, 1)
        reasons = [s.add(u) for u in ups]
        assert reasons.count("non_finite") == 1 and reasons.count(None) == 12
        assert s._reducer.lanes == (default_lanes(512 * 1100 + 1100) if lanes == 0 else 2)
        out = s.finish().weights
        ok = [u for u in ups if u.agent != "nan"]
        for n in g:
            ref = average([u.delta[n] for u in ok], [u.num_samples for u in ok])
            np.testing.assert_allclose(out[n], ref, rtol=1e-4, atol=1e-5)
