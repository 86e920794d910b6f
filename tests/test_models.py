"""Models an operator brings (docs/models.md): the supported layers export and train with parity,
refused layers are named with what to use (exit 2), fedmq's Conv defaults match Keras', and the
final model.keras loads with plain Keras where fedmq is not importable."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from fedmq.aggregator.config import ModelSection  # noqa: E402
from fedmq.aggregator.export import layers as fl  # noqa: E402
from fedmq.aggregator.export.convert import ExportError, ModelRefused, check_model, export_model, load_model_fn  # noqa: E402, E501
from fedmq.aggregator.export.plain import to_plain_keras  # noqa: E402
from fedmq.aggregator.export.trainable import TrainSpec, weight_key  # noqa: E402
from fedmq.aggregator.model_store import ServedModel, export_final  # noqa: E402
from fedmq.broker.contract.messages import TensorSpec  # noqa: E402
from fedmq.broker.errors import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TFLITE_PY = ROOT / ".tflite-venv" / "bin" / "python"
CLI = ROOT / ".venv" / "bin" / "fedmq-aggregator"


def image_model():
    """Every 2-D layer docs/models.md lists as supported, in one graph."""
    inp = keras.Input((8, 8, 2))
    a = fl.Conv2D(4, 3, activation="relu", name="c_valid")(inp)
    b = fl.Conv2D(4, 3, padding="same", activation="tanh", name="c_same")(inp)
    b = fl.MaxPool2D(2, name="pool")(b)
    a = keras.layers.GlobalAveragePooling2D(name="gap2")(a)
    b = keras.layers.Flatten(name="flat")(b)
    x = keras.layers.Concatenate(name="cat")([a, b])
    x = keras.layers.LayerNormalization(name="ln")(x)
    h = fl.Dense(x.shape[-1], activation="sigmoid", name="h")(x)
    x = keras.layers.Add(name="add")([x, h])
    return keras.Model(inp, fl.Dense(3, name="logits")(x), name="img")


def sequence_model():
    """The 1-D layers, Reshape, GroupNormalization and an Activation layer."""
    inp = keras.Input((24,))
    x = keras.layers.Reshape((12, 2), name="reshape")(inp)
    x = fl.Conv1D(4, 3, activation="relu", name="c1")(x)
    x = fl.MaxPool1D(2, name="p1")(x)
    x = keras.layers.GroupNormalization(groups=2, name="gn")(x)
    x = keras.layers.GlobalAveragePooling1D(name="gap1")(x)
    x = fl.Dense(8, activation="relu", name="d")(x)
    x = keras.layers.Activation("tanh", name="act")(x)
    return keras.Model(inp, fl.Dense(3, name="logits")(x), name="seq")


@pytest.mark.parametrize("build", [image_model, sequence_model])
def test_supported_layers_export_and_train_with_parity(build):
    """export_model checks, in a real TFLite interpreter, 20 train steps against TensorFlow's."""
    keras.utils.set_random_seed(0)
    ex = export_model(build(), TrainSpec(batch_size=8), verify_steps=20)
    v = ex.verification
    assert v["steps"] == 20 and v["max_loss_diff"] <= 1e-3 and v["update_diff"] <= 0.1


def test_conv_defaults_match_keras():
    """fedmq's Conv2D/Conv1D pad "valid" by default, as Keras does; "same" when asked."""
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    for kw in ({}, {"padding": "same"}, {"padding": "valid", "activation": "tanh"}):
        ours = keras.Sequential([keras.Input((8, 8, 3)), fl.Conv2D(5, 3, **kw)])
        ref = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(5, 3, **kw)])
        assert ours.output_shape == ref.output_shape
        ref.set_weights(ours.get_weights())  # same kernel layout [k, k, C, F]
        np.testing.assert_allclose(ours.predict(x, verbose=0), ref.predict(x, verbose=0), atol=1e-5)
    assert keras.Sequential([keras.Input((10, 2)), fl.Conv1D(3, 5)]).output_shape == (None, 6, 3)
    with pytest.raises(ValueError, match="padding 'causal'"):
        fl.Conv2D(2, 3, padding="causal")
    with pytest.raises(ValueError, match="square kernel"):
        fl.Conv2D(2, (3, 5))


