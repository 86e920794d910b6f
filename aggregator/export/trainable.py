"""A ``tf.Module`` around a Keras model with the signatures on-device training needs.

Signatures (all converted to TFLite builtins):

* ``train(x[B..], y[B], mask[B], lr, mu) -> {loss}`` — one optimizer step on a fixed-size batch;
  ``mask`` (1 = real example, 0 = padding) lets the last partial batch be padded, not dropped;
  ``mu`` > 0 adds the FedProx term mu/2 * ||w - w_global||^2 (its gradient, to the update; the
  returned loss is the data loss). Only artifacts exported with ``prox=True`` hold the anchor
  (a model-size buffer on the device) and take the ``mu`` input; the others have no ``mu``.
* ``evaluate(x, y) -> {loss_sum, correct}`` and ``infer(x) -> {output}`` (softmax), any batch.
* ``get_weights() -> {w000..}``, ``set_weights(w000..)`` (also resets optimizer state and sets the
  FedProx anchor: a round starts from the global weights with a fresh local optimizer).

Weights are plain ``tf.Variable`` copies and the model runs through ``stateless_call``: Keras-3
variables and optimizers get no initializer in the .tflite (a silent failure, see the notes).
The optimizers are written here with ``tf.Variable`` state: sgd, momentum, adam.

Device memory is what limits the CNN on a Pi, so the artifact holds few model-size buffers:
each variable is read once per step (that read serves the forward pass and the update), no
optimizer state for plain SGD, and the FedProx anchor only when exported with ``prox``.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclass(frozen=True)
class TrainSpec:
    batch_size: int = 32
    optimizer: str = "sgd"
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-7
    prox: bool = False  # hold the FedProx anchor (needed when the round's mu > 0)


def weight_key(i: int) -> str:
    return f"w{i:03d}"


class TrainableModule(tf.Module):
    def __init__(self, model: keras.Model, spec: TrainSpec) -> None:
        super().__init__(name="fedmq_trainable")
        if spec.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {spec.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        self.model = model
        self.spec = spec
        self.names = [v.path for v in model.trainable_variables]
        initial = [v.numpy() for v in model.trainable_variables]
        self.w = [tf.Variable(w, name=weight_key(i)) for i, w in enumerate(initial)]
        self.nt = [tf.Variable(v.numpy(), trainable=False) for v in model.non_trainable_variables]
        self.anchor = [tf.Variable(w, trainable=False) for w in initial] if spec.prox else []
        # optimizer state only where the optimizer needs it (each copy is a model-size buffer on the device)
        self.m = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.w] if spec.optimizer != "sgd" else []
        self.v = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.w] if spec.optimizer == "adam" else []
        self.t = tf.Variable(0.0, trainable=False)
        self.num_classes = int(model.outputs[0].shape[-1])
        x_shape = tuple(model.inputs[0].shape[1:])
        self.x_shape = x_shape
        b = spec.batch_size
        train_sig = [tf.TensorSpec((b, *x_shape), tf.float32, name="x"), tf.TensorSpec((b,), tf.int32, name="y"),
                     tf.TensorSpec((b,), tf.float32, name="mask"), tf.TensorSpec((), tf.float32, name="lr")]
        if spec.prox:
            self.train = tf.function(self._train, input_signature=[*train_sig, tf.TensorSpec((), tf.float32, name="mu")])
        else:
            self.train = tf.function(lambda x, y, mask, lr: self._train(x, y, mask, lr, 0.0), input_signature=train_sig)
        self.evaluate = tf.function(self._evaluate, input_signature=[
            tf.TensorSpec((None, *x_shape), tf.float32, name="x"), tf.TensorSpec((None,), tf.int32, name="y")])
        self.infer = tf.function(self._infer, input_signature=[tf.TensorSpec((None, *x_shape), tf.float32, name="x")])
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        specs = [tf.TensorSpec(v.shape, v.dtype, name=weight_key(i)) for i, v in enumerate(self.w)]
        self.set_weights = tf.function(lambda *ws: self._set_weights(ws), input_signature=specs)

    def _logits(self, x, training: bool, w=None):
        out, _ = self.model.stateless_call(self.w if w is None else w, self.nt, x, training=training)
        return out

    def _ce(self, logits, y):
        return -tf.reduce_sum(tf.one_hot(y, self.num_classes) * tf.nn.log_softmax(logits), axis=-1)

    def _train(self, x, y, mask, lr, mu):
        s = self.spec
        w = [v.read_value() for v in self.w]  # one read per variable, for the forward pass and the update
        with tf.GradientTape() as tape:
            tape.watch(w)
            ce = self._ce(self._logits(x, True, w), y)
            loss = tf.reduce_sum(ce * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
        grads = tape.gradient(loss, w)
        if s.prox:  # FedProx: the gradient of mu/2 ||w - w_global||^2 is mu (w - w_global), added directly
            grads = [g + mu * (wi - a) for g, wi, a in zip(grads, w, self.anchor)]
        if s.optimizer == "sgd":
            for v, wi, g in zip(self.w, w, grads):
                v.assign(wi - lr * g)
        elif s.optimizer == "momentum":
            for v, wi, m, g in zip(self.w, w, self.m, grads):
                m_new = s.momentum * m + g
                m.assign(m_new)
                v.assign(wi - lr * m_new)
        else:
            self.t.assign_add(1.0)
            c1 = 1.0 - tf.pow(s.beta1, self.t)
            c2 = 1.0 - tf.pow(s.beta2, self.t)
            for v, wi, m, vv, g in zip(self.w, w, self.m, self.v, grads):
                m_new = s.beta1 * m + (1.0 - s.beta1) * g
                v_new = s.beta2 * vv + (1.0 - s.beta2) * tf.square(g)
                m.assign(m_new)
                vv.assign(v_new)
                v.assign(wi - lr * (m_new / c1) / (tf.sqrt(v_new / c2) + s.eps))
        return {"loss": loss}

    def _evaluate(self, x, y):
        logits = self._logits(x, False)
        correct = tf.cast(tf.equal(tf.cast(tf.argmax(logits, axis=-1), tf.int32), y), tf.float32)
        return {"loss_sum": tf.reduce_sum(self._ce(logits, y)), "correct": tf.reduce_sum(correct)}

    def _infer(self, x):
        return {"output": tf.nn.softmax(self._logits(x, False))}

    def _get_weights(self):
        return {weight_key(i): tf.identity(w) for i, w in enumerate(self.w)}

    def _set_weights(self, ws):
        for w, new in zip(self.w, ws):
            w.assign(new)
        for a, new in zip(self.anchor, ws):
            a.assign(new)
        for m in self.m:
            m.assign(tf.zeros_like(m))
        for v in self.v:
            v.assign(tf.zeros_like(v))
        self.t.assign(0.0)
        return {"n": tf.constant(len(ws), tf.int32)}

    def signatures(self) -> dict:
        return {"train": self.train.get_concrete_function(), "evaluate": self.evaluate.get_concrete_function(),
                "infer": self.infer.get_concrete_function(), "get_weights": self.get_weights.get_concrete_function(),
                "set_weights": self.set_weights.get_concrete_function()}

    def zero_weights(self) -> None:
        """Set the weights (and the FedProx anchor) to zeros: what an export saves."""
        for v in [*self.w, *self.anchor]:
            v.assign(tf.zeros_like(v))

    def weights_numpy(self) -> list[np.ndarray]:
        return [w.numpy() for w in self.w]
