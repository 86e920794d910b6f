"""The agent trains with no TensorFlow, in ai-edge-litert and in tflite-runtime (separate venv)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from fedmq.aggregator.export.convert import export_model  # noqa: E402
from fedmq.aggregator.export.keras_trainer import KerasTrainer  # noqa: E402
from fedmq.aggregator.export.trainable import TrainSpec  # noqa: E402
from fedmq.aggregator.export.zoo import ZOO  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "agent_parity_script.py"
STEPS = 20
# the export verification's learning rate and tolerances (fedmq.aggregator.export.convert): at a large rate a
# ReLU input that rounds the other way in one runtime sends the trajectories apart by an amount that
# depends on the CPU; at this one a correct runtime is within the tolerances on any machine
LR = 0.001
LOSS_TOL = 1e-3
UPDATE_TOL = 0.1


def tflite_python() -> str | None:
    p = os.environ.get("FEDMQ_TFLITE_PYTHON") or str(ROOT / ".tflite-venv" / "bin" / "python")
    return p if Path(p).exists() else None


@pytest.fixture(scope="module", params=["mlp", "sensor1d", "cnn"])
def case(request, tmp_path_factory):
    name = request.param
    keras.utils.set_random_seed(0)
    ex = export_model(ZOO[name](), TrainSpec(batch_size=8, prox=True), verify_steps=0)
    ker = KerasTrainer(ZOO[name](), batch_size=8)
    ker.set_weights(ex.initial_weights)
    rng = np.random.default_rng(5)
    shape = ex.inputs[0].shape
    xs = rng.normal(size=(STEPS, *shape)).astype(np.float32)
    # a learnable task (labels a fixed function of the inputs): random labels make the trajectory chaotic
    proj = rng.normal(size=(int(np.prod(shape[1:])), ker.num_classes))
    ys = np.argmax(xs.reshape(STEPS, shape[0], -1) @ proj, axis=-1).astype(np.int32)
    ms = np.ones((STEPS, shape[0]), np.float32)
    ms[-1, 5:] = 0.0  # a padded batch too
    ref = np.array([float(ker.module.train(x, y, m, np.float32(LR), np.float32(0.01))["loss"])
                    for x, y, m in zip(xs, ys, ms)])
    ref_w = ker.get_weights()
    path = tmp_path_factory.mktemp(name) / "case.npz"
    fit_x = rng.normal(size=(21, *shape[1:])).astype(np.float32)
    fit_y = rng.integers(0, ker.num_classes, size=21)
    np.savez(path, lr=np.float32(LR), artifact=np.frombuffer(ex.artifact, np.uint8), x=xs, y=ys, mask=ms, ref=ref, fit_x=fit_x,
             fit_y=fit_y, **{f"init{i}": w for i, w in enumerate(ex.initial_weights)},
             **{f"ref_w{i}": w for i, w in enumerate(ref_w)})
    return name, path


def run(python: str, case_path: Path, runtime: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FEDMQ_TFLITE_RUNTIME"}
    if runtime:
        env["FEDMQ_TFLITE_RUNTIME"] = runtime
    out_path = case_path.with_name(f"out-{runtime or 'default'}.npz")
    out = subprocess.run([python, str(SCRIPT), str(case_path), str(out_path)], capture_output=True, text=True,
                         env=env, timeout=300, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    case, got = np.load(case_path), np.load(out_path)
    n = len([k for k in case.files if k.startswith("init")])
    assert len(got.files) == n
    start = [case[f"init{i}"] for i in range(n)]
    ref = [case[f"ref_w{i}"] for i in range(n)]
    num = sum(float(np.sum((np.float64(got[f"w{i}"]) - ref[i]) ** 2)) for i in range(n))
    den = sum(float(np.sum((np.float64(ref[i]) - start[i]) ** 2)) for i in range(n))
    assert den > 0, "the reference did not move"
    r["update_diff"] = float(np.sqrt(num / den))
    return r


def assert_parity(r: dict) -> None:
    """Losses within the export's loss tolerance; the 20-step update within 10% of its norm."""
    assert r["max_diff"] <= LOSS_TOL and r["update_diff"] <= UPDATE_TOL, r


def test_agent_trains_with_tensorflow_blocked_in_litert(case):
    name, path = case
    r = run(sys.executable, path, None)
    assert r["runtime"].startswith("ai_edge_litert")
    assert r["tf_loaded"] is False
    assert_parity(r)
    assert np.isfinite(r["fit_loss"])


@pytest.mark.tflite_runtime
def test_tflite_runtime_parity_in_its_own_environment(case):
    py = tflite_python()
    if py is None:
        pytest.skip("no tflite-runtime environment: run `make tflite-venv` (tflite-runtime needs numpy<2)")
    name, path = case
    r = run(py, path, "tflite_runtime")
    assert r["runtime"].startswith("tflite_runtime 2.")
    assert r["numpy"].startswith("1."), "tflite-runtime must run on numpy < 2"
    assert r["tf_loaded"] is False
    assert_parity(r)
