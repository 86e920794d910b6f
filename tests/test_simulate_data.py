"""``simulate --data``: the operator's own .npz files, checked against the model, run by a real fleet."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_mosquitto

pytest.importorskip("tensorflow")

from fedmq.aggregator.partition import partition  # noqa: E402
from fedmq.aggregator.simulate import SimConfig, Simulation  # noqa: E402
from fedmq.broker.errors import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / ".venv" / "bin" / "fedmq-aggregator"
sys.path.insert(0, str(ROOT / "examples"))
import byo_data  # noqa: E402


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    out = tmp_path_factory.mktemp("byo")
    byo_data.make(out)
    return out


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_") and k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def _sim(*args, cwd):
    return subprocess.run([str(CLI), "simulate", "--no-progress", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=str(cwd), env=_env())


@pytest.mark.network
@needs_mosquitto
def test_one_file_per_agent_runs_a_real_fleet(byo, tmp_path):
    """The documented example (examples/byo_data.py + the command of docs/datasets.md), reduced to 3 rounds."""
    r = _sim("--data", byo / "agents", "--eval", byo / "held_out.npz", "--model", "zoo:mlp", "--rounds", "3",
             "--epochs", "1", "--batch-size", "16", "--lr", "0.05", "--run-dir", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    run = tmp_path / "run"
    s = json.loads((run / "summary.json").read_text())
    assert s["agents"] == 4 and s["rounds"] == 3 and s["dataset"] == "npz"
    # each agent trained on exactly one of the operator's files, as given
    for i, f in enumerate(sorted((byo / "agents").glob("*.npz"))):
        with np.load(f) as src, np.load(run / "data" / f"agent-{i + 1:03d}.npz") as got:
            np.testing.assert_array_equal(src["x"], got["x"])
            np.testing.assert_array_equal(src["y"], got["y"])
    rows = [json.loads(line) for line in (run / "state" / "history.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in rows if r["outcome"] == "aggregated"] == [4.0] * 3
    # independent reference: the final model.keras, loaded by plain Keras, scored on the held-out file
    import keras

    m = keras.models.load_model(run / "state" / "final" / "model.keras")
    with np.load(byo / "held_out.npz") as z:
        xe, ye = z["x"], z["y"]
    acc = float(np.mean(np.argmax(m.predict(xe, verbose=0), axis=-1) == ye))
    # the aggregator scored this same file with the same weights (TFLite): at most a float tie apart
    assert abs(acc - s["final_accuracy"]) <= 1.5 / len(ye)
    assert acc > 0.5  # chance is 0.1: the federation learned the operator's task


def _cfg(tmp_path, byo, **kw):
    base = {"data": str(byo / "all.npz"), "eval_data": str(byo / "held_out.npz"), "model": "zoo:mlp",
            "partition": "auto", "agents": 3}
    return Simulation(SimConfig(**{**base, **kw}), tmp_path / "run", progress=False)


def _shards(run):
    return [np.load(p) for p in sorted((run / "data").glob("agent-*.npz"))]


@pytest.mark.parametrize("how, agents", [("iid", 3), ("dirichlet", 3), ("shards", 3), ("natural", 4), ("auto", 4)])
def test_one_file_is_partitioned_with_the_existing_partitioners(byo, tmp_path, how, agents):
    sim = _cfg(tmp_path, byo, partition=how, agents=3)
    names = sim.prepare()
    assert len(names) == agents  # natural (and auto, the file has groups): one agent per site
    with np.load(byo / "all.npz") as z:
        x, y, g = z["x"], z["y"], z["groups"]
    ref = partition(y, agents, "natural" if how == "auto" else how, alpha=0.5, seed=0, groups=g)
    for idx, shard in zip(ref, _shards(sim.run_dir)):
        np.testing.assert_array_equal(shard["x"], x[idx])
        np.testing.assert_array_equal(shard["y"], y[idx])
    assert sum(len(s["y"]) for s in _shards(sim.run_dir)) == len(y)


def _write(p, **arrays):
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize("mutate, expect", [
    (lambda d: {"x": d["x"][:, :32], "y": d["y"]}, r"examples have shape \(32,\), the model expects \(64,\)"),
    (lambda d: {"x": d["x"].reshape(-1, 8, 8), "y": d["y"]}, r"reshape with x.reshape\(len\(x\), 64\)"),
    (lambda d: {"x": d["x"], "y": d["y"] + 5}, r"label 1[0-4] is out of range: the model has 10 outputs"),
    (lambda d: {"inputs": d["x"], "y": d["y"]}, r"no array 'x'"),
    (lambda d: {"x": d["x"], "y": d["y"][:-1]}, r"one label per example"),
    (lambda d: {"x": d["x"], "y": d["y"] + 0.5}, r"non-integer values"),
    (lambda d: {"x": np.where(np.arange(d["x"].shape[1]) == 3, np.nan, d["x"]), "y": d["y"]}, r"NaN"),
    (lambda d: {"x": d["x"], "y": np.array([{"evil": 1}] * len(d["y"]), dtype=object)}, r"allow_pickle|numeric"),
])
def test_data_that_does_not_fit_is_refused_naming_the_file(byo, tmp_path, mutate, expect):
    with np.load(byo / "agents" / "site-2.npz") as z:
        d = {"x": z["x"], "y": z["y"]}
    bad_dir = tmp_path / "agents"
    bad_dir.mkdir()
    for f in sorted((byo / "agents").glob("*.npz")):
        (bad_dir / f.name).write_bytes(f.read_bytes())
    _write(bad_dir / "site-2.npz", **mutate(d))
    sim = _cfg(tmp_path, byo, data=str(bad_dir))
    with pytest.raises(ConfigError, match=expect) as e:
        sim.prepare()
    assert "site-2.npz" in str(e.value)
    # positive control: the unmodified files pass
    _write(bad_dir / "site-2.npz", **d)
    assert len(_cfg(tmp_path, byo, data=str(bad_dir)).prepare()) == 4


def test_missing_pieces_are_named(byo, tmp_path):
    with pytest.raises(ConfigError, match="--eval"):
        _cfg(tmp_path, byo, eval_data="").prepare()
    with pytest.raises(ConfigError, match="--model"):
        _cfg(tmp_path, byo, model="").prepare()
    with pytest.raises(ConfigError, match="no .npz files"):
        _cfg(tmp_path, byo, data=str(tmp_path)).prepare()
    with pytest.raises(ConfigError, match="without examples"):
        _cfg(tmp_path, byo, data=str(byo / "agents" / "site-1.npz"), partition="iid", agents=500).prepare()
    with pytest.raises(ConfigError, match="needs a 'groups' array"):
        _cfg(tmp_path, byo, data=str(byo / "agents" / "site-1.npz"), partition="natural").prepare()
    # a glob, with the held-out file next to the agents' files left out
    one = tmp_path / "flat"
    one.mkdir()
    for f in [*sorted((byo / "agents").glob("*.npz")), byo / "held_out.npz"]:
        (one / f.name).write_bytes(f.read_bytes())
    assert len(_cfg(tmp_path, byo, data=str(one / "*.npz"), eval_data=str(one / "held_out.npz")).prepare()) == 4


def test_cli_exits_2_for_a_misfit_and_for_a_refused_model(byo, tmp_path):
    """Before any process starts: no broker, no aggregator (nothing under run/logs)."""
    bad = _write(tmp_path / "bad.npz", x=np.zeros((20, 10), np.float32), y=np.zeros(20, np.int32))
    r = _sim("--data", bad, "--eval", byo / "held_out.npz", "--model", "zoo:mlp", "--agents", "2", "--run-dir", "r1",
             cwd=tmp_path)
    assert r.returncode == 2 and "bad.npz: examples have shape (10,), the model expects (64,)" in r.stderr, r.stderr
    assert not any((tmp_path / "r1" / "logs").iterdir())
    (tmp_path / "bnmodel.py").write_text(
        "import keras\nfrom fedmq.aggregator.export import layers as fl\n"
        "def net():\n    i = keras.Input((64,))\n"
        "    return keras.Model(i, fl.Dense(10)(keras.layers.BatchNormalization(name='bn1')(i)))\n")
    env = {**_env(), "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([str(CLI), "simulate", "--no-progress", "--data", str(byo / "agents"), "--eval",
                        str(byo / "held_out.npz"), "--model", "bnmodel:net", "--run-dir", "r2"], capture_output=True,
                       text=True, timeout=300, cwd=str(tmp_path), env=env)
    assert r.returncode == 2 and "layer 'bn1' (BatchNormalization)" in r.stderr, r.stderr[-2000:]
