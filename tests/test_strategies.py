"""Aggregation strategies against independent references (numpy, the papers' formulas, brute force)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.aggregator.strategies import ClientUpdate, build_strategy
from fedmq.aggregator.strategies.reducers import WeightedMean
from fedmq.broker.errors import ConfigError

SHAPES = {"k": (4, 3), "b": (3,)}


def model(seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}


def updates(k, seed=1, scale=1.0):
    rng = np.random.default_rng(seed)
    return [ClientUpdate(f"a{i}", int(rng.integers(1, 500)),
                         {n: (rng.normal(size=s) * scale).astype(np.float32) for n, s in SHAPES.items()},
                         {"val_accuracy": float(rng.uniform(0.1, 0.9)), "loss": float(rng.uniform(0.1, 2))})
            for i in range(k)]


def run(cfg, g, ups, round_no=1, strat=None):
    s = strat or build_strategy(cfg)
    s.begin_round(g, round_no)
    reasons = [s.add(u) for u in ups]
    return s, s.finish(), reasons


def stacked(ups, n):
    return np.stack([u.delta[n].astype(np.float64) for u in ups])


def assert_close(a, b, tol=2e-5):
    for n in a:
        np.testing.assert_allclose(a[n], b[n], rtol=tol, atol=tol)


# -- the seed's methods ---------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 10_000))
def test_simple_mean_is_the_mean(k, seed):
    g, ups = model(seed), updates(k, seed + 1)
    _, r, _ = run({"name": "mean"}, g, ups)
    assert_close(r.weights, {n: g[n] + stacked(ups, n).mean(axis=0) for n in g})


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 10_000))
def test_sample_weighted_mean_matches_np_average(k, seed):
    g, ups = model(seed), updates(k, seed + 1)
    w = [u.num_samples for u in ups]
    _, r, _ = run({"name": "weighted"}, g, ups)
    assert_close(r.weights, {n: g[n] + np.average(stacked(ups, n), axis=0, weights=w) for n in g})


@pytest.mark.parametrize("mapping, temperature, metric, fn", [
    ("proportional", 1.0, "val_accuracy", lambda q, t: q),
    ("softmax", 0.1, "val_accuracy", lambda q, t: math.exp(q / t)),
    ("inverse", 1.0, "loss", lambda q, t: 1 / (q + 1e-8)),
])
def test_quality_weighting(mapping, temperature, metric, fn):
    g, ups = model(), updates(7)
    cfg = {"name": "quality", "quality": {"metric": metric, "mapping": mapping, "temperature": temperature}}
    _, r, _ = run(cfg, g, ups)
    w = [fn(u.metrics[metric], temperature) for u in ups]
    assert_close(r.weights, {n: g[n] + np.average(stacked(ups, n), axis=0, weights=w) for n in g})


def test_softmax_weights_equal_the_softmax():
    q = np.array([0.2, 0.5, 0.9])
    t = 0.25
    sm = np.exp(q / t) / np.exp(q / t).sum()
    g = {"w": np.zeros(1, np.float32)}
    ups = [ClientUpdate(f"a{i}", 1, {"w": np.array([float(i == j) for j in [0]], np.float32) * 0 + np.float32(i)},
                        {"val_accuracy": float(q[i])}) for i in range(3)]
    _, r, _ = run({"name": "quality", "quality": {"mapping": "softmax", "temperature": t}}, g, ups)
    assert r.weights["w"][0] == pytest.approx(float(sm @ np.arange(3)), rel=1e-5)


@pytest.mark.parametrize("lr", [1.0, 0.5, 2.0])
def test_fedavg_with_server_learning_rate(lr):
    g, ups = model(), updates(5)
    w = [u.num_samples for u in ups]
    _, r, _ = run({"name": "fedavg", "server": {"lr": lr}}, g, ups)
    assert_close(r.weights, {n: g[n] + lr * np.average(stacked(ups, n), axis=0, weights=w) for n in g})


def test_hybrid_samples_times_quality():
    g, ups = model(), updates(6)
    w = [u.num_samples * u.metrics["val_accuracy"] for u in ups]
    _, r, _ = run({"name": "hybrid"}, g, ups)
    assert_close(r.weights, {n: g[n] + np.average(stacked(ups, n), axis=0, weights=w) for n in g})


# -- server optimizers vs a transcription of Reddi et al. 2021, Algorithm 2 -----------------------
def reference_opt(name, xs, deltas, lr, b1=0.9, b2=0.99, tau=1e-3, mom=0.9):
    x = xs.astype(np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    out = []
    for d in deltas:
        if name == "sgd":
            x = x + lr * d
        elif name == "momentum":
            m = mom * m + d
            x = x + lr * m
        else:
            m = b1 * m + (1 - b1) * d
            if name == "adagrad":
                v = v + d**2
            elif name == "adam":
                v = b2 * v + (1 - b2) * d**2
            else:
                v = v - (1 - b2) * d**2 * np.sign(v - d**2)
            x = x + lr * m / (np.sqrt(v) + tau)
        out.append(x.copy())
    return out


@pytest.mark.parametrize("preset, opt, lr", [("fedavg", "sgd", 1.0), ("fedavgm", "momentum", 0.7),
                                             ("fedadam", "adam", 0.05), ("fedyogi", "yogi", 0.05),
                                             ("fedadagrad", "adagrad", 0.05)])
def test_server_optimizers_follow_the_paper(preset, opt, lr):
    g = model(3)
    s = build_strategy({"name": preset, "server": {"lr": lr}})
    x = dict(g)
    deltas = []
    for rnd in range(1, 6):
        ups = updates(4, seed=10 + rnd)
        _, r, _ = run(None, x, ups, rnd, strat=s)
        deltas.append(np.average(stacked(ups, "k"), axis=0, weights=[u.num_samples for u in ups]))
        x = r.weights
        ref = reference_opt(opt, g["k"], deltas, lr)[-1]
        np.testing.assert_allclose(x["k"], ref, rtol=1e-4, atol=1e-5)


def test_state_save_load_reproduces_the_next_round_exactly():
    g = model()
    a = build_strategy({"name": "fedyogi", "clip": {"bound": 2.0, "adaptive": True}})
    x = g
    for rnd in (1, 2):
        _, r, _ = run(None, x, updates(5, seed=rnd), rnd, strat=a)
        x = r.weights
    saved = {k: np.array(v, copy=True) for k, v in a.state_dict().items()}
    b = build_strategy({"name": "fedyogi", "clip": {"bound": 2.0, "adaptive": True}})
    b.load_state_dict(saved)
    _, ra, _ = run(None, x, updates(5, seed=3), 3, strat=a)
    _, rb, _ = run(None, x, updates(5, seed=3), 3, strat=b)
    for n in ra.weights:
        assert np.array_equal(ra.weights[n], rb.weights[n])
    assert ra.metrics["clip_bound"] == rb.metrics["clip_bound"]


# -- robust aggregators ---------------------------------------------------------------------------
def test_median_matches_np_median():
    g, ups = model(), updates(9)
    _, r, _ = run({"name": "median"}, g, ups)
    assert_close(r.weights, {n: g[n] + np.median(stacked(ups, n), axis=0) for n in g})


@pytest.mark.parametrize("k, beta", [(10, 0.1), (10, 0.2), (7, 0.3), (3, 0.0)])
def test_trimmed_mean_matches_sorted_slice(k, beta):
    g, ups = model(), updates(k)
    _, r, _ = run({"name": "trimmed_mean", "beta": beta}, g, ups)
    cut = int(math.floor(beta * k))
    ref = {n: g[n] + np.sort(stacked(ups, n), axis=0)[cut:k - cut].mean(axis=0) for n in g}
    assert_close(r.weights, ref)


def brute_krum_scores(ups, f):
    flat = [np.concatenate([u.delta[n].reshape(-1).astype(np.float64) for n in SHAPES]) for u in ups]
    n = len(flat)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return scores


@pytest.mark.parametrize("f, m", [(1, 1), (2, 1), (2, 3)])
def test_krum_matches_brute_force(f, m):
    g, ups = model(), updates(9)
    name = "krum" if m == 1 else "multikrum"
    s, r, _ = run({"name": name, "f": f, "m": m}, g, ups)
    scores = brute_krum_scores(ups, f)
    np.testing.assert_allclose(s._reducer.scores, scores, rtol=1e-6)
    chosen = list(np.argsort(scores, kind="stable")[:m])
    assert s._reducer.selected == chosen
    w = [ups[i].num_samples if m > 1 else 1 for i in chosen]
    ref = {n: g[n] + np.average(np.stack([ups[i].delta[n] for i in chosen]), axis=0, weights=w) for n in g}
    assert_close(r.weights, ref)


def test_krum_precondition_leaves_model_unchanged_with_a_clear_reason():
    g, ups = model(), updates(4)
    _, r, _ = run({"name": "krum", "f": 1}, g, ups)
    assert r.weights is None and r.outcome == "unchanged"
    assert "n > 2f + 2 = 4" in r.reason


@pytest.mark.parametrize("attack", ["sign_flip_x100", "scale_x100"])
def test_robust_aggregators_resist_20_percent_byzantine(attack):
    rng = np.random.default_rng(7)
    honest_center = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    g = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    ups = []
    for i in range(20):
        d = {n: (honest_center[n] + 0.1 * rng.normal(size=SHAPES[n])).astype(np.float32) for n in SHAPES}
        if i < 4:  # 20% Byzantine
            factor = -100.0 if attack == "sign_flip_x100" else 100.0
            d = {n: (v * factor).astype(np.float32) for n, v in d.items()}
        ups.append(ClientUpdate(f"a{i}", 100, d))
    clean = {n: np.mean([u.delta[n] for u in ups[4:]], axis=0) for n in SHAPES}

    def err(cfg):
        _, r, _ = run(cfg, g, ups)
        return math.sqrt(sum(float(np.sum((r.weights[n] - clean[n]) ** 2)) for n in SHAPES))

    center_norm = math.sqrt(sum(float(np.sum(v ** 2)) for v in clean.values()))
    assert err({"name": "mean"}) > 10 * center_norm  # plain mean is dragged away
    for cfg in ({"name": "median"}, {"name": "trimmed_mean", "beta": 0.25}, {"name": "krum", "f": 4},
                {"name": "multikrum", "f": 4, "m": 10}):
        assert err(cfg) < 0.1 * center_norm, cfg


# -- invariants --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mean", "weighted", "fedadam", "median", "trimmed_mean", "multikrum", "hybrid"])
def test_permutation_invariance(name):
    g, ups = model(), updates(9)
    _, a, _ = run({"name": name}, g, ups)
    _, b, _ = run({"name": name}, g, ups[::-1])
    assert_close(a.weights, b.weights, tol=1e-5)


@pytest.mark.parametrize("name", ["mean", "weighted", "quality", "median", "trimmed_mean", "krum"])
def test_identical_updates_average_to_themselves(name):
    g = model()
    d = updates(1)[0]
    ups = [ClientUpdate(f"a{i}", 10 + i, d.delta, d.metrics) for i in range(7)]
    _, r, _ = run({"name": name}, g, ups)
    assert_close(r.weights, {n: g[n] + d.delta[n] for n in g}, tol=1e-6)


def test_scaling_all_weights_leaves_result_unchanged():
    g, ups = model(), updates(6)
    big = [ClientUpdate(u.agent, u.num_samples * 1000, u.delta, u.metrics) for u in ups]
    _, a, _ = run({"name": "weighted"}, g, ups)
    _, b, _ = run({"name": "weighted"}, g, big)
    assert_close(a.weights, b.weights, tol=1e-6)


@pytest.mark.parametrize("lanes", [1, 2, 3])  # lanes > 1: worker threads (tests/test_fold_lanes.py)
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 30), st.integers(1, 5000), st.integers(0, 1000))
def test_streaming_mean_equals_batch_mean(lanes, k, size, seed):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=size).astype(np.float32) for _ in range(k)]
    w = rng.uniform(0.1, 10, size=k)
    m = WeightedMean([np.empty(size, np.float32)], block=97, lanes=lanes)  # blocks that do not divide the size
    for x, wi in zip(xs, w):
        m.add([x], float(wi))
    np.testing.assert_allclose(m.result()[0], np.average(np.stack(xs), axis=0, weights=w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lanes", [1, 2])
def test_streaming_mean_memory_is_independent_of_update_count(lanes):
    import tracemalloc

    size = 200_000
    xs = [np.random.default_rng(i).normal(size=size).astype(np.float32) for i in range(40)]
    template = [np.empty(size, np.float32)]
    tracemalloc.start()
    m = WeightedMean(template, lanes=lanes)
    for x in xs:
        m.add([x], 1.0)
    m.result()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < (lanes + 0.2) * size * 4  # one accumulator per lane, not 40 copies


@pytest.mark.parametrize("lanes", [1, 2])
@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-12, 6), min_size=1, max_size=20), st.integers(0, 1000))
def test_streaming_mean_with_extreme_weight_ratios(lanes, log_w, seed):
    """Coefficients 18 orders of magnitude apart take both fold paths; the mean still equals np.average."""
    rng = np.random.default_rng(seed)
    w = [10.0 ** e for e in log_w]
    xs = [rng.normal(size=300).astype(np.float32) * 1e3 for _ in w]
    m = WeightedMean([np.empty(300, np.float32)], block=64, lanes=lanes)
    for x, wi in zip(xs, w):
        m.add([x], wi)
    ref = np.average(np.stack(xs).astype(np.float64), axis=0, weights=w)
    np.testing.assert_allclose(m.result()[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_streaming_mean_reused_across_rounds_starts_from_zero():
    m = WeightedMean([np.empty(5, np.float32)])
    m.add([np.full(5, 7.0, np.float32)], 3.0)
    m.reset()
    assert m.result() is None
    m.add([np.arange(5, dtype=np.float32)], 2.0)
    m.add([np.full(5, 1.0, np.float32)], 2.0)
    np.testing.assert_array_equal(m.result()[0], (np.arange(5) + 1.0) / 2)


def test_streaming_mean_result_is_idempotent_and_adding_after_it_stays_exact():
    """result() normalises the accumulator in place: a second call, or more updates, must not drift."""
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=50).astype(np.float32) for _ in range(4)]
    w = [3.0, 1.0, 7.0, 2.0]
    m = WeightedMean([np.empty(50, np.float32)], block=16)
    m.add([xs[0]], w[0])
    m.add([xs[1]], w[1])
    first = m.result()[0].copy()
    np.testing.assert_array_equal(m.result()[0], first)
    np.testing.assert_allclose(first, np.average(np.stack(xs[:2]), axis=0, weights=w[:2]), rtol=1e-5, atol=1e-6)
    m.add([xs[2]], w[2])
    m.add([xs[3]], w[3])
    np.testing.assert_allclose(m.result()[0], np.average(np.stack(xs), axis=0, weights=w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_new_global_is_fresh_and_survives_the_next_round(opt):
    """The new global never aliases the reducer's buffer, the old global or the update."""
    g = {"k": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}
    s = build_strategy({"name": "weighted", "server": {"name": opt, "lr": 0.5}})
    s.begin_round(g, 1)
    s.add(ClientUpdate("a", 2, {"k": np.full((4, 3), 2.0, np.float32), "b": np.ones(3, np.float32)}))
    new = s.finish().weights
    kept = {n: a.copy() for n, a in new.items()}
    assert all(a.dtype == np.float32 and a.shape == g[n].shape for n, a in new.items())
    s.begin_round(new, 2)
    s.add(ClientUpdate("a", 2, {"k": np.full((4, 3), -9.0, np.float32), "b": np.full(3, 5.0, np.float32)}))
    s.finish()
    for n in g:
        np.testing.assert_array_equal(new[n], kept[n])
    np.testing.assert_array_equal(g["k"], 1.0)
    if opt == "sgd":  # x + 0.5 * delta
        np.testing.assert_array_equal(kept["k"], 2.0)
        np.testing.assert_array_equal(kept["b"], 0.5)


