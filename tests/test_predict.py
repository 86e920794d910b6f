"""On-device inference: ``LocalModel`` and ``fedmq-agent predict`` run the agent's latest verified
global model in its TFLite interpreter, and predict what the aggregator's own evaluation sees.

References: the aggregator's evaluation path (``TFLiteTrainer.evaluate`` of the served artifact
with the global weights, batch 256, as ``AggregatorService`` runs it), a numpy forward pass of the
sensor1d network, the tflite-runtime interpreter, and a real federation (aggregator + agent
processes on a real Mosquitto) whose own ``eval_accuracy`` of the final global must equal the
accuracy of the agent's predictions on the same data.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_mosquitto, wait_until

from fedmq.broker.contract import codec
from fedmq.broker.contract.messages import GlobalModel
from fedmq.broker.storage import atomic_write
from fedmq.edge_agent import GlobalRefused, LocalModel, ModelNotReady
from fedmq.edge_agent.trainer import DataError, TFLiteTrainer

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUN = "0123abcd"
N = 203  # not a multiple of the batch size (16): the last batch is padded


@pytest.fixture(scope="module")
def served(model_cache):
    from fedmq.aggregator.config import ModelSection
    from fedmq.aggregator.model_store import load_or_export

    return load_or_export(ModelSection(source="zoo:sensor1d", batch_size=16, verify_steps=5), model_cache)


@pytest.fixture(scope="module")
def task(served):
    """A learnable task (label = a fixed function of the channel means) and weights trained on it,
    so the predictions spread over several classes (a constant predictor would prove little)."""
    rng = np.random.default_rng(7)
    proj = rng.normal(size=(6, 7))

    def sample(n):
        x = (rng.normal(size=(n, 100, 6)) + rng.normal(size=(n, 1, 6))).astype(np.float32)
        return x, np.argmax(x.mean(axis=1) @ proj, axis=1).astype(np.int32)

    x_train, y_train = sample(240)
    x, y = sample(N)
    t = TFLiteTrainer(served.artifact, served.model_id)
    w1 = t.fit(x_train, y_train, epochs=4, lr=0.05, weights=served.initial).weights
    w2 = t.fit(x_train, y_train, epochs=4, lr=0.05, seed=1).weights
    names = [s.name for s in served.weights]
    return {"x": x, "y": y, "round3": dict(zip(names, w1)), "round4": dict(zip(names, w2))}


def write_global(cache: Path, tensors: dict, round_no: int, model_id: str, run: str = RUN) -> None:
    """What the agent does when it accepts a global: the encoded message, replaced atomically."""
    atomic_write(cache / "global.msgpack", codec.encode(GlobalModel(round_no, model_id, tensors, time.time(), run)))


@pytest.fixture
def cache(tmp_path, served, task) -> Path:
    """An agent cache_dir as the agent leaves it: the artifact and the global of round 3."""
    c = tmp_path / "cache"
    (c / "models").mkdir(parents=True)
    (c / "models" / f"{served.model_id}.tflite").write_bytes(served.artifact)
    write_global(c, task["round3"], 3, served.model_id)
    return c


def aggregator_eval(served, weights: dict, x, y) -> tuple[float, float]:
    """What the aggregator computes for a global (AggregatorService: evaluator, batch 256)."""
    ev = TFLiteTrainer(served.artifact, served.model_id)
    ev.set_weights([weights[w.name] for w in served.weights])
    return ev.evaluate(x, y, batch=256)


def numpy_forward(weights: dict, served, x: np.ndarray) -> np.ndarray:
    """sensor1d by hand: conv1d(16, 5, same) relu, conv1d(32, 5, same) relu, global average pool, dense, softmax."""
    k1, b1, k2, b2, wd, bd = (np.float64(weights[w.name]) for w in served.weights)

    def conv(h, k, b):
        w = k.shape[1]
        h = np.pad(h, ((0, 0), ((w - 1) // 2, w // 2), (0, 0)))  # "same": the layers' default
        win = np.lib.stride_tricks.sliding_window_view(h, w, axis=1)  # (n, t, c, k)
        return np.maximum(np.einsum("ntck,kco->nto", win, k[0]) + b, 0.0)

    h = conv(conv(np.float64(x), k1, b1), k2, b2).mean(axis=1)
    z = h @ wd + bd
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# -- the API -------------------------------------------------------------------------------------------


def test_predictions_are_what_the_aggregator_evaluates(cache, served, task):
    x, y = task["x"], task["y"]
    m = LocalModel.open(cache)
    assert (m.run, m.round, m.model_id, m.x_shape, m.num_classes) == (RUN, 3, served.model_id, (100, 6), 7)
    p = m.predict(x)
    assert p.labels.shape == (N,) and p.probabilities.shape == (N, 7) and p.probabilities.dtype == np.float32
    assert (p.run, p.round, p.model_id) == (RUN, 3, served.model_id)
    assert len(np.unique(p.labels)) >= 3, np.bincount(p.labels)  # the comparison below can tell models apart
    loss, acc = aggregator_eval(served, task["round3"], x, y)
    assert 0.3 < acc < 1.0
    assert round(acc * N) == int(np.sum(p.labels == y))  # the same number of correct predictions
    nll = -np.mean(np.log(np.float64(p.probabilities[np.arange(N), y])))
    assert nll == pytest.approx(loss, rel=1e-4)
    # with our labels as the truth the aggregator's graph is right on every example: same argmax everywhere
    loss_own, acc_own = aggregator_eval(served, task["round3"], x, p.labels.astype(np.int32))
    assert acc_own == 1.0
    # negative control: the round-4 weights disagree somewhere, so the check above can fail
    assert aggregator_eval(served, task["round4"], x, p.labels.astype(np.int32))[1] < 1.0


def test_probabilities_match_a_numpy_forward_pass(cache, served, task):
    x = task["x"]
    ref = numpy_forward(task["round3"], served, x)
    got = LocalModel.open(cache).predict_proba(x)
    assert np.max(np.abs(got - ref)) < 1e-5
    margin = np.sort(ref, axis=1)[:, -1] - np.sort(ref, axis=1)[:, -2]
    sure = margin > 1e-4
    assert sure.mean() > 0.9 and np.array_equal(got.argmax(1)[sure], ref.argmax(1)[sure])


def test_any_number_of_inputs_goes_through_the_fixed_batch(cache, served, task):
    m = LocalModel.open(cache)
    x = task["x"]
    full = m.predict_proba(x)
    for n in (0, 1, 15, 16, 17, 33):
        np.testing.assert_allclose(m.predict_proba(x[:n]), full[:n], atol=1e-6)
    np.testing.assert_allclose(m.predict_proba(x[5]), full[5:6], atol=1e-6)  # one example, no batch axis
    # the interpreter saw only batches of 16 (never resized to the request)
    assert tuple(m._trainer._infer.get_input_details()["x"]["shape"]) == (16, 100, 6)


@pytest.mark.parametrize("bad,needle", [
    (np.zeros((3, 99, 6)), "expects (n, 100, 6)"),
    (np.full((2, 100, 6), np.nan), "NaN"),
    (np.array([["a"] * 6] * 100), "numeric"),
])
def test_bad_inputs_are_refused(cache, bad, needle):
    m = LocalModel.open(cache)
    with pytest.raises(DataError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        m.predict(bad)
    assert m.predict(np.zeros((2, 100, 6))).labels.shape == (2,)  # positive control


def test_refresh_reloads_only_a_changed_global(cache, served, task, monkeypatch):
    m = LocalModel.open(cache)
    loads = []
    real = LocalModel._load
    monkeypatch.setattr(LocalModel, "_load", lambda self, payload: loads.append(1) or real(self, payload))
    x = task["x"][:40]
    for _ in range(5):
        assert m.refresh() is False
        m.predict(x)
    assert loads == []  # unchanged file: not even read
    write_global(cache, task["round4"], 4, served.model_id)  # the agent accepted the next global
    assert m.refresh() is True and m.round == 4 and len(loads) == 1
    np.testing.assert_allclose(m.predict_proba(x), numpy_forward(task["round4"], served, x), atol=1e-5)
    assert m.refresh() is False
    write_global(cache, task["round4"], 4, served.model_id)  # rewritten, same global: read, not reloaded
    assert m.refresh() is False and len(loads) == 2


def _tamper(cache: Path, served, task, how: str) -> None:
    t = {k: v.copy() for k, v in task["round3"].items()}
    name = served.weights[0].name
    if how == "other_model":
        write_global(cache, t, 5, "f" * 64)
    elif how == "missing_tensor":
        del t[name]
        write_global(cache, t, 5, served.model_id)
    elif how == "extra_tensor":
        t["w999"] = np.zeros(3, np.float32)
        write_global(cache, t, 5, served.model_id)
    elif how == "shape":
        t[name] = t[name][..., :-1].copy()
        write_global(cache, t, 5, served.model_id)
    elif how == "int_dtype":
        t[name] = t[name].astype(np.int32)
        write_global(cache, t, 5, served.model_id)
    elif how == "nan":
        t[name][0, 0, 0, 0] = np.nan
        write_global(cache, t, 5, served.model_id)
    elif how == "garbage":
        atomic_write(cache / "global.msgpack", b"\x93\x01\x02" + os.urandom(64))
    elif how == "oversize":  # a sparse file: refused from its size, never read
        with open(cache / "global.msgpack", "r+b") as f:
            f.truncate(65 * 2**20)
    elif how == "tampered_artifact":
        p = cache / "models" / f"{served.model_id}.tflite"
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))
    else:
        raise ValueError(how)


HOW = {"other_model": "whose artifact is not in", "missing_tensor": "missing tensors", "extra_tensor": "unexpected",
       "shape": "has shape", "int_dtype": "not floating point", "nan": "NaN or Inf", "garbage": "not a valid global",
       "tampered_artifact": "does not match model id", "oversize": "more than a global may"}


@pytest.mark.parametrize("how", sorted(HOW))
def test_a_global_that_does_not_fit_is_refused(cache, served, task, how):
    _tamper(cache, served, task, how)
    with pytest.raises(GlobalRefused, match=HOW[how]):
        LocalModel.open(cache)


@pytest.mark.parametrize("how", ["missing_tensor", "shape", "nan", "garbage", "other_model", "oversize"])
def test_a_refused_newer_global_never_replaces_the_served_one(cache, served, task, how):
    m = LocalModel.open(cache)
    before = m.predict_proba(task["x"][:20])
    _tamper(cache, served, task, how)
    for _ in range(2):  # refused again until the file changes (without re-reading it)
        with pytest.raises(GlobalRefused, match=HOW[how]):
            m.refresh()
    assert m.round == 3
    np.testing.assert_array_equal(m.predict_proba(task["x"][:20]), before)
    write_global(cache, task["round4"], 4, served.model_id)  # positive control: a good one is taken
    assert m.refresh() and m.round == 4


def test_no_global_yet(tmp_path, cache):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotReady, match="follow_global"):
        LocalModel.open(tmp_path / "empty")
    assert LocalModel.open(cache).ready  # positive control


def test_importing_the_package_stays_light():
    code = ("import sys, fedmq.edge_agent as e; assert 'fedmq.edge_agent.local_model' not in sys.modules; "
            "assert 'numpy' not in sys.modules; e.LocalModel; assert 'fedmq.edge_agent.local_model' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# -- the command -----------------------------------------------------------------------------------------


def _config(tmp: Path, cache: Path) -> Path:
    np.savez(tmp / "train.npz", x=np.zeros((4, 100, 6), np.float32), y=np.zeros(4, np.int32))
    p = tmp / "agent.toml"
    p.write_text(f'[agent]\nid = "dev-1"\ncache_dir = "{cache}"\n[data]\nsource = "npz:{tmp / "train.npz"}"\n')
    return p


def _agent(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_") and k != "STATE_DIRECTORY"}
    return subprocess.run([str(BIN / "fedmq-agent"), *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=env)


def test_predict_command(tmp_path, cache, served, task):
    cfg = _config(tmp_path, cache)
    np.savez(tmp_path / "data.npz", x=task["x"], y=task["y"])
    ref = LocalModel.open(cache).predict(task["x"])
    js = _agent("predict", "--config", str(cfg), "--input", str(tmp_path / "data.npz"), "--json")
    assert js.returncode == 0, js.stderr
    doc = json.loads(js.stdout)
    assert doc["labels"] == ref.labels.tolist() and (doc["run"], doc["round"]) == (RUN, 3)
    np.testing.assert_allclose(np.array(doc["probabilities"]), ref.probabilities, atol=1e-6)
    assert doc["accuracy"] == pytest.approx(aggregator_eval(served, task["round3"], task["x"], task["y"])[1])

    out = _agent("predict", "--config", str(cfg), "--input", str(tmp_path / "data.npz"), "--output",
                 str(tmp_path / "preds.npz"))
    assert out.returncode == 0, out.stderr
    with np.load(tmp_path / "preds.npz") as z:
        assert np.array_equal(z["labels"], ref.labels) and int(z["round"]) == 3 and str(z["model_id"]) == served.model_id

    text = _agent("predict", "--config", str(cfg), "--input", str(tmp_path / "data.npz"))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert len(lines) == N and [int(ln.split("\t")[1]) for ln in lines] == ref.labels.tolist()
    assert f"{N} predictions with the global model of run {RUN} round 3" in text.stderr


def test_predict_command_without_a_global_exits_2(tmp_path, cache, task):
    np.savez(tmp_path / "data.npz", x=task["x"][:3])
    (tmp_path / "empty").mkdir()
    none = _agent("predict", "--config", str(_config(tmp_path, tmp_path / "empty")), "--input",
                  str(tmp_path / "data.npz"))
    assert none.returncode == 2 and "no global model" in none.stderr and "Traceback" not in none.stderr
    np.savez(tmp_path / "nox.npz", inputs=task["x"][:3])
    nox = _agent("predict", "--config", str(_config(tmp_path, cache)), "--input", str(tmp_path / "nox.npz"))
    assert nox.returncode == 2 and "no array 'x'" in nox.stderr
    ok = _agent("predict", "--config", str(_config(tmp_path, cache)), "--input", str(tmp_path / "data.npz"))
    assert ok.returncode == 0, ok.stderr  # positive control


# -- serving between rounds ------------------------------------------------------------------------------


class Server:
    def __init__(self, cfg: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
        self.p = subprocess.Popen([str(BIN / "fedmq-agent"), "predict", "--config", str(cfg), "--serve", "--port", "0"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(ln) for ln in self.p.stdout], daemon=True).start()
        try:
            line = lines.get(timeout=60)
        except queue.Empty:
            self.p.kill()
            raise AssertionError("the server did not start: " + self.p.stderr.read()[-2000:]) from None
        assert line.startswith("serving predictions on http://127.0.0.1:"), line
        self.port = int(line.strip().rsplit(":", 1)[1])

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, json.loads(r.read() or b"null")
        finally:
            c.close()

    def predict(self, x) -> tuple[int, dict]:
        return self.request("POST", "/v1/predict", json.dumps({"x": np.asarray(x).tolist()}).encode(),
                            {"Content-Type": "application/json"})

    def stop(self) -> int:
        self.p.send_signal(signal.SIGTERM)
        return self.p.wait(30)


def test_serve_follows_the_agent_without_restarting(tmp_path, served, task):
    c = tmp_path / "cache"
    c.mkdir()
    srv = Server(_config(tmp_path, c))
    try:
        status, doc = srv.request("GET", "/v1/model")
        assert status == 503 and "no global model" in doc["error"]  # up before the agent has a model
        (c / "models").mkdir()
        (c / "models" / f"{served.model_id}.tflite").write_bytes(served.artifact)
        write_global(c, task["round3"], 3, served.model_id)
        status, doc = srv.request("GET", "/v1/model")
        assert status == 200 and (doc["round"], doc["model_id"], doc["x_shape"]) == (3, served.model_id, [100, 6])
        x = task["x"][:37]
        status, doc = srv.predict(x)
        assert status == 200 and doc["round"] == 3
        np.testing.assert_allclose(np.array(doc["probabilities"]), numpy_forward(task["round3"], served, x), atol=1e-5)
        write_global(c, task["round4"], 4, served.model_id)  # the agent accepted the next global
        status, doc = srv.predict(x)
        assert status == 200 and doc["round"] == 4
        np.testing.assert_allclose(np.array(doc["probabilities"]), numpy_forward(task["round4"], served, x), atol=1e-5)
        # a refused newer global: the verified one keeps being served
        _tamper(c, served, task, "shape")
        status, doc = srv.predict(x)
        assert status == 200 and doc["round"] == 4
        # untrusted requests
        assert srv.predict(np.zeros((2, 99, 6)))[0] == 400
        assert srv.request("POST", "/v1/predict", b"{not json", {"Content-Length": "9"})[0] == 400
        assert srv.request("POST", "/v1/predict", b'{"x": [[1, 2], [3]]}')[0] == 400
        assert srv.request("POST", "/v1/predict", b"", {"Content-Length": str(10**9)})[0] == 413
        assert srv.request("GET", "/nope")[0] == 404
        assert srv.predict(x[:1])[0] == 200  # still serving after all that
    finally:
        rc = srv.stop()
    assert rc == 0, srv.p.stderr.read()[-2000:]


# -- the other runtime ----------------------------------------------------------------------------------

TFLITE_SCRIPT = """
import sys, numpy as np
from fedmq.edge_agent import LocalModel
m = LocalModel.open(sys.argv[1])
with np.load(sys.argv[2]) as z:
    p = m.predict(z["x"])
