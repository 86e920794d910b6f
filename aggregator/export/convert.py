"""Convert a Keras model to a verified, trainable TFLite artifact.

``export_model`` saves a TrainableModule with its stateless signatures, converts it with builtins
only, then refuses the artifact unless:

1. it needs no Flex/custom op (else ExportError names the ops and the replacement layers);
2. it holds no variable (weights and optimizer state go through the signatures: a variable would be
   Keras state captured by the model, which devices could neither set nor federate);
3. weights set in the device's own trainer (``edge_agent.trainer``) come back bit-identical from the
   train signature's inputs and, after a step with lr = 0, from its outputs; ``evaluate`` and ``infer``
   given the weights agree with TensorFlow's within ``tolerance``;
4. on the same batches, the TFLite ``train`` losses equal TensorFlow's within ``tolerance``
   (1e-3), and the weight update after the steps equals TensorFlow's within ``update_tolerance``
   (10% of its norm). Correct artifacts agree to ~1e-6 on both, except when a ReLU input or a
   max-pool tie rounds the other way in one runtime: then the losses drift apart by up to ~3e-4
   and the update by ~2% (the CNN, seed 1, batch 10). An artifact that trains differently
   (momentum instead of SGD) is 7e-3 to 0.3 away in loss and 77-85% in the update.

The artifact's id is the SHA-256 of its bytes; its tensor specs travel in the ModelManifest so
agents need no model code. It carries no weights (the FedAvg CNN's is ~35 KB): they travel where
they belong, in the GlobalModel message, and agents (and the verification) set them before training.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from fedmq.broker.contract.messages import ARTIFACT_FORMAT, ModelManifest, TensorSpec
from fedmq.broker.errors import ConfigError

from .trainable import TrainableModule, TrainSpec, weight_key

log = logging.getLogger(__name__)

FORMAT = ARTIFACT_FORMAT
REPLACEMENTS = {
    "ReluGrad": "activation='relu' -> fedmq.aggregator.export.layers.Dense(..., activation='relu') or layers.relu",
    "Relu6Grad": "relu6 -> tf.minimum(tf.maximum(x, 0), 6)",
    "Conv2DBackpropFilter": "keras Conv2D/Conv1D -> fedmq.aggregator.export.layers.Conv2D / Conv1D",
    "Conv2DBackpropInput": "keras Conv2D/Conv1D -> fedmq.aggregator.export.layers.Conv2D / Conv1D",
    "MaxPoolGrad": "keras MaxPooling2D/1D -> fedmq.aggregator.export.layers.MaxPool2D / MaxPool1D",
    "BroadcastGradientArgs": "a None batch dimension in train -> export with a fixed batch size",
}


class ExportError(Exception):
    """The model cannot be turned into a trainable builtin-only artifact (message says why)."""


class ModelRefused(ExportError, ConfigError):
    """The model as given cannot be served (a layer, an op, an unimportable module): a usage error.

    Being a ConfigError, it makes ``fedmq-aggregator run/simulate/export`` exit 2; the message names
    the layer (or module) and what to use instead. Verification failures stay plain ExportErrors.
    """

    reason = "model_refused"


# layers whose state or randomness cannot be federated / run on-device, with what to use instead
_NOT_FEDERATED = ("its moving mean and variance are non-trainable state that is neither learned on-device "
                  "nor averaged by the aggregator (only trainable weights travel), so the served model would "
                  "normalize with mean 0 / variance 1; use keras.layers.LayerNormalization or "
                  "keras.layers.GroupNormalization (both export and train on-device), or remove it")
_RANDOM = ("it draws random numbers in training, and the random ops (StatelessRandomUniformV2, ...) are not "
           "builtins of the on-device interpreters; remove it (for regularization: a smaller layer, fewer local "
           "epochs, or FedProx with [train] mu > 0)")
REFUSED_LAYERS = {
    "BatchNormalization": _NOT_FEDERATED,
    "Dropout": _RANDOM, "SpatialDropout1D": _RANDOM, "SpatialDropout2D": _RANDOM, "SpatialDropout3D": _RANDOM,
    "GaussianDropout": _RANDOM, "AlphaDropout": _RANDOM, "GaussianNoise": _RANDOM, "RandomFlip": _RANDOM,
    "RandomRotation": _RANDOM, "RandomZoom": _RANDOM, "RandomTranslation": _RANDOM, "RandomCrop": _RANDOM,
    "RandomContrast": _RANDOM, "RandomBrightness": _RANDOM,
}
# stock Keras layers whose gradients are not builtins, with the fedmq layer that replaces them
_STOCK = {
    "Conv2D": ("Conv2DBackpropFilter", "fedmq.aggregator.export.layers.Conv2D"),
    "Conv1D": ("Conv2DBackpropFilter", "fedmq.aggregator.export.layers.Conv1D"),
    "MaxPooling2D": ("MaxPoolGrad", "fedmq.aggregator.export.layers.MaxPool2D"),
    "MaxPooling1D": ("MaxPoolGrad", "fedmq.aggregator.export.layers.MaxPool1D"),
    "ReLU": ("ReluGrad", "fedmq.aggregator.export.layers.relu (e.g. in a keras.layers.Lambda)"),
}


def _all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def check_model(model: keras.Model) -> None:
    """Refuse, before converting, the layers that would export wrongly or not at all (ModelRefused).

    Every refusal names the layer, its class and what to use; all of them are reported at once.
    """
    problems: list[str] = []
    for layer in _all_layers(model):
        cls = type(layer).__name__
        where = f"layer {layer.name!r} ({cls})"
        if cls in REFUSED_LAYERS:
            problems.append(f"{where}: {REFUSED_LAYERS[cls]}")
            continue
        if type(layer).__module__.startswith("fedmq."):
            continue
        if cls in _STOCK:
            op, use = _STOCK[cls]
            problems.append(f"{where}, stock Keras: its gradient needs {op}, which the on-device interpreters "
                            f"lack; use {use}")
        elif cls == "Dense" and getattr(layer.activation, "__name__", "") == "relu":
            problems.append(f"{where}, stock Keras with activation='relu': its gradient needs ReluGrad; use "
                            f"fedmq.aggregator.export.layers.Dense(..., activation='relu')")
        elif cls == "Activation" and getattr(layer.activation, "__name__", "") == "relu":
            problems.append(f"{where} 'relu': its gradient needs ReluGrad; use keras.layers.Lambda("
                            f"fedmq.aggregator.export.layers.relu) or an activation='relu' on a fedmq layer")
        elif layer.non_trainable_weights and not isinstance(layer, keras.Model):
            names = ", ".join(w.name for w in layer.non_trainable_weights)
            problems.append(f"{where}: non-trainable weights ({names}) are not federated (only trainable weights "
                            f"travel); remove it or make them trainable")
    if problems:
        raise ModelRefused(f"model {model.name!r} cannot be trained on devices as built:\n  " + "\n  ".join(problems))


@dataclass
class Exported:
    artifact: bytes
    model_id: str
    names: list[str]  # Keras variable paths, in weight order
    weights: list[TensorSpec]
    inputs: list[TensorSpec]
    spec: TrainSpec
    initial_weights: list[np.ndarray]
    verification: dict[str, float]

    def manifest(self, extra: dict[str, float] | None = None) -> ModelManifest:
        return ModelManifest(self.model_id, self.artifact, self.weights, self.inputs, self.spec.batch_size,
                             time.time(), dict(extra or {}), FORMAT)


def _flex_ops_from_error(msg: str) -> list[str]:
    ops = set(re.findall(r"tf\.(\w+)", msg)) | set(re.findall(r"Flex(\w+)", msg))
    return sorted(o for o in ops if o[:1].isupper())  # op names are CamelCase ("tf.entry_function" is not one)


def _builtin_name(oc) -> str:
    """Name of a flatbuffer OperatorCode's builtin op ("FILL", "CALL_ONCE", ...)."""
    from tensorflow.lite.python import schema_py_generated as schema

    code = max(oc.builtinCode, oc.deprecatedBuiltinCode)
    return next((k for k, v in vars(schema.BuiltinOperator).items() if v == code and not k.startswith("_")), str(code))