# -- bad inputs ------------------------------------------------------------------------------------
def test_bad_updates_excluded_with_reasons():
    g, good = model(), updates(3)
    d = good[0].delta
    bad = [
        ClientUpdate("nan", 5, {**d, "k": np.full((4, 3), np.nan, np.float32)}),
        ClientUpdate("inf", 5, {**d, "b": np.array([np.inf, 0, 0], np.float32)}),
        ClientUpdate("huge", 5, {**d, "b": np.array([3e38, 3e38, 0], np.float32)}),
        ClientUpdate("shape", 5, {**d, "k": np.zeros((3, 4), np.float32)}),
        ClientUpdate("dtype", 5, {**d, "k": np.zeros((4, 3), np.float64)}),
        ClientUpdate("missing", 5, {"k": d["k"]}),
        ClientUpdate("extra", 5, {**d, "z": np.zeros(1, np.float32)}),
        ClientUpdate("neg", -3, d),
        ClientUpdate("zero", 0, d),
        ClientUpdate("a0", 5, d),  # duplicate agent
    ]
    s, r, reasons = run({"name": "weighted"}, g, good + bad)
    assert reasons[:3] == [None, None, None]
    assert reasons[3:] == ["non_finite", "non_finite", "non_finite", "bad_shape", "bad_dtype", "bad_tensors",
                           "bad_tensors", "bad_samples", "zero_weight", "duplicate"]
    w = [u.num_samples for u in good]
    assert_close(r.weights, {n: g[n] + np.average(stacked(good, n), axis=0, weights=w) for n in g})
    assert r.rejected["non_finite"] == 3 and r.participants == ["a0", "a1", "a2"]