def test_zoo_convolutions_keep_their_same_padding():
    """The zoo's CNNs say padding="same" explicitly: the same shapes (and parameter counts) as before."""
    cnn = load_model_fn("zoo:cnn")()
    assert cnn.get_layer("flatten").output.shape[-1] == 7 * 7 * 64
    assert cnn.count_params() == 1_663_370
    s = load_model_fn("zoo:sensor1d")()
    assert s.get_layer("conv2").output.shape[1:] == (100, 32)


def refused_model():
    inp = keras.Input((16,))
    x = fl.Dense(8, activation="relu", name="h")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Dropout(0.3, name="drop")(x)
    x = keras.layers.Dense(8, activation="relu", name="stock")(x)
    return keras.Model(inp, fl.Dense(3, name="logits")(x))


def test_refused_layers_are_named_with_what_to_use():
    with pytest.raises(ModelRefused) as e:
        export_model(refused_model(), TrainSpec(batch_size=4), verify_steps=0)
    msg = str(e.value)
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ExportError)  # exit 2 from every command
    assert "layer 'bn1' (BatchNormalization)" in msg and "LayerNormalization" in msg and "GroupNormalization" in msg
    assert "layer 'drop' (Dropout)" in msg and "remove it" in msg
    assert "layer 'stock' (Dense)" in msg and "fedmq.aggregator.export.layers.Dense" in msg
    assert "entry_function" not in msg
    # a nested model is searched too
    inner = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(name="inner_bn")], name="inner")
    inp = keras.Input((4,))
    with pytest.raises(ModelRefused, match="layer 'inner_bn'"):
        check_model(keras.Model(inp, fl.Dense(2)(inner(inp))))
    # positive control: the suggested replacement passes the check and exports (test above trains it)
    inp = keras.Input((16,))
    x = keras.layers.LayerNormalization(name="ln")(fl.Dense(8, activation="relu")(inp))
    check_model(keras.Model(inp, fl.Dense(3)(x)))


BYO = '''
import keras
from fedmq.aggregator.export import layers as fl

def bn():
    inp = keras.Input((6,))
    x = keras.layers.BatchNormalization(name="bn1")(fl.Dense(8, activation="relu")(inp))
    return keras.Model(inp, fl.Dense(3)(x))

def dropout():
    inp = keras.Input((6,))
    x = keras.layers.Dropout(0.5, name="drop1")(fl.Dense(8, activation="relu")(inp))
    return keras.Model(inp, fl.Dense(3)(x))

def ln():
    inp = keras.Input((6,))
    x = keras.layers.LayerNormalization(name="ln1")(fl.Dense(8, activation="relu")(inp))
    return keras.Model(inp, fl.Dense(3)(x))
'''


def _cli(args, cwd, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=300, cwd=str(cwd), env=env)


