"""A ``tf.Module`` around a Keras model: the stateless signatures devices run, and the same
math with ``tf.Variable`` state for TensorFlow (the reference the export is verified against).

The artifact's signatures (all TFLite builtins) hold no state: the weights, the optimizer state
and the FedProx anchor go in as inputs and the updated ones come out as outputs, which the device
feeds back in before the next step (``edge_agent.trainer``):

* ``train(x[B..], y[B], mask[B], lr[, mu], w000.., [a000..], [m000..], [v000..], [t])
  -> {loss, w000.., [m000..], [v000..], [t]}`` — one optimizer step on a fixed-size batch;
  ``mask`` (1 = real example, 0 = padding) lets the last partial batch be padded, not dropped;
  ``mu`` > 0 adds the FedProx term mu/2 * ||w - a||^2 with ``a`` the anchor (the global weights;
  only in artifacts exported with ``prox=True``); ``m`` (momentum, adam), ``v`` and ``t`` (adam) are
  the optimizer state, zeros at the start of a round.
* ``evaluate(x, y, w000..) -> {loss_sum, correct}`` and ``infer(x, w000..) -> {output}`` (softmax),
  any batch.

Why stateless: with resource variables every signature kept its own model-size buffers (the
variables, their initializer, set/get inputs and outputs, each signature's read copy), ~10 copies
of the weights for the FedAvg CNN; stateless, training holds its inputs, one gradient and its
outputs (bench/RESULTS.md, "stateless artifact"). The artifact holds no weights at all (~40 KB):
the weights travel in the GlobalModel message.

The TensorFlow side keeps plain ``tf.Variable`` copies and runs the model through
``stateless_call`` (Keras-3 variables and optimizers would not convert, see the notes); its
``train`` is the same ``_step`` assigned to the variables.
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


def state_key(prefix: str, i: int) -> str:
    """Names of the per-weight state inputs: ``a`` FedProx anchor, ``m`` first and ``v`` second moment."""
    return f"{prefix}{i:03d}"


class TrainableModule(tf.Module):
    def __init__(self, model: keras.Model, spec: TrainSpec) -> None:
        super().__init__(name="fedmq_trainable")
        if spec.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {spec.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        self.model = model
        self.spec = spec
        self.names = [v.path for v in model.trainable_variables]
        initial = [v.numpy() for v in model.trainable_variables]
        self.n = len(initial)
        self.w = [tf.Variable(w, name=weight_key(i)) for i, w in enumerate(initial)]
        self.nt = [tf.Variable(v.numpy(), trainable=False) for v in model.non_trainable_variables]
        self.anchor = [tf.Variable(w, trainable=False) for w in initial] if spec.prox else []
        self.m = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.w] if spec.optimizer != "sgd" else []
        self.v = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.w] if spec.optimizer == "adam" else []
        self.t = tf.Variable(0.0, trainable=False)
        self.num_classes = int(model.outputs[0].shape[-1])
        x_shape = tuple(model.inputs[0].shape[1:])
        self.x_shape = x_shape
        b = spec.batch_size
        batch = [tf.TensorSpec((b, *x_shape), tf.float32, name="x"), tf.TensorSpec((b,), tf.int32, name="y"),
                 tf.TensorSpec((b,), tf.float32, name="mask"), tf.TensorSpec((), tf.float32, name="lr")]
        mu = [tf.TensorSpec((), tf.float32, name="mu")] if spec.prox else []
        wspecs = [tf.TensorSpec(v.shape, v.dtype, name=weight_key(i)) for i, v in enumerate(self.w)]

        def like(prefix: str) -> list[tf.TensorSpec]:
            return [tf.TensorSpec(v.shape, v.dtype, name=state_key(prefix, i)) for i, v in enumerate(self.w)]

        state = wspecs + (like("a") if spec.prox else []) + (like("m") if self.m else []) + \
            (like("v") if self.v else []) + ([tf.TensorSpec((), tf.float32, name="t")] if self.v else [])
        # TensorFlow (the reference): state in variables
        if spec.prox:
            self.train = tf.function(self._train, input_signature=[*batch, *mu])
        else:
            self.train = tf.function(lambda x, y, mask, lr: self._train(x, y, mask, lr, 0.0), input_signature=batch)
        self.evaluate = tf.function(lambda x, y: self._evaluate(x, y, self.w), input_signature=[
            tf.TensorSpec((None, *x_shape), tf.float32, name="x"), tf.TensorSpec((None,), tf.int32, name="y")])
        self.infer = tf.function(lambda x: self._infer(x, self.w), input_signature=[
            tf.TensorSpec((None, *x_shape), tf.float32, name="x")])
        self.get_weights = tf.function(self._get_weights, input_signature=[])
        self.set_weights = tf.function(lambda *ws: self._set_weights(ws), input_signature=wspecs)
        # the artifact: stateless
        if spec.prox:
            self.lite_train = tf.function(lambda x, y, mask, lr, mu, *st: self._lite_train(x, y, mask, lr, mu, st),
                                          input_signature=[*batch, *mu, *state])
        else:
            self.lite_train = tf.function(lambda x, y, mask, lr, *st: self._lite_train(x, y, mask, lr, 0.0, st),
                                          input_signature=[*batch, *state])
        self.lite_evaluate = tf.function(lambda x, y, *w: self._evaluate(x, y, list(w)), input_signature=[
            tf.TensorSpec((None, *x_shape), tf.float32, name="x"), tf.TensorSpec((None,), tf.int32, name="y"),
            *wspecs])
        self.lite_infer = tf.function(lambda x, *w: self._infer(x, list(w)), input_signature=[
            tf.TensorSpec((None, *x_shape), tf.float32, name="x"), *wspecs])

    def _logits(self, x, training: bool, w):
        out, _ = self.model.stateless_call(w, self.nt, x, training=training)
        return out

    def _ce(self, logits, y):
        return -tf.reduce_sum(tf.one_hot(y, self.num_classes) * tf.nn.log_softmax(logits), axis=-1)

    def _step(self, x, y, mask, lr, mu, w, a, m, v, t):
        """One optimizer step: (loss, new w, new m, new v, new t). Pure: what both sides compute."""
        s = self.spec
        with tf.GradientTape() as tape:
            tape.watch(w)
            ce = self._ce(self._logits(x, True, w), y)
            loss = tf.reduce_sum(ce * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
        grads = tape.gradient(loss, w)
        if s.prox:  # FedProx: the gradient of mu/2 ||w - w_global||^2 is mu (w - w_global), added directly
            grads = [g + mu * (wi - ai) for g, wi, ai in zip(grads, w, a)]
        if s.optimizer == "sgd":
            return loss, [wi - lr * g for wi, g in zip(w, grads)], [], [], t
        if s.optimizer == "momentum":
            m_new = [s.momentum * mi + g for mi, g in zip(m, grads)]
            return loss, [wi - lr * mi for wi, mi in zip(w, m_new)], m_new, [], t
        t_new = t + 1.0
        c1 = 1.0 - tf.pow(s.beta1, t_new)
        c2 = 1.0 - tf.pow(s.beta2, t_new)
        m_new = [s.beta1 * mi + (1.0 - s.beta1) * g for mi, g in zip(m, grads)]
        v_new = [s.beta2 * vi + (1.0 - s.beta2) * tf.square(g) for vi, g in zip(v, grads)]
        w_new = [wi - lr * (mi / c1) / (tf.sqrt(vi / c2) + s.eps) for wi, mi, vi in zip(w, m_new, v_new)]
        return loss, w_new, m_new, v_new, t_new

    def _train(self, x, y, mask, lr, mu):
        w = [v.read_value() for v in self.w]
        loss, w_new, m_new, v_new, t_new = self._step(x, y, mask, lr, mu, w, self.anchor, self.m, self.v, self.t)
        for var, new in zip([*self.w, *self.m, *self.v], [*w_new, *m_new, *v_new]):
            var.assign(new)
        if self.v:
            self.t.assign(t_new)
        return {"loss": loss}

    def _lite_train(self, x, y, mask, lr, mu, st):
        n = self.n
        w, rest = list(st[:n]), list(st[n:])
        a, rest = (rest[:n], rest[n:]) if self.spec.prox else ([], rest)
        m, rest = (rest[:n], rest[n:]) if self.m else ([], rest)
        v, rest = (rest[:n], rest[n:]) if self.v else ([], rest)
        t = rest[0] if self.v else tf.constant(0.0)
        loss, w_new, m_new, v_new, t_new = self._step(x, y, mask, lr, mu, w, a, m, v, t)
        out = {"loss": loss, **{weight_key(i): t_ for i, t_ in enumerate(w_new)}}
        out.update({state_key("m", i): t_ for i, t_ in enumerate(m_new)})
        out.update({state_key("v", i): t_ for i, t_ in enumerate(v_new)})
        if self.v:
            out["t"] = t_new
        return out

    def _evaluate(self, x, y, w):
        logits = self._logits(x, False, w)
        correct = tf.cast(tf.equal(tf.cast(tf.argmax(logits, axis=-1), tf.int32), y), tf.float32)
        return {"loss_sum": tf.reduce_sum(self._ce(logits, y)), "correct": tf.reduce_sum(correct)}

    def _infer(self, x, w):
        return {"output": tf.nn.softmax(self._logits(x, False, w))}

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
        """The artifact's signatures (stateless)."""
        return {"train": self.lite_train.get_concrete_function(),
                "evaluate": self.lite_evaluate.get_concrete_function(),
                "infer": self.lite_infer.get_concrete_function()}

    def weights_numpy(self) -> list[np.ndarray]:
        return [w.numpy() for w in self.w]