@pytest.mark.parametrize("metrics, reason", [({}, "missing_quality"), ({"val_accuracy": float("nan")}, "bad_quality"),
                                             ({"val_accuracy": -0.5}, "bad_quality"),
                                             ({"val_accuracy": 0.0}, "zero_weight")])
def test_bad_quality_metrics(metrics, reason):
    g, u = model(), updates(1)[0]
    _, r, reasons = run({"name": "quality"}, g, [ClientUpdate("x", 5, u.delta, metrics)])
    assert reasons == [reason] and r.weights is None and r.outcome == "unchanged"


def test_empty_round_leaves_model_unchanged():
    _, r, _ = run({"name": "fedadam"}, model(), [])
    assert r.weights is None and r.reason == "no usable updates"


# -- clipping and noise ------------------------------------------------------------------------------
@pytest.mark.parametrize("lanes", [1, 2])
def test_clipping_bounds_each_contribution(lanes):
    g = {"w": np.zeros(4, np.float32)}
    ups = [ClientUpdate("a", 1, {"w": np.array([30, 40, 0, 0], np.float32)}),  # norm 50 -> clipped to 5
           ClientUpdate("b", 1, {"w": np.array([0, 0, 3, 0], np.float32)})]  # norm 3 -> unchanged
    _, r, _ = run({"name": "mean", "clip": {"bound": 5.0}, "lanes": lanes}, g, ups)
    np.testing.assert_allclose(r.weights["w"], [1.5, 2.0, 1.5, 0.0], rtol=1e-6)
    assert r.metrics["clipped_fraction"] == 0.5


