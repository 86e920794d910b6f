"""A copy of a model built only from stock Keras layers: the final ``model.keras`` must load with
plain ``keras.models.load_model`` on a machine without fedmq.

fedmq's layers (``layers.py``) exist for their builtin-only *gradients*; their forward passes are
stock Keras ones, so each maps to its Keras namesake with the same weights:

* ``Dense``     -> ``keras.layers.Dense`` (same kernel and bias)
* ``Conv2D``    -> ``keras.layers.Conv2D`` (stride 1, same padding name; kernel [k, k, C, F] as is)
* ``Conv1D``    -> ``keras.layers.Conv1D`` (kernel [1, k, C, F] reshaped to Keras' [k, C, F])
* ``MaxPool2D`` -> ``keras.layers.MaxPooling2D(pool)``, ``MaxPool1D`` -> ``keras.layers.MaxPooling1D(pool)``

Every other layer is cloned from its config. The copy is checked against the original on a
random batch before it is returned (an architecture that does not map raises ExportError).
Layers of the operator's own module are cloned as they are, so that module is still needed to
load the file; a subclassed model (no functional graph) cannot be cloned and is refused.
"""

from __future__ import annotations

import logging

import keras
import numpy as np

from . import layers as fl

log = logging.getLogger(__name__)


def _plain_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    cfg = layer.get_config()
    common = {"name": layer.name, "dtype": cfg.get("dtype")}
    if isinstance(layer, fl.Conv1D):  # before Conv2D: Conv1D subclasses it
        return keras.layers.Conv1D(layer.filters, layer.kernel_size, padding=layer.padding,
                                   activation=layer.activation, **common)
    if isinstance(layer, fl.Conv2D):
        return keras.layers.Conv2D(layer.filters, layer.kernel_size, padding=layer.padding,
                                   activation=layer.activation, **common)
    if isinstance(layer, fl.MaxPool1D):
        return keras.layers.MaxPooling1D(layer.pool, **common)
    if isinstance(layer, fl.MaxPool2D):
        return keras.layers.MaxPooling2D(layer.pool, **common)
    if isinstance(layer, fl.Dense):
        cfg = {k: v for k, v in cfg.items() if k != "module" and k != "registered_name"}
        return keras.layers.Dense.from_config(cfg)
    return layer.__class__.from_config(cfg)


def to_plain_keras(model: keras.Model, *, strict: bool = False, atol: float = 1e-4, seed: int = 0) -> keras.Model:
    """A functional copy of ``model`` with fedmq's layers replaced by Keras' own, weights copied.

    When the copy cannot be made or computes differently: ExportError if ``strict``, else a
    warning and ``model`` itself (the final model is still written; loading it then needs fedmq).
    """
    try:
        return _to_plain(model, atol, seed)
    except Exception as e:
        if strict:
            raise
        log.warning("%s; saving the model as built (loading it needs fedmq's layers)", e)
        return model


def _to_plain(model: keras.Model, atol: float, seed: int) -> keras.Model:
    from .convert import ExportError

    pairs: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []

    def clone(layer):
        new = _plain_layer(layer)
        pairs.append((layer, new))
        return new

    try:
        plain = keras.models.clone_model(model, clone_function=clone, recursive=True)
    except Exception as e:  # noqa: BLE001 - keras raises several types for models it cannot clone
        raise ExportError(f"model {model.name!r} cannot be rebuilt from stock Keras layers "
                          f"({type(e).__name__}: {e}); build it with the functional API or keras.Sequential") from None
    for old, new in pairs:
        ws = old.get_weights()
        if isinstance(old, fl.Conv1D) and ws:
            ws = [ws[0].reshape(ws[0].shape[1:]), *ws[1:]]
        if ws:
            new.set_weights(ws)
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    x = np.random.default_rng(seed).normal(size=(4, *shape)).astype(np.float32)
    a, b = model.predict(x, verbose=0), plain.predict(x, verbose=0)  # predict: fedmq convs run in a tf.function
    diff = float(np.max(np.abs(a - b)))
    if not diff <= atol:
        raise ExportError(f"the stock-Keras copy of {model.name!r} computes differently (max |diff| {diff:.2e}): "
                          "not saved")
    log.debug("plain-Keras copy of %s matches (max |diff| %.1e)", model.name, diff)
    return plain


def inference_tflite(model: keras.Model) -> bytes:
    """The final inference artifact: one signature ``serving_default(x) -> {output}``, softmax output.

    ``x`` is float32 [batch, *input shape] with a dynamic batch (the signature runner resizes it;
    the raw tensor API starts at batch 1: ``resize_tensor_input`` first). Input and output are named here rather than
    by the converter, whose default input name (``keras_tensor_<n>``) changes from run to run.
    """
    import tensorflow as tf

    shape = tuple(int(d) for d in model.inputs[0].shape[1:])

    # the weights as constants through stateless_call: Keras-3 variables captured by a tf.function
    # convert to resource variables without an initializer, and READ_VARIABLE fails in the interpreter
    trainable = [tf.constant(v.numpy()) for v in model.trainable_variables]
    frozen = [tf.constant(v.numpy()) for v in model.non_trainable_variables]

    @tf.function(input_signature=[tf.TensorSpec((None, *shape), tf.float32, name="x")])
    def serve(x):
        logits, _ = model.stateless_call(trainable, frozen, x, training=False)
        return {"output": tf.nn.softmax(logits)}

    import tempfile

    module = tf.Module()
    module.serve = serve
    with tempfile.TemporaryDirectory(prefix="fedmq-final-") as d:  # a SavedModel: the signature keeps its names
        tf.saved_model.save(module, d, signatures={"serving_default": serve.get_concrete_function()})
        return tf.lite.TFLiteConverter.from_saved_model(d, signature_keys=["serving_default"]).convert()