STATE_OPS = ("VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE")


def inspect_ops(artifact: bytes) -> tuple[set[str], int]:
    """(op names, subgraph count) read from the flatbuffer."""
    from tensorflow.lite.tools import flatbuffer_utils

    m = flatbuffer_utils.convert_bytearray_to_object(bytearray(artifact))
    ops: set[str] = set()
    for oc in m.operatorCodes:
        if oc.customCode:
            ops.add("custom:" + oc.customCode.decode() if isinstance(oc.customCode, bytes) else str(oc.customCode))
        else:
            ops.add(_builtin_name(oc))
    return ops, len(m.subgraphs)


def check_artifact(artifact: bytes) -> None:
    """Refuse artifacts with Flex/custom ops or with state (variables) of their own."""
    ops, _ = inspect_ops(artifact)
    custom = sorted(o for o in ops if o.startswith("custom:"))
    if custom:
        raise ExportError(f"artifact contains custom/Flex ops {custom}: not runnable on devices")
    state = sorted(o for o in ops if o in STATE_OPS)
    if state:
        raise ExportError(f"artifact holds variables ({', '.join(state)}): the model captures state of its own "
                          "(a Keras variable read outside the weights given to stateless_call?); devices can "
                          "neither set nor federate it")


def load_model_fn(ref: str):
    """``zoo:NAME`` or ``package.module:function`` -> a callable returning a keras.Model."""
    import importlib

    mod, _, fn = ref.partition(":")
    if not fn:
        raise ModelRefused(f"model reference {ref!r}: use 'zoo:NAME' or 'package.module:function'")
    if mod == "zoo":
        from .zoo import ZOO

        if fn not in ZOO:
            raise ModelRefused(f"no zoo model {fn!r}; available: {', '.join(ZOO)}")
        return ZOO[fn]
    try:
        return getattr(importlib.import_module(mod), fn)
    except ModuleNotFoundError as e:
        top = mod.split(".")[0]
        hint = (f"; fedmq does not look in the current directory: put the directory that holds {top}/ (or {top}.py) "
                f"on PYTHONPATH (e.g. PYTHONPATH=. fedmq-aggregator ...) or pip install -e the project "
                f"(docs/models.md)") if (e.name or "") in (mod, top) or mod.startswith((e.name or "?") + ".") else ""
        raise ModelRefused(f"cannot load model function {ref!r}: {e}{hint}") from None
    except (ImportError, AttributeError) as e:
        raise ModelRefused(f"cannot load model function {ref!r}: {e}") from None