def test_adaptive_clipping_moves_bound_toward_quantile():
    s = build_strategy({"name": "mean", "clip": {"bound": 100.0, "adaptive": True, "quantile": 0.5, "lr": 0.5}})
    g = {"w": np.zeros(1, np.float32)}
    for rnd in range(1, 40):
        ups = [ClientUpdate(f"a{i}", 1, {"w": np.array([float(i + 1)], np.float32)}) for i in range(10)]
        run(None, g, ups, rnd, strat=s)
    assert 4.0 <= s.clipper.bound <= 7.0  # median norm of 1..10 is 5.5


def test_gaussian_noise_sigma_and_reproducibility():
    g = {"w": np.zeros(200_000, np.float32)}
    ups = [ClientUpdate(f"a{i}", 1, {"w": np.zeros(200_000, np.float32)}) for i in range(4)]
    cfg = {"name": "dp_fedavg", "clip": {"bound": 2.0}, "noise": {"multiplier": 1.5, "seed": 3}}
    _, r, _ = run(cfg, g, ups)
    sigma = 1.5 * 2.0 / 4
    assert r.metrics["noise_sigma"] == pytest.approx(sigma)
    assert float(np.std(r.weights["w"])) == pytest.approx(sigma, rel=0.02)
    _, r2, _ = run(cfg, g, ups)
    assert np.array_equal(r.weights["w"], r2.weights["w"])


