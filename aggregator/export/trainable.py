"""A ``tf.Module`` around a Keras model with the signatures on-device training needs.

Signatures (all converted to TFLite builtins):

* ``train(x[B..], y[B], mask[B], lr, mu) -> {loss}`` — one optimizer step on a fixed-size batch;
  ``mask`` (1 = real example, 0 = padding) lets the last partial batch be padded, not dropped;
  ``mu`` > 0 adds the FedProx term mu/2 * ||w - w_global||^2 (its gradient, to the update; the
  returned loss is the data loss).
* ``evaluate(x, y) -> {loss_sum, correct}`` and ``infer(x) -> {output}`` (softmax), any batch.
* ``get_weights() -> {w000..}``, ``set_weights(w000..)`` (also resets optimizer state and sets the
  FedProx anchor: a round starts from the global weights with a fresh local optimizer).

Weights are plain ``tf.Variable`` copies and the model runs through ``stateless_call``: Keras-3
variables and optimizers get no initializer in the .tflite (a silent failure, see the notes).
The optimizers are written here with ``tf.Variable`` state: sgd, momentum, adam.
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
        self.w = [tf.Variable(v.numpy(), name=weight_key(i)) for i, v in enumerate(model.trainable_variables)]
        self.nt = [tf.Variable(v.numpy(), trainable=False) for v in model.non_trainable_variables]
        self.anchor = [tf.Variable(v.numpy(), trainable=False) for v in model.trainable_variables]
        # optimizer state only where the optimizer needs it (each copy is a model-size buffer on the device)
        self.m = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.w] if spec.optimizer != "sgd" else []
        self.v = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.w] if spec.optimizer == "adam" else []
        self.t = tf.Variable(0.0, trainable=False)
        self.num_classes = int(model.outputs[0].shape[-1])
        x_shape = tuple(model.inputs[0].shape[1:])
        self.x_shape = x_shape
        b = spec.batch_size
        self.train = tf.function(self._train, input_signature=[
            tf.TensorSpec((b, *x_shape), tf.float32, name="x"), tf.TensorSpec((b,), tf.int32, name="y"),
            tf.TensorSpec((b,), tf.float32, name="mask"), tf.TensorSpec((), tf.float32, name="lr"),
            tf.TensorSpec((), tf.float32, name="mu")])
        self.evaluate = tf.function(self._evaluate, input_signature=[
            tf.TensorSpec((None, *x_shape), tf.float32, name="x"), tf.TensorSpec((None,), tf.int32, name="y")])
        self.infer = tf.function(self._infer, input_signature=[tf.TensorSpec((None, *x_shape), tf.float32, name="x")])
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        specs = [tf.TensorSpec(v.shape, v.dtype, name=weight_key(i)) for i, v in enumerate(self.w)]
        self.set_weights = tf.function(lambda *ws: self._set_weights(ws), input_signature=specs)

    def _logits(self, x, training: bool):
        out, _ = self.model.stateless_call(self.w, self.nt, x, training=training)
        return out

    def _ce(self, logits, y):
        return -tf.reduce_sum(tf.one_hot(y, self.num_classes) * tf.nn.log_softmax(logits), axis=-1)

    def _train(self, x, y, mask, lr, mu):
        with tf.GradientTape() as tape:
            ce = self._ce(self._logits(x, True), y)
            loss = tf.reduce_sum(ce * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
        # FedProx: the gradient of mu/2 ||w - w_global||^2 is mu (w - w_global), added directly
        # (cheaper on the device than differentiating the term; mu = 0 leaves plain local training)
        grads = [g + mu * (w - a) for g, w, a in zip(tape.gradient(loss, self.w), self.w, self.anchor)]
        s = self.spec
        if s.optimizer == "sgd":
            for w, g in zip(self.w, grads):
                w.assign_sub(lr * g)
        elif s.optimizer == "momentum":
            for w, m, g in zip(self.w, self.m, grads):
                m.assign(s.momentum * m + g)
                w.assign_sub(lr * m)
        else:
            self.t.assign_add(1.0)
            c1 = 1.0 - tf.pow(s.beta1, self.t)
            c2 = 1.0 - tf.pow(s.beta2, self.t)
            for w, m, v, g in zip(self.w, self.m, self.v, grads):
                m.assign(s.beta1 * m + (1.0 - s.beta1) * g)
                v.assign(s.beta2 * v + (1.0 - s.beta2) * tf.square(g))
                w.assign_sub(lr * (m / c1) / (tf.sqrt(v / c2) + s.eps))
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
        for w, a, new in zip(self.w, self.anchor, ws):
            w.assign(new)
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

    def weights_numpy(self) -> list[np.ndarray]:
        return [w.numpy() for w in self.w]