@pytest.mark.slow  # ~20 s: three TensorFlow start-ups
def test_export_cli_refuses_with_exit_2_and_exports_the_alternative(tmp_path):
    (tmp_path / "mymodels.py").write_text(BYO)
    r = _cli(["export", "--model", "mymodels:bn", "--out", "o/bn.tflite"], tmp_path, pythonpath=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "layer 'bn1' (BatchNormalization)" in r.stderr and "LayerNormalization" in r.stderr
    r = _cli(["export", "--model", "mymodels:dropout", "--out", "o/do.tflite"], tmp_path, pythonpath=tmp_path)
    assert r.returncode == 2 and "layer 'drop1' (Dropout)" in r.stderr, r.stderr[-2000:]
    r = _cli(["export", "--model", "mymodels:ln", "--out", "o/ln.tflite", "--batch-size", "4"], tmp_path,
             pythonpath=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "ln.tflite").stat().st_size > 0


def test_model_module_not_on_the_path_is_caught_by_run_check(tmp_path):
    """The documented custom-model example, from the repo root: without PYTHONPATH=. it is not importable."""
    cfg = tmp_path / "agg.toml"
    cfg.write_text(textwrap.dedent(f"""
        [broker]
        host = "127.0.0.1"
        port = 1883
        [service]
        state_dir = "{tmp_path / 'state'}"
        [model]
        source = "examples.custom_model:small_cnn"
    """))
    r = _cli(["run", "--check", "--config", str(cfg)], ROOT)
    assert r.returncode == 2 and "PYTHONPATH" in r.stderr and "examples" in r.stderr, r.stderr[-2000:]
    r = _cli(["run", "--check", "--config", str(cfg)], ROOT, pythonpath=".")
    assert r.returncode == 0, r.stderr[-2000:]  # positive control: the fix the message names works


def _final(tmp_path, source):
    """export_final (what the service writes at the end of a run) with seeded non-trivial weights."""
    keras.utils.set_random_seed(1)
    model = load_model_fn(source)()
    rng = np.random.default_rng(0)
    ws = [(rng.normal(size=v.shape) * 0.2).astype(np.float32) for v in model.trainable_variables]
    specs = [TensorSpec(weight_key(i), tuple(w.shape), "float32") for i, w in enumerate(ws)]
    served = ServedModel(b"", "", [], specs, [], 16, ws)
    out = tmp_path / "final"
    export_final(ModelSection(source=source), served, {s.name: w for s, w in zip(specs, ws)}, out)
    for v, w in zip(model.trainable_variables, ws):
        v.assign(w)
    return model, out


NO_FEDMQ = """
import sys, json
sys.modules["fedmq"] = None  # this machine has no fedmq: any import of it fails
import numpy as np, keras
m = keras.models.load_model(sys.argv[1])
x = np.load(sys.argv[2])
np.save(sys.argv[3], m.predict(x, verbose=0))
print(json.dumps({"fedmq_loaded": any(k == "fedmq" or k.startswith("fedmq.") for k, v in sys.modules.items()
                                      if v is not None), "layers": sorted({type(l).__module__.split(".")[0]
                                                                           for l in m.layers})}))
"""

TFLITE = """
import sys, json, numpy as np
from tflite_runtime.interpreter import Interpreter
it = Interpreter(model_path=sys.argv[1])
sig = it.get_signature_list()
run = it.get_signature_runner("serving_default")
np.save(sys.argv[3], run(x=np.load(sys.argv[2]))["output"])
print(json.dumps(sig))
"""


def _fresh(py, script, *args, cwd):
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run([str(py), "-I", "-c", script, *map(str, args)], capture_output=True, text=True, timeout=300,
                       cwd=str(cwd), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("source", ["zoo:sensor1d", "examples.custom_model:small_cnn", "zoo:mlp"])
def test_final_keras_loads_without_fedmq_and_agrees_with_the_tflite(tmp_path, source, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # examples.custom_model, as PYTHONPATH=. would
    model, out = _final(tmp_path, source)
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    x = np.random.default_rng(2).normal(size=(5, *shape)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ref = tf.nn.softmax(model.predict(x, verbose=0)).numpy()  # the fedmq model itself, with the final weights
    got = _fresh(sys.executable, NO_FEDMQ, out / "model.keras", tmp_path / "x.npy", tmp_path / "k.npy", cwd=tmp_path)
    assert got["fedmq_loaded"] is False and got["layers"] == ["keras"]
    logits = np.load(tmp_path / "k.npy")
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), ref, atol=1e-5)  # .keras holds logits
    if not TFLITE_PY.exists():
        pytest.skip("no .tflite-venv")
    sig = _fresh(TFLITE_PY, TFLITE, out / "model.tflite", tmp_path / "x.npy", tmp_path / "t.npy", cwd=tmp_path)
    assert sig == {"serving_default": {"inputs": ["x"], "outputs": ["output"]}}
    np.testing.assert_allclose(np.load(tmp_path / "t.npy"), ref, atol=1e-5)  # tflite-runtime, batch 5


def test_the_no_fedmq_check_is_effective(tmp_path):
    """Positive control: a model saved with fedmq's own layers does not load in that process."""
    model = load_model_fn("zoo:mlp")()
    model.save(tmp_path / "raw.keras")
    np.save(tmp_path / "x.npy", np.zeros((1, 64), np.float32))
    r = subprocess.run([sys.executable, "-I", "-c", NO_FEDMQ, str(tmp_path / "raw.keras"), str(tmp_path / "x.npy"),
                        str(tmp_path / "o.npy")], capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                       env={"PATH": os.environ.get("PATH", ""), "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode != 0 and "fedmq" in r.stderr


def test_plain_copy_refuses_a_model_it_cannot_rebuild():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = fl.Dense(2)

        def call(self, x):
            return self.d(x)

    m = Sub()
    m(np.zeros((1, 3), np.float32))
    with pytest.raises(ExportError, match="cannot be rebuilt"):
        to_plain_keras(m, strict=True)
    assert to_plain_keras(m) is m  # not strict (the service): saved as built, with a warning