# -- configuration -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, match", [
    ({"name": "fedavgg"}, "did you mean 'fedavg'"),
    ({"name": "krum", "f": -1}, r"strategy.f = -1"),
    ({"name": "trimmed_mean", "beta": 0.6}, r"strategy.beta"),
    ({"name": "fedadam", "server": {"beta1": 1.5}}, r"strategy.server.beta1"),
    ({"name": "fedadam", "server": {"lrr": 0.1}}, r"did you mean 'lr'"),
    ({"name": "mean", "noise": {"multiplier": 1.0}}, "needs strategy.clip"),
    ({"name": "hybrid", "weights": ["samples", "size"]}, "strategy.weights"),
    ({"name": "quality", "quality": {"mapping": "exp"}}, "strategy.quality.mapping"),
    ({"name": "mean", "reducer": "mode"}, "strategy.reducer"),
    ({"name": "mean", "colour": 1}, "unknown key strategy.colour"),
    ({"name": "fedavg", "lanes": -1}, r"strategy.lanes = -1: must be an integer"),
    ({"name": "fedavg", "lanes": 2.5}, r"strategy.lanes = 2.5"),
])
def test_config_errors_name_the_key(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_strategy(cfg)


# -- partitions (simulation) ---------------------------------------------------------------------------
def test_partitions_are_disjoint_and_shaped_as_documented():
    from fedmq.aggregator.partition import partition

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, size=6000)
    for how in ("iid", "dirichlet", "shards"):
        parts = partition(y, 100 if how != "dirichlet" else 20, how, alpha=0.1, seed=1)
        allidx = np.concatenate(parts)
        assert len(allidx) == len(set(allidx.tolist())) == 6000, how
    shards = partition(y, 100, "shards", seed=1)
    assert all(len(p) == 60 for p in shards)
    assert np.mean([len(np.unique(y[p])) for p in shards]) <= 2.6  # 2 label-sorted shards: ~2 classes each
    iid = partition(y, 10, "iid", seed=1)
    assert np.mean([len(np.unique(y[p])) for p in iid]) == 10
    skew = partition(y, 20, "dirichlet", alpha=0.05, seed=1)
    assert np.mean([len(np.unique(y[p])) for p in skew if len(p)]) < 5
    groups = np.repeat(np.arange(1, 4), 2000)
    nat = partition(y, 3, "natural", groups=groups)
    assert [set(groups[p].tolist()) for p in nat] == [{1}, {2}, {3}]
    with pytest.raises(ValueError, match="--agents 3"):
        partition(y, 5, "natural", groups=groups)