np.savez(sys.argv[3], probabilities=p.probabilities, labels=p.labels)
print(m.runtime)
"""


@pytest.mark.tflite_runtime
def test_tflite_runtime_predicts_the_same(tmp_path, cache, task):
    py = Path(os.environ.get("FEDMQ_TFLITE_PYTHON") or ROOT / ".tflite-venv" / "bin" / "python")
    if not py.exists():
        pytest.skip("no tflite-runtime environment (.tflite-venv or FEDMQ_TFLITE_PYTHON)")
    np.savez(tmp_path / "x.npz", x=task["x"])
    (tmp_path / "s.py").write_text(TFLITE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
    env["FEDMQ_TFLITE_RUNTIME"] = "tflite_runtime"
    out = subprocess.run([str(py), str(tmp_path / "s.py"), str(cache), str(tmp_path / "x.npz"), str(tmp_path / "o.npz")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("tflite_runtime 2.")
    ref = LocalModel.open(cache).predict(task["x"])
    with np.load(tmp_path / "o.npz") as z:
        np.testing.assert_allclose(z["probabilities"], ref.probabilities, atol=1e-5)
        assert np.array_equal(z["labels"], ref.labels)


# -- a real federation -------------------------------------------------------------------------------------


@needs_mosquitto
@pytest.mark.network
def test_the_agent_predicts_what_the_aggregator_evaluated(tmp_path, broker, model_cache, task):
    """Aggregator and agent processes on a real broker, 2 rounds; then the agent's cache_dir holds the
    final global, and its predictions on the aggregator's eval data score the aggregator's eval_accuracy."""
    import uuid

    from fleet import Fleet

    x, y = task["x"], task["y"]
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    np.savez(tmp_path / "shard.npz", x=x[:120], y=y[:120])
    # max_payload 4 KiB: the global (~13 KB) travels chunked, and the agent stores the reassembled message
    f = Fleet(tmp_path, {"host": broker.host, "port": broker.port, "fleet": "p" + uuid.uuid4().hex[:8],
                         "max_payload": 4096}, model_cache=model_cache)
    try:
        f.start_aggregator(rounds={"rounds": 2, "min_agents": 1, "grace_s": 0.5},
                           eval={"dataset": f"npz:{tmp_path / 'eval.npz'}"})
        cfg = f.agent_config("dev-1", tmp_path / "shard.npz")  # (its ``agent`` argument is the id)
        cfg.write_text(cfg.read_text().replace("[agent]\n", "[agent]\nfollow_global = true\n", 1))
        assert "follow_global = true" in cfg.read_text()
        f.spawn("dev-1", "fedmq.edge_agent.cli", cfg)
        hist = tmp_path / "aggregator-state" / "history.jsonl"

        def rows():
            return [json.loads(ln) for ln in hist.read_text().splitlines()] if hist.exists() else []

        wait_until(lambda: len([r for r in rows() if r["outcome"] == "aggregated"]) >= 2, 120, what="two rounds")
        last = [r for r in rows() if r["outcome"] == "aggregated"][-1]
        cache = tmp_path / "dev-1-cache"
        wait_until(lambda: (cache / "global.msgpack").exists() and codec.decode(
            (cache / "global.msgpack").read_bytes()).round == last["round"], 60, what="the final global on the agent")
        m = LocalModel.open(cache)
        assert (m.round, m.run) == (last["round"], last["run"])
        assert (cache / "global.msgpack").stat().st_size > 3 * 4096  # it did arrive in chunks
        p = m.predict(x)
        assert int(np.sum(p.labels == y)) == round(last["eval_accuracy"] * len(y))
        nll = -np.mean(np.log(np.float64(p.probabilities[np.arange(len(y)), y])))
        assert nll == pytest.approx(last["eval_loss"], rel=1e-4)
    except BaseException:
        print(f.dump_logs())
        raise
    finally:
        f.stop_all()


def test_with_trusted_keys_only_a_global_signed_by_the_fleet_is_served(tmp_path, served, task):
    """Issue 15 point 1 on the device: the stored global's signature is checked before it is decoded."""
    from fedmq.broker.contract import signing
    from fedmq.edge_agent.local_model import GlobalRefused, LocalModel

    pem, public = signing.generate()
    other_pem, _ = signing.generate()
    c = tmp_path / "cache"
    (c / "models").mkdir(parents=True)
    (c / "models" / f"{served.model_id}.tflite").write_bytes(served.artifact)
    body = codec.encode(GlobalModel(3, served.model_id, task["round3"], 0.0, run=RUN))
    for payload, ok in ((body, False), (signing.Signer(other_pem).wrap("global", body), False),
                        (signing.Signer(pem).wrap("round", body), False),  # a signature made for another channel
                        (signing.Signer(pem).wrap("global", body), True)):  # the positive control
        (c / "global.msgpack").write_bytes(payload)
        if ok:
            m = LocalModel.open(c, trusted_keys=[public])
            assert m.info()["round"] == 3 and m.info()["run"] == RUN
            assert len(m.predict(task["x"][:4]).labels) == 4
        else:
            with pytest.raises(GlobalRefused):
                LocalModel.open(c, trusted_keys=[public])
    # without trusted keys (not configured) the signed envelope is still readable
    assert LocalModel.open(c) is not None