def convert(module: TrainableModule) -> bytes:
    with tempfile.TemporaryDirectory(prefix="fedmq-export-") as d:
        tf.saved_model.save(module, d, signatures=module.signatures())
        conv = tf.lite.TFLiteConverter.from_saved_model(d, signature_keys=list(module.signatures()))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        try:
            return conv.convert()
        except Exception as e:  # the converter raises ConverterError with the op list
            ops = _flex_ops_from_error(str(e))
            hints = [f"  {op}: {REPLACEMENTS[op]}" for op in ops if op in REPLACEMENTS]
            raise ModelRefused(
                "the model needs TensorFlow ops that the on-device interpreters cannot run: "
                + (", ".join(ops) or str(e)[:500]) + ("\nreplace:\n" + "\n".join(hints) if hints else "")
            ) from None


def export_model(model: keras.Model, spec: TrainSpec = TrainSpec(), *, verify_steps: int = 20,
                 tolerance: float = 1e-3, update_tolerance: float = 0.1, seed: int = 0) -> Exported:
    """Export and verify; raises ExportError when the artifact must not be published.

    ModelRefused (a subclass) when the model itself cannot be served: a refused layer (check_model)
    or an op the converter cannot make a builtin of.
    """
    check_model(model)
    module = TrainableModule(model, spec)
    init = module.weights_numpy()
    artifact = convert(module)
    check_artifact(artifact)
    b = spec.batch_size
    weights = [TensorSpec(weight_key(i), tuple(w.shape), str(w.dtype)) for i, w in enumerate(init)]
    inputs = [TensorSpec("x", (b, *module.x_shape), "float32"), TensorSpec("y", (b,), "int32")]
    exported = Exported(artifact, hashlib.sha256(artifact).hexdigest(), module.names, weights, inputs, spec,
                        init, {})
    if verify_steps:
        exported.verification = verify(module, exported, verify_steps, tolerance, seed, update_tolerance)
    return exported