def test_robust_reducers_hold_what_memory_mb_allows_and_count_the_rest():
    """max_updates = 0: the cap is derived from the model size (K x P x 4 bytes <= memory_mb; Krum adds K^2)."""
    g = {"w": np.zeros(65_536, np.float32)}  # 256 KiB per held update
    for reducer, expect in (("median", 4), ("trimmed_mean", 4), ("krum", 3)):
        s = build_strategy({"name": "hybrid", "weights": ["samples"], "reducer": reducer, "memory_mb": 1, "f": 0})
        s.begin_round(g, 1)
        reasons = [s.add(ClientUpdate(f"a{i}", 10, {"w": np.full(65_536, float(i), np.float32)})) for i in range(6)]
        # Krum: 3 x 256 KiB + 3^2 x 16 B <= 1 MiB < 4 x 256 KiB
        assert reasons == [None] * expect + ["too_many"] * (6 - expect), (reducer, reasons)
    s = build_strategy({"name": "hybrid", "weights": ["samples"], "reducer": "median", "memory_mb": 1,
                        "max_updates": 6})
    s.begin_round(g, 1)  # an explicit max_updates wins over the derived cap (the control)
    assert all(s.add(ClientUpdate(f"a{i}", 10, {"w": np.ones(65_536, np.float32)})) is None for i in range(6))
