"""Agent-side pieces without a broker: local data sources, outbox, error feedback, telemetry endpoint."""


import numpy as np
import pytest

from fedmq.broker.contract.tensors import Compression, decode_tensor, encode_tensor
from fedmq.broker.errors import ConfigError
from fedmq.edge_agent.compress import ErrorFeedback, apply_error_feedback
from fedmq.edge_agent.data import load_local, split_eval
from fedmq.edge_agent.outbox import Outbox, OutboxKey


def test_npz_csv_and_callable_sources(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    y = np.array([0, 1, 0, 2])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    gx, gy = load_local(f"npz:{tmp_path / 'd.npz'}")
    assert np.array_equal(gx, x) and np.array_equal(gy, y)
    d = tmp_path / "csv"
    d.mkdir()
    (d / "a.csv").write_text("f1,f2,f3,label\n0,1,2,0\n3,4,5,1\n")
    (d / "b.csv").write_text("6,7,8,0\n9,10,11,2\n")
    cx, cy = load_local(f"csv:{d}")
    assert np.array_equal(cx, x) and np.array_equal(cy, y)
    mod = tmp_path / "mydata.py"
    mod.write_text("import numpy as np\ndef load():\n    return np.ones((5, 2)), np.zeros(5)\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        fx, fy = load_local("callable:mydata:load")
        assert fx.shape == (5, 2) and fy.shape == (5,)
    finally:
        sys.path.remove(str(tmp_path))
    for bad, msg in (("npz:/nope.npz", "not found"), (f"csv:{tmp_path / 'empty'}", "no \\*.csv"),
                     ("callable:nomodule:fn", "cannot call"), ("parquet:/x", "use npz")):
        with pytest.raises(ConfigError, match=msg):
            load_local(bad)
    np.savez(tmp_path / "bad.npz", features=x)
    with pytest.raises(ConfigError, match="'x' and 'y'"):
        load_local(f"npz:{tmp_path / 'bad.npz'}")


def test_eval_split_is_seeded_and_disjoint():
    x = np.arange(100)[:, None].astype(np.float32)
    y = np.arange(100) % 3
    xt, yt, xe, ye = split_eval(x, y, 0.2, seed=1)
    assert len(xe) == 20 and len(xt) == 80
    assert not set(xt[:, 0]) & set(xe[:, 0])
    assert np.array_equal(split_eval(x, y, 0.2, seed=1)[2], xe)


def test_outbox_survives_and_drops_closed_rounds(tmp_path):
    run, other, mid = "aa" * 8, "bb" * 8, "cd" * 32
    k3, k4 = OutboxKey(run, mid, 3, 2), OutboxKey(run, mid, 4, 3)
    o = Outbox(tmp_path / "ob")
    o.put(k3, b"three")
    o.put(k4, b"four")
    assert Outbox(tmp_path / "ob").get(k3) == b"three"  # a new process sees it
    o.drop_before(run, 4)
    assert o.get(k3) is None and o.get(k4) == b"four"
    o.drop_before(other, 9)  # another run's rounds say nothing about this run's
    assert o.get(k4) == b"four"


def test_outbox_is_keyed_by_run_model_round_and_base(tmp_path):
    """An entry is found only for the exact (run, model, round, base round) it was made for."""
    run, mid = "aa" * 8, "cd" * 32
    o = Outbox(tmp_path / "ob")
    o.put(OutboxKey(run, mid, 3, 2), b"three")
    assert o.get(OutboxKey(run, mid, 3, 2)) == b"three"  # positive control
    for k in (OutboxKey("bb" * 8, mid, 3, 2), OutboxKey(run, "ef" * 32, 3, 2), OutboxKey(run, mid, 3, 1),
              OutboxKey(run, mid, 4, 2)):
        assert o.get(k) is None, k
    o.put(OutboxKey("bb" * 8, mid, 5, 4), b"other run")
    assert o.drop_other_runs(run) == 1 and [k.run for k in o.keys()] == [run]
    assert o.drop_other_runs(run, model_id="ef" * 32) == 1 and o.keys() == []


def test_topk_error_feedback_loses_nothing_over_rounds(tmp_path):
    """Sum of what was sent + the final residual equals the sum of the true deltas."""
    ef = ErrorFeedback(tmp_path / "res.npz")
    comp = Compression("topk", 0.05)
    rng = np.random.default_rng(0)
    sent_total = np.zeros(1000, np.float32)
    true_total = np.zeros(1000, np.float32)
    for _ in range(6):
        delta = {"w": rng.normal(size=1000).astype(np.float32)}
        true_total += delta["w"]
        corrected = apply_error_feedback(delta, comp, ef)
        _, sent = decode_tensor(encode_tensor("w", corrected["w"], comp), 10**6)
        assert np.count_nonzero(sent) == 50
        sent_total += sent
    residual = ef.load(["w"], [(1000,)])["w"]
    np.testing.assert_allclose(sent_total + residual, true_total, atol=1e-4)
    assert apply_error_feedback(delta, Compression("int8"), ef) is delta  # only top-k keeps a residual