def verify(module: TrainableModule, ex: Exported, steps: int, tolerance: float, seed: int,
           update_tolerance: float = 0.1) -> dict[str, float]:
    """Train the artifact with the device's own trainer next to TensorFlow (see the module docstring)."""
    from fedmq.edge_agent.trainer import TFLiteTrainer

    try:
        trainer = TFLiteTrainer(ex.artifact, ex.model_id)
    except ValueError as e:  # ArtifactError: signatures or tensors not what the device needs
        raise ExportError(f"the device trainer refuses the artifact: {e}") from None
    runtime = trainer.runtime
    rng = np.random.default_rng(seed)
    b = ex.spec.batch_size
    num_classes = module.num_classes
    # 1. the weights in and out of the interpreter, bit-identical: set/get through the train signature's
    # inputs, and a step with lr = 0 must return them unchanged through its outputs
    probe = [rng.normal(size=w.shape).astype(np.float32) for w in ex.weights]
    trainer.set_weights(probe)
    trainer.prepare()
    x0 = rng.normal(size=(b, *module.x_shape)).astype(np.float32)
    y0 = rng.integers(0, num_classes, size=b).astype(np.int32)
    for what in ("set/get round trip", "a step with lr = 0"):
        for w, p, got in zip(ex.weights, probe, trainer.get_weights()):
            if not np.array_equal(got, p):
                raise ExportError(f"{what} is not bit-identical for {w.name}")
        if what == "set/get round trip":
            trainer.step(x0, y0, np.ones(b, np.float32), 0.0, 0.0)
    # 2. evaluate and infer with given weights: TFLite vs TensorFlow
    trainer.set_weights(ex.initial_weights)
    module.set_weights(*[tf.constant(i) for i in ex.initial_weights])
    lite_loss, _ = trainer.evaluate(x0, y0)  # (accuracy: an argmax tie may round either way in one runtime)
    ref_loss = float(module.evaluate(x0, y0)["loss_sum"]) / b
    if not abs(lite_loss - ref_loss) <= tolerance * max(1.0, abs(ref_loss)):
        raise ExportError(f"TFLite evaluate loss {lite_loss:.6f} differs from TensorFlow's {ref_loss:.6f} ({runtime})")
    lite_p, ref_p = trainer.predict(x0), module.infer(x0)["output"].numpy()
    if lite_p.shape != ref_p.shape or not np.allclose(lite_p, ref_p, atol=tolerance):
        raise ExportError(f"TFLite infer differs from TensorFlow's by {float(np.max(np.abs(lite_p - ref_p))):.2e} "
                          f"({runtime})")
    # 3. same batches, same losses: TFLite vs TensorFlow
    worst = 0.0
    # small: at 0.01 a ReLU input rounding to the other side of 0 in one runtime (the CNN, step 12 of
    # seed 0) already moved the losses apart by 2e-4; at 0.001 the 20-step losses agree to ~5e-7
    lr = np.float32(0.001)
    mu = np.float32(0.01) if ex.spec.prox else None
    # a learnable task (labels a fixed function of the inputs): with random labels the trajectory
    # is chaotic and float rounding differences between the two runtimes grow without bound
    proj = rng.normal(size=(int(np.prod(module.x_shape)), num_classes)).astype(np.float32)
    for _ in range(steps):
        x = rng.normal(size=(b, *module.x_shape)).astype(np.float32)
        y = np.argmax(x.reshape(b, -1) @ proj, axis=-1).astype(np.int32)
        mask = np.ones(b, np.float32)
        lite = trainer.step(x, y, mask, lr, 0.0 if mu is None else float(mu))
        ref = float(module.train(x, y, mask, lr, *([mu] if mu is not None else []))["loss"])
        if not np.isfinite(lite):
            raise ExportError(f"TFLite training produced a non-finite loss ({runtime})")
        worst = max(worst, abs(lite - ref))
        if worst > tolerance:
            raise ExportError(f"TFLite loss {lite:.6f} differs from TensorFlow's {ref:.6f} by {worst:.2e} "
                              f"(> {tolerance}) at step {_ + 1} ({runtime})")
    # 4. the update the steps made, TFLite vs TensorFlow, relative to its size
    lite_w, tf_w = trainer.get_weights(), module.weights_numpy()
    num = sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(lite_w, tf_w))
    den = sum(float(np.sum((b.astype(np.float64) - i) ** 2)) for b, i in zip(tf_w, ex.initial_weights))
    update_diff = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    if not update_diff <= update_tolerance:
        raise ExportError(f"TFLite training updates differ from TensorFlow's by {update_diff:.1%} of their norm "
                          f"(> {update_tolerance:.0%}) after {steps} steps ({runtime})")
    module.set_weights(*[tf.constant(i) for i in ex.initial_weights])
    log.info("artifact %s verified with %s: %d steps, max |loss diff| %.2e, update diff %.1e", ex.model_id[:12],
             runtime, steps, worst, update_diff)
    return {"steps": float(steps), "max_loss_diff": worst, "update_diff": update_diff}
